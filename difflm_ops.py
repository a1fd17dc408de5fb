"""
difflm_ops.py: the fused ops of csrc/, and the one place that decides when an op replaces the
readable PyTorch function (its oracle) in a method file.

A method file marks a function that a fused op computes too, and writes only the math in it:

    @difflm_ops.fused("sedd_euler_step")
    def euler_step(log_score, xt, rate_dt, u, graph, shift=None):
        ...

euler_step(...) runs the op when the extension is built for the inputs' device and the op takes
them (fp32/bf16 scores, a graph it knows), else the body. euler_step.oracle is the body (tests
call it directly); euler_step.kernel is the op alone, with no check and no fallback.

The first use of an op on a device in a process checks it against its oracle on small random
inputs (odd sizes, both dtypes, masked and unmasked rows, the backward of score_entropy and rotary,
the sampling steps on the oracle's uniforms). An op that disagrees, raises, or gives a NaN the
oracle does not is switched off for the process with one warning naming it and the largest
difference; its oracle runs instead.

    DIFFLM_KERNELS=0       no ops: every marked function runs its oracle, nothing is built
    DIFFLM_KERNELS=trust   the ops run without the first-use check

The extension is a prebuilt `difflm_kernels` (DIFFLM_BUILD_EXT=1 pip install -e . --no-build-isolation)
or a JIT build of csrc/ with ninja, cached in $DIFFLM_BUILD (default ~/.cache/difflm); a failed build is one
warning and the oracles run.

  load()              torch.ops.difflm, or None;  available(device): the ops run there
  prepare(device)     every op's first-use check now, before torch.compile traces a model
  fused(name)         the decorator above; FUSED maps each op name to its marked function
  oracles_only()      a context in which every marked function runs its oracle
  replace(name, op)   a context in which op stands in for a built op, checked like one (how the
                      tests inject a wrong op)
"""

import contextlib
import functools
import glob
import importlib.util
import inspect
import itertools
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
# Apple's clang has no OpenMP: on macOS the C++ ops build without it, their loops on one thread
OPENMP = () if sys.platform == "darwin" else ("-fopenmp",)
PREBUILD = "DIFFLM_BUILD_EXT=1 pip install -e . --no-build-isolation"  # the ahead-of-time build (setup.py)
_LOADED = {}  # src_dir -> torch.ops.difflm, or None
FUSED = {}  # op name -> the Fused wrapper of its oracle (every marked function)
_HOOKS_RUN = set()  # op names whose on_load hook has run (once per process)
_PASSED = {}  # (op name, device) -> True (the op runs) / False (switched off)
_CHECK_SECONDS = {}  # (op name, device) -> seconds its first-use check took
_STANDINS = {}  # op name -> a callable used in place of the built op (replace())
_ORACLES_ONLY = []  # non-empty inside oracles_only()


# ----------------------------------------------------------------------------------------------
# Building and loading csrc/


@contextlib.contextmanager
def _build_lock(build):
    """Hold an OS lock on the build folder while torch builds or loads into it. Up to torch 2.13,
    torch's own marker file (build/lock, a FileBaton) outlives a killed build, and every later load
    would then wait on it forever, silently; under the OS lock (freed when its holder dies) a marker
    left there is stale. Later torch holds an OS lock on that file itself, and the file stays."""
    from torch.utils import cpp_extension
    try:
        import fcntl
    except ImportError:  # not a POSIX system: torch's marker alone
        yield
        return
    with open(os.path.join(build, "difflm.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        stale = os.path.join(build, "lock")
        if hasattr(cpp_extension, "FileBaton") and os.path.exists(stale):
            warnings.warn(f"removing {stale}, left by a kernel build that was killed")
            os.remove(stale)
        yield


def build_dir(kind):
    """The JIT build's cache folder for kind ("cpu" or "cuda"), one per torch version and, for CUDA, per GPU
    architecture: a home folder shared by a cluster's A100 and H100 nodes, or kept across a torch upgrade,
    must not hand one of them a module built for the other (nvcc builds for the GPU it sees)."""
    tag = f"{kind}-torch{torch.__version__}"
    if kind == "cuda":
        tag += "-sm{}{}".format(*torch.cuda.get_device_capability())
    return os.path.join(os.environ.get("DIFFLM_BUILD", os.path.expanduser("~/.cache/difflm")), tag)


def _build(sources):
    """JIT-build sources (ninja, cached per torch version and device) -> torch.ops.difflm, or None with one warning.
    A failed CUDA build (nvcc missing, or not the CUDA torch was built with) falls back to the C++ ops
    alone, so the CPU keeps its kernels and the GPU runs the PyTorch path."""
    from torch.utils import cpp_extension
    cuda = any(f.endswith(".cu") for f in sources)
    failure = None
    for kind in (("cuda", "cpu") if cuda else ("cpu",)):
        try:
            build = build_dir(kind)
            os.makedirs(build, exist_ok=True)
            with _build_lock(build):
                cpp_extension.load(
                    name="difflm_kernels", is_python_module=False, build_directory=build, verbose=False,
                    sources=[f for f in sources if kind == "cuda" or f.endswith(".cpp")],
                    extra_cflags=["-O3", *OPENMP] + (["-DDIFFLM_CUDA"] if kind == "cuda" else []),
                    extra_ldflags=list(OPENMP), extra_cuda_cflags=["-O3"])  # a new list: load() appends to it
        except Exception as e:
            failure = failure or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        if kind == "cpu" and cuda:
            warnings.warn(f"difflm CUDA kernels failed to build ({failure}); the C++ kernels are built, "
                          "tensors on the GPU take the PyTorch path")
        return torch.ops.difflm
    warnings.warn(f"difflm kernels failed to build ({failure}); using the PyTorch path "
                  "(set DIFFLM_KERNELS=0 to skip the build)")
    return None


def load(src_dir=None):
    """The compiled extension (ops under torch.ops.difflm), or None.

    The module built by `DIFFLM_BUILD_EXT=1 pip install -e . --no-build-isolation` when there is one
    (rebuild it after editing csrc/), else a JIT build of csrc/ with ninja, cached. None when DIFFLM_KERNELS=0, when
    csrc/ has no sources, or when the build fails (one warning; the readable PyTorch path runs).
    """
    src_dir = src_dir or os.path.join(ROOT, "csrc")
    if src_dir in _LOADED:
        return _LOADED[src_dir]
    module = None
    if not disabled():
        sources = sorted(glob.glob(os.path.join(src_dir, "*.cpp")))
        if torch.cuda.is_available():
            sources += sorted(glob.glob(os.path.join(src_dir, "*.cu")))
        if src_dir == os.path.join(ROOT, "csrc") and importlib.util.find_spec("difflm_kernels"):
            try:
                import difflm_kernels  # noqa: F401  (importing it registers torch.ops.difflm)
                sources, module = [], torch.ops.difflm
            except (ImportError, OSError) as e:  # built for another torch: the JIT build below, cached per version
                warnings.warn(f"the prebuilt difflm_kernels does not load ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''}); building csrc/ instead; rebuild it "
                              f"with `{PREBUILD}` or delete it")
            if module is not None and torch.cuda.is_available() and not module.cuda_built():
                warnings.warn("the prebuilt difflm_kernels has no CUDA part (it was built without a GPU), so tensors "
                              f"on the GPU take the PyTorch path; rebuild it here with `{PREBUILD}`, "
                              "or delete it for the JIT build")
        if sources:
            module = _build(sources)
    _LOADED[src_dir] = module
    if module is not None:
        _register_fakes()
        for f in list(FUSED.values()):
            _run_hook(f)
    return module


def available(device):
    """True when the built ops run on this device (cpu, or cuda with the CUDA part built)."""
    k = load()
    device = torch.device(device)
    return k is not None and (device.type == "cpu" or (device.type == "cuda" and k.cuda_built()))


def _register_fakes():
    """Shape-only implementations, so that torch.compile can trace through the ops (once per process).
    They also serve meta tensors, so they refuse a mix of devices (a meta xt beside CPU scores would
    otherwise return a CPU tensor of uninitialised memory), naming the argument as the binding does."""
    if "fakes" in _HOOKS_RUN:
        return
    _HOOKS_RUN.add("fakes")

    def fake(name, shape_of):
        schema = getattr(torch.ops.difflm, name).default._schema
        names = [arg.name for arg in schema.arguments]

        def impl(*args, **kwargs):
            tensors = [(n, t) for n, t in zip(names, args) if isinstance(t, torch.Tensor)]
            first, ref = tensors[0]
            for n, t in tensors[1:]:
                if t.device != ref.device:
                    raise RuntimeError(f"difflm: {n} must be on {ref.device} like {first}, got {t.device}")
            return shape_of(*args)
        torch.library.register_fake("difflm::" + name, impl)

    fake("score_entropy", lambda log_score, *a: log_score.new_empty(log_score.shape[:2], dtype=torch.float32))
    fake("score_entropy_backward", lambda grad_loss, log_score, *a: torch.empty_like(log_score))
    fake("score_entropy_with_grad", lambda log_score, *a: (
        log_score.new_empty(log_score.shape[:2], dtype=torch.float32), torch.empty_like(log_score)))
    for name in ("sedd_euler_step", "sedd_tweedie_step", "mdlm_ancestral_step"):
        fake(name, lambda scores, xt, *a: torch.empty_like(xt))
    for name in ("nearest_embedding", "nearest_embedding_screened"):
        fake(name, lambda x, E, *a: x.new_empty(x.shape[:1], dtype=torch.long))
    fake("rotary", lambda qkv, *a: qkv.new_empty(qkv.shape))


def register_rotary_autograd(ops):
    """The autograd of the rotary op, the on_load hook of common.apply_rotary: the backward of a rotation
    is the rotation the other way, the op with transpose flipped."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], inputs[2])
        ctx.transpose = inputs[3]

    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        return ops.rotary(grad, cos, sin, not ctx.transpose), None, None, None

    torch.library.register_autograd("difflm::rotary", backward, setup_context=setup_context)


def _run_hook(f):
    if f.on_load is not None and f.name not in _HOOKS_RUN:
        _HOOKS_RUN.add(f.name)
        f.on_load(torch.ops.difflm)


# ----------------------------------------------------------------------------------------------
# The dispatch point


def _trust():
    return os.environ.get("DIFFLM_KERNELS", "1").strip().lower() == "trust"


def disabled():
    """DIFFLM_KERNELS=0 (or off, false, no): every op runs its PyTorch version."""
    return os.environ.get("DIFFLM_KERNELS", "1").strip().lower() in ("0", "off", "false", "no")


class Fused:
    """A readable oracle that a fused op may replace; see the module docstring."""

    def __init__(self, name, oracle, on_load):
        self.name, self.oracle, self.on_load = name, oracle, on_load
        self.spec = SPECS[name]
        self._signature = inspect.signature(oracle)
        self._n_args = len(self._signature.parameters)  # counted once: torch 2.6's compile cannot trace inspect.Signature
        functools.update_wrapper(self, oracle)

    def _args(self, args, kwargs):
        if not kwargs and len(args) == self._n_args:
            return args  # every argument given in order: the common call, and one made per layer and token
        a = self._signature.bind(*args, **kwargs)
        a.apply_defaults()
        return a.args  # positional, defaults filled in

    def __call__(self, *args, **kwargs):
        a = self._args(args, kwargs)
        if self.spec.device(a).type != "meta" and not torch.compiler.is_compiling():
            self.spec.refuse(a)  # inputs on which op and oracle would differ: an error on both paths
        return self.kernel(*a) if self._use_kernel(a) else self.oracle(*a)

    def kernel(self, *args, **kwargs):
        """The fused op on the oracle's arguments (adapted to what the binding takes); no fallback."""
        op = _STANDINS.get(self.name) or self.spec.call
        return op(*self._args(args, kwargs))

    def _use_kernel(self, a):
        if _ORACLES_ONLY:
            return False
        device = self.spec.device(a)
        if torch.compiler.is_compiling():  # nothing is built or checked in a trace: decided by prepare()
            return _PASSED.get((self.name, str(device)), False) and self.spec.takes(a)
        return available(device) and self.spec.takes(a) and self.passed(device)

    def passed(self, device):
        """Whether the op runs on device (built there): its first-use check, once per process."""
        key = (self.name, str(device))
        if key not in _PASSED:
            _PASSED[key] = _trust() or self.self_check(device)
        return _PASSED[key]

    def self_check(self, device):
        """Run the op and its oracle on the spec's small inputs; False (with one warning) when they disagree."""
        t0, device = time.perf_counter(), torch.device(device)
        try:  # the check is about the op, not the caller's modes: no autocast, autograd available
            with torch.inference_mode(False), torch.autocast(device.type, enabled=False):
                worst, what = self.spec.check(self, device)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            if not device_runs(device):  # a GPU fault is sticky: the oracle cannot run either
                raise RuntimeError(f"difflm kernel {self.name} on {device}: its first-use check hit a GPU error ({first}), "
                                   "after which nothing runs on this device in this process; rerun with DIFFLM_KERNELS=0 "
                                   "to use the PyTorch path") from e
            worst, what = math.inf, f"it raised {type(e).__name__}: {first}"
        _CHECK_SECONDS[self.name, str(device)] = time.perf_counter() - t0
        if worst <= 1:
            return True
        warnings.warn(f"difflm kernel {self.name} on {device} disagrees with its PyTorch oracle ({what}); "
                      "it is switched off for this process and the oracle runs instead")
        return False



def device_runs(device):
    """Whether device still computes: after a GPU fault (an illegal address, a device-side assert), which may
    surface as torch's "CUDA error: ..." or as an op's own "CUDA kernel ... failed", every later call fails."""
    try:
        return torch.ones(1, device=device).add(1).item() == 2
    except Exception:
        return False


def fused(name, on_load=None):
    """Decorator: the function is the oracle of op `name`; on_load(torch.ops.difflm) runs once after
    the extension loads (SEDD's score entropy and common's rotary register their autograd through it)."""
    def wrap(oracle):
        f = Fused(name, oracle, on_load)
        FUSED[name] = f
        if any(m is not None for m in _LOADED.values()):
            _run_hook(f)
        return f
    return wrap


def prepare(device):
    """Load the extension and decide every marked op for device now, before torch.compile traces a
    model: a trace neither builds nor checks (a build would break the graph), so an op left undecided
    is traced as its oracle."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # tensors name their GPU
    if available(device):
        for f in FUSED.values():
            f.passed(device)


@contextlib.contextmanager
def oracles_only():
    """Inside: every marked function runs its oracle (as with DIFFLM_KERNELS=0), e.g. to compare a
    whole training step or sampler with and without the ops."""
    _ORACLES_ONLY.append(True)
    try:
        yield
    finally:
        _ORACLES_ONLY.pop()


@contextlib.contextmanager
def replace(name, op):
    """Inside: op(*oracle's arguments) stands in for the built op `name`, and is checked afresh on
    first use like a built op. The hook through which tests inject a wrong op."""
    forget = lambda: [_PASSED.pop(k) for k in list(_PASSED) if k[0] == name]  # noqa: E731
    _STANDINS[name] = op
    forget()
    try:
        yield
    finally:
        del _STANDINS[name]
        forget()


# ----------------------------------------------------------------------------------------------
# The ops: which inputs each takes, how its arguments are adapted to the binding, and its check


def _float_scores(t):
    return t.dtype in (torch.float32, torch.bfloat16)


def _ids(*ts):
    return all(t.dtype == torch.long for t in ts)


def _same_device(a):
    """Every tensor argument on one device: a mixed call runs the oracle (and fails there as PyTorch does)."""
    devices = {x.device for x in a if isinstance(x, torch.Tensor)}
    return len(devices) == 1


def _shift_ok(shift):
    return shift is None or shift.is_floating_point() and not shift.requires_grad


def _shift(shift):
    return None if shift is None else shift.float().contiguous()


def _score_entropy(log_score, xt, x0, sigma_bar, graph, shift):
    """On the CPU, when a gradient will be asked for, the loss's pass writes the gradient too: there
    the exps cost more than the bytes. On a GPU (and under torch.compile) the forward only reads and
    the backward recomputes."""
    k = torch.ops.difflm
    args = (log_score.contiguous(), xt.contiguous(), x0.contiguous(), sigma_bar, graph, _shift(shift))
    if (log_score.device.type == "cpu" and log_score.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        return k.score_entropy_with_grad(*args)[0]
    return k.score_entropy(*args)


def _sedd_euler_step(log_score, xt, rate_dt, u, graph, shift):
    return torch.ops.difflm.sedd_euler_step(log_score.contiguous(), xt.contiguous(), rate_dt.double().contiguous(),
                                            u.contiguous(), graph, _shift(shift))


def _sedd_tweedie_step(log_score, xt, dsigma, u, graph, final, shift):
    return torch.ops.difflm.sedd_tweedie_step(log_score.contiguous(), xt.contiguous(), dsigma.double().contiguous(),
                                              u.contiguous(), graph, final, _shift(shift))


def _mdlm_ancestral_step(logits, xt, p_unmask, u, mask_id):
    return torch.ops.difflm.mdlm_ancestral_step(logits.contiguous(), xt.contiguous(), p_unmask.double().contiguous(),
                                                u.contiguous(), mask_id)


def _rotary(qkv, cos, sin):
    return torch.ops.difflm.rotary(qkv if qkv.stride(-1) == 1 else qkv.contiguous(), cos, sin)


def _rotary_takes(a):
    qkv, cos, sin = a
    table = (qkv.shape[1], 1, 1, qkv.shape[-1]) if qkv.dim() == 5 and qkv.shape[2] == 3 else None
    return (_float_scores(qkv) and qkv.shape[-1] % 2 == 0 and qkv.numel() > 0 and _same_device(a)
            and all(t.shape == table and t.dtype == torch.float32 and t.is_contiguous() and not t.requires_grad
                    for t in (cos, sin)))


@contextlib.contextmanager
def cublas_off(flag):
    """Inside: torch.backends.cuda.matmul.<flag> off, process-wide, and on again after where it was on. A flag
    already off is left as it is (newer torch's bf16 flag holds a split-K setting beside it)."""
    matmul = torch.backends.cuda.matmul
    allowed = getattr(matmul, flag)
    if allowed:
        setattr(matmul, flag, False)
    try:
        yield
    finally:
        if allowed:
            setattr(matmul, flag, True)


def _nearest_embedding(x, E, metric, screened=False):
    """screened: the GPU's search for large tables, called on any input (the first-use check runs it)."""
    op = torch.ops.difflm.nearest_embedding_screened if screened else torch.ops.difflm.nearest_embedding
    shape, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])  # (..., d) -> (N, d)
    # cuBLAS adds a bf16 GEMM's split-K partial sums in fp32: the screen's bound allows one rounding to bf16,
    # of the result, and torch lets cuBLAS round each partial sum too unless this flag says no
    with cublas_off("allow_bf16_reduced_precision_reduction"):
        return op(x2.float().contiguous(), E.float().contiguous(), metric).view(shape)


# -- small random inputs for the first-use checks (a private generator: the global RNG is untouched)

def _states(graph, B, L, N, gen, masked=0.5):
    """xt, x0 (B, L): absorbing rows at MASK = N - 1 with probability `masked` (the last sequence has
    none masked); uniform rows with x = x0 about half the time, and each sequence's first at N - 1 (a
    real token on this graph, which an op must not take for MASK)."""
    if graph == "absorb":
        x0 = torch.randint(N - 1, (B, L), generator=gen)
        mask = torch.rand(B, L, generator=gen) < masked
        mask[-1] = False
        return torch.where(mask, N - 1, x0), x0
    xt = torch.randint(N, (B, L), generator=gen)
    xt[:, 0] = N - 1
    return xt, torch.where(torch.rand(B, L, generator=gen) < 0.5, xt, torch.randint(N, (B, L), generator=gen))


# (B, L, V) of the checks' score tensors. On the GPU, rows of N > 2048 and N > 16384 take the CUDA kernels'
# other two thread layouts (a block per row of 256, then 512 threads: GPT-2's vocabulary); the C++ ops
# have one layout, and a CPU process would pay for the large rows at every start.
CHECK_SIZES = {"cpu": ((3, 7, 37),), "cuda": ((3, 7, 37), (2, 3, 2049), (2, 3, 16385))}


def _cases(gen, device):
    """(graph, dtype, log_score (B, L, N), xt, x0) on device for both graphs and dtypes, odd sizes."""
    for B, L, V in CHECK_SIZES.get(device.type, CHECK_SIZES["cpu"]):
        for graph in ("absorb", "uniform"):
            N = V + 1 if graph == "absorb" else V
            for dtype in (torch.float32, torch.bfloat16):
                ls = (torch.randn(B, L, N, generator=gen) * 2).to(dtype)
                xt, x0 = _states(graph, B, L, N, gen)
                yield graph, dtype, ls.to(device), xt.to(device), x0.to(device)


def _gap(got, ref, atol, rtol):
    """(largest |got - ref| in units of the tolerance, a phrase naming the largest difference).
    A NaN or inf where the oracle has a finite value counts as an infinite difference."""
    got, ref = got.double(), ref.double()
    bad = ~torch.isfinite(got) & torch.isfinite(ref)
    diff = torch.where(bad, math.inf, (got - ref).abs().nan_to_num(0.0))
    ratio = diff / (atol + rtol * ref.abs().nan_to_num(0.0))
    if ratio.numel() == 0:
        return 0.0, "no elements"
    i = int(ratio.reshape(-1).argmax())
    return float(ratio.reshape(-1)[i]), f"largest difference {float(diff.reshape(-1)[i]):.3g}"


def _tokens_gap(got, ref):
    """Sampled tokens must equal the oracle's for the same uniforms: any differing token fails."""
    n = int((got != ref).sum())
    return (math.inf if n else 0.0), f"{n} of {ref.numel()} tokens differ"


def _worst(results):
    """The (ratio, phrase) with the largest ratio (each caller's phrase says where it was found)."""
    return max(results, key=lambda r: r[0]) if results else (0.0, "nothing checked")


# (atol, rtol) of score entropy against its oracle: the loss, and the gradient by dtype (bf16's is rounded
# once more); bench.py's check past 2^31 uses them too
LOSS_TOL, GRAD_TOL = (1e-4, 1e-4), {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-3, 2e-2)}


def _check_score_entropy(f, device):
    """Loss and gradient, without a shift and with one (SEDD's absorbing offset, as its loss passes it)."""
    gen, out = torch.Generator().manual_seed(0), []
    for (graph, dtype, ls, xt, x0), shifted in itertools.product(_cases(gen, device), (False, True)):
        sb = torch.rand(ls.shape[0], generator=gen) * 4 + 1e-3
        sb[-1] = 200.0  # past fp32's expm1: the constants' limits (r -> 0 absorbing, r -> 1 uniform)
        sb = sb.to(device)
        shift = (torch.rand(ls.shape[0], generator=gen) * 16 - 2).to(device) if shifted else None
        w = (torch.rand(xt.shape, generator=gen) + 0.5).to(device)  # an upstream gradient that is not all ones
        where = f"{graph}, {str(dtype)[6:]}{', shifted' if shifted else ''}"
        with torch.no_grad():
            r, msg = _gap(f.kernel(ls, xt, x0, sb, graph, shift), f.oracle(ls, xt, x0, sb, graph, shift), *LOSS_TOL)
            out.append((r, f"loss {where}: {msg}"))
        got = []  # (loss, gradient, gradient again) of the op, then of the oracle; on the CPU the op's first
        for fn in (f.kernel, f.oracle):  # gradient is its loss-and-gradient pass's, the second its backward's
            leaf = ls.detach().clone().requires_grad_()
            with torch.enable_grad():
                loss = fn(leaf, xt, x0, sb, graph, shift)
                grads = [torch.autograd.grad((loss * w).sum(), leaf, retain_graph=keep)[0] for keep in (True, False)]
                got.append((loss.detach(), *grads))
        r, msg = _gap(got[0][0], got[1][0], *LOSS_TOL)
        out.append((r, f"loss with gradient {where}: {msg}"))
        tol = GRAD_TOL[dtype]
        for i, what in ((1, "gradient"), (2, "gradient of a second backward")):
            r, msg = _gap(got[0][i], got[1][1], *tol)
            out.append((r, f"{what} {where}: {msg}"))
    return _worst(out)


def _check_steps(f, device):
    """The SEDD steps also with a shift, on the scores plus that shift (so that as many rows move)."""
    gen, out = torch.Generator().manual_seed(0), []
    for graph, dtype, ls, xt, _ in _cases(gen, device):
        B, L, N = ls.shape
        t = (torch.rand(B, generator=gen, dtype=torch.float64) * 0.5 + 0.05).to(device)  # some rows move
        t[0] = 1e-4  # and one barely does (the denoiser's own step): a token that should stay is seen to
        u = torch.rand(B, L, 2, generator=gen, dtype=torch.float64).to(device)
        shift = (torch.rand(B, generator=gen) * 16 - 2).to(device)
        scores = ((ls, None, ""), ((ls.float() + shift[:, None, None]).to(dtype), shift, ", shifted"))
        calls = {"sedd_euler_step": [((s, xt, t, u, graph, sh), what) for s, sh, what in scores],
                 "sedd_tweedie_step": [((s, xt, t, u, graph, final, sh), (", final" if final else "") + what)
                                       for final in (False, True) for s, sh, what in scores],
                 "mdlm_ancestral_step": [((ls, xt, t, u, N - 1), "")] if graph == "absorb" else []}[f.name]
        with torch.no_grad():
            for a, what in calls:
                r, msg = _tokens_gap(f.kernel(*a), f.oracle(*a))
                out.append((r, f"{graph}, {str(dtype)[6:]}{what}: {msg}"))
    return _worst(out)


def _check_nearest(f, device):
    gen, out = torch.Generator().manual_seed(0), []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 7, 5, generator=gen).to(dtype).to(device)
        E = torch.randn(13, 5, generator=gen).to(device)
        for metric, screened in itertools.product(("cos", "l2"), (False, True)):
            got = f.spec.call(x, E, metric, screened=True) if screened else f.kernel(x, E, metric)
            ref = f.oracle(x, E, metric)
            # near-ties may pick another row on another device: compare the picked rows' scores
            xd, Ed = x.double().reshape(-1, 5), E.double()
            if metric == "cos":
                scores = F.normalize(xd, dim=-1) @ F.normalize(Ed, dim=-1).T
            else:
                scores = xd @ Ed.T - 0.5 * Ed.pow(2).sum(-1)
            pick = lambda ids: scores.gather(1, ids.reshape(-1, 1).long().clamp(0, E.shape[0] - 1))  # noqa: E731
            bad = (got < 0) | (got >= E.shape[0])
            # one-sided: the op's pick may score higher than the oracle's (a TF32 oracle on a GPU), not lower
            got_score = torch.where(bad.reshape(-1, 1), math.nan, torch.minimum(pick(got), pick(ref)))
            r, msg = _gap(got_score, pick(ref), 1e-4, 1e-4)
            out.append((r, f"{metric}{', screened' if screened else ''}, {str(dtype)[6:]}: score of the picked row, "
                           f"{msg}"))
    return _worst(out)


def _check_rotary(f, device):
    """Output and gradient on a strided (B, L, 3, H, D) projection, with tables of no particular structure."""
    gen, out = torch.Generator().manual_seed(0), []
    B, L, H, D = 2, 5, 3, 6
    cos, sin = (torch.randn(L, 1, 1, D, generator=gen, dtype=torch.float32).to(device) for _ in range(2))
    for dtype in (torch.float32, torch.bfloat16):
        qkv = torch.randn(B, L, 4, H, D, generator=gen).to(dtype).to(device)[:, :, 1:]
        w = torch.randn(B, L, 3, H, D, generator=gen).to(dtype).to(device)
        got = []
        for fn in (f.kernel, f.oracle):
            leaf = qkv.clone().requires_grad_()
            with torch.enable_grad():
                y = fn(leaf, cos, sin)
                got.append((y.detach(), torch.autograd.grad((y * w).sum(), leaf)[0]))
        tol = (1e-6, 1e-5) if dtype == torch.float32 else (1e-3, 8e-3)  # both are exact; bf16's slack is one ulp
        for i, what in enumerate(("output", "gradient")):
            r, msg = _gap(got[0][i], got[1][i], *tol)
            out.append((r, f"{what}, {str(dtype)[6:]}: {msg}"))
    return _worst(out)


def _refuse_shift(scores, shift):
    """A shift is one value per sequence (the oracles would broadcast a single one)."""
    if shift is not None and tuple(shift.shape) != tuple(scores.shape[:1]):
        raise ValueError(f"difflm: shift must have shape (B,) = ({scores.shape[0]},), one value per sequence, "
                         f"got {tuple(shift.shape)}")


def _refuse_score_entropy(a):
    """Absorbing score entropy: r = 1 / expm1(sigma_bar) is a rate only for 0 < sigma_bar < inf."""
    sigma_bar = a[3]
    if a[4] == "absorb" and sigma_bar.numel() and not bool(((sigma_bar > 0) & (sigma_bar < math.inf)).all()):
        raise ValueError("difflm: sigma_bar must be positive and finite for the absorbing graph")
    _refuse_shift(a[0], a[5])


def _refuse_step(tname, shifts):
    """A step's rate (or probability) `tname` is finite and >= 0 and its uniforms lie in [0, 1);
    outside (or NaN) the op and the oracle pick differently. One answer for both (on a GPU, one sync);
    so is a graph the op does not know (the oracle read it as uniform) or a mask_id outside the scores.
    shifts: the step takes a shift, its last argument."""
    def refuse(a):
        if shifts:
            _refuse_shift(a[0], a[-1])
        if isinstance(a[4], str) and a[4] not in _GRAPHS:
            raise ValueError(f"difflm: unknown graph {a[4]!r}; use absorb or uniform")
        if not isinstance(a[4], str) and not 0 <= a[4] < a[0].shape[-1]:
            raise ValueError(f"difflm: mask_id={a[4]} is not a state of the {a[0].shape[-1]} scores")
        t_ok, u_ok = ((a[2] >= 0) & (a[2] < math.inf)).all(), ((a[3] >= 0) & (a[3] < 1)).all()
        if not bool(t_ok & u_ok):
            if not bool(t_ok):
                raise ValueError(f"difflm: {tname} must be finite and >= 0")
            raise ValueError("difflm: u must lie in [0, 1) (uniforms)")
    return refuse


def _refuse_non_finite(a):
    """A NaN or infinite vector has no nearest row (argmax over NaN scores is arbitrary). One check of
    both first: on a GPU each answer is a synchronisation."""
    x, E = a[0], a[1]
    if not bool(torch.isfinite(x).all() & torch.isfinite(E).all()):
        name = "x" if not bool(torch.isfinite(x).all()) else "E"
        raise ValueError(f"difflm: {name} must be finite (it holds a NaN or an infinity)")


class _Spec:
    def __init__(self, call, takes, check, refuse):
        self.call, self.takes, self.check, self.refuse = call, takes, check, refuse

    def device(self, a):
        return a[0].device


_GRAPHS = ("absorb", "uniform")
SPECS = {
    "score_entropy": _Spec(_score_entropy, lambda a: _float_scores(a[0]) and _ids(a[1], a[2]) and a[4] in _GRAPHS
                           and a[3].dtype in (torch.float32, torch.float64) and not a[3].requires_grad  # the op's
                           and _shift_ok(a[5]) and _same_device(a),  # backward is the scores' alone
                           _check_score_entropy, _refuse_score_entropy),
    "sedd_euler_step": _Spec(_sedd_euler_step, lambda a: _float_scores(a[0]) and _ids(a[1]) and a[4] in _GRAPHS
                             and a[3].dtype == torch.float64 and _shift_ok(a[-1]) and _same_device(a),
                             _check_steps, _refuse_step("rate_dt", True)),
    "sedd_tweedie_step": _Spec(_sedd_tweedie_step, lambda a: _float_scores(a[0]) and _ids(a[1]) and a[4] in _GRAPHS
                               and a[3].dtype == torch.float64 and _shift_ok(a[-1]) and _same_device(a),
                               _check_steps, _refuse_step("dsigma", True)),
    "mdlm_ancestral_step": _Spec(_mdlm_ancestral_step, lambda a: _float_scores(a[0]) and _ids(a[1])
                                 and 0 <= a[4] < a[0].shape[-1] and a[3].dtype == torch.float64 and _same_device(a),
                                 _check_steps, _refuse_step("p_unmask", False)),
    "rotary": _Spec(_rotary, _rotary_takes, _check_rotary, lambda a: None),
    "nearest_embedding": _Spec(_nearest_embedding, lambda a: _float_scores(a[0]) and a[2] in ("cos", "l2")
                               and _same_device(a), _check_nearest, _refuse_non_finite),
}
