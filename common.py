"""
common.py: only what two or more method files share.

  config and CLI      dataclass fields become typed --key=value overrides
  device, precision   cuda + bf16 autocast when present, else cpu + fp32; seeds
  the backbone        a bidirectional (or causal) Transformer with rotary positions, SDPA and optional
                      adaLN time conditioning; it returns hidden states, each method adds its own head
  checkpoints         one atomic, checksummed file per run, loaded with weights_only
  sampling helpers    float64 categorical draws, low-discrepancy times, --show

Token data lives in corpus.py and the training loop in trainer.py; both build on this module.
Method files import this module; it never imports them.
"""

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import inspect
import math
import os
import re
import socket
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import difflm_ops

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA_ENV = "DIFFLM_DATA"  # a folder holding offline copies (tinyshakespeare.txt, gpt2/, e2e/)


def die(msg):
    """Stop with one line on stderr and exit status 1 (bad input, missing files)."""
    raise SystemExit(f"error: {msg}")


# ----------------------------------------------------------------------------------------------
# Config and CLI


class ArgumentParser(argparse.ArgumentParser):
    """argparse for bench.py and the data/*/prepare.py scripts, whose bad flags stop with one line as the
    methods' do, not argparse's usage block."""

    def error(self, message):
        die(f"{self.prog}: {message} (--help lists the options)")


@dataclasses.dataclass
class BaseConfig:
    """Knobs every method takes. A method's Config adds the blocks below that it uses, then its own."""

    # I/O
    out_dir: str = ""  # default out/<method>
    dataset: str = "shakespeare_char"
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the model for training
    # optimisation
    batch_size: int = 32
    grad_accum: int = 1
    max_iters: int = 2000
    lr_decay_iters: int = 0  # 0: decay over max_iters; past it the rate stays at min_lr
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
    eval_split: str = "val"  # val | test
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
TRUE, FALSE = ("1", "true", "yes", "on", ""), ("0", "false", "no", "off")  # what a bool --key takes
# key -> the verbs that read it ("a|b c": a, or b with c; --train keeps --eval's keys); a Config's READ_BY adds its own
READ_BY = {"gen": "eval", "eval_split": "eval", "samples_in": "eval gen", "eval_data": "eval", "eval_file": "eval", "timesteps": "sample|eval",
           "stride": "sample|eval", "classifier_iters": "train_classifier|train", "classifier_layers": "train_classifier|train",
           **dict.fromkeys("judge eval_t_samples eval_points eval_mrs eval_batches control_targets control_samples".split(), "eval|train"),
           **dict.fromkeys("samples_out prefix suffix infill placeholder control length source show png".split(), "sample"),
           **dict.fromkeys("max_iters weight_decay beta1 beta2 grad_clip grad_accum eval_interval eval_iters compile resume "
                           "overwrite".split(), "train"),
           **dict.fromkeys("lr min_lr warmup_iters lr_decay_iters log_interval".split(), "train|train_classifier"),
           **dict.fromkeys("batch_size dataset data_dir".split(), "train|eval|train_classifier"),
           **dict.fromkeys("t_min p_keep p_replace p_insert p_delete span_lambda boot_prob target".split(), "train|eval"),
           "dropout": "train|train_classifier", **dict.fromkeys(("num_samples", "mbr"), "sample|train|eval gen")}
TIED = {"dataset": (None, ("data_dir",))}  # key -> (the value its saved companions serve, None: any; the companions)
SHARED_KEYS = {f.name for c in (BaseConfig, TextConfig, PromptConfig) for f in dataclasses.fields(c)}
RESUMED = {}  # checkpoint path -> the checkpoint parse_args read for --resume, which trainer.resume_from takes


def _convert(name, value, typ):
    """--name=value -> a value of typ, or one line saying what --name takes."""
    with contextlib.suppress(ValueError):
        if typ is not bool:
            return typ(value)
        if value.lower() in TRUE + FALSE:
            return value.lower() in TRUE
    die(f"--{name} takes {'true or false' if typ is bool else 'a whole number' if typ is int else 'a number'}, not {value!r}")


def parse_args(config_cls, argv=None, known=VERBS):
    """Parse `--train|--sample|--eval` (the known verbs) and `--key=value` overrides -> (verbs, cfg, overrides): overrides
    holds the keys given; where a checkpoint decides the run (not a fresh --train), cfg is its config with them on top."""
    argv = sys.argv[1:] if argv is None else argv
    module = sys.modules[config_cls.__module__]  # the method file: its docstring for --help, its name
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    types = {name: f.type if f.type in (bool, int, float, str) else type(f.default) for name, f in fields.items()}
    verbs, overrides = [], {}
    if "-h" in argv or "--help" in argv:  # every key, its default and the comment beside it in the source
        said = {k: c for cls in reversed(config_cls.__mro__[:-1])  # a method's own line over a shared one
                for k, c in re.findall(r"^ +(\w+): [^\n=]+=[^\n#]*# *(.+)$", inspect.getsource(cls), re.M)}
        keys = [f"  --{name}={f.default!r}" for name, f in fields.items()]
        print((module.__doc__ or "").strip() + f"\n\nverbs: {' '.join('--' + v for v in known)}\nconfig keys (--key=value):")
        print("\n".join(f"{k:<{min(32, max(map(len, keys)))}}  {said.get(name, '')}".rstrip() for k, name in zip(keys, fields)))
        sys.exit(0)
    for arg in argv:
        if not arg.startswith("--"):
            die(f"unexpected argument {arg!r}; use {', '.join('--' + v for v in known)} or --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key in known and not eq:
            verbs.append(key)
            continue
        if key not in fields and (key in SHARED_KEYS or key in READ_BY):  # another method's key
            die(f"--{key} is not used by {os.path.basename(module.__file__)}; drop it")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields) + list(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see the Config class for the keys"
            die(f"--{key} takes no value; write --{key}" if key in known else f"unknown config key --{key}{hint}")
        if not eq and types[key] is not bool:
            die(f"--{key} needs a value: --{key}=...")
        overrides[key] = _convert(key, value, types[key])
    if not verbs:
        die(f"say what to do: {', '.join('--' + v for v in known[:-1])} or --{known[-1]} (plus --key=value overrides)")
    if "train" not in verbs and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would do it all again
        die(f"only --train runs under torchrun; run {' '.join('--' + v for v in verbs)} with python")
    for key, needs in {**READ_BY, **getattr(config_cls, "READ_BY", {})}.items():
        alts = [alt.split() for alt in needs.split("|") if alt.split()[0] in known]  # this method's verbs
        if overrides.get(key) and not any(all(n in verbs or overrides.get(n) for n in alt) for alt in alts):
            want = " or ".join(" ".join("--" + n for n in alt) for alt in alts)
            add = " ".join("--" + n for n in alts[0] if not (n in verbs or overrides.get(n))) if len(alts) == 1 else "one"
            die(f"--{key} is read by {want} only; add {add} or drop it")
    published = ("n_layer", "n_head", "n_embd") if overrides.get("init_from") else ()  # hub.py checks these against its config
    cfg = config_cls(**{k: v for k, v in overrides.items() if k not in published})
    method = os.path.splitext(os.path.basename(module.__file__))[0]
    path, ckpt = os.path.join(out_dir(cfg, method), "ckpt.pt"), None
    if "train" in verbs and cfg.resume:
        ckpt = RESUMED[path] = load_checkpoint(path, method)
        for k in ("dataset", "seed") if issubclass(config_cls, TextConfig) else ("seed",):  # its data (ddpm's may move), its draws
            saved = (ckpt.get("config") or {}).get(k)
            if saved is not None and overrides.get(k, saved) != saved:  # before another corpus is prepared, or downloaded
                die(f"--{k}={overrides[k]}: the run being resumed has --{k}={saved}; drop it, or train a new model")
    elif not getattr(cfg, "init_from", "") and os.path.isfile(path) and not ("train" in verbs and cfg.overwrite):
        try:  # its config alone (the loader reads it whole); a file that fails here is read whole, to say why
            peek = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            peek = None if "train" in verbs else load_checkpoint(path, method)  # training refuses it for being there
        if isinstance(peek, dict) and peek.get("method", method) != method:
            die(f"{path} was trained by {peek['method']}.py, not {method}.py" + (
                f"; continue it with `python {peek['method']}.py --train --resume --out_dir={out_dir(cfg, method)}`, "
                "start over with --overwrite, or choose another --out_dir" if "train" in verbs else ""))
        ckpt = None if "train" in verbs else peek  # a new run's settings are its flags', not the checkpoint's
    if isinstance(ckpt, dict) and ckpt.get("method", method) == method and isinstance(ckpt.get("config"), dict):
        cfg = config_from_checkpoint(config_cls, ckpt, overrides)  # the shape and FIXED keys stay
    if not 0 <= cfg.seed < 2**62:  # the generators take 64 bits, and the runs add offsets (per rank, per draw)
        die(f"--seed={cfg.seed} must be a whole number from 0 to 2**62 - 1")
    torch.manual_seed(cfg.seed)  # before main() builds its model, so initial weights are reproducible
    return verbs, cfg, overrides


def check_choice(cfg, key, known):
    """--key must name one of known -> else one line listing them."""
    if getattr(cfg, key) not in known:
        die(f"unknown --{key}={getattr(cfg, key)!r}; use {' or '.join(k or '(empty)' for k in known)}")


def check_at_least(cfg, keys, low):
    """Each --key must be a finite number >= low (NaN and infinity are not) -> else one line naming it."""
    for k in keys:
        if not low <= getattr(cfg, k) < math.inf:
            die(f"--{k}={getattr(cfg, k)} must be at least {low} (and finite)")


def check_between(cfg, keys, low, high):
    """Each --key must lie strictly between low and high -> else one line naming it."""
    for k in keys:
        if not low < getattr(cfg, k) < high:
            die(f"--{k}={getattr(cfg, k)} must be in ({low}, {high})")


def check_common(cfg):
    """The shared keys' values -> one line naming the flag, before any data or model is touched (check_config's first)."""
    text = isinstance(cfg, TextConfig)
    if text:  # ddpm's 2-D data has no test split
        check_choice(cfg, "eval_split", ("val", "test"))
    check_at_least(cfg, ["batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval",
                         "num_samples"] + (["n_layer", "n_head", "n_embd", "block_size"] if text else []), 1)
    check_at_least(cfg, ("lr_decay_iters", "warmup_iters", "min_lr", "weight_decay", "grad_clip"), 0)
    check_between(cfg, ("lr",), 0, math.inf)  # NaN and infinity fail too
    if cfg.min_lr > cfg.lr:
        die(f"--min_lr={cfg.min_lr:g} is above --lr={cfg.lr:g}: the decay would raise the rate; lower --min_lr")
    for k in ("beta1", "beta2", "ema") + (("dropout",) if text else ()):
        if not 0 <= getattr(cfg, k) < 1:  # NaN fails this too
            die(f"--{k}={getattr(cfg, k)} must be in [0, 1)")
    if text and (cfg.n_embd % cfg.n_head or cfg.n_embd // cfg.n_head % 2):
        die(f"--n_embd={cfg.n_embd} must be --n_head={cfg.n_head} times an even head size (rotary positions turn pairs)")
    get_device(cfg)


def per_command(config_cls):
    """What one command asks, which a checkpoint's config keeps none of: its folder, its device, a spent init_from,
    and every key that --train does not read (output files, conditioning), the Config's own READ_BY's too."""
    read_by = {**READ_BY, **getattr(config_cls, "READ_BY", {})}
    return {"out_dir", "init_from", "resume", "overwrite", "device", *(k for k, v in read_by.items() if "train" not in v)}


def config_from_checkpoint(config_cls, ckpt, overrides):
    """The checkpoint's config (keys older ones saved under other names RENAMED) with the command line's on top.
    The model's shape and the Config's FIXED keys (what else it learnt, e.g. a T) stay; what one command asked
    (per_command) is not the next one's; the saved keys TIED to a key go when it takes another value (another
    --dataset: the saved data_dir, which would win over it) or never served them (an eta saved beside no DDIM)."""
    config = {getattr(config_cls, "RENAMED", {}).get(k, k): v for k, v in ckpt["config"].items()}
    drop = {t for k, (serves, companions) in {**TIED, **getattr(config_cls, "TIED", {})}.items() for t in companions
            if overrides.get(k, config.get(k)) != config.get(k) or serves not in (None, config.get(k))}
    saved = {k: v for k, v in config.items() if k in {f.name for f in dataclasses.fields(config_cls)} - per_command(config_cls) - drop}
    for k in ("n_layer", "n_head", "n_embd", "block_size") + getattr(config_cls, "FIXED", ()):
        if k in overrides and overrides[k] != saved.get(k):
            die(f"--{k} is fixed by the checkpoint ({saved.get(k)}); drop it or train a new model")
    return config_cls(**{**saved, **overrides})


# ----------------------------------------------------------------------------------------------
# Device, precision, seeds


def get_device(cfg):
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        die(f"unknown --device={cfg.device}; use auto, cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device={cfg.device} but this torch sees no GPU; use --device=cpu")
    n, local = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's processes here
    torchrun = cfg.device in ("auto", "cuda") and "LOCAL_RANK" in os.environ and torch.cuda.is_available()
    device = (torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torchrun else torch.device(cfg.device)  # a rank's GPU
              if cfg.device != "auto" else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if device.index is not None and (device.index >= n or (local > 1 and not torchrun)):
        die(f"torchrun's process {device.index} has no GPU of its own: this machine has {n}; use --nproc_per_node={n}" if torchrun
            else f"--device={cfg.device} puts every torchrun process on one GPU; use --device=cuda (each takes its own)"
            if local > 1 else f"--device={cfg.device} but this machine has {n} GPU(s); use cuda:0 .. cuda:{n - 1}")
    if device.type == "cuda":  # TF32 for what stays fp32, from the start: a sampler gives the same after --train as alone
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device):
    """bf16 autocast on GPU (get_device turned TF32 on for what stays fp32); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def progress(iterable, desc, total=None, every=60.0):
    """iterable, with a tqdm bar on stderr when it is a terminal (evaluation, sampling, benchmarks); elsewhere (a batch
    job's log, where a bar's redraws would pile up) a line every `every` seconds, so a long pass shows it moves."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
    return _logged(iterable, desc, total if total is not None else len(iterable) if hasattr(iterable, "__len__") else None, every)


def _logged(iterable, desc, total, every):
    start = last = time.monotonic()
    for i, item in enumerate(iterable, 1):
        yield item  # the caller's work on it happens here, so the clock below counts it
        if time.monotonic() - last >= every:
            last = time.monotonic()
            print(f"{desc}: {i}{f' of {total}' if total else ''} after {last - start:.0f} s", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The backbone: a Transformer with rotary positions and optional adaLN time conditioning


def rotary_tables(block_size, head_dim, base=10000.0):
    # (L, 1, 1, hd) each, to broadcast against (B, L, 2, H, hd): cos twice; sin, its first half negated
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(block_size).float(), inv)  # (L, hd/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.cat([cos, cos], -1)[:, None, None], torch.cat([-sin, sin], -1)[:, None, None]


@difflm_ops.fused("rotary", on_load=difflm_ops.register_rotary_autograd)  # one pass in csrc/
def apply_rotary(qkv, cos, sin):
    # qkv (B, L, 3, H, hd): queries and keys turned by position, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    x1, x2 = qkv[:, :, :2].chunk(2, dim=-1)
    turned = qkv[:, :, :2] * cos + torch.cat([x2, x1], dim=-1) * sin
    return torch.cat([turned.type_as(qkv), qkv[:, :, 2:]], dim=2)  # values as they are


class KVCache:
    """Keys and values of every layer for positions 0..pos-1 of an incremental causal decode: a prefill into the empty
    cache, then one token at a time. Keys are stored already rotated at their own positions, so a new query attends to
    them as they are. Each layer's (2, B, H, block_size, hd) is allocated at its first write, in the keys' dtype."""

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
        qkv = self.qkv(x).view(B, L, 3, self.n_head, C // self.n_head)  # (B, L, 3, H, hd)
        q, k, v = apply_rotary(qkv, cos, sin).permute(2, 0, 3, 1, 4)  # (B, H, L, hd) each
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
            self.gate1, self.gate2 = nn.Parameter(torch.zeros(n_embd)), nn.Parameter(torch.zeros(n_embd))  # identity at first

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
        for name, table in zip(("cos", "sin"), rotary_tables(block_size, n_embd // n_head)):
            self.register_buffer(name, table, persistent=False)
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
# The cross-entropy over a vocabulary, for every loss of a head over token ids


NLL_CHUNK = 2**24  # elements of fp32 work (64 MB) a chunk of rows at most, or one row


class TokenNLL(torch.autograd.Function):
    """-log softmax(z)[y] in fp32 (M,) from logits z (M, V) in their own dtype, y (M,) ids (y < 0: a row that counts 0).
    F.cross_entropy(z.float()) keeps an fp32 log-softmax of z for its backward and builds more fp32 copies around it;
    this keeps z alone, works through fp32 a chunk of rows at a time, and computes the softmax again in the backward."""

    @staticmethod
    def forward(ctx, z, y):
        ctx.rows = max(1, NLL_CHUNK // z.shape[-1])
        ctx.save_for_backward(z, y)
        chunks = zip(z.split(ctx.rows), y.clamp(min=0)[:, None].split(ctx.rows))
        logp = torch.cat([c.float().log_softmax(-1).gather(-1, yc)[:, 0] for c, yc in chunks])  # (M,)
        return logp.neg().masked_fill(y < 0, 0)

    @staticmethod
    def backward(ctx, g):
        # g (M,) -> the gradient (softmax(z) - onehot(y)) g of z (M, V), in z's dtype
        z, y = ctx.saved_tensors
        g = g.masked_fill(y < 0, 0)[:, None]  # (M, 1): rows without a target get no gradient
        dz = torch.empty_like(z)
        for c, yc, gc, d in zip(*(t.split(ctx.rows) for t in (z, y.clamp(min=0)[:, None], g, dz))):
            # softmax(z) - onehot(y) in fp32, times g into d; unnamed, so freed before the next chunk's is made
            torch.mul(c.float().softmax(-1).scatter_add_(-1, yc, torch.full_like(gc, -1.0)), gc, out=d)
        return dz, None


token_nll = TokenNLL.apply


# ----------------------------------------------------------------------------------------------
# Checkpoints: one file holds everything a run needs to resume, sample and evaluate. Written to a temporary
# name of this process and renamed, so a crash or a full disk never leaves a broken ckpt.pt; it carries a SHA-256
# of its contents, checked on load: torch's zip reader does not check its CRCs (a flipped bit would load silently).


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


def write_file(path, content, fix):
    """Text lines, or what content(f) writes to a binary file, to path atomically; an error: one line ending in fix."""
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"  # two processes never share a tmp file
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") if callable(content) else open(tmp, "w", encoding="utf-8") as f:
            content(f) if callable(content) else f.writelines(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if os.name == "posix":  # the rename lasts a power cut only once the folder holding it is synced too
            folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    except BaseException as e:  # a failed or interrupted write leaves no partial tmp file behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        e = (e.__context__ or e) if isinstance(e, RuntimeError) else e  # torch's zip writer wraps a full disk, and Ctrl-C
        if not isinstance(e, (OSError, RuntimeError)):
            raise e
        die(f"cannot write {path}: {getattr(e, 'strerror', None) or e}; {fix}")


def save_checkpoint(path, obj):
    """Write obj (a dict) to path atomically, with its checksum; a write error is one line."""
    obj = {**obj, "checksum": checksum(obj)}
    kept = "the previous checkpoint is kept" if os.path.isfile(path) else "no checkpoint was written"
    write_file(path, lambda f: torch.save(obj, f), f"{kept}; free disk space or choose another --out_dir")


def load_checkpoint(path, method, verb="--train"):
    """path -> the checkpoint dict, its checksum verified and its floating tensors finite (verb: what wrote it)."""
    folder = os.path.dirname(path) or "."
    if os.path.isfile(folder):  # --out_dir named the checkpoint itself
        die(f"{folder} is a file, not a run's folder; pass the folder that holds it, --out_dir={os.path.dirname(folder) or '.'}")
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}; train one there with `python {method}.py {verb} --out_dir={folder}`, or name the folder holding one")
    retrain = f"retrain with `python {method}.py {verb} --overwrite --out_dir={folder}` or restore a copy"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); {retrain}")
    if not isinstance(ckpt, dict):
        die(f"{path} is not a difflm checkpoint (a {type(ckpt).__name__}, not a dict); {retrain}")
    stored = ckpt.pop("checksum", None)  # a checksum-shaped value under another key: that key's name is damaged
    if stored is None and not any(isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) for v in ckpt.values()):
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
# Sampling helpers shared by the discrete methods


def sample_times(batch_size, t_min, device):
    """Low-discrepancy times (batch_size,): one uniform draw in each of batch_size equal strata of [0, 1), moved to
    [t_min, 1], so a batch covers every noise level: a lower-variance time integral than i.i.d. times (MDLM, SEDD)."""
    u = (torch.rand(batch_size, device=device) + torch.arange(batch_size, device=device)) / batch_size
    return (1 - t_min) * u + t_min


def masked_rows(xt, mask_id):
    """The positions of xt (B, L) that hold mask_id, as (b, l) index tensors (R,) each (nonzero(as_tuple=True)),
    where the absorbing methods run their head in training. R changes every batch; marked dynamic, it makes
    --compile trace the model once for any R, not once for the first batch's R and again for the rest."""
    rows = (xt == mask_id).nonzero(as_tuple=True)
    for r in rows:
        torch._dynamo.maybe_mark_dynamic(r, 0)
    return rows


def sample_categorical(probs, u):
    """Inverse-CDF draw from unnormalised probs (..., V) with uniforms u (...,) in float64: float64 accumulation keeps the
    tail intact over many small steps (Zheng et al. 2024); the fused kernels take the same uniforms, to the same tokens."""
    cdf = probs.double().cumsum(-1)  # (..., V)
    idx = torch.searchsorted(cdf, (u.double() * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


CONTROL_BLOCK = 2**24  # score entries (128 MB in float64) a block of the decoding controls' work holds at most


def by_blocks(fn, *args):
    """fn(*args) on a block of the sequences at a time, concatenated: fn's float64 work (the decoding controls
    make several (B, L, N) float64 tensors, 26 GB each at B = 64, L = 1024, N = 50258) stays a block's size
    whatever the batch. args[0]: the scores (B, L, N); every tensor argument is cut along dim 0 alike, anything
    else (None) passed whole. fn must treat each sequence on its own, so the result is that of one call."""
    B, size = args[0].shape[0], max(1, args[0][0].numel())
    n = max(1, CONTROL_BLOCK // size)  # sequences per block, at least one
    if B <= n:
        return fn(*args)
    cut = lambda a, i: a[i:i + n] if isinstance(a, torch.Tensor) else a  # noqa: E731
    return torch.cat([fn(*(cut(a, i) for a in args)) for i in range(0, B, n)])


def semi_autoregressive(chain, fixed, block_size, stride):
    """fixed (B, T) token ids or -1 at free positions -> (samples (B, T), network calls). chain(window) runs one reverse
    chain on a window (B, W), W <= block_size, of ids or -1 and returns (x_0 (B, W), calls). T <= block_size: one chain.
    Longer: semi-autoregressive rounds; each keeps the last block_size - stride generated tokens as a clean prefix (held
    fixed) and generates stride new ones, so any sampler that holds fixed positions extends past its context."""
    T = fixed.shape[1]
    if T > block_size and not 0 < stride < block_size:  # block_size 1: no context to carry into a next round
        die(f"a model of block_size={block_size} cannot extend past its context with stride {stride}; use --seq_len <= {block_size}")
    out, calls = chain(fixed[:, :block_size])
    pieces, done = [out], min(T, block_size)
    while done < T:
        new = min(stride, T - done)
        context = torch.cat(pieces, 1)[:, -(block_size - new):]
        out, c = chain(torch.cat([context, fixed[:, done:done + new]], 1))
        pieces.append(out[:, -new:])
        done, calls = done + new, calls + c
    return torch.cat(pieces, 1), calls


def show_steps(tokenizer, cfg):
    """--show: the sampler's callback show(i, x) after step i (0-based) of cfg.steps, printing the first sequence of x (B, L)
    at eight evenly spaced steps and the last; None without --show."""
    if not cfg.show:
        return None
    every = max(1, cfg.steps // 8)

    def show(i, x):
        if i % every == 0 or i == cfg.steps - 1:
            print(f"--- step {i + 1}/{cfg.steps}\n{tokenizer.decode(x[0].tolist())}")
    return show
