"""Shared test helpers: the project root on sys.path, the offline data folder, small configs."""
import atexit
import json
import os
import subprocess
import sys
import tempfile
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# the suite tests the kernels and the PyTorch path, each test setting DIFFLM_KERNELS where it tests the switch:
# one left in the shell (0, trust) would fail every kernel test with "did not build", or skip the checks
os.environ.pop("DIFFLM_KERNELS", None)


def shared_data():
    """../shared/data (or wherever $DIFFLM_DATA points): the GPT-2 BPE files and unshipped corpora.
    Tiny Shakespeare and E2E ship in data/ and need no copy; a test that needs one fails if absent."""
    path = os.environ.get("DIFFLM_DATA") or os.path.join(ROOT, "..", "shared", "data")
    if not os.path.isfile(os.path.join(path, "gpt2", "vocab.bpe")):
        pytest.fail(f"shared data not found: set DIFFLM_DATA to the folder with gpt2/vocab.bpe (tried {path})")
    return os.path.abspath(path)


OFFLINE = {"DIFFLM_DATA": "", "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


STARTUP = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "LD_", "MALLOC", "CUDA_", "TORCH_", "PYTORCH_",
           "TORCHDYNAMO_", "TORCHINDUCTOR_FORCE", "NPY_", "NUMPY_")  # what torch, numpy and the interpreter read as they start
FORKSERVER = {}  # the running tests/forkserver.py and the environment it started with


def forked(args, cwd, env, timeout):
    """`python <args>` as a child of tests/forkserver.py -> CompletedProcess, or None where a fresh interpreter
    must run it: not a script there, not Linux (macOS frameworks are not safe to fork into), or an environment
    that differs in what is read at start-up."""
    if sys.platform != "linux" or not args[0].endswith(".py") or not os.path.isfile(os.path.join(cwd, args[0])):
        return None
    if not FORKSERVER or FORKSERVER["proc"].poll() is not None:
        base = {**os.environ, "OMP_NUM_THREADS": env["OMP_NUM_THREADS"]}
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "forkserver.py")], env=base,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        atexit.register(proc.kill)
        FORKSERVER.update(proc=proc, env=base)
    startup = lambda e: {k: v for k, v in e.items() if k.startswith(STARTUP)}  # noqa: E731
    if startup(env) != startup(FORKSERVER["env"]):
        return None
    proc = FORKSERVER["proc"]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        request = {"args": args, "cwd": cwd, "env": env, "out": out, "err": err, "timeout": timeout}
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            answer = proc.stdout.readline().split()
            if not answer:
                raise RuntimeError("tests/forkserver.py died during this run; run the tests again")
            code, killed = map(int, answer)
        except BaseException:  # out of step with its answers (an interrupted test, a dead server): the next call starts another
            proc.kill()
            FORKSERVER.clear()
            raise
        with open(out) as f_out, open(err) as f_err:
            stdout, stderr = f_out.read(), f_err.read()
    if killed:
        raise subprocess.TimeoutExpired([sys.executable] + args, timeout, stdout, stderr)
    return subprocess.CompletedProcess([sys.executable] + args, code, stdout, stderr)


def run_cli(args, cwd=None, env=None, check=True, timeout=600):
    """Run `python <args>` from the project root; return the CompletedProcess. A script runs as a child
    of tests/forkserver.py (torch already imported: ~2 s less each time), anything else in a fresh one."""
    e = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    e.update(env or {})
    r = forked(args, cwd or ROOT, e, timeout) or subprocess.run(
        [sys.executable] + args, cwd=cwd or ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """tiny Shakespeare at char level, prepared once per test session into a temp folder from the
    copy shipped in data/ (no $DIFFLM_DATA, no network)."""
    out = tmp_path_factory.mktemp("shakespeare_char")
    run_cli(["data/shakespeare_char/prepare.py", f"--out_dir={out}"], env=OFFLINE)
    return str(out)


def relabelled(src, dst):
    """A copy of the prepared folder src (its files linked) whose meta.json swaps two words of the vocabulary:
    the same ids, other meanings, as a folder prepared again with other settings would give."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if name != "meta.json":
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    meta = json.load(open(os.path.join(src, "meta.json")))
    meta["words"][4], meta["words"][5] = meta["words"][5], meta["words"][4]
    json.dump(meta, open(os.path.join(dst, "meta.json"), "w"))
    return str(dst)


def write_toy_dataset(path, sequences, chars):
    """A dataset folder from lists of token ids (the toy languages of the learning tests)."""
    import numpy as np
    import corpus
    flat = [i for s in sequences for i in s]
    n = int(0.9 * len(flat))
    corpus.write_split(str(path), np.array(flat[:n]), np.array(flat[n:]),
                       {"tokenizer": "char", "chars": list(chars), "vocab_size": len(chars)})
    return str(path)


def fixed_batches(*xs):
    """A stand-in for corpus batches that hands out the batches xs: .sequential(split, batch_size) yields each in turn
    (--eval's pass over a split, sized), .get(split, batch_size, gen) returns the first (the evaluations during training)."""
    return types.SimpleNamespace(sequential=lambda split, batch_size: tuple(xs), get=lambda split, batch_size, gen=None: xs[0])


def terms_and_grads(model, fns, *args):
    """Each fn(model, *args) -> per-position terms (B, L) from the same seeded draw; returns the
    terms of each and the gradient of their sum w.r.t. every parameter (two ways of computing one
    loss, compared by the caller)."""
    import torch
    losses, grads = [], []
    for fn in fns:
        model.zero_grad()
        torch.manual_seed(1)  # the same noise draw
        terms = fn(model, *args)
        terms.sum().backward()
        losses.append(terms.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    return losses, grads


def host_syncs(fn):
    """How many times fn() would wait for a GPU, counted on the CPU by the ops that do: a value read on the host
    (.item(), bool(), float()), nonzero, masked_select, an index or index_put by a boolean mask. Each drains
    the GPU's queue before the host goes on. Ops that a C++ extension calls inside its own op are not seen."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name in ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.equal", "aten.is_nonzero") \
                    or name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_") \
                    and any(i is not None and i.dtype == torch.bool for i in args[1]):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n
