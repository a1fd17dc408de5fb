"""
AR: the autoregressive baseline, the yardstick every diffusion method is measured against.
Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2), 2019; nanoGPT.

The same backbone as the diffusion methods (common.Transformer) with causal=True, the same data,
training loop and CLI. A [BOS] token (id V) opens every window, so the model gives the exact joint
likelihood of a whole block_size window, p(x_1..x_L) = prod_i p(x_i | x_<i), and its NLL per token
is directly comparable with the diffusion methods' bounds on the same windows. Sampling uses a
key/value cache: one step costs one token's forward pass (a diffusion step costs a whole
sequence's), which is the fair comparison of sampling cost.

    python ar.py --train                   # tiny Shakespeare, char level, ~8 min on 2 CPU cores
    python ar.py --sample                  # print samples from out/ar/ckpt.pt (cached sampler)
    python ar.py --sample --prefix="ROMEO:" --temperature=0.8
    python ar.py --eval                    # exact validation NLL (nats, bits per token, perplexity)
    python ar.py --eval --gen              # + NLL of its own samples under the judge (out/ar/ckpt.pt)

This checkpoint is also the judge of every method's `--eval --gen` (trainer.load_judge rebuilds its
layout, backbone + head, without importing this file).
"""

import dataclasses
import math
import os
import time

import torch
import torch.nn as nn

import common
import corpus
import trainer

# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class Config(common.TextConfig, common.BaseConfig):
    # the common blocks' backbone, batch and lr (mdlm.py changes its heads and lr); fewer iterations than its 2400
    max_iters: int = 2000
    # sampling: a prefix only (no suffix: the model reads left to right)
    prefix: str = ""
    allow_unk: bool = False  # let words outside the vocabulary become <unk> instead of stopping
    temperature: float = 1.0  # 1.0 samples the model's own distribution (what the judge numbers assume)
    seq_len: int = 0  # 0: block_size; longer: the cache slides (re-filled from the last block_size // 2 tokens)
    # evaluation
    READ_BY = dict.fromkeys(("temperature", "seq_len", "num_samples"), "sample|train|eval gen")  # --eval samples only with --gen
    gen: bool = False  # --eval --gen: sample num_samples sequences and score them with the judge
    judge: str = "out/ar/ckpt.pt"


def check_config(cfg):
    """Every value at the command-line boundary -> one line naming the flag."""
    common.check_common(cfg)
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        common.die(f"--temperature={cfg.temperature} must be a finite number above 0")
    if cfg.seq_len < 0:
        common.die(f"--seq_len={cfg.seq_len} must be 0 (block_size) or more")


# ----------------------------------------------------------------------------------------------
# Model: common's Transformer, causal, over V + 1 input ids ([BOS] is the last) and a V-way head.
# trainer.load_judge rebuilds exactly this layout (backbone, head); keep the two in step.


class AR(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.vocab_size, self.bos_id = vocab_size, vocab_size
        self.backbone = common.Transformer(vocab_size + 1, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size,
                                           cfg.dropout, causal=True)
        self.head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        nn.init.zeros_(self.head.weight)  # an untrained model predicts the uniform distribution

    def forward(self, idx):
        # idx (B, L) -> logits (B, L, V): position i predicts the token after idx[:, i]
        return self.head(self.backbone(idx))


def shift_in_bos(x0, bos_id):
    """x0 (B, L) -> inputs (B, L): [BOS, x_1 .. x_{L-1}], so output i predicts x_{i+1} (x_1 from BOS alone)."""
    return torch.cat([torch.full_like(x0[:, :1], bos_id), x0[:, :-1]], 1)


# ----------------------------------------------------------------------------------------------
# Loss: next-token cross-entropy, -log p(x_1..x_L) / L


def nll_terms(model, x0, bos_id):
    """Per-position -log p(x_i | x_<i) (B, L), fp32; model may be wrapped, so bos_id comes separately."""
    logits = model(shift_in_bos(x0, bos_id))  # (B, L, V)
    return common.token_nll(logits.flatten(0, 1), x0.flatten()).view_as(x0)  # over contiguous (B*L, V) rows


def loss_fn(model, x0, bos_id):
    return nll_terms(model, x0, bos_id).mean()  # nats per token


# ----------------------------------------------------------------------------------------------
# Sampler: ancestral, one token at a time through the backbone's key/value cache


@torch.no_grad()
def generate(model, cfg, prefix, num_samples, length, show=None):
    """prefix (P,) token ids -> samples (num_samples, length) whose first P tokens are the prefix,
    and the number of network calls (a new token's pass each, besides the prefill and the refills below).

    Longer than block_size: when the cache is full it is refilled from [BOS] + the last
    block_size // 2 tokens (the model was trained on windows that start anywhere after [BOS]).
    """
    device = next(model.parameters()).device
    backbone, L = model.backbone, model.backbone.block_size
    out = prefix.to(device).long().expand(num_samples, -1).clone()  # (B, P)
    calls = 0
    cache = None

    def refill():
        nonlocal cache
        keep = out[:, out.shape[1] - L // 2:] if out.shape[1] >= L else out  # (at L = 1, none: -0 would keep all)
        cache = backbone.new_cache()
        inp = torch.cat([torch.full((num_samples, 1), model.bos_id, device=device), keep], 1)
        with common.autocast(device):
            return model.head(backbone(inp, cache=cache)[:, -1]).float()  # (B, V)

    if out.shape[1] >= length:  # the prefix fills the length: nothing to generate, no network call
        return out[:, :length], 0
    logits = refill()
    calls += 1
    while out.shape[1] < length:
        z = logits.double()  # float64 for the draw; the max taken first: a tiny temperature cannot overflow to inf - inf
        probs = torch.softmax((z - z.amax(-1, keepdim=True)) / cfg.temperature, -1)
        nxt = common.sample_categorical(probs, torch.rand(num_samples, dtype=torch.float64, device=device))
        out = torch.cat([out, nxt[:, None]], 1)
        if show:
            show(out.shape[1], out)
        if out.shape[1] == length:
            break
        if cache.pos == L:
            logits = refill()
        else:
            with common.autocast(device):
                logits = model.head(backbone(nxt[:, None], cache=cache)[:, -1]).float()
        calls += 1
    return out[:, :length], calls


# ----------------------------------------------------------------------------------------------
# Evaluation: the exact NLL of the validation windows


@torch.no_grad()
def evaluate(model, batches, cfg, full=False):
    """NLL in nats per token: every validation window (full=True, --eval), or eval_iters random
    batches (during training). Exact: no bound, no time samples."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for x0 in corpus.val_batches(batches, cfg, full):
        x0 = x0.to(device)
        total += float(nll_terms(model, x0, model.bos_id).sum())
        count += x0.numel()
    nats = total / count
    return trainer.nats_figures("val_nll", nats)


# ----------------------------------------------------------------------------------------------
# main


def build_model(cfg, meta):
    return AR(cfg, meta["vocab_size"])


def load(overrides):
    """load_for_inference, then the checks again on the checkpoint's config under the overrides."""
    cfg, model, tok, meta, ckpt = trainer.load_for_inference(Config, overrides, "ar", build_model)
    check_config(cfg)
    return cfg, model, tok, meta, ckpt


def main(argv=None):
    verbs, cfg, overrides = common.parse_args(Config, argv)
    check_config(cfg)
    if "train" in verbs:
        trainer.check_memory(cfg)
        meta = corpus.prepare_data(cfg)
        model = build_model(cfg, meta)
        trainer.train(cfg, "ar", model, lambda m, x0: loss_fn(m, x0, model.bos_id),
                     lambda m, b: evaluate(m, b, cfg), meta)
        if "RANK" in os.environ and int(os.environ["RANK"]) != 0:
            return
    if "sample" in verbs:
        cfg, model, tok, meta, _ = load(overrides)
        length = cfg.seq_len or cfg.block_size
        prefix = torch.tensor(corpus.encode_prompt(tok, cfg.prefix, "--prefix", cfg.allow_unk) if cfg.prefix else [], dtype=torch.long)
        if len(prefix) > length:
            common.die(f"--prefix takes {len(prefix)} tokens, more than the {length}-token sequence; shorten it or raise --seq_len")
        every = max(1, length // 8)

        def show(n, x):
            if n % every == 0 or n == length:
                print(f"--- {n}/{length} tokens\n{tok.decode(x[0].tolist())}")
        t0 = time.time()
        samples, calls = generate(model, cfg, prefix, cfg.num_samples, length, show if cfg.show else None)
        for i, s in enumerate(samples.tolist()):
            print(f"=== sample {i}\n{tok.decode(s)}")
        print(f"({cfg.num_samples} samples of {length} tokens, key/value cache, {calls} network calls, "
              f"{time.time() - t0:.1f}s)")
    if "eval" in verbs:
        cfg, model, tok, meta, ckpt = load(overrides)
        cfg = dataclasses.replace(cfg, data_dir=cfg.data_dir or corpus.data_path(cfg))
        corpus.prepare_data(cfg, meta)
        with common.autocast(next(model.parameters()).device):
            stats = {**evaluate(model, corpus.Batches(cfg, meta, cfg.seed), cfg, full=True), "data": cfg.eval_split}
        print(f"{cfg.eval_split} NLL {stats['val_nll']:.4f} nats/token | {stats['val_bits']:.4f} bits/token | "
              f"perplexity {stats['val_ppl']:.3f} (exact)")
        if cfg.gen:
            length = cfg.seq_len or cfg.block_size
            empty = torch.zeros(0, dtype=torch.long)
            stats.update(trainer.generative_eval(
                cfg.judge, lambda n: generate(model, cfg, empty, n, length)[0], cfg.num_samples, meta, tok,
                f"cached sampler, temperature {cfg.temperature}"))
        trainer.log_json(os.path.join(common.out_dir(cfg, "ar"), "log.jsonl"), {"eval_full": stats, "iter": ckpt["iter"],
                         **({"temperature": cfg.temperature, "seq_len": cfg.seq_len} if cfg.gen else {})})  # how --gen drew


if __name__ == "__main__":
    main()
