"""
DiffusER: discrete diffusion by edit-based reconstruction.
Reid, Hellendoorn and Neubig, "DiffusER: Discrete Diffusion via Edit-based Reconstruction", ICLR 2023.

Forward process: T (12) steps of Levenshtein edits (keep 60%, replace 20%, insert 10%, delete 10%, Poisson(3)
spans; new tokens from the corpus unigram distribution), each logged, so the reverse edits x_t -> x_{t-1} are
known exactly: a tag KEEP / DELETE / REPLACE per token of x_t, an insertion count per gap, and the tokens that
fill the slots. A tagger predicts the edits, a generator fills the slots. Decoding revises a bootstrap (source
text, empty, random tokens, or a draft of ar.py) T times: greedy, sampled, beam, or the paper's 2D beam.

The authors released no code; this file's own choices (docs/diffuser.md, Departures): the generator is the bidirectional
backbone filling the slots left to right, one per call; a bootstrap gets one extra trained revision t = T + 1
towards x_0; a revision learns every edit back to x_0 (--target=x0), not only the last step's (paper: --target=prev).

    python diffuser.py --train                          # E2E MR -> text, source bootstrap, ~15 min on 2 CPU cores
    python diffuser.py --sample --show                  # realise validation MRs, each revision with its edits marked
    python diffuser.py --sample --source="name : The Eagle | Type : pub | area : riverside"
    python diffuser.py --eval --decode=beam2d           # BLEU on E2E validation (pip install sacrebleu)
    python diffuser.py --train --dataset=shakespeare_word --bootstrap=random --out_dir=out/diffuser_shk
    python ar.py --train --dataset=shakespeare_word --out_dir=out/ar_shk    # the drafter / judge on the same words
    python diffuser.py --sample --out_dir=out/diffuser_shk --bootstrap=autoregressive --ar_ckpt=out/ar_shk/ckpt.pt
    python diffuser.py --eval --gen --out_dir=out/diffuser_shk --judge=out/ar_shk/ckpt.pt   # NLL of samples under ar.py
"""

import collections
import dataclasses
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn

import common
import corpus
import trainer

KEEP, DELETE, REPLACE = 0, 1, 2  # reverse-edit tags of the tokens of x_t; insertions live in the gaps
INSERT = 3  # an insertion slot in walk() (never a tag)
SPECIALS = [corpus.WordTokenizer.START, corpus.WordTokenizer.END, corpus.WordTokenizer.PAD]  # never in a sequence
BOOTSTRAPS = ("source", "null", "random", "autoregressive")

# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class Config(common.TextConfig, common.BaseConfig):
    dataset: str = "e2e"
    block_size: int = 96  # source (<= 43 words on E2E) + separator + BOS + x_t (<= max_len)
    max_iters: int = 2400
    warmup_iters: int = 50
    eval_interval: int = 600
    eval_iters: int = 5
    # --eval's cross-entropies take eval_iters batches too; --sample realises the data's MRs (a class attribute)
    READ_BY = {"eval_iters": "train|eval", **dict.fromkeys(("dataset", "data_dir"), "train|sample|eval")}
    # forward process (paper sec. 3: T = 12, edit types 60/20/10/10, Poisson(3) spans)
    T: int = 12
    FIXED = ("T", "max_len")  # with the model's shape, what a checkpoint fixes (a class attribute, not a --key)
    TIED = {"decode": ("sample", ("temperature", "top_p"))}  # a saved run's draws are not another --decode's
    p_keep: float = 0.6
    p_replace: float = 0.2
    p_insert: float = 0.1
    p_delete: float = 0.1
    span_lambda: float = 3.0
    noise: str = "unigram"  # unigram | uniform: where replaced and inserted tokens come from
    max_len: int = 48  # longest x_t; longer training texts are skipped, insertions are capped (0..max_len a gap)
    seq_len: int = 24  # window length on unconditional data; length of a random bootstrap
    bootstrap: str = "source"  # source | null | random | autoregressive (decoding only: a draft of ar_ckpt)
    boot_prob: float = 0.5  # how often training draws the bootstrap revision x_{T+1} -> x_0
    ar_ckpt: str = "out/ar/ckpt.pt"  # unconditional data: --bootstrap=autoregressive revises its seq_len-word drafts
    gen: bool = False  # --eval --gen: score num_samples samples with the autoregressive judge
    judge: str = "out/ar/ckpt.pt"  # an ar.py on the same words; the same file as ar_ckpt flatters AR-drafted samples
    target: str = "x0"  # a revision learns x0: every edit back to the text (alignment), or prev: x_t -> x_{t-1} (paper)
    decode: str = "greedy"  # decoding: greedy | sample | beam | beam2d
    beam_b: int = 5  # beam inside a revision: the b best edit sets, each filled greedily
    beam_r: int = 3  # hypotheses kept across revisions (2D beam)
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus; the paper's nucleus decoding uses 0.6
    steps: int = 0  # revisions after the bootstrap revision; 0: T
    source: str = ""  # --sample: an E2E meaning representation to realise (else validation MRs)
    allow_unk: bool = False  # let --source words outside the vocabulary become <unk> instead of stopping
    eval_mrs: int = 0  # --eval: distinct validation MRs to decode for BLEU; 0: all
    decode_batch: int = 256  # sequences per network call while decoding


def check_config(cfg):
    """Every value at the command-line boundary -> one line naming the flag."""
    common.check_common(cfg)
    common.check_at_least(cfg, ("seq_len", "decode_batch", "max_len", "T", "beam_b", "beam_r"), 1)
    common.check_at_least(cfg, ("steps", "eval_mrs"), 0)
    for key, known in (("bootstrap", BOOTSTRAPS), ("target", ("x0", "prev")), ("noise", ("unigram", "uniform")),
                       ("decode", ("greedy", "sample", "beam", "beam2d"))):
        common.check_choice(cfg, key, known)
    probs = (cfg.p_keep, cfg.p_replace, cfg.p_insert, cfg.p_delete)
    if not all(math.isfinite(p) and p >= 0 for p in probs) or abs(sum(probs) - 1) > 1e-9:  # numpy's draw allows ~1e-8
        common.die(f"--p_keep/--p_replace/--p_insert/--p_delete must be >= 0 and sum to 1 (got {probs})")
    if not 0 < cfg.span_lambda < math.inf or not 0 <= cfg.boot_prob <= 1:  # spans of length 0 would keep every token
        common.die("need --span_lambda > 0 (finite) and 0 <= --boot_prob <= 1")
    if not 0 < cfg.temperature < math.inf or not 0 < cfg.top_p <= 1:
        common.die(f"need --temperature > 0 and 0 < --top_p <= 1 (got {cfg.temperature}, {cfg.top_p})")
    if cfg.bootstrap in ("random", "autoregressive") and cfg.seq_len > cfg.max_len:  # training cut it, decoding refused
        common.die(f"the {cfg.bootstrap} bootstrap has --seq_len={cfg.seq_len} words, more than --max_len={cfg.max_len}")
    if (cfg.temperature, cfg.top_p) != (1, 1) and cfg.decode != "sample":  # greedy and beams take no draws
        common.die(f"--temperature and --top_p shape --decode=sample's draws, not {cfg.decode}'s; add --decode=sample")


# ----------------------------------------------------------------------------------------------
# Forward process: one corruption step with its edit log, and the reverse edits it implies
# An edit is (kind, old, new): the tokens it consumes from x_{t-1} and the tokens it writes to x_t.
#   ("keep", w, w)   ("replace", w, v) with len(v) == len(w)   ("insert", (), v)   ("delete", w, ())


class NoiseTokens:
    """Where replaced and inserted tokens come from: the corpus's unigram distribution or uniform, never <s>, </s> or <pad>."""

    def __init__(self, counts, kind="unigram"):
        w = np.asarray(counts, dtype=np.float64).copy() if kind == "unigram" else np.ones(len(counts))
        w[SPECIALS] = 0.0  # <unk> stays: never an empty distribution
        self.probs = w / w.sum()
        self.cdf = np.cumsum(self.probs)

    def draw(self, rng, k):
        idx = np.searchsorted(self.cdf, rng.random(k) * self.cdf[-1], side="right")
        return tuple(int(i) for i in np.minimum(idx, len(self.cdf) - 1))


def corrupt_step(x, rng, noise, probs=(0.6, 0.2, 0.1, 0.1), lam=3.0, max_len=10**9):
    """One forward step q(x_t | x_{t-1}) (paper sec. 3.1): returns (x_t, edits). At each position an edit type from probs
    (keep, replace, insert, delete) and a span k ~ Poisson(lam); k = 0 keeps one token. Insertions are shortened so that
    x_t never grows past max_len; one with no room left at all is drawn again."""
    x, n, i, out, edits = tuple(x), len(x), 0, [], []
    # with no room the draws end at another kind or an insertion of span 0 (a keep): draw from that law at once (the
    # insertion's weight times e^-lam) instead of drawing insertions again, e^lam times on average
    full = np.multiply(probs, (1, 1, math.exp(-lam), 1))
    full = full / full.sum() if full.sum() > 0 else (0, 0, 1, 0)
    while True:
        room = max_len - len(out) - (n - i)  # tokens an insertion here may add
        kind = ("keep", "replace", "insert", "delete")[int(rng.choice(4, p=probs if room > 0 else full))]
        k = int(rng.poisson(lam)) if room > 0 or kind != "insert" else 0
        if i == n or (kind == "insert" and k > 0):  # past the last token only an insertion can happen
            k = min(k, room) if kind == "insert" else 0
            if k > 0:
                new = noise.draw(rng, k)
                out += new
                edits.append(("insert", (), new))
            if i == n:
                return out, edits
            continue
        if k == 0:
            kind, k = "keep", 1
        old = x[i:i + k]
        i += len(old)
        new = old if kind == "keep" else noise.draw(rng, len(old)) if kind == "replace" else ()
        out += new
        edits.append((kind, old, new))


def reverse_edits(edits):
    """Forward edits x_{t-1} -> x_t  =>  reverse edits x_t -> x_{t-1}: tags (len x_t,) KEEP/DELETE/REPLACE,
    counts (len x_t + 1,) tokens to insert in the gap before token j (counts[0]: at the front), and
    fills: the generator's targets in slot order (gap, token, gap, ... left to right)."""
    tags, counts, fills = [], [0], []
    for kind, old, new in edits:
        if kind == "delete":  # deleted tokens come back as insertions in the current gap
            counts[-1] += len(old)
            fills += old
            continue
        # x_t holds the kept tokens, noise that replaced words (put them back), inserted noise (delete it)
        tags += [{"keep": KEEP, "replace": REPLACE, "insert": DELETE}[kind]] * len(new)
        counts += [0] * len(new)
        if kind == "replace":
            fills += old
    return tags, counts, fills


def walk(xt, tags, counts):
    """x_t with its reverse edits in slot order: (tag, token of x_t) or (INSERT, None) per insertion."""
    yield from [(INSERT, None)] * counts[0]
    for j, w in enumerate(xt):
        yield tags[j], w
        yield from [(INSERT, None)] * counts[j + 1]


def build_canvas(xt, tags, counts, vocab_size, limit=None):
    """The generator's input: x_t less its deletions, a kept token as itself, a replaced w as V + w (the generator
    sees what it replaces), an insertion slot as 2V -> (canvas, slot positions), cut to `limit` entries."""
    V, canvas, slots = vocab_size, [], []
    for tag, w in walk(xt, tags, counts):
        if tag == DELETE or (limit is not None and len(canvas) >= limit):
            continue
        if tag != KEEP:
            slots.append(len(canvas))
        canvas.append(w if tag == KEEP else V + w if tag == REPLACE else 2 * V)
    return canvas, slots


def levenshtein_edits(a, b):
    """Minimum-cost edits taking a to b (unit costs) -> (cost, one-token edits as corrupt_step's). The
    backtrace breaks ties the same way every time: the diagonal, then deleting a's token, then inserting."""
    n, m = len(a), len(b)
    D = np.zeros((n + 1, m + 1), dtype=np.int64)
    ar, bb = np.arange(m + 1), np.asarray(b, dtype=np.int64)
    D[0] = ar
    for i in range(1, n + 1):  # one row at a time: diagonal and vertical moves, then the horizontal
        e = np.empty(m + 1, dtype=np.int64)  # run as a running minimum (D[i, j] = min_k e[k] + j - k)
        e[0] = i
        e[1:] = np.minimum(D[i - 1, :-1] + (bb != a[i - 1]), D[i - 1, 1:] + 1)
        D[i] = np.minimum.accumulate(e - ar) + ar
    edits, i, j = [], n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and D[i, j] == D[i - 1, j - 1] + (a[i - 1] != b[j - 1]):
            edits.append(("keep" if a[i - 1] == b[j - 1] else "replace", (a[i - 1],), (b[j - 1],)))
            i, j = i - 1, j - 1
        elif i > 0 and D[i, j] == D[i - 1, j] + 1:
            edits.append(("delete", (a[i - 1],), ()))
            i -= 1
        else:
            edits.append(("insert", (), (b[j - 1],)))
            j -= 1
    return int(D[n, m]), edits[::-1]


# ----------------------------------------------------------------------------------------------
# Training data: (x_t, reverse edits) pairs from the corruption chain, collated for both networks


@dataclasses.dataclass
class EditBatch:
    """Inputs and targets of one training batch; -100 marks positions without a target."""
    tag_in: torch.Tensor  # (B, Lt) [source, </s>,] <s>, x_t
    tag_mask: torch.Tensor  # (B, Lt) True at real tokens
    tag_y: torch.Tensor  # (B, Lt) KEEP/DELETE/REPLACE at the tokens of x_t
    ins_y: torch.Tensor  # (B, Lt) insertion count at <s> and every token of x_t (the gap after it)
    gen_in: torch.Tensor  # (B, Lg) [source, </s>,] <s>, canvas
    gen_mask: torch.Tensor  # (B, Lg)
    gen_y: torch.Tensor  # (B, Lg) the fill token at every hidden slot, else -100
    t: torch.Tensor  # (B,) float time step, 1..T (T + 1: the bootstrap revision)

    def to(self, device, non_blocking=False):
        return EditBatch(*(v.to(device, non_blocking=non_blocking) for v in dataclasses.astuple(self)))


def prefix(src):
    """Conditioning tokens in front of every input: the source and a separator (none without a source)."""
    return [] if src is None else list(src) + [corpus.WordTokenizer.END]


def pad(rows, value):
    """Lists of ids -> (ids, mask) (len(rows), longest), padded with value."""
    L = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [value] * (L - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), L)
    return ids, torch.arange(L)[None] < torch.tensor([len(r) for r in rows])[:, None]


def collate(examples, vocab_size, rng=None):
    """examples: (src or None, x_t, tags, counts, fills, t) -> EditBatch. With rng, each canvas shows the words of a random
    subset of its slots (each with probability u ~ U(0, 1), one slot kept open) and only the open slots are targets: the
    generator learns to fill a slot given words already chosen around it, as decode() runs it (left to right)."""
    START = corpus.WordTokenizer.START
    tag_rows, gen_rows, tag_t, ins_t, gen_t = [], [], [], [], []
    for src, xt, tags, counts, fills, t in examples:
        pre = prefix(src)
        o = len(pre)
        tag_rows.append(pre + [START] + list(xt))
        tag_t.append([-100] * (o + 1) + list(tags))
        ins_t.append([-100] * o + list(counts))
        canvas, slots = build_canvas(xt, tags, counts, vocab_size)
        shown = np.zeros(len(slots), dtype=bool)
        if rng is not None and slots:
            shown = rng.random(len(slots)) < rng.random()
            if shown.all():
                shown[int(rng.integers(len(slots)))] = False
        gen_rows.append(pre + [START] + canvas)
        gen_t.append([-100] * (o + 1 + len(canvas)))
        for pos, w, s in zip(slots, fills, shown):  # a shown slot holds its word and has no target
            (gen_rows[-1] if s else gen_t[-1])[o + 1 + pos] = w
    PAD, ts = corpus.WordTokenizer.PAD, torch.tensor([float(e[5]) for e in examples])
    return EditBatch(*pad(tag_rows, PAD), pad(tag_t, -100)[0], pad(ins_t, -100)[0],
                     *pad(gen_rows, PAD), pad(gen_t, -100)[0], ts)


class EditBatches:
    """Training pairs for trainer.train: .get(split, batch_size, gen) -> EditBatch, .gen for resume. One example
    per line of <split>.jsonl ("src", "text": data/e2e), else random windows of seq_len words from <split>.bin."""

    def __init__(self, cfg, meta, seed):
        if meta.get("tokenizer") != "word":
            common.die(f"DiffusER edits words: --dataset={cfg.dataset} has a {meta.get('tokenizer')} tokenizer; "
                       "use --dataset=e2e or --dataset=shakespeare_word")
        self.cfg, self.V, path = cfg, meta["vocab_size"], corpus.data_path(cfg)
        self.gen = torch.Generator().manual_seed(seed)
        self.seq2seq = bool(meta.get("seq2seq"))  # data/e2e/prepare.py wrote <split>.jsonl beside the token files
        if cfg.bootstrap == "source" and not self.seq2seq:
            common.die(f"--bootstrap=source needs sequence-to-sequence data (--dataset=e2e); {path} has none: "
                       "use null or random")
        self.examples, self.streams = {}, {}
        for split, name in (("train", "train"), ("val", "valid")):
            if self.seq2seq:
                exs = [(e["src"], e["text"]) for e in corpus.load_jsonl(cfg, name, meta)
                       if len(e["text"]) <= cfg.max_len]
                if not exs:
                    common.die(f"no {split} example fits --max_len={cfg.max_len}; raise it")
                longest = max(len(s) for s, _ in exs) + 2 + cfg.max_len
                if longest > cfg.block_size:
                    common.die(f"a source plus --max_len={cfg.max_len} needs {longest} positions, more than "
                               f"--block_size={cfg.block_size}; raise --block_size or lower --max_len")
                self.examples[split] = exs
                continue
            data = np.memmap(os.path.join(path, f"{split}.bin"), dtype=np.dtype(meta["dtype"]), mode="r")
            if len(data) < cfg.seq_len or cfg.seq_len > cfg.max_len or cfg.max_len + 2 > cfg.block_size:
                common.die(f"need --seq_len ({cfg.seq_len}) <= --max_len ({cfg.max_len}) <= --block_size - 2 "
                           f"({cfg.block_size - 2}) and a {split} split of at least --seq_len words ({len(data)})")
            self.streams[split] = data  # read a window at a time, never whole
        train = (np.array([w for _, x in self.examples["train"] for w in x], dtype=np.int64) if self.seq2seq
                 else self.streams["train"])
        counts = sum(np.bincount(train[i:i + 2**24], minlength=self.V)[:self.V] for i in range(0, len(train), 2**24))  # (V,)
        self.unigram = counts.tolist()
        self.noise = NoiseTokens(counts, cfg.noise)

    def draw_x0(self, split, rng):
        if self.seq2seq:
            ex = self.examples[split]
            src, x = ex[int(rng.integers(len(ex)))]
            return list(src), list(x)
        s = self.streams[split]
        i = int(rng.integers(len(s) - self.cfg.seq_len + 1))  # the last window too
        return None, s[i:i + self.cfg.seq_len].tolist()

    def get(self, split, batch_size, gen=None):
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen or self.gen)))
        examples = [make_example(*self.draw_x0(split, rng), rng, self.noise, self.cfg) for _ in range(batch_size)]
        return collate(examples, self.V, rng)


def bootstrap_sequence(kind, src, length, noise, rng):
    """x_{T+1}: the source text, the empty sequence, or random tokens."""
    if kind == "source":
        return list(src)
    return [] if kind == "null" else list(noise.draw(rng, length))  # main() keeps "autoregressive" out of training


def make_example(src, x0, rng, noise, cfg):
    """A training pair: t ~ U{1..T} and the edits x_t -> x_0 (--target=prev: -> x_{t-1}), or (boot_prob) t = T + 1: bootstrap."""
    probs = (cfg.p_keep, cfg.p_replace, cfg.p_insert, cfg.p_delete)
    if cfg.boot_prob > 0 and rng.random() < cfg.boot_prob:
        xb = bootstrap_sequence(cfg.bootstrap, src, cfg.seq_len, noise, rng)[:cfg.max_len]  # a longer source: cut, as decoding cuts it
        _, edits = levenshtein_edits(x0, xb)  # as if one forward step had turned x_0 into the bootstrap
        return (src, xb, *reverse_edits(edits), cfg.T + 1)
    t = int(rng.integers(1, cfg.T + 1))
    x = x0
    for _ in range(t):
        x, edits = corrupt_step(x, rng, noise, probs, cfg.span_lambda, cfg.max_len)
    if cfg.target == "x0":  # every edit back to the text, not only the last step's
        _, edits = levenshtein_edits(x0, x)
    return (src, x, *reverse_edits(edits), t)


# ----------------------------------------------------------------------------------------------
# Model: a tagger and a generator, each common's bidirectional Transformer, time-conditioned


class DiffusER(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        V, C = vocab_size, cfg.n_embd
        self.vocab_size, self.max_len, self.T = V, cfg.max_len, cfg.T

        shape = (cfg.n_layer, cfg.n_head, C, cfg.block_size, cfg.dropout)  # the same for both networks
        self.tagger = common.Transformer(V, *shape, cond_dim=128)
        self.tag_head = nn.Linear(C, 3)  # KEEP / DELETE / REPLACE per token of x_t
        self.ins_head = nn.Linear(C, cfg.max_len + 1)  # tokens to insert in the gap after each position (0..max_len)
        self.generator = common.Transformer(2 * V + 1, *shape, cond_dim=128)  # words, "replace w" (V + w), slot (2V)
        self.gen_head = nn.Linear(C, V)

    def tag(self, ids, mask, t):
        # ids, mask (B, L), t (B,) -> tag logits (B, L, 3), insertion logits (B, L, max_len + 1)
        h = self.tagger(ids, t, mask)
        return self.tag_head(h), self.ins_head(h)

    def fill(self, ids, mask, t):
        # ids, mask (B, L), t (B,) -> token logits (B, L, V)
        return self.gen_head(self.generator(ids, t, mask))

    def forward(self, batch):
        return (*self.tag(batch.tag_in, batch.tag_mask, batch.t), self.fill(batch.gen_in, batch.gen_mask, batch.t))


# ----------------------------------------------------------------------------------------------
# Loss: cross-entropy of the tagger (tags and insertion counts) and of the generator (slot tokens)


def mean_ce(logits, y):
    # (B, L, C), (B, L) -> the mean over the targets (y >= 0); 0 for a batch without any (tiny ones: no slot, every x_t empty)
    total = common.token_nll(logits.flatten(0, 1), y.flatten()).sum()
    return total / (y >= 0).sum().clamp(min=1)


def loss_terms(model, batch):
    """The three cross-entropies, each a mean over its targets (log p_tag + log p_gen, paper eq. 3)."""
    tag_logits, ins_logits, gen_logits = model(batch)
    return tuple(mean_ce(lg, y) for lg, y in ((tag_logits, batch.tag_y), (ins_logits, batch.ins_y), (gen_logits, batch.gen_y)))


def loss_fn(model, batch):
    return sum(loss_terms(model, batch))


# ----------------------------------------------------------------------------------------------
# Decoding: revisions from a bootstrap; greedy, sampling, beam, 2D beam

Hyp = collections.namedtuple("Hyp", "x score history")  # score: total log p; history: [(t, x_t, tags, counts, fills)]


def network_logprobs(model, rows, t, which, chunk, at=None):
    """Float64 log-probabilities of variable-length inputs, `chunk` rows at a time; with `at` (a position per row) only those."""
    device, out = next(model.parameters()).device, []
    for c in range(0, len(rows), chunk):
        ids, mask = (v.to(device) for v in pad(rows[c:c + chunk], corpus.WordTokenizer.PAD))
        tt = torch.full((ids.shape[0],), float(t), device=device)
        with common.autocast(device):
            logits = model.tag(ids, mask, tt) if which == "tag" else (model.fill(ids, mask, tt),)
        if at is not None:
            idx = torch.tensor(at[c:c + chunk], device=device)
            logits = [lg[torch.arange(len(idx), device=device), idx] for lg in logits]
        lps = [lg.double().log_softmax(-1).cpu().numpy() for lg in logits]
        out += [tuple(lp[i] for lp in lps) for i in range(ids.shape[0])]
    return out


def kbest(logps, b):
    """The b best joint choices of n independent categoricals (float64 arrays): scores (k,), choices (k, n).
    A beam of b partial sums is exact, as the terms are independent; ties go to the lower index, as argmax."""
    scores, choices = np.zeros(1), np.zeros((1, 0), dtype=np.int64)
    for lp in logps:
        top = np.argsort(-lp, kind="stable")[:b]
        cand = (scores[:, None] + lp[top][None, :]).ravel()
        order = np.argsort(-cand, kind="stable")[:b]
        bi, ci = np.divmod(order, len(top))
        scores, choices = cand[order], np.concatenate([choices[bi], top[ci][:, None]], 1)
    return scores, choices


def sample_choice(lp, temperature, top_p):
    """One draw per row of lp (n, C) float64, tempered and nucleus-truncated; inverse CDF in float64."""
    probs = torch.softmax(torch.from_numpy(lp) / temperature, -1)
    if top_p < 1:
        p, idx = probs.sort(dim=-1, descending=True, stable=True)
        keep = p.cumsum(-1) - p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, p * keep)
    return common.sample_categorical(probs, torch.rand(len(lp), dtype=torch.float64)).numpy()


def choose(logps, strategy, b, cfg):
    """Candidates for independent categoricals (n arrays) -> [(score, choice array)]: greedy the 1-best, beam the b best (kbest), sample one draw."""
    if strategy == "sample" and logps:
        mat = np.full((len(logps), max(len(lp) for lp in logps)), -np.inf)
        for i, lp in enumerate(logps):
            mat[i, :len(lp)] = lp
        c = sample_choice(mat, cfg.temperature, cfg.top_p)
        return [(float(sum(lp[k] for lp, k in zip(logps, c))), c)]
    scores, choices = kbest(logps, b if strategy == "beam" else 1)
    return [(float(s), c) for s, c in zip(scores, choices)]


@torch.no_grad()
def fill_slots(model, jobs, t, strategy, cfg):
    """The generator's words for each job (conditioning ids, canvas, slot positions), left to right, one slot
    per network call (the paper's generator is autoregressive over the slots): slot k sees the words chosen
    for slots < k. greedy: argmax; sample: temperature / nucleus. Returns (log p, sequence, fills) per job."""
    xs, scores, fills = [list(cv) for _, cv, _ in jobs], [0.0] * len(jobs), [[] for _ in jobs]
    for k in range(max((len(s) for _, _, s in jobs), default=0)):
        active = [i for i, (_, _, s) in enumerate(jobs) if len(s) > k]
        at = [len(jobs[i][0]) + jobs[i][2][k] for i in active]
        out = network_logprobs(model, [jobs[i][0] + xs[i] for i in active], t, "fill", cfg.decode_batch, at=at)
        lp = np.stack([o[0] for o in out])  # (active, V)
        lp[:, SPECIALS] = -np.inf  # slots hold words, never <s>, </s> or <pad>
        ws = lp.argmax(1) if strategy == "greedy" else sample_choice(lp, cfg.temperature, cfg.top_p)
        for i, row, w in zip(active, lp, ws.tolist()):
            xs[i][jobs[i][2][k]] = w
            scores[i] += float(row[w])
            fills[i].append(w)
    return list(zip(scores, xs, fills))


@torch.no_grad()
def decode(model, starts, srcs, cfg, times, strategy="greedy", b=1, r=1):
    """Revise each start sequence at the given time steps -> the best Hyp per start. greedy: argmax of every
    choice; sample: temperature / nucleus draws; beam: the b best edit sets of each revision, each filled
    greedily, and the top r hypotheses across revisions (r > 1: the 2D beam). An empty sequence must insert."""
    V, START, chunk = model.vocab_size, corpus.WordTokenizer.START, cfg.decode_batch
    beams = [[Hyp(list(x)[:model.max_len], 0.0, [])] for x in starts]
    for t in common.progress(times, "revisions"):
        flat = [(i, h) for i, beam in enumerate(beams) for h in beam]
        tag_out = network_logprobs(model, [prefix(srcs[i]) + [START] + h.x for i, h in flat], t, "tag", chunk)
        edits = []  # (flat index, edit score, tags, counts)
        for j, (i, h) in enumerate(flat):
            tag_lp, ins_lp = tag_out[j]
            o, n = len(prefix(srcs[i])), len(h.x)
            ins_lp = ins_lp[o:o + n + 1].copy()
            if n == 0:
                ins_lp[0, 0] = -np.inf
            logps = list(tag_lp[o + 1:o + 1 + n]) + list(ins_lp)
            for score, c in choose(logps, strategy, b, cfg):
                edits.append((j, score, c[:n].tolist(), c[n:].tolist()))
        jobs = [(prefix(srcs[flat[j][0]]) + [START], *build_canvas(flat[j][1].x, tags, counts, V, limit=model.max_len))
                for j, _, tags, counts in edits]
        filled = fill_slots(model, jobs, t, "sample" if strategy == "sample" else "greedy", cfg)
        pools = [[] for _ in beams]
        for (j, escore, tags, counts), (fscore, x, fills) in zip(edits, filled):
            i, h = flat[j]
            pools[i].append(Hyp(x, h.score + escore + fscore, h.history + [(t, h.x, tags, counts, fills)]))
        beams = [sorted(pool, key=lambda hh: -hh.score)[:r] for pool in pools]  # stable: ties keep order
    return [beam[0] for beam in beams]


def strategy_of(cfg):
    """--decode -> (strategy, b, r) for decode()."""
    return {"greedy": ("greedy", 1, 1), "sample": ("sample", 1, 1),
            "beam": ("beam", cfg.beam_b, 1), "beam2d": ("beam", cfg.beam_b, cfg.beam_r)}[cfg.decode]


def mark_revision(tok, xt, tags, counts, fills, limit):
    """One revision as text: kept words plain, [-deleted-], [old->new], [+inserted+]. build_canvas cuts the canvas
    at limit (max_len) entries: a word past the cut shows as deleted, an insertion there not at all."""
    new, steps = iter([tok.words[w] for w in fills]), list(walk(xt, tags, counts))
    show = {KEEP: lambda w: tok.words[w], DELETE: lambda w: f"[-{tok.words[w]}-]",
            REPLACE: lambda w: f"[{tok.words[w]}->{next(new, '...')}]", INSERT: lambda w: f"[+{next(new, '...')}+]"}
    ends = np.cumsum([tag != DELETE for tag, _ in steps])  # canvas entries up to each step, its own included
    return " ".join(show[tag if n <= limit else DELETE](w) for (tag, w), n in zip(steps, ends) if n <= limit or tag != INSERT)


def words(tok, ids):
    return " ".join(tok.words[i] for i in ids if i not in (tok.START, tok.END, tok.PAD))


# ----------------------------------------------------------------------------------------------
# Evaluation: cross-entropies on held-out corruptions; BLEU on E2E validation (or test)


@torch.no_grad()
def evaluate(model, batches, cfg):
    """Tagger and generator cross-entropy (nats) on eval_iters validation batches, the same every time."""
    model.eval()
    sums = np.zeros(3)
    for batch in corpus.val_batches(batches, cfg):
        sums += [float(v) for v in loss_terms(model, batch.to(next(model.parameters()).device))]
    tag, ins, gen_ce = (float(v) for v in sums / cfg.eval_iters)  # plain floats: the checkpoint loads weights_only
    return {"val_loss": tag + ins + gen_ce, "val_tag_ce": tag, "val_ins_ce": ins, "val_gen_ce": gen_ce}


def validation_mrs(cfg, meta, limit=0, split="val"):
    """Distinct MRs of the validation (or test) split in file order: [(src ids, [reference strings])]."""
    groups = {}
    for e in corpus.load_jsonl(cfg, "valid" if split == "val" else split, meta):
        groups.setdefault(tuple(e["src"]), []).append(e["ref"])
    return list(groups.items())[:limit or None]


def bleu(hyps, refs):
    """Corpus BLEU (sacrebleu) of hypotheses against lists of references, both words split by the tokenizer."""
    try:
        import sacrebleu
    except ImportError:
        common.die("BLEU needs sacrebleu, an optional extra: pip install -e \".[bleu]\" (or pip install sacrebleu)")
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(max(len(r) for r in refs))]
    return sacrebleu.corpus_bleu(hyps, streams, tokenize="none", force=True).score  # not split again: <unk> is one word


@torch.no_grad()
def ar_drafts(path, meta, n, length, device):
    """n drafts of `length` words (lists of ids) from the ar.py checkpoint at path: ancestral sampling at
    temperature 1 from [BOS] (id V) through its key/value cache, float64 inverse-CDF draws, never <s>, </s>
    or <pad>. The draft fits the context, so each word is drawn as by one forward over [BOS] + all before it."""
    judge, _ = trainer.load_judge(path, meta, device, "--ar_ckpt")  # dies on a missing file or another vocabulary
    backbone, head = judge["backbone"], judge["head"]
    if length > backbone.block_size:
        common.die(f"a draft of --seq_len={length} words does not fit the drafter's context "
                   f"block_size={backbone.block_size}; lower --seq_len or train ar.py with a longer --block_size")
    cache, drafted = backbone.new_cache(), []
    nxt = torch.full((n, 1), head.out_features, device=device)  # (n, 1) [BOS], then each new word
    for _ in range(length):
        with common.autocast(device):
            logits = head(backbone(nxt, cache=cache)[:, -1])  # (n, V)
        probs = torch.softmax(logits.double(), -1)
        probs[:, SPECIALS] = 0.0
        nxt = common.sample_categorical(probs, torch.rand(n, dtype=torch.float64, device=device))[:, None]
        drafted.append(nxt)
    return torch.cat(drafted, 1).cpu().tolist()


# ----------------------------------------------------------------------------------------------
# main


def build_model(cfg, meta):
    return DiffusER(cfg, meta["vocab_size"])


def load(overrides):
    cfg, model, tok, meta, ckpt = trainer.load_for_inference(Config, overrides, "diffuser", build_model)
    check_config(cfg)
    if cfg.bootstrap == "autoregressive" and meta["seq2seq"]:
        common.die("--bootstrap=autoregressive drafts from the unconditional ar.py; on E2E use --bootstrap=source")
    if not meta["seq2seq"] and (e2e := [k for k in ("source", "eval_split", "eval_mrs") if k in overrides]):  # E2E's MRs
        common.die(f"--{e2e[0]} is for sequence-to-sequence models (E2E); this model is unconditional: drop it")
    if cfg.steps > cfg.T:
        common.die(f"--steps={cfg.steps} exceeds the trained --T={cfg.T}")
    return cfg, model, tok, meta, ckpt


def run_decode(model, cfg, meta, srcs):
    """One decoded sequence per source (None: unconditional), from --bootstrap: the best Hyp of each."""
    boot_revision = meta["boot_trained"] in (True, cfg.bootstrap)  # the bootstrap t = T + 1 learnt ("": none; True: older)
    if cfg.bootstrap == "source" and (any(s is None for s in srcs) or not boot_revision):
        common.die("--bootstrap=source needs a source and a model trained with it (--bootstrap=source --boot_prob > 0); "
                   "decode with --bootstrap=null or random")
    for s in srcs:
        if s is not None and len(s) + 2 + model.max_len > model.tagger.block_size:
            common.die(f"the source has {len(s)} words; with --max_len={model.max_len} it does not fit the model's "
                       f"context block_size={model.tagger.block_size}; shorten it")
    if cfg.bootstrap == "autoregressive":
        starts = ar_drafts(cfg.ar_ckpt, meta, len(srcs), cfg.seq_len, next(model.parameters()).device)
        boot_revision = False  # a draft reads like text (a lightly corrupted x_t): skip t = T + 1, run steps..1
    else:
        rng, noise = np.random.default_rng(cfg.seed), NoiseTokens(meta["unigram"], cfg.noise)
        starts = [bootstrap_sequence(cfg.bootstrap, s, cfg.seq_len, noise, rng) for s in srcs]
    times = ([cfg.T + 1] if boot_revision else []) + list(range(cfg.steps or cfg.T, 0, -1))  # bootstrap rev., steps..1
    return decode(model, starts, srcs, cfg, times, *strategy_of(cfg))


def sample_stream(model, cfg, meta, n):
    """n unconditional decodes -> (1, total words) on the model's device, packed end to end like the judge's
    training stream, so sequences of any length are scored (a word after a junction sees the text before it)."""
    stream = [w for h in run_decode(model, cfg, meta, [None] * n) for w in h.x]
    if not stream:
        common.die("every sample is empty; nothing to score (train longer, or raise --num_samples)")
    return torch.tensor([stream], device=next(model.parameters()).device)


def main(argv=None):
    verbs, cfg, overrides = common.parse_args(Config, argv)
    check_config(cfg)
    if "train" in verbs:
        if cfg.bootstrap == "autoregressive":
            common.die("--bootstrap=autoregressive is a decoding option; train with --bootstrap=null or random")
        trainer.check_memory(cfg)
        meta = corpus.prepare_data(cfg)
        batches = EditBatches(cfg, meta, cfg.seed)
        meta = {**meta, "unigram": batches.unigram, "seq2seq": batches.seq2seq, "boot_trained": cfg.bootstrap if cfg.boot_prob > 0 else ""}
        model = build_model(cfg, meta)
        trainer.train(cfg, "diffuser", model, loss_fn, lambda m, b: evaluate(m, b, cfg), meta, batches=batches,
                      dynamic=True)  # edit batches vary in length: one compile for all
        if "RANK" in os.environ and int(os.environ["RANK"]) != 0:
            return
    if "sample" in verbs:
        cfg, model, tok, meta, _ = load(overrides)
        srcs = [None] * cfg.num_samples  # unconditional
        if cfg.source:
            # num_samples realisations of it where decoding draws (--decode=sample); one where it is deterministic
            srcs = [corpus.encode_prompt(tok, cfg.source, "--source", cfg.allow_unk)] * (cfg.num_samples if cfg.decode == "sample" else 1)
        elif meta["seq2seq"]:
            srcs = [list(s) for s, _ in validation_mrs(cfg, meta, cfg.num_samples)]
        t0 = time.time()
        best = run_decode(model, cfg, meta, srcs)
        for i, (s, h) in enumerate(zip(srcs, best)):
            print(f"=== sample {i}" + (f"\nMR: {words(tok, s)}" if s is not None else ""))
            if cfg.show:
                for t, xt, tags, counts, fills in h.history:
                    print(f"  t={t:2d} | {mark_revision(tok, xt, tags, counts, fills, model.max_len)}")
            print(words(tok, h.x))
        print(f"({len(srcs)} samples, {cfg.decode} decoding from the {cfg.bootstrap} bootstrap, "
              f"{len(best[0].history)} revisions, {time.time() - t0:.1f}s)")
    if "eval" in verbs:
        cfg, model, tok, meta, ckpt = load(overrides)  # (--gen on E2E is refused there)
        corpus.prepare_data(cfg, meta)
        trained_boot = ckpt["config"].get("bootstrap", cfg.bootstrap)  # held-out corruptions as trained
        stats = evaluate(model, EditBatches(dataclasses.replace(cfg, bootstrap=trained_boot), meta, cfg.seed), cfg)
        print("held-out corruptions: " + " | ".join(f"{k} {v:.4f}" for k, v in stats.items()))
        if meta["seq2seq"]:
            items, t0 = validation_mrs(cfg, meta, cfg.eval_mrs, cfg.eval_split), time.time()
            best = run_decode(model, cfg, meta, [list(s) for s, _ in items])
            stats["bleu"] = bleu([words(tok, h.x) for h in best], [refs for _, refs in items])
            _, b, r = strategy_of(cfg)
            print(f"E2E {'validation' if cfg.eval_split == 'val' else 'test'} BLEU {stats['bleu']:.2f} ({cfg.decode}, "
                  f"b={b}, r={r}, {len(items)} MRs, {time.time() - t0:.0f}s)")
        elif cfg.gen:
            what = f"{cfg.decode} decoding from the {cfg.bootstrap} bootstrap, texts packed as the judge's stream"
            if cfg.bootstrap == "autoregressive" and os.path.abspath(cfg.ar_ckpt) == os.path.abspath(cfg.judge):
                what += "; the drafts come from the judge itself, which flatters them"
            stats.update(trainer.generative_eval(cfg.judge, lambda n: sample_stream(model, cfg, meta, n),
                                                cfg.num_samples, meta, tok, what))
        trainer.log_json(os.path.join(common.out_dir(cfg, "diffuser"), "log.jsonl"),
                         {"eval_full": stats, "iter": ckpt["iter"], **{k: getattr(cfg, k) for k in (  # what was decoded, how
                             "eval_split", "eval_mrs", "steps", "bootstrap", "decode", "beam_b", "beam_r", "temperature", "top_p")}})


if __name__ == "__main__":
    main()
