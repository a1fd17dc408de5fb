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
  kernels             loads csrc/ as a torch extension, or nothing (DIFFLM_KERNELS=0)

Method files import this module; it never imports them.
"""

import contextlib
import copy
import dataclasses
import difflib
import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings

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
    """Knobs every method shares. A method's Config subclasses this and adds its own."""

    # I/O
    out_dir: str = ""  # default out/<method>
    dataset: str = "shakespeare_char"
    data_dir: str = ""  # default data/<dataset>
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the model for training
    # backbone
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
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
    # sampling and evaluation
    num_samples: int = 4
    prefix: str = ""
    suffix: str = ""
    show: bool = False


VERBS = ("train", "sample", "eval")


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
    if cfg.device != "auto":
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            die("--device=cuda but this torch sees no GPU; use --device=cpu")
        return torch.device(cfg.device)
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


def data_path(cfg):
    return cfg.data_dir or os.path.join(ROOT, "data", cfg.dataset)


def write_split(out_dir, train_ids, val_ids, meta):
    """Used by every prepare.py: the two token files and meta.json, each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    dtype = np.uint16 if meta["vocab_size"] < 2**16 else np.uint32
    meta = {**meta, "dtype": np.dtype(dtype).name, "train_tokens": len(train_ids), "val_tokens": len(val_ids)}
    for name, ids in (("train.bin", train_ids), ("val.bin", val_ids)):
        tmp = os.path.join(out_dir, name + ".tmp")
        np.asarray(ids, dtype=dtype).tofile(tmp)
        os.replace(tmp, os.path.join(out_dir, name))
    tmp = os.path.join(out_dir, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, os.path.join(out_dir, "meta.json"))
    return meta


def find_local_copy(name, url, sha256=None):
    """A corpus file: from $DIFFLM_DATA when it has it, else downloaded from its public source."""
    import hashlib
    import urllib.request
    local = os.path.join(os.environ.get(SHARED_DATA_ENV, ""), name)
    if os.environ.get(SHARED_DATA_ENV) and os.path.isfile(local):
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


def prepare_data(cfg, rank=0):
    """Run data/<dataset>/prepare.py once if its files are missing; return the meta dict."""
    path = data_path(cfg)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        script = os.path.join(ROOT, "data", cfg.dataset, "prepare.py")
        if not os.path.isfile(script):
            known = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(ROOT, "data", "*", "prepare.py")))
            die(f"unknown dataset {cfg.dataset!r}: there is no data/{cfg.dataset}/prepare.py (known: {', '.join(known)})")
        if rank == 0:
            print(f"preparing {cfg.dataset} into {path} ...")
            r = subprocess.run([sys.executable, script, f"--out_dir={path}"], capture_output=True, text=True)
            if r.returncode != 0:
                lines = (r.stderr or r.stdout).strip().splitlines()
                raise SystemExit(lines[-1] if lines else f"error: {script} failed")
            print(r.stdout.strip())
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


class Batches:
    """Random windows of block_size tokens from a memmapped split, as in nanoGPT.

    Each rank draws from its own generator, so data streams differ across ranks and the
    generator's state goes into the checkpoint for an exact resume.
    """

    def __init__(self, cfg, meta, seed):
        self.path, self.dtype, self.block = data_path(cfg), np.dtype(meta["dtype"]), cfg.block_size
        self.gen = torch.Generator().manual_seed(seed)
        for split in ("train", "val"):
            n = meta[f"{split}_tokens"]
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
        data = self.data(split)
        n = (len(data) - 1) // self.block
        for b in range(0, n, batch_size):
            starts = range(b * self.block, min(n, b + batch_size) * self.block, self.block)
            yield torch.from_numpy(np.stack([data[s:s + self.block].astype(np.int64) for s in starts]))


def val_batches(batches, cfg, full=False):
    """The validation batches of an evaluate(): every window once, in order (full, for --eval), else
    the same eval_iters random batches at every call, so evaluations during training compare."""
    if full:
        return progress(batches.sequential("val", cfg.batch_size), "eval")
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


class Attention(nn.Module):
    def __init__(self, n_embd, n_head, dropout, causal):
        super().__init__()
        self.n_head, self.causal, self.dropout = n_head, causal, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x, cos, sin, mask=None):
        # mask: None, or (B, 1, 1, L) bool, True where a key may be attended (padding is False)
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, L, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout, causal, cond_dim):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=False, elementwise_affine=cond_dim == 0)
        self.attn = Attention(n_embd, n_head, dropout, causal)
        self.ln2 = nn.LayerNorm(n_embd, bias=False, elementwise_affine=cond_dim == 0)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=False), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * n_embd, n_embd, bias=False), nn.Dropout(dropout))
        # adaLN-Zero (DiT): shift, scale and gate of both sublayers from the time embedding
        self.ada = nn.Linear(cond_dim, 6 * n_embd) if cond_dim else None
        if not cond_dim:  # the same zero-init gates, learned per channel (LayerScale / ReZero):
            self.gate1 = nn.Parameter(torch.zeros(n_embd))  # every block starts as the identity,
            self.gate2 = nn.Parameter(torch.zeros(n_embd))  # worth ~0.13 nats/char to MDLM at 1000 iters

    def forward(self, x, cos, sin, c=None, mask=None):
        if self.ada is None:
            x = x + self.gate1 * self.attn(self.ln1(x), cos, sin, mask)
            return x + self.gate2 * self.mlp(self.ln2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.ln1(x) * (1 + scale1) + shift1, cos, sin, mask)
        return x + gate2 * self.mlp(self.ln2(x) * (1 + scale2) + shift2)


def timestep_embedding(t, dim=256, max_period=10000.0):
    # t (B,) float -> (B, dim) sinusoids
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Transformer(nn.Module):
    """Token ids (B, L) [+ time (B,)] -> hidden states (B, L, n_embd).

    vocab_size counts every input id the method uses (MDLM adds [MASK]). cond_dim > 0 turns on
    adaLN time conditioning; the method decides what "time" is (t, sigma_bar, ...).
    """

    def __init__(self, vocab_size, n_layer, n_head, n_embd, block_size, dropout=0.0, causal=False, cond_dim=0):
        super().__init__()
        if n_embd % n_head or (n_embd // n_head) % 2:
            die(f"n_embd={n_embd} must split into n_head={n_head} heads of even size")
        self.block_size, self.cond_dim = block_size, cond_dim
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, causal, cond_dim) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False, elementwise_affine=cond_dim == 0)
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

    def forward(self, idx, t=None, pad_mask=None):
        # pad_mask: None, or (B, L) bool, True at real tokens; padded keys are then never attended
        # (bidirectional models only: variable-length batches whose outputs do not see the padding)
        B, L = idx.shape
        if L > self.block_size:
            die(f"sequence of {L} tokens is longer than the model's context block_size={self.block_size}")
        cos, sin = self.cos[:L], self.sin[:L]
        x = self.drop(self.wte(idx))
        c = self.time_mlp(timestep_embedding(t)) if self.cond_dim else None
        mask = None
        if pad_mask is not None:
            if self.blocks and self.blocks[0].attn.causal:
                die("pad_mask is for bidirectional Transformers; a causal model pads on the right and ignores it")
            mask = pad_mask[:, None, None, :]
        for block in self.blocks:
            x = block(x, cos, sin, c, mask)
        if self.cond_dim:
            shift, scale = self.ada_f(c)[:, None].chunk(2, dim=-1)
            return self.ln_f(x) * (1 + scale) + shift
        return self.ln_f(x)  # (B, L, C)


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary file and renamed, loaded with weights_only=True


def save_checkpoint(path, obj):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, method):
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}; train one first with `python {method}.py --train` (or pass --out_dir=...)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); retrain with `python {method}.py --train`")


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
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg, method, model, loss_fn, evaluate, meta, batches=None):
    """The shared loop.

    model    the method's nn.Module (backbone + head); raw, unwrapped
    loss_fn  loss_fn(model, x0) -> scalar loss for a batch x0 (B, L); may draw its own noise
    evaluate evaluate(model, batches) -> dict of floats on the validation split (EMA weights)
    batches  default: random token windows (Batches); a method with other data passes an object
             with .get(split, batch_size, gen=None) and a torch.Generator .gen
    Returns the EMA model.
    """
    device = get_device(cfg)
    rank, world = init_distributed(device)
    master = rank == 0
    odir = out_dir(cfg, method)
    ckpt_path = os.path.join(odir, "ckpt.pt")
    log_path = os.path.join(odir, "log.jsonl")
    if master:
        os.makedirs(odir, exist_ok=True)
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
        ckpt = load_checkpoint(ckpt_path, method)
        model.load_state_dict(ckpt["model"])
        ema_model.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        own = lambda states: states[rank] if rank < len(states) else states[0]  # noqa: E731  (per-rank states)
        torch.set_rng_state(own(ckpt["rng"]))
        if device.type == "cuda" and ckpt.get("cuda_rng"):  # the GPU draws the training noise there
            torch.cuda.set_rng_state(own(ckpt["cuda_rng"]), device)
        batches.gen.set_state(own(ckpt["data_rng"]))
        start = ckpt["iter"] + 1
        if master:
            print(f"resuming from {ckpt_path} at iteration {start}")
    n_params = sum(p.numel() for p in model.parameters())
    if master:
        print(f"{method}: {n_params / 1e6:.2f}M parameters, {device}, {world} process(es)")

    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    ctx = autocast(device)
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum * world

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

    last_good = None
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
            print(f"iter {it:5d}/{cfg.max_iters} | loss {loss_val:.4f} | lr {lr:.2e} | {tps / 1e3:.1f}k tok/s | eta {fmt_time(eta)}", flush=True)
            log_json(log_path, {"iter": it, "loss": loss_val, "lr": lr, "tok_per_s": tps, "time": now - t0})
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
    # logs go beside the checkpoint that was read, wherever it was trained
    cfg = dataclasses.replace(config_from_checkpoint(config_cls, ckpt, overrides), out_dir=where)
    meta = ckpt["meta"]
    model = build_model(cfg, meta)
    try:
        model.load_state_dict(ckpt["ema"] if cfg.ema > 0 else ckpt["model"])
    except RuntimeError as e:
        die(f"the checkpoint does not fit this model ({str(e).splitlines()[0]}); it was trained with other settings")
    device = get_device(cfg)
    seed_all(cfg.seed)
    return cfg, model.to(device).eval(), get_tokenizer(meta), meta, ckpt


# ----------------------------------------------------------------------------------------------
# Sampling helpers shared by the discrete methods


def sample_categorical(probs, u):
    """Inverse-CDF draw from unnormalised probs (..., V) with uniforms u (...,) in float64.

    float64 accumulation keeps the tail intact over many small steps (Zheng et al. 2024); the
    fused kernels consume the same uniforms and so return the same tokens.
    """
    cdf = probs.double().cumsum(-1)  # (..., V)
    target = (u.double() * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def conditioning(tokenizer, cfg, length):
    """--prefix and --suffix -> (token ids or -1 at free positions) (length,)."""
    pre = tokenizer.encode(cfg.prefix, "--prefix") if cfg.prefix else []
    suf = tokenizer.encode(cfg.suffix, "--suffix") if cfg.suffix else []
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


# ----------------------------------------------------------------------------------------------
# Kernels: csrc/ built as a torch extension on first use, or nothing

_KERNELS = {}


@contextlib.contextmanager
def _build_lock(build):
    """Hold an OS lock on the build folder while torch builds or loads into it. torch's own marker
    file (build/lock) outlives a killed build, and every later load would then wait on it forever,
    silently; under the OS lock (freed when its holder dies) a marker left there is stale."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: torch's marker alone
        yield
        return
    with open(os.path.join(build, "difflm.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        stale = os.path.join(build, "lock")
        if os.path.exists(stale):
            warnings.warn(f"removing {stale}, left by a kernel build that was killed")
            os.remove(stale)
        yield


def _build_kernels(sources):
    """JIT-build sources (ninja, cached per device kind) -> torch.ops.difflm, or None with one warning.
    A failed CUDA build (nvcc missing, or not the CUDA torch was built with) falls back to the C++ ops
    alone, so the CPU keeps its kernels and the GPU runs the PyTorch path."""
    from torch.utils import cpp_extension
    cuda = any(f.endswith(".cu") for f in sources)
    failure = None
    for kind in (("cuda", "cpu") if cuda else ("cpu",)):
        try:
            build = os.path.join(os.environ.get("DIFFLM_BUILD", os.path.expanduser("~/.cache/difflm")), kind)
            os.makedirs(build, exist_ok=True)
            with _build_lock(build):
                cpp_extension.load(
                    name="difflm_kernels", is_python_module=False, build_directory=build, verbose=False,
                    sources=[f for f in sources if kind == "cuda" or f.endswith(".cpp")],
                    extra_cflags=["-O3", "-fopenmp"] + (["-DDIFFLM_CUDA"] if kind == "cuda" else []),
                    extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3"])
        except Exception as e:
            failure = failure or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        if kind == "cpu" and cuda:
            warnings.warn(f"difflm CUDA kernels failed to build ({failure}); the C++ kernels are built, "
                          "tensors on the GPU take the PyTorch path")
        _register_kernel_python()
        return torch.ops.difflm
    warnings.warn(f"difflm kernels failed to build ({failure}); using the PyTorch path "
                  "(set DIFFLM_KERNELS=0 to skip the build)")
    return None


def load_kernels(src_dir=None):
    """The compiled extension (ops under torch.ops.difflm), or None.

    The module built by `DIFFLM_BUILD_EXT=1 pip install -e .` when there is one (rebuild it after
    editing csrc/), else a JIT build of csrc/ with ninja, cached. None when DIFFLM_KERNELS=0, when
    csrc/ has no sources, or when the build fails (one warning; the readable PyTorch path runs).
    """
    src_dir = src_dir or os.path.join(ROOT, "csrc")
    if src_dir in _KERNELS:
        return _KERNELS[src_dir]
    module = None
    if os.environ.get("DIFFLM_KERNELS", "1") != "0":
        sources = sorted(glob.glob(os.path.join(src_dir, "*.cpp")))
        if torch.cuda.is_available():
            sources += sorted(glob.glob(os.path.join(src_dir, "*.cu")))
        if src_dir == os.path.join(ROOT, "csrc") and importlib.util.find_spec("difflm_kernels"):
            import difflm_kernels  # noqa: F401  (importing it registers torch.ops.difflm)
            sources, module = [], torch.ops.difflm
            _register_kernel_python()
        if sources:
            module = _build_kernels(sources)
    _KERNELS[src_dir] = module
    return module


_REGISTERED = []


def _register_kernel_python():
    """Fake (shape-only) implementations for torch.compile, and the autograd of score_entropy.

    score_entropy only reads the scores; its backward streams them once more and writes the
    gradient, already scaled by the incoming gradient of the (B, L) loss. score_entropy_with_grad
    (CPU) writes the gradient of loss.sum() in the loss's own pass; its backward scales it in place.
    Either way the gradient is the only B x L x N tensor made.
    """
    if _REGISTERED:
        return
    _REGISTERED.append(True)
    lib = "difflm::"
    torch.library.register_fake(lib + "score_entropy", lambda log_score, xt, x0, sigma_bar, graph:
                                log_score.new_empty(log_score.shape[:2], dtype=torch.float32))
    torch.library.register_fake(lib + "score_entropy_backward", lambda grad_loss, log_score, *args:
                                torch.empty_like(log_score))
    torch.library.register_fake(lib + "score_entropy_with_grad", lambda log_score, *args: (
                                log_score.new_empty(log_score.shape[:2], dtype=torch.float32), torch.empty_like(log_score)))
    for name in ("sedd_euler_step", "sedd_tweedie_step", "mdlm_ancestral_step"):
        torch.library.register_fake(lib + name, lambda scores, xt, *args, **kwargs: torch.empty_like(xt))
    torch.library.register_fake(lib + "nearest_embedding", lambda x, E, metric:  # Diffusion-LM's clamp
                                x.new_empty(x.shape[:1], dtype=torch.long))

    def recompute(ctx, grad_loss):
        log_score, xt, x0, sigma_bar = ctx.saved_tensors
        return torch.ops.difflm.score_entropy_backward(grad_loss.float().contiguous(), log_score, xt, x0, sigma_bar,
                                                       ctx.graph)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.graph = inputs[4]

    def backward(ctx, grad_loss):
        return recompute(ctx, grad_loss), None, None, None, None

    torch.library.register_autograd(lib + "score_entropy", backward, setup_context=setup_context)

    def setup_context_with_grad(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.grad = output[1]  # not saved_tensors: backward scales it in place
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # else backward gets a B x L x N zero tensor for output[1]

    def backward_with_grad(ctx, grad_loss, _):
        if ctx.grad is None:  # a retained graph's second backward: the first one consumed it
            return recompute(ctx, grad_loss), None, None, None, None
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(grad_loss.unsqueeze(-1)), None, None, None, None

    torch.library.register_autograd(lib + "score_entropy_with_grad", backward_with_grad,
                                    setup_context=setup_context_with_grad)


def score_entropy_kernel(k, log_score, xt, x0, sigma_bar, graph):
    """The fused score entropy (B, L) of sedd.py. On the CPU, when a gradient will be asked for,
    the loss's pass writes the gradient too: there the exps cost more than the bytes. On a GPU
    (and under torch.compile) the forward only reads and the backward recomputes."""
    if (log_score.device.type == "cpu" and log_score.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        return k.score_entropy_with_grad(log_score, xt, x0, sigma_bar, graph)[0]
    return k.score_entropy(log_score, xt, x0, sigma_bar, graph)


def kernel_ready(k, t):
    """True when the compiled ops k (from load_kernels) take tensor t: a built device, fp32 or bf16."""
    if k is None or t.dtype not in (torch.float32, torch.bfloat16):
        return False
    return t.device.type == "cpu" or (t.device.type == "cuda" and k.cuda_built())
