"""
MDLM: masked (absorbing-state) diffusion language model.
Sahoo et al., "Simple and Effective Masked Diffusion Language Models", NeurIPS 2024.

Forward process: each token is independently replaced by [MASK] with probability 1 - alpha_t,
t in [0, 1]. The model sees x_t and predicts x_0 at the masked positions (SUBS
parameterisation); the loss is a masked-LM cross-entropy weighted by -alpha'_t / (1 - alpha_t),
which is exactly the continuous-time NELBO. Sampling starts from all [MASK] and unmasks tokens
step by step.

    python mdlm.py --train                  # tiny Shakespeare, char level, ~10 min on 2 CPU cores
    python mdlm.py --sample                 # print samples from out/mdlm/ckpt.pt
    python mdlm.py --sample --prefix="ROMEO:" --steps=256 --show
    python mdlm.py --sample --infill="ROMEO:\n____ ____ the ____ of ____\n" --show   # _ marks a free position
    python mdlm.py --sample --sampler=confidence --temperature=0.8 --top_p=0.9
    python mdlm.py --eval                   # validation NELBO (nats, bits per token, perplexity)
"""

import dataclasses
import math
import os
import re
import time

import torch
import torch.nn as nn

import common
import corpus
import difflm_ops
import hub
import trainer

# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class Config(hub.PublishedConfig, common.PromptConfig, common.TextConfig, common.BaseConfig):
    # sized for a short training run on a laptop CPU
    n_head: int = 8  # heads of 16 give a lower bound than 4 of 32 at the same cost
    max_iters: int = 2400
    lr: float = 2e-3  # zero-init residual gates in the backbone keep this stable
    schedule: str = "loglinear"  # loglinear | cosine: alpha_t, the probability a token is still unmasked
    eps: float = 1e-3  # kappa: alpha_1 = eps, so a token survives to t=1 with probability eps
    t_min: float = 1e-3  # lowest training / evaluation time
    time_cond: bool = False  # the paper's default: p(x_0 | x_t) does not depend on t
    FIXED = ("time_cond", "eps")  # with the model's shape, what a checkpoint fixes (a class attribute, not a --key)
    # sampling
    sampler: str = "ddpm_cache"  # ddpm | ddpm_cache | confidence (reveal the most probable predictions first)
    temperature: float = 1.0  # divides the logits before sampling; 1: the exact sampler
    top_p: float = 1.0  # nucleus: sample among the most probable tokens holding top_p of the mass; 1: off
    steps: int = 256
    t_end: float = 1e-5  # last sampling time before the final noise-removal step
    seq_len: int = 0  # 0: block_size; longer: semi-autoregressive blocks
    stride: int = 0  # new tokens per semi-autoregressive round; 0: block_size // 2
    infill: str = ""  # a template: --placeholder marks each free position, the rest is held fixed
    placeholder: str = "_"
    # evaluation
    eval_t_samples: int = 4  # time samples per validation sequence in --eval
    READ_BY = {"num_samples": "sample|train|eval"}  # --eval also samples, to count real words (a class attribute)
    gen: bool = False  # --eval --gen: score num_samples samples with the judge
    judge: str = "out/ar/ckpt.pt"  # an ar.py checkpoint (same data), or a transformers causal LM: hub id (gpt2-large) or directory
    # eval_data, eval_file, samples_out, samples_in, init_from, ddit, cond_dim: hub.PublishedConfig


SCHEDULES = ("loglinear", "cosine")
SAMPLERS = ("ddpm", "ddpm_cache", "confidence")


def check_config(cfg):
    """Every value at the command-line boundary -> one line naming the flag; the math below trusts cfg."""
    common.check_common(cfg)
    common.check_choice(cfg, "schedule", SCHEDULES)
    common.check_choice(cfg, "sampler", SAMPLERS)
    common.check_between(cfg, ("t_min", "t_end"), 0, 1)
    common.check_between(cfg, ("eps",), 1e-12, 1)  # 1 - eps is not 1 in float64: --time_cond's sigma_bar(1) is finite
    common.check_at_least(cfg, ("steps", "eval_t_samples", "cond_dim"), 1)
    common.check_at_least(cfg, ("seq_len", "stride"), 0)  # 0: block_size, block_size // 2
    if not 0 < cfg.temperature < math.inf:
        common.die(f"--temperature={cfg.temperature} must be a finite number above 0")
    if not 0 < cfg.top_p <= 1:
        common.die(f"--top_p={cfg.top_p} must be in (0, 1]")


# ----------------------------------------------------------------------------------------------
# Forward process: the schedule alpha_t, its weight, and q(x_t | x_0)


def mask_prob(t, cfg):
    """1 - alpha_t, alpha_t the keep probability (paper eq. 2 family; alpha_0 = 1, alpha_1 = eps), in a form
    that keeps its digits near t = 0, where 1 - alpha_t in fp32 loses them."""
    if cfg.schedule == "loglinear":  # alpha_t = 1 - (1 - eps) t
        return (1 - cfg.eps) * t
    return 2 * (1 - cfg.eps) * torch.sin(math.pi / 4 * t) ** 2  # cosine: alpha_t = eps + (1 - eps) cos(pi t / 2)


def sigma_bar(t, cfg):
    """-log alpha_t (t a tensor), the network's time input when it is conditioned."""
    return -torch.log1p(-mask_prob(t, cfg))


def nelbo_weight(t, cfg):
    """-alpha'_t / (1 - alpha_t), the weight of the masked cross-entropy (paper eq. 10)."""
    if cfg.schedule == "loglinear":
        return 1.0 / t  # (1 - eps) cancels exactly
    return (math.pi / 2) / torch.tan(math.pi / 4 * t)  # cosine: (pi/2) cot(pi t / 4)


def q_sample(x0, t, mask_id, cfg):
    """x0 (B, L), t (B,) -> x_t (B, L): each token masked independently with prob 1 - alpha_t."""
    move = torch.rand(x0.shape, device=x0.device) < mask_prob(t, cfg)[:, None]
    return torch.where(move, mask_id, x0)


# ----------------------------------------------------------------------------------------------
# Model: common's Transformer and a head over the N = V + 1 states ([MASK] is the last id)


class MDLM(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.vocab_size, self.mask_id = vocab_size, vocab_size
        self.time_cond, self.ddit = cfg.time_cond, cfg.ddit
        self.backbone = common.Transformer(vocab_size + 1, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size,
                                           cfg.dropout, causal=False, cond_dim=cfg.cond_dim if cfg.time_cond or cfg.ddit else 0,
                                           norm_weight=cfg.ddit, mlp_bias=cfg.ddit)
        self.head = nn.Linear(cfg.n_embd, vocab_size + 1, bias=cfg.ddit)
        nn.init.zeros_(self.head.weight)  # an untrained model predicts the uniform distribution
        if cfg.ddit:
            nn.init.zeros_(self.head.bias)

    def hidden(self, xt, sigma=None):
        # xt (B, L), sigma (B,) or None -> backbone output (B, L, C)
        if not self.time_cond:  # the published layout keeps its adaLN and feeds it sigma = 0 (MDLM code base)
            sigma = torch.zeros(xt.shape[0], device=xt.device) if self.ddit else None
        return self.backbone(xt, sigma)

    def forward(self, xt, sigma=None, rows=None):
        # xt (B, L), sigma (B,) or None -> logits (B, L, V + 1); with rows, the (b, l) indices (M,) each
        # of M positions (mask.nonzero(as_tuple=True)), the head runs only on those positions -> (M, V + 1)
        h = self.hidden(xt, sigma)  # (B, L, C)
        return self.head(h if rows is None else h[rows])


def subs_log_probs(logits, xt, mask_id):
    """SUBS parameterisation (paper sec. 3.2): log p_theta(x_0 | x_t), (B, L, N) fp32.

    Zero masking: [MASK] gets no mass. Carry-over unmasking: an unmasked position is one-hot on
    its own token.
    """
    logp = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), -float("inf")).log_softmax(-1)
    unmasked = (xt != mask_id)[..., None]
    onehot = torch.full_like(logp, -float("inf")).scatter_(-1, xt.unsqueeze(-1), 0.0)
    return torch.where(unmasked, onehot, logp)


# ----------------------------------------------------------------------------------------------
# Loss: the continuous-time NELBO (paper eq. 10-11)


def nelbo_terms(model, x0, t, cfg, mask_id):
    """Per-position NELBO terms (B, L): w(t) * -log p_theta(x_0 | x_t) at masked positions, else 0.

    model may be wrapped (DDP, torch.compile), so mask_id comes separately.
    """
    xt = q_sample(x0, t, mask_id, cfg)
    sigma = sigma_bar(t, cfg)  # the time input when conditioned
    rows = common.masked_rows(xt, mask_id)  # (M,) each: carry-over makes the term 0 elsewhere; the head runs here
    logits = model(xt, sigma, rows=rows)  # (M, N)
    logits[:, mask_id] = -float("inf")  # zero masking
    nll = torch.zeros(x0.shape, device=x0.device)
    nll[rows] = common.token_nll(logits, x0[rows])  # (B, L)
    return nll * nelbo_weight(t, cfg)[:, None]


def loss_fn(model, x0, cfg, mask_id):
    t = common.sample_times(x0.shape[0], cfg.t_min, x0.device)
    return nelbo_terms(model, x0, t, cfg, mask_id).mean()  # nats per token


# ----------------------------------------------------------------------------------------------
# Samplers


def time_grid(steps, t_end):
    return torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64)  # t_0 = 1 > ... > t_S = t_end


def unmask_probability(t, s, cfg):
    """P(a masked token is revealed between t and s) = (alpha_s - alpha_t) / (1 - alpha_t); (t-s)/t under log-linear."""
    m_t, m_s = (mask_prob(torch.tensor(v, dtype=torch.float64), cfg) for v in (t, s))
    return float((m_t - m_s) / m_t)


@difflm_ops.fused("mdlm_ancestral_step")
def ancestral_step(logits, xt, p_unmask, u, mask_id):
    """One reverse step t -> s (paper eq. 7), in two stages so it is exact in any precision.

    logits (B, L, N) network output; xt (B, L); p_unmask (B,) float64; u (B, L, 2) float64.
    A masked position is revealed when u[..., 0] < p_unmask, and then takes a token drawn from
    the SUBS distribution softmax(logits without [MASK]) by inverse CDF with u[..., 1].
    Unmasked positions are carried over.
    """
    probs = torch.softmax(logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), -float("inf")), -1)
    token = common.sample_categorical(probs, u[..., 1])
    reveal = (xt == mask_id) & (u[..., 0] < p_unmask[:, None])
    return torch.where(reveal, token, xt)


def most_likely(logits, mask_id):
    """The argmax of the SUBS law at masked positions: logits (..., N) -> ids (...). Overwrites the logits'
    [MASK] column (their last use) rather than building the log-probabilities, which have the same order."""
    logits[..., mask_id] = -float("inf")
    return logits.argmax(-1)


def decoding_logits(logits, mask_id, temperature=1.0, top_p=1.0):
    """Temperature and nucleus (top-p) on the SUBS logits (B, L, N) -> logits of the truncated,
    tempered law (fp32; computed in float64). Both off: the logits unchanged (the exact sampler)."""
    if temperature == 1 and top_p == 1:
        return logits
    z = logits.double()
    z[..., mask_id] = -float("inf")
    z = (z - z.amax(-1, keepdim=True)) / temperature  # the max taken first: a tiny temperature cannot overflow to inf - inf
    if top_p < 1:
        p, order = z.softmax(-1).sort(-1, descending=True)
        drop = (p.cumsum(-1) - p) >= top_p  # tokens after the smallest set holding top_p of the mass
        z = z.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return z.float()


def confidence_step(logits, xt, p_unmask, u, mask_id):
    """MaskGIT/LLaDA-style step: draw a token at every masked position (u[..., 1], as the
    ancestral step), then reveal the k most probable draws, k = p_unmask * (masked count) rounded
    up or down at random (u[:, 0, 0]) so that its expectation is the ancestral sampler's.
    logits (B, L, N); xt (B, L); p_unmask (B,) float64; u (B, L, 2) float64 -> (B, L)."""
    probs = torch.softmax(logits.double().index_fill(-1, torch.tensor([mask_id], device=logits.device), -float("inf")), -1)
    token = common.sample_categorical(probs, u[..., 1])
    masked = xt == mask_id
    conf = torch.where(masked, probs.gather(-1, token.unsqueeze(-1)).squeeze(-1), -1.0)  # (B, L)
    expect = p_unmask * masked.sum(-1)
    k = (expect.floor() + (u[:, 0, 0] < expect - expect.floor())).long()  # (B,)
    rank = conf.sort(dim=-1, descending=True, stable=True)[1].argsort(-1)  # 0 = the most confident
    reveal = masked & (rank < k[:, None])
    return torch.where(reveal, token, xt)


def float64_work(cfg):
    """Whether a step works in float64 on (B, L, N) tensors: the decoding controls and the confidence step do."""
    return cfg.temperature != 1 or cfg.top_p != 1 or cfg.sampler == "confidence"


@torch.no_grad()
def sample_chain(model, x, cfg, show=None):
    """Run one reverse chain from x (B, L) (masks at the free positions) -> (x_0 (B, L), network calls).

    ddpm runs the whole network every step. ddpm_cache goes to cached_chain. With confidence the
    network output is reused while no sequence of the batch changes: without time conditioning
    p_theta(x_0 | x_t) is then the same function of the same input. --temperature and --top_p
    reshape the logits before each step (off by default).
    """
    if cfg.sampler == "ddpm_cache" and not model.time_cond:
        return cached_chain(model, x, cfg, show)
    mask_id, calls, logits = model.mask_id, 0, None
    grid = time_grid(cfg.steps, cfg.t_end).tolist()
    B, device = x.shape[0], x.device
    step = confidence_step if cfg.sampler == "confidence" else ancestral_step

    def decode(logits, x, p_unmask, u):  # (B, L, N), (B, L), (B,), (B, L, 2) -> the next x (B, L)
        return step(decoding_logits(logits, mask_id, cfg.temperature, cfg.top_p), x, p_unmask, u, mask_id)

    def network(t):
        with common.autocast(device):
            sigma = sigma_bar(torch.full((B,), t, dtype=torch.float64, device=device), cfg)
            return model(x, sigma.float())  # (B, L, N), bf16 on a GPU

    for i in common.progress(range(cfg.steps), "sampling"):
        t, s = grid[i], grid[i + 1]
        if logits is None or cfg.sampler == "ddpm":
            logits, calls = network(t), calls + 1
        u = torch.rand(B, x.shape[1], 2, dtype=torch.float64, device=device)
        p_unmask = torch.full((B,), unmask_probability(t, s, cfg), dtype=torch.float64, device=device)
        # float64 work (the controls, the confidence step): a block of sequences at a time
        x_new = common.by_blocks(decode, logits, x, p_unmask, u) if float64_work(cfg) else decode(logits, x, p_unmask, u)
        if not torch.equal(x_new, x):
            logits = None  # the sequence changed: the cached output is stale
        x = x_new
        if show:
            show(i, x)
    # final noise removal (MDLM reference): the most likely x_0 under SUBS where still masked
    if (x == mask_id).any():
        if logits is None or cfg.sampler == "ddpm":
            logits, calls = network(cfg.t_end), calls + 1
        x = torch.where(x == mask_id, most_likely(logits, mask_id), x)
    return x, calls


@torch.no_grad()
def cached_chain(model, x, cfg, show=None):
    """The ancestral sampler computing only what it uses; the same tokens as ddpm for the same uniforms.

    Which masked positions a step reveals depends on u[..., 0] alone, so the step draws the
    uniforms first and computes the head (and the step) only at those rows. The backbone output
    is kept per sequence and recomputed, on the sub-batch of sequences that changed since, only
    when a step needs it: without time conditioning it is a function of the sequence alone.
    x (B, L) -> (x_0 (B, L), network calls: one per sub-batch run).
    """
    mask_id, calls, hidden = model.mask_id, 0, None
    grid = time_grid(cfg.steps, cfg.t_end).tolist()
    x, (B, L), device = x.clone(), x.shape, x.device
    stale = torch.ones(B, dtype=torch.bool, device=device)  # sequences whose hidden state is out of date
    u = torch.empty(B, L, 2, dtype=torch.float64, device=device)  # reused: drawn in place each step

    def decode(logits, x, u):  # the rows passed to the step all reveal: p_unmask = 1
        always = torch.ones(x.shape[0], dtype=torch.float64, device=device)
        return ancestral_step(decoding_logits(logits, mask_id, cfg.temperature, cfg.top_p), x, always, u, mask_id)

    def logits_at(rows):  # rows (b, l) indices (R,) each -> logits (R, N) there, backbone refreshed first
        nonlocal hidden, calls
        idx = stale.nonzero().squeeze(1)
        if len(idx):
            with common.autocast(device):
                h = model.hidden(x[idx])  # (B', L, C)
            hidden = h if hidden is None else hidden.index_copy_(0, idx, h)
            stale.zero_()
            calls += 1
        with common.autocast(device):
            return model.head(hidden[rows])  # (R, N)

    for i in common.progress(range(cfg.steps), "sampling"):
        torch.rand(B, L, 2, dtype=torch.float64, device=device, out=u)
        p = unmask_probability(grid[i], grid[i + 1], cfg)
        reveal = ((x == mask_id) & (u[..., 0] < p)).nonzero(as_tuple=True)  # (R,) each: the rows revealed now
        if len(reveal[0]):  # the R rows as R sequences of length 1
            args = logits_at(reveal)[:, None], x[reveal][:, None], u[reveal][:, None]  # (R, 1, N), (R, 1), (R, 1, 2)
            x[reveal] = (common.by_blocks(decode, *args) if float64_work(cfg) else decode(*args))[:, 0]
            stale[reveal[0]] = True
        if show:
            show(i, x)
    rest = (x == mask_id).nonzero(as_tuple=True)  # final noise removal, as in sample_chain
    if len(rest[0]):
        x[rest] = most_likely(logits_at(rest), mask_id)
    return x, calls


@torch.no_grad()
def generate(model, cfg, fixed, num_samples, show=None):
    """fixed (T,) token ids or -1 at free positions -> samples (num_samples, T), network calls.

    T <= block_size: one chain. T > block_size: semi-autoregressive rounds; each round keeps the
    last block_size - stride tokens as a clean prefix and generates stride new ones.
    """
    L, T = model.backbone.block_size, fixed.shape[0]
    fixed = fixed.to(next(model.parameters()).device).expand(num_samples, T)

    def chain(window):  # (B, W) ids or -1 -> the chain from [MASK] at the free positions
        return sample_chain(model, torch.where(window >= 0, window, model.mask_id), cfg, show)
    return common.semi_autoregressive(chain, fixed, L, cfg.stride or L // 2)


# ----------------------------------------------------------------------------------------------
# Evaluation: the validation NELBO


@torch.no_grad()
def evaluate(model, batches, cfg, full=False):
    """NELBO in nats per token: every validation window with eval_t_samples stratified times each
    (full=True, --eval), or eval_iters random batches (during training)."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    k = cfg.eval_t_samples if full else 1
    for x0 in corpus.val_batches(batches, cfg, full):
        x0 = x0.to(device)
        t = common.sample_times(k * x0.shape[0], cfg.t_min, device)  # (k B,): strata over k copies of the batch
        for tj in t.split(x0.shape[0]):  # a copy at a time: one batch of scores in memory, not k
            total += float(nelbo_terms(model, x0, tj, cfg, model.mask_id).sum()) / k
        count += x0.numel()
    nats = total / count
    return trainer.nats_figures("val_nelbo", nats)


def word_overlap(texts, train_text):
    """-> (share of the words in texts that also occur in the training text, number of words): a cheap check that
    samples are made of real words (a character-level model must learn to spell them)."""
    known = set(re.findall(r"[A-Za-z']+", train_text))
    words = [w for t in texts for w in re.findall(r"[A-Za-z']+", t)]
    return sum(w in known for w in words) / max(1, len(words)), len(words)


# ----------------------------------------------------------------------------------------------
# main


def build_model(cfg, meta):
    return MDLM(cfg, meta["vocab_size"])


def load(overrides):
    """load_for_inference (or the published weights of --init_from), then the checks again on the
    checkpoint's config under the overrides, and those that need the trained model's own settings."""
    if overrides.get("init_from"):
        cfg, model, tok, meta, ckpt = trainer.load_published(Config, overrides, "mdlm", build_model)
    else:
        cfg, model, tok, meta, ckpt = trainer.load_for_inference(Config, overrides, "mdlm", build_model)
    check_config(cfg)
    if cfg.time_cond and "sampler" not in overrides:  # the default sampler reuses outputs a time-conditioned model cannot
        cfg = dataclasses.replace(cfg, sampler="ddpm")
    if cfg.sampler in ("ddpm_cache", "confidence") and cfg.time_cond:
        common.die(f"--sampler={cfg.sampler} reuses the network output and needs a model without time conditioning; use --sampler=ddpm")
    if cfg.stride >= cfg.block_size:  # (a published model's block_size is known only now)
        common.die(f"--stride={cfg.stride} must be below the model's block_size={cfg.block_size} (0: block_size // 2)")
    return cfg, model, tok, meta, ckpt


def main(argv=None):
    verbs, cfg, overrides = common.parse_args(Config, argv)
    check_config(cfg)
    if "train" in verbs:
        # --init_from fine-tunes the published model on this run's data
        cfg, model, meta, overrides = trainer.model_to_train(cfg, "mdlm", Config, overrides, build_model, check_config)
        trainer.train(cfg, "mdlm", model, lambda m, x0: loss_fn(m, x0, cfg, model.mask_id),
                     lambda m, b: evaluate(m, b, cfg), meta)
        if "RANK" in os.environ and int(os.environ["RANK"]) != 0:
            return
    if "sample" in verbs:
        cfg, model, tok, meta, _ = load(overrides)
        length = cfg.seq_len or cfg.block_size
        fixed = corpus.conditioning(tok, cfg, length)
        length = fixed.shape[0]  # --infill without --seq_len: the template's length
        t0 = time.time()
        samples, calls = generate(model, cfg, fixed, cfg.num_samples, common.show_steps(tok, cfg))
        for i, s in enumerate(samples.tolist()):
            print(f"=== sample {i}\n{tok.decode(s)}")
        if cfg.samples_out:
            hub.write_samples(cfg.samples_out, [tok.decode(s) for s in samples.tolist()], hub.sample_settings(cfg, "mdlm"))
        print(f"({cfg.num_samples} samples of {length} tokens, {cfg.steps} steps, {calls} network calls, {time.time() - t0:.1f}s)")
    if "eval" in verbs:
        cfg, model, tok, meta, ckpt = load(overrides)
        cfg, batches, what = corpus.eval_batches(cfg, meta, bos=True)  # --eval_data: wrapped as in MDLM's code
        with common.autocast(next(model.parameters()).device):
            stats = {**evaluate(model, batches, cfg, full=True), "data": what}  # what the log record scored
        print(f"{what} NELBO {stats['val_nelbo']:.4f} nats/token | {stats['val_bits']:.4f} bits/token | "
              f"perplexity <= {stats['val_ppl']:.3f} ({cfg.eval_t_samples} time samples per sequence)")
        if meta["tokenizer"] != "gpt2":  # BPE samples are made of vocabulary pieces by construction
            texts = hub.read_samples(cfg.samples_in)[0] if cfg.samples_in else [tok.decode(x) for x in generate(
                model, cfg, torch.full((cfg.block_size,), -1), cfg.num_samples)[0].tolist()]  # --gen draws its own, but for --samples_in
            # a bounded slice of the training text: the statistic must not cost a pass over a large corpus
            train_text = "\n".join(map(tok.decode, corpus.Batches(cfg, meta, cfg.seed).slices("train", 1 << 20)))
            share, n = word_overlap(texts, train_text)
            stats["sample_words_in_train"] = share
            print(f"samples: {100 * share:.1f}% of {n} generated words occur in the training text "
                  f"({f'from {cfg.samples_in}' if cfg.samples_in else f'{cfg.num_samples} samples, {cfg.steps} steps'})")
        if cfg.gen:
            free = torch.full((cfg.seq_len or cfg.block_size,), -1)
            stats.update(trainer.generative_eval(cfg.judge, lambda n: generate(model, cfg, free, n)[0], cfg.num_samples,
                                                meta, tok, f"{cfg.sampler}, {cfg.steps} steps, temperature {cfg.temperature}, "
                                                f"top_p {cfg.top_p}", cfg.samples_in, next(model.parameters()).device))
        trainer.log_json(os.path.join(common.out_dir(cfg, "mdlm"), "log.jsonl"),
                        {"eval_full": stats, "iter": ckpt["iter"], "t_samples": cfg.eval_t_samples,
                         "init_from": cfg.init_from or None,  # the weights scored, where not this folder's
                         **({"gen_settings": hub.sample_settings(cfg, "mdlm")} if cfg.gen and not cfg.samples_in else {})})


if __name__ == "__main__":
    main()
