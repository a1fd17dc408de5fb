"""
common.py: only what two or more method files share.

  config and CLI      dataclass fields become typed --key=value overrides
  device, precision   cuda + bf16 autocast when present, else cpu + fp32; seeds
  data, tokenizers    data/<name>/prepare.py -> train.bin/val.bin/meta.json; char, word, GPT-2
  the backbone        a bidirectional (or causal) Transformer with rotary positions, SDPA and
                      optional adaLN time conditioning; it returns hidden states, each method
                      adds its own head
  the training loop   AdamW, warmup + cosine, clipping, accumulation, EMA, periodic eval, logs,
                      atomic checkpoints with exact --resume, DDP under torchrun

Method files import this module; it never imports them.
"""

import contextlib
import copy
import dataclasses
import difflib
import glob
import hashlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA_ENV = "DIFFLM_DATA"  # a folder holding offline copies (tinyshakespeare.txt, gpt2/, e2e/)


def die(msg):
    """Stop with one line on stderr and exit status 1 (bad input, missing files)."""
    raise SystemExit(f"error: {msg}")


# ----------------------------------------------------------------------------------------------
# Config and CLI


@dataclasses.dataclass
class BaseConfig:
    """Knobs every method takes. A method's Config adds the blocks below that it uses, then its own."""

    # I/O
    out_dir: str = ""  # default out/<method>
    dataset: str = "shakespeare_char"
    seed: int = 1337
    eval_split: str = "val"  # val | test
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the model for training
    # optimisation
    batch_size: int = 32
    grad_accum: int = 1
    max_iters: int = 2000
    lr_decay_iters: int = 0  # 0: decay over max_iters (set it to resume a run longer than planned)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema: float = 0.999  # EMA decay of the weights used for eval and sampling (0: off)
    eval_interval: int = 500
    eval_iters: int = 20
    log_interval: int = 50
    resume: bool = False
    overwrite: bool = False  # --train into an out_dir that holds a checkpoint: start over
    # sampling
    num_samples: int = 4
    show: bool = False


@dataclasses.dataclass
class TextConfig:
    """Token data (data/<dataset>/) and the Transformer backbone over it: every method but ddpm.py."""

    data_dir: str = ""  # default data/<dataset>
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0


@dataclasses.dataclass
class PromptConfig:
    """Text that conditions sampling: held fixed at the start and at the end of every sample."""

    prefix: str = ""
    suffix: str = ""
    allow_unk: bool = False  # let words outside the vocabulary become <unk> instead of stopping


VERBS = ("train", "sample", "eval")
SHARED_KEYS = {f.name for c in (BaseConfig, TextConfig, PromptConfig) for f in dataclasses.fields(c)}


def _convert(name, value, typ):
    if typ is bool:
        v = value.lower()
        if v in ("1", "true", "yes", "on", ""):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        die(f"--{name} takes true or false, not {value!r}")
    try:
        return typ(value)
    except ValueError:
        die(f"--{name} takes a {typ.__name__}, not {value!r}")


def parse_args(config_cls, argv=None):
    """Parse `--train|--sample|--eval` and `--key=value` overrides.

    Returns (verbs, cfg, overrides) where overrides holds only the keys given on the command line
    (sampling from a checkpoint applies them over the checkpoint's own config).
    """
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    types = {name: type(f.default) for name, f in fields.items()}
    verbs, overrides = [], {}
    if "-h" in argv or "--help" in argv:
        print((sys.modules[config_cls.__module__].__doc__ or "").strip() + "\n\nconfig keys (--key=value):")
        for name, f in fields.items():
            print(f"  --{name}={f.default!r}")
        sys.exit(0)
    for arg in argv:
        if not arg.startswith("--"):
            die(f"unexpected argument {arg!r}; use --train, --sample, --eval or --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key in VERBS and not eq:
            verbs.append(key)
            continue
        if key not in fields and key in SHARED_KEYS:
            die(f"--{key} is not used by {os.path.basename(sys.modules[config_cls.__module__].__file__)}; drop it")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields) + list(VERBS), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see the Config class for the keys"
            die(f"unknown config key --{key}{hint}")
        if not eq and types[key] is not bool:
            die(f"--{key} needs a value: --{key}=...")
        overrides[key] = _convert(key, value, types[key])
    if not verbs:
        die("say what to do: --train, --sample or --eval (plus --key=value overrides)")
    cfg = config_cls(**overrides)
    seed_all(cfg.seed)  # before main() builds its model, so initial weights are reproducible
    return verbs, cfg, overrides


def check_common(cfg):
    """The shared keys' values -> one line naming the flag, before any data or model is touched.

    Each method's check_config calls this first, then checks its own keys.
    """
    at_least_one = ["batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval", "num_samples"]
    if isinstance(cfg, TextConfig):
        at_least_one += ["n_layer", "n_head", "n_embd", "block_size"]
    for k in at_least_one:
        if getattr(cfg, k) < 1:
            die(f"--{k}={getattr(cfg, k)} must be at least 1")
    for k in ("lr_decay_iters", "warmup_iters"):
        if getattr(cfg, k) < 0:
            die(f"--{k}={getattr(cfg, k)} must be 0 or more")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        die(f"--lr={cfg.lr} must be a finite number above 0")
    for k in ("min_lr", "weight_decay", "grad_clip"):
        if not (math.isfinite(getattr(cfg, k)) and getattr(cfg, k) >= 0):
            die(f"--{k}={getattr(cfg, k)} must be a finite number, 0 or more")
    for k in ("beta1", "beta2", "ema") + (("dropout",) if isinstance(cfg, TextConfig) else ()):
        if not 0 <= getattr(cfg, k) < 1:  # NaN fails this too
            die(f"--{k}={getattr(cfg, k)} must be in [0, 1)")
    if isinstance(cfg, TextConfig) and (cfg.n_embd % cfg.n_head or cfg.n_embd // cfg.n_head % 2):
        die(f"--n_embd={cfg.n_embd} must be --n_head={cfg.n_head} times an even head size (rotary positions turn pairs)")
    get_device(cfg)


def check_memory(cfg):
    """Refuse a training config whose activations alone would not fit the device (a lower bound:
    about a dozen (batch, block, n_embd) fp32 tensors per layer are kept for the backward pass)."""
    device = get_device(cfg)
    need = 4 * 12 * cfg.batch_size * cfg.block_size * cfg.n_embd * cfg.n_layer
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        die(f"--batch_size={cfg.batch_size} x --block_size={cfg.block_size} x --n_embd={cfg.n_embd} x --n_layer={cfg.n_layer} "
            f"needs at least {need / 2**30:.0f} GiB for training, more than the {have / 2**30:.0f} GiB of {device}; "
            "lower --batch_size (raise --grad_accum) or --block_size")


def config_from_checkpoint(config_cls, ckpt, overrides):
    """The checkpoint's config with the command line's overrides on top; model shape stays."""
    saved = {k: v for k, v in ckpt["config"].items() if k in {f.name for f in dataclasses.fields(config_cls)}}
    shape_keys = ("n_layer", "n_head", "n_embd", "block_size")
    for k in shape_keys:
        if k in overrides and overrides[k] != saved.get(k):
            die(f"--{k} is fixed by the checkpoint ({saved.get(k)}); drop it or train a new model")
    return config_cls(**{**saved, **overrides})


def print_config(cfg):
    print("config: " + " ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items()))


# ----------------------------------------------------------------------------------------------
# Device, precision, seeds


def get_device(cfg):
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        die(f"unknown --device={cfg.device}; use auto, cpu, cuda or cuda:N")
    if cfg.device != "auto":
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            die(f"--device={cfg.device} but this torch sees no GPU; use --device=cpu")
        device = torch.device(cfg.device)
        if device.index is not None and device.index >= torch.cuda.device_count():
            die(f"--device={cfg.device} but this machine has {torch.cuda.device_count()} GPU(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return device
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device):
    """bf16 autocast on GPU (TF32 for what stays fp32); plain fp32 on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def progress(iterable, desc, total=None):
    """iterable, with a tqdm progress bar on stderr when stderr is a terminal (never in logs, pipes or
    tests); for long loops other than the training log: full evaluation, sampling, benchmarks."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# Tokenizers (stored as JSON in meta.json, never pickled)


class CharTokenizer:
    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text, what="text"):
        bad = sorted({c for c in text if c not in self.stoi})
        if bad:
            die(f"{what} has characters outside the model's {self.vocab_size}-character vocabulary: "
                f"{''.join(bad)!r}; use only characters seen in training")
        return [self.stoi[c] for c in text]

    def decode(self, ids, mask_char="_"):
        return "".join(self.chars[i] if i < self.vocab_size else mask_char for i in ids)


class WordTokenizer:
    """Words and punctuation, the frequent ones kept; specials first (START, END, UNK, PAD)."""

    SPECIALS = ("<s>", "</s>", "<unk>", "<pad>")
    START, END, UNK, PAD = 0, 1, 2, 3
    PATTERN = re.compile(r"\w+|[^\w\s]")

    def __init__(self, words):
        self.words = list(words)
        self.stoi = {w: i for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words)

    @classmethod
    def split(cls, text):
        return cls.PATTERN.findall(text)

    @classmethod
    def build(cls, texts, min_count):
        counts = {}
        for text in texts:
            for w in cls.split(text):
                counts[w] = counts.get(w, 0) + 1
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(cls.SPECIALS) + kept)

    def encode(self, text, what="text"):
        return [self.stoi.get(w, self.UNK) for w in self.split(text)]

    def decode(self, ids, mask_char="_"):
        out = [self.words[i] if i < self.vocab_size else mask_char for i in ids]
        return " ".join(w for w in out if w not in ("<pad>",))


def gpt2_encoding():
    """tiktoken's GPT-2 BPE, from local files under $DIFFLM_DATA/gpt2 when present (offline)."""
    import tiktoken
    local = os.path.join(os.environ.get(SHARED_DATA_ENV, ""), "gpt2")
    if os.path.isfile(os.path.join(local, "vocab.bpe")) and os.path.isfile(os.path.join(local, "encoder.json")):
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=os.path.join(local, "vocab.bpe"),
                                                encoder_json_file=os.path.join(local, "encoder.json"))
        return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline with no local files
        die(f"cannot load the GPT-2 BPE ({type(e).__name__}); set {SHARED_DATA_ENV} to a folder with gpt2/vocab.bpe and gpt2/encoder.json")


class GPT2Tokenizer:
    def __init__(self):
        self.enc = gpt2_encoding()
        self.vocab_size = self.enc.n_vocab

    def encode(self, text, what="text"):
        return self.enc.encode_ordinary(text)

    def decode(self, ids, mask_char="_"):
        # masked ids (>= vocab) are shown as a marker between the decoded runs
        out, run = [], []
        for i in ids:
            if i < self.vocab_size:
                run.append(i)
            else:
                out.append(self.enc.decode(run)), run.clear(), out.append(mask_char)
        out.append(self.enc.decode(run))
        return "".join(out)


def get_tokenizer(meta):
    if "tokenizer" not in meta:
        return None  # continuous data (ddpm.py) has no tokenizer
    kind = meta["tokenizer"]
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "word":
        return WordTokenizer(meta["words"])
    if kind == "gpt2":
        return GPT2Tokenizer()
    die(f"unknown tokenizer {kind!r} in meta.json")


# ----------------------------------------------------------------------------------------------
# Data: data/<name>/prepare.py writes train.bin, val.bin (uint16/uint32) and meta.json


SPLIT_FILES = ("train.bin", "val.bin")
CHECK_CHUNK = 1 << 24  # tokens per read when scanning a token file, so memory stays bounded


def data_path(cfg):
    return cfg.data_dir or os.path.join(ROOT, "data", cfg.dataset)


def mark_unprepared(out_dir):
    """Remove meta.json before replacing any file it describes: a prepare killed midway then
    leaves a folder that reads as unprepared rather than new files under an old meta.json."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, "meta.json"))


def write_split(out_dir, train_ids, val_ids, meta):
    """Used by every prepare.py: the two token files and meta.json, each written atomically.

    meta.json records each token file's size and sha256 (check_data compares them) and, when run
    from a prepare.py, the command that re-prepares the folder. Temporary names carry the pid, so
    processes preparing one folder at once never write to the same file.
    """
    import hashlib
    import shlex
    os.makedirs(out_dir, exist_ok=True)
    dtype = np.uint16 if meta["vocab_size"] < 2**16 else np.uint32
    arrays = dict(zip(SPLIT_FILES, (np.asarray(ids, dtype=dtype) for ids in (train_ids, val_ids))))
    for name, a in arrays.items():
        if a.size == 0:
            die(f"the {name[:-4]} split of {out_dir} would be empty; give more text")
    if "command" not in meta and sys.argv and sys.argv[0].endswith("prepare.py"):
        meta = {**meta, "command": "python " + " ".join(map(shlex.quote, sys.argv))}
    meta = {**meta, "dtype": np.dtype(dtype).name, "train_tokens": arrays["train.bin"].size,
            "val_tokens": arrays["val.bin"].size,
            "files": {name: {"bytes": a.nbytes, "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
                      for name, a in arrays.items()}}
    tmp = f".{os.getpid()}.tmp"
    for name, a in arrays.items():
        a.tofile(os.path.join(out_dir, name + tmp))
    with open(os.path.join(out_dir, "meta.json" + tmp), "w") as f:
        json.dump(meta, f)
    mark_unprepared(out_dir)
    for name in SPLIT_FILES + ("meta.json",):
        os.replace(os.path.join(out_dir, name + tmp), os.path.join(out_dir, name))
    return meta


def find_local_copy(name, url, sha256=None, shipped=None):
    """A corpus file's bytes and where they came from: the gzip copy shipped in the repository
    (shipped, a path), else $DIFFLM_DATA/name, else a download from url; (None, why) if none works."""
    import gzip
    import hashlib
    import urllib.request
    local = os.path.join(os.environ.get(SHARED_DATA_ENV, ""), name)
    if shipped and os.path.isfile(shipped):
        try:
            with gzip.open(shipped) as f:
                data = f.read()
        except (OSError, EOFError) as e:
            return None, f"{shipped} is damaged ({e}); restore it with git checkout -- {shipped}"
        source = shipped
    elif os.environ.get(SHARED_DATA_ENV) and os.path.isfile(local):
        data = open(local, "rb").read()
        source = local
    else:
        try:
            with urllib.request.urlopen(url, timeout=15) as r:
                data = r.read()
            source = url
        except Exception as e:
            return None, f"could not download {url} ({type(e).__name__})"
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        return None, f"{source} does not have the expected sha256 {sha256}"
    return data, source


@contextlib.contextmanager
def data_lock(path):
    """Hold an exclusive lock on path/prepare.lock: torchrun's ranks all call prepare_data, and
    one prepares while the others wait, then find the folder prepared."""
    try:
        import fcntl
        os.makedirs(path, exist_ok=True)
        f = open(os.path.join(path, "prepare.lock"), "a")
    except (ImportError, OSError):  # no flock (Windows) or a read-only folder that nobody can prepare
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def reprepare_command(cfg, meta=None):
    """The command that rebuilds cfg's data folder, for error messages."""
    path = data_path(cfg)
    if meta and meta.get("command"):
        return meta["command"]
    if os.path.isfile(os.path.join(ROOT, "data", cfg.dataset, "prepare.py")):
        return f"python data/{cfg.dataset}/prepare.py" + (f" --out_dir={path}" if cfg.data_dir else "")
    return f"python data/text/prepare.py --input=FILE --name={cfg.dataset} --force"


def load_meta(cfg):
    """meta.json of cfg's data folder, with the keys every loader relies on."""
    path = os.path.join(data_path(cfg), "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:
        die(f"{path} is not valid JSON ({e}); re-prepare: {reprepare_command(cfg)}")
    need = ("vocab_size", "dtype", "train_tokens", "val_tokens", "files")
    missing = [k for k in need if k not in meta] if isinstance(meta, dict) else list(need)
    if missing or meta["dtype"] not in ("uint16", "uint32") or set(meta["files"]) != set(SPLIT_FILES):
        die(f"{path} lacks {', '.join(missing) or 'a valid dtype or files entry'} (written by an older "
            f"difflm or by hand); re-prepare: {reprepare_command(cfg, meta if isinstance(meta, dict) else None)}")
    return meta


def check_data(cfg, meta):
    """The token files against meta.json: their sizes every time (cheap); on the first use after a
    prepare also their sha256 and that every id is below vocab_size, recorded in verified.json so
    the scan is not repeated while the files stay the same."""
    import hashlib
    path, dtype = data_path(cfg), np.dtype(meta["dtype"])
    stamp, files = os.path.join(path, "verified.json"), {}
    for name in SPLIT_FILES:
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            die(f"{f} is missing; re-prepare: {reprepare_command(cfg, meta)}")
        st, want = os.stat(f), meta["files"][name]["bytes"]
        tokens = meta[name[:-4] + "_tokens"]
        if st.st_size != want or want != tokens * dtype.itemsize or st.st_size == 0:
            die(f"{f} has {st.st_size:,} bytes but meta.json says {tokens:,} {dtype.name} tokens "
                f"({want:,} bytes): truncated, empty or from another prepare; re-prepare: {reprepare_command(cfg, meta)}")
        files[name] = [st.st_size, st.st_mtime_ns, meta["files"][name]["sha256"]]
    with contextlib.suppress(OSError, ValueError):
        with open(stamp) as f:
            if json.load(f) == files:
                return
    for name in SPLIT_FILES:
        h, top = hashlib.sha256(), 0
        with open(os.path.join(path, name), "rb") as f:  # read, not mapped: mapped pages would stay in RSS
            while chunk := f.read(CHECK_CHUNK * dtype.itemsize):
                h.update(chunk)
                top = max(top, int(np.frombuffer(chunk, dtype=dtype).max()))
        if h.hexdigest() != meta["files"][name]["sha256"]:
            die(f"{os.path.join(path, name)} does not match the sha256 in meta.json (another prepare's file "
                f"or a damaged one); re-prepare: {reprepare_command(cfg, meta)}")
        if top >= meta["vocab_size"]:
            die(f"{os.path.join(path, name)} holds token id {top}, not below the vocabulary of "
                f"{meta['vocab_size']} in meta.json; re-prepare: {reprepare_command(cfg, meta)}")
    with contextlib.suppress(OSError):  # a read-only folder is checked again next time
        tmp = f"{stamp}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(files, f)
        os.replace(tmp, stamp)


def prepare_data(cfg):
    """Run data/<dataset>/prepare.py if the folder is not prepared, check its token files against
    meta.json and return the meta dict. Any number of processes may call it at once (data_lock)."""
    path = data_path(cfg)
    script = os.path.join(ROOT, "data", cfg.dataset, "prepare.py")
    if not os.path.isfile(os.path.join(path, "meta.json")) and (cfg.dataset == "text" or not os.path.isfile(script)):
        known = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(ROOT, "data", "*", "prepare.py"))
                       if os.path.basename(os.path.dirname(p)) != "text")
        die(f"unknown dataset {cfg.dataset!r}: {path} is not prepared and there is no data/{cfg.dataset}/prepare.py "
            f"(known: {', '.join(known)}; for your own text: python data/text/prepare.py --input=FILE --name={cfg.dataset})")
    with data_lock(path):
        if not os.path.isfile(os.path.join(path, "meta.json")):
            print(f"preparing {cfg.dataset} into {path} ...")
            r = subprocess.run([sys.executable, script, f"--out_dir={path}"], capture_output=True, text=True)
            if r.returncode != 0:
                lines = (r.stderr or r.stdout).strip().splitlines()
                raise SystemExit(lines[-1] if lines else f"error: {script} failed")
            print(r.stdout.strip())
        meta = load_meta(cfg)
        check_data(cfg, meta)
    return meta


def tokenizer_name(meta):
    return f"{meta.get('tokenizer', 'no')} tokenizer with {meta.get('vocab_size', '?')} tokens"


class Batches:
    """Random windows of block_size tokens from a memmapped split, as in nanoGPT.

    Each rank draws from its own generator, so data streams differ across ranks and the
    generator's state goes into the checkpoint for an exact resume. meta is the model's (from
    prepare_data, or the checkpoint's for --eval); the folder's own meta.json must agree with it.
    """

    def __init__(self, cfg, meta, seed):
        self.path, self.block = data_path(cfg), cfg.block_size
        here = meta
        if os.path.isfile(os.path.join(self.path, "meta.json")):
            with open(os.path.join(self.path, "meta.json")) as f:
                here = json.load(f)
        if any(here.get(k) != meta.get(k) for k in ("tokenizer", "vocab_size", "chars", "words")):
            same = " (the same size, other symbols)" if tokenizer_name(here) == tokenizer_name(meta) else ""
            die(f"{self.path} has a {tokenizer_name(here)} but the model was trained on a {tokenizer_name(meta)}{same}; "
                f"use the dataset it was trained on")
        self.dtype = np.dtype(here["dtype"])
        self.gen = torch.Generator().manual_seed(seed)
        for split in ("train", "val"):
            n = here[f"{split}_tokens"]
            if n <= self.block:
                die(f"the {split} split has {n} tokens, fewer than block_size={self.block}; lower --block_size")

    def data(self, split):
        # a fresh memmap per call avoids holding the file open (nanoGPT's leak workaround)
        return np.memmap(os.path.join(self.path, f"{split}.bin"), dtype=self.dtype, mode="r")

    def get(self, split, batch_size, gen=None):
        data = self.data(split)
        ix = torch.randint(len(data) - self.block, (batch_size,), generator=gen or self.gen)
        x = np.stack([data[i:i + self.block].astype(np.int64) for i in ix.tolist()])
        return torch.from_numpy(x)  # (B, L)

    def sequential(self, split, batch_size):
        """Every non-overlapping window of the split once, in order (for --eval)."""
        if not os.path.isfile(os.path.join(self.path, f"{split}.bin")):
            die(f"{self.path} has no {split} split ({split}.bin); use --eval_split=val")
        data = self.data(split)
        n = (len(data) - 1) // self.block
        if n == 0:
            die(f"the {split} split has {len(data)} tokens, not more than block_size={self.block}; lower --block_size")
        for b in range(0, n, batch_size):
            starts = range(b * self.block, min(n, b + batch_size) * self.block, self.block)
            yield torch.from_numpy(np.stack([data[s:s + self.block].astype(np.int64) for s in starts]))

    def slices(self, split, max_tokens, pieces=64):
        """At most max_tokens of a split as lists of ids: all of it when it fits, else `pieces` evenly
        spaced runs, so a statistic over the training text costs the same at any corpus size."""
        data = self.data(split)
        if len(data) <= max_tokens:
            return [data.tolist()]
        run = max_tokens // pieces
        return [data[s:s + run].tolist() for s in np.linspace(0, len(data) - run, pieces).astype(np.int64)]


def val_batches(batches, cfg, full=False):
    """The validation batches of an evaluate(): every window of the --eval_split split once, in order
    (full, for --eval), else the same eval_iters random val batches at every call, so evaluations
    during training compare (and never see the test split)."""
    if full:
        if cfg.eval_split not in ("val", "test"):
            die(f"unknown --eval_split={cfg.eval_split!r}; use val or test")
        if cfg.eval_split != "val":
            print(f"evaluating on the {cfg.eval_split} split")
        return progress(batches.sequential(cfg.eval_split, cfg.batch_size), "eval")
    gen = torch.Generator().manual_seed(cfg.seed)
    return (batches.get("val", cfg.batch_size, gen) for _ in range(cfg.eval_iters))


# ----------------------------------------------------------------------------------------------
# The backbone: a Transformer with rotary positions and optional adaLN time conditioning


def rotary_tables(block_size, head_dim, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(block_size).float(), inv)  # (L, hd/2)
    return torch.cos(angles), torch.sin(angles)


def apply_rotary(x, cos, sin):
    # x (B, H, L, hd): rotate each (first half, second half) pair by the position's angle
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer for positions 0..pos-1 of an incremental causal decode: a
    prefill into the empty cache, then one token at a time. Keys are stored already rotated at their
    own positions, so a new query attends to them as they are. Each layer's (2, B, H, block_size, hd)
    is allocated at its first write, in the dtype the keys come in (bf16 under CUDA autocast)."""

    def __init__(self, n_layer, block_size):
        self.block_size, self.pos, self.kv = block_size, 0, [None] * n_layer

    def extend(self, layer, k, v):
        """Store k, v (B, H, T, hd) of positions pos..pos+T-1 -> keys, values (B, H, pos+T, hd) so far.
        The Transformer advances pos once every layer has stored its own."""
        p0, T = self.pos, k.shape[2]
        if self.kv[layer] is None:
            self.kv[layer] = k.new_zeros(2, *k.shape[:2], self.block_size, k.shape[-1])
        kv = self.kv[layer]
        kv[0, :, :, p0:p0 + T], kv[1, :, :, p0:p0 + T] = k, v
        return kv[0, :, :, :p0 + T], kv[1, :, :, :p0 + T]


class Attention(nn.Module):
    def __init__(self, n_embd, n_head, dropout, causal):
        super().__init__()
        self.n_head, self.causal, self.dropout = n_head, causal, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        # mask: None, or (B, 1, 1, L) bool, True where a key may be attended (padding is False)
        # cache: None, or a KVCache whose keys/values of the earlier positions this layer joins
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, L, hd)
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (B, H, pos + L, hd)
        # L > 1 queries are the whole sequence so far (a prefill starts from an empty cache), where
        # the causal mask applies as is; one cached query may see every key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None and L > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout, causal, cond_dim, norm_weight=False, mlp_bias=False):
        super().__init__()
        affine = cond_dim == 0 or norm_weight  # adaLN's scale takes the norm weight's place unless asked for both
        self.ln1 = nn.LayerNorm(n_embd, bias=False, elementwise_affine=affine)
        self.attn = Attention(n_embd, n_head, dropout, causal)
        self.ln2 = nn.LayerNorm(n_embd, bias=False, elementwise_affine=affine)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=mlp_bias), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * n_embd, n_embd, bias=mlp_bias), nn.Dropout(dropout))
        # adaLN-Zero (DiT): shift, scale and gate of both sublayers from the time embedding
        self.ada = nn.Linear(cond_dim, 6 * n_embd) if cond_dim else None
        if not cond_dim:  # the same zero-init gates, learned per channel (LayerScale / ReZero):
            self.gate1 = nn.Parameter(torch.zeros(n_embd))  # every block starts as the identity
            self.gate2 = nn.Parameter(torch.zeros(n_embd))

    def forward(self, x, cos, sin, c=None, mask=None, cache=None, layer=0):
        if self.ada is None:
            x = x + self.gate1 * self.attn(self.ln1(x), cos, sin, mask, cache, layer)
            return x + self.gate2 * self.mlp(self.ln2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.ln1(x) * (1 + scale1) + shift1, cos, sin, mask, cache, layer)
        return x + gate2 * self.mlp(self.ln2(x) * (1 + scale2) + shift2)


def timestep_embedding(t, dim=256, max_period=10000.0):
    # t (B,) float -> (B, dim) sinusoids
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Transformer(nn.Module):
    """Token ids (B, L) or embeddings (B, L, n_embd) [+ time (B,)] -> hidden states (B, L, n_embd).

    vocab_size counts every input id the method uses (MDLM adds [MASK]); 0 builds no token table,
    for a method that brings its own inputs as embeddings. cond_dim > 0 turns on adaLN time
    conditioning; the method decides what "time" is (t, sigma_bar, ...). A causal model decodes
    incrementally through a KVCache. norm_weight and mlp_bias give the DiT-style layout of the
    published SEDD/MDLM checkpoints ("DDiT"): every LayerNorm keeps its weight beside adaLN, and
    the MLP's Linear layers carry biases.
    """

    def __init__(self, vocab_size, n_layer, n_head, n_embd, block_size, dropout=0.0, causal=False, cond_dim=0,
                 norm_weight=False, mlp_bias=False):
        super().__init__()
        if n_embd % n_head or (n_embd // n_head) % 2:
            die(f"n_embd={n_embd} must split into n_head={n_head} heads of even size")
        self.block_size, self.cond_dim, self.causal = block_size, cond_dim, causal
        self.wte = nn.Embedding(vocab_size, n_embd) if vocab_size else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, causal, cond_dim, norm_weight, mlp_bias)
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False, elementwise_affine=cond_dim == 0 or norm_weight)
        if cond_dim:
            self.time_mlp = nn.Sequential(nn.Linear(256, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim), nn.SiLU())
            self.ada_f = nn.Linear(cond_dim, 2 * n_embd)
        cos, sin = rotary_tables(block_size, n_embd // n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if ".ada." in name or name.startswith("ada_f."):
                nn.init.zeros_(p)  # adaLN-Zero: every block starts as the identity
            elif p.dim() < 2:
                continue
            elif name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))  # GPT-2's scaled residual init
            else:
                nn.init.normal_(p, std=0.02)

    def new_cache(self):
        """An empty KVCache for this model's incremental causal decoding."""
        if not self.causal:
            die("a key/value cache is for causal Transformers (causal=True)")
        return KVCache(len(self.blocks), self.block_size)

    def forward(self, x, t=None, pad_mask=None, cache=None):
        """x: token ids (B, L) or input embeddings (B, L, n_embd). t (B,): the time input (cond_dim > 0).

        pad_mask: None, or (B, L) bool, True at real tokens; padded keys are then never attended
        (bidirectional models only: variable-length batches whose outputs do not see the padding).
        cache: None, or a KVCache (from new_cache) holding positions 0..cache.pos-1; x then holds the
        next positions (several only into an empty cache), attends to the cached ones, and is added.
        The outputs equal those of one forward over the whole sequence so far.
        """
        L, p0 = x.shape[1], cache.pos if cache is not None else 0
        if p0 + L > self.block_size:
            die(f"sequence of {p0 + L} tokens is longer than the model's context block_size={self.block_size}"
                + ("; refill the cache from a shorter context" if cache is not None else ""))
        if cache is not None and L > 1 and p0 > 0:
            die("several positions go only into an empty cache (the prefill); then one at a time")
        if x.dim() == 2:
            if self.wte is None:
                die("this Transformer has no token table (vocab_size=0); pass embeddings (B, L, n_embd)")
            x = self.wte(x)
        x = self.drop(x)
        cos, sin = self.cos[p0:p0 + L], self.sin[p0:p0 + L]  # positions continue after the cached ones
        c = self.time_mlp(timestep_embedding(t)) if self.cond_dim else None
        mask = None
        if pad_mask is not None:
            if self.causal:
                die("pad_mask is for bidirectional Transformers; a causal model pads on the right and ignores it")
            mask = pad_mask[:, None, None, :]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, c, mask, cache, i)
        if cache is not None:
            cache.pos = p0 + L
        if self.cond_dim:
            shift, scale = self.ada_f(c)[:, None].chunk(2, dim=-1)
            return self.ln_f(x) * (1 + scale) + shift
        return self.ln_f(x)  # (B, L, C)


# ----------------------------------------------------------------------------------------------
# Checkpoints: one file holds everything a run needs to resume, sample and evaluate. Written to a
# temporary name of this process and renamed, so a crash or a full disk never leaves a broken
# ckpt.pt; it carries a SHA-256 of its contents, checked on load, because torch's zip reader does
# not check its own CRCs (a flipped bit in a weight would load silently); loaded with weights_only.


def _digest(obj, h):
    """Feed every leaf of a checkpoint (nested dicts and lists of tensors and plain values) to h."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k, v in obj.items():
            _digest(k, h)
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):  # a tuple may come back as either; the same content counts the same
        h.update(b"L%d" % len(obj))
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


def checksum(obj):
    h = hashlib.sha256()
    _digest({k: v for k, v in obj.items() if k != "checksum"}, h)
    return h.hexdigest()


def save_checkpoint(path, obj):
    """Write obj (a dict) to path atomically, with its checksum; a write error is one line."""
    obj = {**obj, "checksum": checksum(obj)}
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"  # two processes never share a tmp file
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        kept = "the previous checkpoint is kept" if os.path.isfile(path) else "no checkpoint was written"
        die(f"cannot write {path}: {e.strerror or e}; {kept}; free disk space or choose another --out_dir")


def load_checkpoint(path, method):
    """path -> the checkpoint dict, its checksum verified and its floating tensors finite."""
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}; train one first with `python {method}.py --train` (or pass --out_dir=...)")
    retrain = f"retrain with `python {method}.py --train --overwrite` or restore a copy"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); {retrain}")
    if not isinstance(ckpt, dict):
        die(f"{path} is not a difflm checkpoint (a {type(ckpt).__name__}, not a dict); {retrain}")
    stored = ckpt.pop("checksum", None)
    if stored is None:
        print(f"warning: {path} carries no checksum (written by an older difflm); its contents are not verified",
              file=sys.stderr)
    elif stored != checksum(ckpt):
        die(f"checkpoint {path} is corrupt: its contents do not match its checksum; {retrain}")
    for name, t in _tensors(ckpt):
        if t.is_floating_point() and not torch.isfinite(t).all():
            die(f"checkpoint {path} holds NaN or inf values ({name}); {retrain}")
    return ckpt


def _tensors(obj, name=""):
    """(dotted name, tensor) for every tensor in a nested dict/list."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{name}[{i}]")


def out_dir(cfg, method):
    return cfg.out_dir or os.path.join("out", method)


# ----------------------------------------------------------------------------------------------
# Distributed training (torchrun): one process per device, gloo on CPU, nccl on GPU


def init_distributed(device):
    if "RANK" not in os.environ:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


# ----------------------------------------------------------------------------------------------
# The training loop


def lr_at(cfg, it):
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


@torch.no_grad()
def ema_update(ema_model, model, decay, step):
    # warm-up ramp so early EMA weights are not dominated by the random init
    d = min(decay, (1 + step) / (10 + step))
    ema_p = list(ema_model.parameters())
    torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - d)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def log_json(path, record):
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        die(f"cannot write {path}: {e.strerror or e}; free disk space or choose another --out_dir")


def truncate_log(path, last_iter):
    """Keep the log records of iterations up to last_iter, the ones a resumed checkpoint holds: the
    run logs the later ones again. A line cut short by a kill goes too."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("iter", -1) <= last_iter:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        die(f"cannot write {path}: {e.strerror or e}; free disk space or choose another --out_dir")


@contextlib.contextmanager
def own_out_dir(odir):
    """Hold odir/run.lock for the run, so a second run into the same folder stops at once with a
    line naming the first. The lock is the kernel's (flock): a killed run releases it by dying."""
    import fcntl  # POSIX; imported here so that the rest of the module loads anywhere
    path = os.path.join(odir, "run.lock")
    try:
        os.makedirs(odir, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        die(f"cannot write to {odir}: {e.strerror or e}; choose another --out_dir")
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "a process that is starting"
            die(f"{odir} is in use by another run ({holder}); wait for it, stop it, or choose another --out_dir")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        for tmp in glob.glob(os.path.join(odir, "ckpt.pt.*.tmp")):  # left by a killed run; no one else writes here
            with contextlib.suppress(OSError):
                os.remove(tmp)
        yield


RESUME_KEYS = ("model", "ema", "optimizer", "rng", "data_rng", "iter", "config", "meta")
RUN_KEYS = {"out_dir", "data_dir", "device", "compile", "max_iters", "lr_decay_iters", "eval_interval", "eval_iters",
            "log_interval", "resume", "overwrite", "num_samples", "show", "prefix", "suffix"}  # not part of a model


def fit_state(module, state, path, saved_cfg, cfg, what="model"):
    """module.load_state_dict(state), or one line naming the settings that differ from the checkpoint's."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        now = dataclasses.asdict(cfg)
        differ = [f"{k}={saved_cfg[k]!r} (here {now[k]!r})" for k in now
                  if k in saved_cfg and k not in RUN_KEYS and saved_cfg[k] != now[k]]
        hint = f"it was trained with {', '.join(differ[:4])}" if differ else "it was trained with other settings"
        die(f"{path} does not fit this {what} ({str(e).strip().splitlines()[0][:160]}); {hint}")


def resume_from(path, method, cfg, meta, model, ema_model, opt, batches, rank, device):
    """Load a run's state for --resume, checked as --sample checks it; -> the next iteration."""
    ckpt = load_checkpoint(path, method)
    if ckpt.get("method", method) != method:
        die(f"{path} was trained by {ckpt['method']}.py, not {method}.py; resume it with {ckpt['method']}.py")
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        die(f"{path} lacks {', '.join(missing)}, so it cannot be resumed; sample from it, or start over with --overwrite")
    for k in ("tokenizer", "vocab_size"):
        if ckpt["meta"].get(k) != meta.get(k):
            die(f"{path} was trained on data with {k}={ckpt['meta'].get(k)!r}, this run's has {meta.get(k)!r}; "
                f"resume with the checkpoint's --dataset ({ckpt['config'].get('dataset')})")
    saved = ckpt["config"]
    fit_state(model, ckpt["model"], path, saved, cfg)
    fit_state(ema_model, ckpt["ema"], path, saved, cfg, "model's EMA")
    fit_state(opt, ckpt["optimizer"], path, saved, cfg, "optimizer")
    own = lambda states: states[rank] if rank < len(states) else states[0]  # noqa: E731  (per-rank states)
    torch.set_rng_state(own(ckpt["rng"]))
    if device.type == "cuda" and ckpt.get("cuda_rng"):  # the GPU draws the training noise there
        torch.cuda.set_rng_state(own(ckpt["cuda_rng"]), device)
    batches.gen.set_state(own(ckpt["data_rng"]))
    start = ckpt["iter"] + 1
    if start > cfg.max_iters:
        die(f"{path} is at iteration {ckpt['iter']}, past --max_iters={cfg.max_iters}; raise --max_iters to train on")
    return start


def train(cfg, method, model, loss_fn, evaluate, meta, batches=None):
    """The shared loop.

    model    the method's nn.Module (backbone + head); raw, unwrapped
    loss_fn  loss_fn(model, x0) -> scalar loss for a batch x0 (B, L); may draw its own noise
    evaluate evaluate(model, batches) -> dict of floats on the validation split (EMA weights)
    batches  default: random token windows (Batches); a method with other data passes an object
             with .get(split, batch_size, gen=None) and a torch.Generator .gen
    Returns the EMA model.

    A run owns its out_dir: it holds the folder's lock while it runs, and it starts over an
    earlier run's checkpoint only with --overwrite (--resume continues it).
    """
    device = get_device(cfg)
    rank, world = init_distributed(device)
    odir = out_dir(cfg, method)
    ckpt_path = os.path.join(odir, "ckpt.pt")
    if cfg.resume and cfg.overwrite:
        die("--resume continues the run in out_dir and --overwrite starts it over; pass one of them")
    with own_out_dir(odir) if rank == 0 else contextlib.nullcontext():
        if not cfg.resume and os.path.isfile(ckpt_path):
            if not cfg.overwrite:
                die(f"{odir} holds a checkpoint of an earlier run; continue it with --resume, start over with "
                    f"--overwrite, or choose another --out_dir")
            if rank == 0:
                os.remove(ckpt_path)
        return _train_loop(cfg, method, model, loss_fn, evaluate, meta, batches, device, rank, world)


def _train_loop(cfg, method, model, loss_fn, evaluate, meta, batches, device, rank, world):
    master = rank == 0
    odir = out_dir(cfg, method)
    ckpt_path = os.path.join(odir, "ckpt.pt")
    log_path = os.path.join(odir, "log.jsonl")
    if master:
        print_config(cfg)

    seed_all(cfg.seed + rank)
    model.to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    ema_model.eval()
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    if batches is None:
        batches = Batches(cfg, meta, seed=cfg.seed + 1000 * rank)
    else:
        batches.gen.manual_seed(cfg.seed + 1000 * rank)
    start = 0
    if cfg.resume:
        start = resume_from(ckpt_path, method, cfg, meta, model, ema_model, opt, batches, rank, device)
        if master:
            print(f"resuming from {ckpt_path} at iteration {start}")
    if master:
        truncate_log(log_path, start - 1)  # each iteration is logged once, however often the run was resumed
    n_params = sum(p.numel() for p in model.parameters())
    if master:
        print(f"{method}: {n_params / 1e6:.2f}M parameters, {device}, {world} process(es)")

    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    ctx = autocast(device)
    # sequences count tokens; ddpm.py's points (no block_size) count samples
    per_example, unit = (cfg.block_size, "tok") if isinstance(cfg, TextConfig) else (1, "samples")
    tokens_per_iter = cfg.batch_size * per_example * cfg.grad_accum * world

    def gather_states(state):
        # every rank's RNG state, so a resumed DDP run continues each stream exactly
        if world == 1:
            return [state]
        out = [None] * world
        torch.distributed.all_gather_object(out, state)
        return out

    def checkpoint(it, val):
        rngs, data_rngs = gather_states(torch.get_rng_state()), gather_states(batches.gen.get_state())
        cuda_rngs = gather_states(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
        if master:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "ema": ema_model.state_dict(), "optimizer": opt.state_dict(),
                "rng": rngs, "data_rng": data_rngs, "cuda_rng": cuda_rngs, "iter": it,
                "config": dataclasses.asdict(cfg), "meta": meta, "method": method, "val": val})

    def run_eval():
        # a fixed seed: every eval sees the same batches and noise, and training RNG is untouched
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), ctx:
            torch.manual_seed(cfg.seed + 12345)
            stats = evaluate(ema_model if cfg.ema > 0 else model, batches)
        return stats

    last_good = start - 1 if start > 0 else None
    t0 = time.time()
    t_last, tok_since = t0, 0
    it = start
    for it in range(start, cfg.max_iters):
        lr = lr_at(cfg, it)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            x0 = batches.get("train", cfg.batch_size).to(device, non_blocking=True)
            sync = micro == cfg.grad_accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else train_model.no_sync()), ctx:
                loss = loss_fn(train_model, x0) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        loss_val = float(loss_sum)
        if not math.isfinite(loss_val):
            where = f"the last good checkpoint {ckpt_path} (iteration {last_good}) is kept" if last_good is not None \
                else "no checkpoint was written"
            die(f"loss became {loss_val} at iteration {it}; {where}; lower --lr or raise --warmup_iters")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.ema > 0:
            ema_update(ema_model, model, cfg.ema, it)
        tok_since += tokens_per_iter

        last = it == cfg.max_iters - 1
        if master and (it % cfg.log_interval == 0 or last):
            now = time.time()
            tps = tok_since / max(now - t_last, 1e-9)
            eta = (now - t0) / (it - start + 1) * (cfg.max_iters - it - 1)
            print(f"iter {it:5d}/{cfg.max_iters} | loss {loss_val:.4f} | lr {lr:.2e} | {tps / 1e3:.1f}k {unit}/s | eta {fmt_time(eta)}", flush=True)
            log_json(log_path, {"iter": it, "loss": loss_val, "lr": lr, f"{unit}_per_s": tps, "time": now - t0})
            t_last, tok_since = now, 0
        if (it + 1) % cfg.eval_interval == 0 or last:
            val = run_eval()
            if master:
                print(f"eval  {it:5d} | " + " | ".join(f"{k} {v:.4f}" for k, v in val.items()), flush=True)
                log_json(log_path, {"iter": it, "eval": val, "time": time.time() - t0})
            checkpoint(it, val)
            last_good = it
            t_last, tok_since = time.time(), 0
    if master:
        print(f"done: {cfg.max_iters - start} iterations in {fmt_time(time.time() - t0)}; checkpoint {ckpt_path}")
    if world > 1:
        torch.distributed.barrier()
    return ema_model


def load_for_inference(config_cls, overrides, method, build_model):
    """Checkpoint -> (cfg, EMA model in eval mode on the device, tokenizer, meta)."""
    where = out_dir(config_cls(**overrides), method)
    ckpt = load_checkpoint(os.path.join(where, "ckpt.pt"), method)
    if ckpt.get("method", method) != method:
        die(f"{where}/ckpt.pt was trained by {ckpt['method']}.py, not {method}.py")
    missing = [k for k in ("model", "config", "meta") + (("ema",) if ckpt.get("config", {}).get("ema", 0) > 0 else ())
               if k not in ckpt]
    if missing:
        die(f"{where}/ckpt.pt lacks {', '.join(missing)}; it is not a complete {method}.py checkpoint: retrain with "
            f"`python {method}.py --train --overwrite`")
    # logs go beside the checkpoint that was read, wherever it was trained
    cfg = dataclasses.replace(config_from_checkpoint(config_cls, ckpt, overrides), out_dir=where)
    meta = ckpt["meta"]
    model = build_model(cfg, meta)
    fit_state(model, ckpt["ema"] if cfg.ema > 0 else ckpt["model"], f"{where}/ckpt.pt", ckpt["config"], cfg)
    device = get_device(cfg)
    seed_all(cfg.seed)
    return cfg, model.to(device).eval(), get_tokenizer(meta), meta, ckpt


# ----------------------------------------------------------------------------------------------
# Sampling helpers shared by the discrete methods


def sample_times(batch_size, t_min, device):
    """Low-discrepancy (stratified) times (batch_size,): one uniform draw in each of the batch_size
    equal strata of [0, 1), moved to [t_min, 1]. The batch then covers every noise level, which
    lowers the variance of the time integral against i.i.d. times (MDLM, SEDD)."""
    u = (torch.rand(batch_size, device=device) + torch.arange(batch_size, device=device)) / batch_size
    return (1 - t_min) * u + t_min


def sample_categorical(probs, u):
    """Inverse-CDF draw from unnormalised probs (..., V) with uniforms u (...,) in float64.

    float64 accumulation keeps the tail intact over many small steps (Zheng et al. 2024); the
    fused kernels consume the same uniforms and so return the same tokens.
    """
    cdf = probs.double().cumsum(-1)  # (..., V)
    target = (u.double() * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def encode_prompt(tokenizer, text, flag, allow_unk=False):
    """Text given on the command line -> ids. A word outside a word vocabulary would silently become
    <unk>, so it stops the run unless --allow_unk (a character outside a char vocabulary always does)."""
    unknown = [w for w in tokenizer.split(text) if w not in tokenizer.stoi] if isinstance(tokenizer, WordTokenizer) else []
    if unknown and not allow_unk:
        die(f"{flag} has words outside the model's vocabulary: {' '.join(unknown[:5])}; use known words or --allow_unk")
    return tokenizer.encode(text, flag)


def conditioning(tokenizer, cfg, length):
    """--prefix and --suffix -> (token ids or -1 at free positions) (length,)."""
    pre = encode_prompt(tokenizer, cfg.prefix, "--prefix", cfg.allow_unk) if cfg.prefix else []
    suf = encode_prompt(tokenizer, cfg.suffix, "--suffix", cfg.allow_unk) if cfg.suffix else []
    if len(pre) + len(suf) > length:
        die(f"--prefix and --suffix take {len(pre) + len(suf)} tokens, more than the {length}-token sequence; shorten them or raise --seq_len")
    fixed = torch.full((length,), -1, dtype=torch.long)
    fixed[:len(pre)] = torch.tensor(pre, dtype=torch.long)
    if suf:
        fixed[length - len(suf):] = torch.tensor(suf, dtype=torch.long)
    return fixed


def show_steps(tokenizer, cfg):
    """--show: the sampler's callback show(i, x) after step i (0-based) of cfg.steps, printing the
    first sequence of x (B, L) at eight evenly spaced steps and the last; None without --show."""
    if not cfg.show:
        return None
    every = max(1, cfg.steps // 8)

    def show(i, x):
        if i % every == 0 or i == cfg.steps - 1:
            print(f"--- step {i + 1}/{cfg.steps}\n{tokenizer.decode(x[0].tolist())}")
    return show


# ----------------------------------------------------------------------------------------------
# Generative evaluation: samples scored by the autoregressive baseline (ar.py) as a fixed judge


def load_judge(path, meta=None, device=None):
    """An ar.py checkpoint -> (judge model in eval mode, its meta). Rebuilds ar.py's layout
    (causal backbone over V + 1 ids with [BOS] = V, V-way head) without importing ar.py.
    With meta, dies unless the judge was trained on the same tokenizer and vocabulary."""
    if not os.path.isfile(path):
        die(f"no judge checkpoint at {path}; train the autoregressive baseline on the same data first "
            f"(`python ar.py --train --dataset=...`) or pass --judge=PATH")
    ckpt = load_checkpoint(path, "ar")
    if ckpt.get("method") != "ar":
        die(f"the judge {path} was trained by {ckpt.get('method')}.py; it must be an ar.py checkpoint")
    jm, c = ckpt["meta"], ckpt["config"]
    if meta is not None and any(meta.get(k) != jm.get(k) for k in ("tokenizer", "vocab_size", "chars", "words")):
        die(f"the judge {path} was trained on another tokenizer/vocabulary ({jm.get('tokenizer')}, {jm.get('vocab_size')} ids) "
            f"than these samples ({meta.get('tokenizer')}, {meta.get('vocab_size')}); train ar.py on the same dataset")
    V = jm["vocab_size"]
    judge = nn.ModuleDict({"backbone": Transformer(V + 1, c["n_layer"], c["n_head"], c["n_embd"], c["block_size"], causal=True),
                           "head": nn.Linear(c["n_embd"], V, bias=False)})
    judge.load_state_dict(ckpt["ema"] if c.get("ema", 0) > 0 else ckpt["model"])
    return judge.to(device or "cpu").eval(), jm


@torch.no_grad()
def judge_nll(judge, samples, batch_size=32):
    """Mean -log p_judge per token (nats) of samples (N, T). Each block_size chunk of a sample is
    scored from [BOS], as the judge scores its validation windows."""
    V, L = judge["head"].out_features, judge["backbone"].block_size
    device = judge["head"].weight.device
    total, count = 0.0, 0
    for s in range(0, samples.shape[1], L):
        chunk = samples[:, s:s + L].long()
        if int(chunk.max()) >= V or int(chunk.min()) < 0:
            die(f"samples hold ids outside the judge's vocabulary of {V} (e.g. a [MASK] left unrevealed)")
        for b in range(0, chunk.shape[0], batch_size):
            x = chunk[b:b + batch_size].to(device)
            inp = torch.cat([torch.full_like(x[:, :1], V), x[:, :-1]], 1)  # [BOS] shifted in
            with autocast(device):
                logits = judge["head"](judge["backbone"](inp)).float()  # (b, T, V)
            total += float(F.cross_entropy(logits.transpose(1, 2), x, reduction="sum"))
            count += x.numel()
    return total / count


def unigram_entropy(samples):
    """Entropy (nats) of the token frequencies over all samples (N, T): low values expose collapse."""
    counts = torch.bincount(samples.flatten().long().cpu()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def generative_eval(judge_path, sample_fn, num_samples, meta, what=""):
    """Draw num_samples sequences with sample_fn(n) -> (n, T), time them, score them with the judge.

    Returns {"gen_nll" (nats/token under the judge), "gen_ppl", "gen_entropy" (nats), "sec_per_sample"}
    and prints one line.
    """
    t0 = time.time()
    samples = sample_fn(num_samples)
    sec = (time.time() - t0) / num_samples
    judge, _ = load_judge(judge_path, meta, samples.device)
    nll = judge_nll(judge, samples)
    stats = {"gen_nll": nll, "gen_ppl": math.exp(nll), "gen_entropy": unigram_entropy(samples), "sec_per_sample": sec}
    print(f"gen: NLL {nll:.4f} nats/token under the judge {judge_path} (perplexity {stats['gen_ppl']:.3f}) | "
          f"unigram entropy {stats['gen_entropy']:.4f} nats | {sec:.3f} s/sample "
          f"({num_samples} samples of {samples.shape[1]} tokens{', ' + what if what else ''})")
    return stats
