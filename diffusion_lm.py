"""
Diffusion-LM: Gaussian diffusion on learned word embeddings, with rounding, clamping and
gradient-based control.
Li, Thickstun, Gulrajani, Liang, Hashimoto, "Diffusion-LM Improves Controllable Text Generation", NeurIPS 2022.

Words w are embedded (E, learned jointly, d = 16 for E2E) and a continuous DDPM runs on the
embedding sequence with the "sqrt" noise schedule. The network predicts x_0 (the clean
embeddings); a rounding head tied to E maps x_0 back to words. Training minimises the paper's
end-to-end objective (x_0 MSE + prior + rounding cross-entropy). Sampling is ancestral on a
respaced schedule (200 of 2000 steps) and snaps the predicted x_0 to its nearest word embedding
after every step (the clamping trick); a printed text is the minimum-Bayes-risk (BLEU) choice
among 10 samples. Control: a classifier on noisy latents steers sampling by a few gradient steps
per denoising step (semantic content, length); infilling holds known words.

    python diffusion_lm.py --train                     # E2E restaurant texts, ~10 min on 2 CPU cores
    python diffusion_lm.py --sample                    # restaurant descriptions from out/diffusion_lm
    python diffusion_lm.py --sample --show --steps=200 --clamp=l2
    python diffusion_lm.py --train_classifier          # the noisy-latent classifier for control
    python diffusion_lm.py --sample --control="food=Italian"
    python diffusion_lm.py --sample --length=12        # END at position 12
    python diffusion_lm.py --sample --infill="The Eagle is a _ _ _ near the river ."
    python diffusion_lm.py --eval                      # NLL bound (nats/position), control success
"""

import collections
import dataclasses
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import corpus
import difflm_ops
import trainer

METHOD = "diffusion_lm"

# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class Config(common.PromptConfig, common.TextConfig, common.BaseConfig):
    dataset: str = "e2e"
    n_head: int = 8  # heads of 16 and the higher lr below give more fluent samples than 4 heads of 32
    block_size: int = 64  # n = 64 positions (paper)
    rows: bool = True  # one text per row, padded with PAD (needs <split>.jsonl); false: packed windows
    batch_size: int = 64
    max_iters: int = 2400
    lr: float = 4e-3  # the highest rate that trains stably here; lower ones end at a higher val loss
    warmup_iters: int = 100
    eval_interval: int = 800
    eval_iters: int = 8
    log_interval: int = 100
    # Diffusion-LM
    embed_dim: int = 16  # d: 16 for E2E, 128 for ROCStories (paper)
    T: int = 2000
    FIXED = ("T",)  # with the model's shape, what a checkpoint fixes (a class attribute, not a --key)
    # sampling
    steps: int = 200  # respaced decode: step k of the 200-step chain is step 10k of T = 2000
    clamp: str = "cos"  # cos (the lecture's nearest by cosine) | l2 (the reference code) | none
    num_samples: int = 8
    mbr: int = 10  # MBR decoding: each printed sample is the BLEU consensus of this many (1: off)
    # control
    control: str = ""  # field=value[,field=value]: semantic content (needs --train_classifier)
    length: int = 0  # > 0: END at this position (0-based, counting <s>), PAD after it
    infill: str = ""  # words with _ at free positions, e.g. "The Eagle is _ _ _ ."
    guide_steps: int = 3  # Adagrad steps per denoising step (paper: 3)
    guide_lr: float = 0.1  # paper Table 6: semantic content and length 0.1
    guide_lambda: float = 0.01  # fluency weight lambda (paper Table 6: 0.01)
    # the classifier on noisy latents (--train_classifier)
    classifier_iters: int = 3000  # the classifier's loss is still falling well before this
    classifier_layers: int = 2
    # evaluation
    eval_t_samples: int = 4  # time samples per validation sequence for the diffusion sum of the bound
    eval_batches: int = 20  # validation batches in --eval (0: all)
    control_targets: str = "food=Italian,food=Chinese,food=French,name=The Golden Curry,near=Café Rouge,area=riverside,Type=pub"
    control_samples: int = 64
    gen: bool = False  # --eval --gen: fluency, the NLL of num_samples samples under the autoregressive judge
    judge: str = "out/ar/ckpt.pt"  # an ar.py checkpoint trained on the same data (e.g. --dataset=e2e)


def check_config(cfg):
    """Every value at the command-line boundary -> one line naming the flag; the math below trusts cfg."""
    common.check_common(cfg)
    common.check_choice(cfg, "clamp", ("cos", "l2", "none"))
    common.check_at_least(cfg, ("T",), 2)  # L_T and at least one step of the sum
    common.check_at_least(cfg, ("embed_dim", "steps", "mbr", "classifier_iters", "classifier_layers",
                                "eval_t_samples", "control_samples"), 1)
    if cfg.T % cfg.steps:  # e.g. the most steps below both that divide T, and T
        common.die(f"--steps={cfg.steps} must divide T={cfg.T} (e.g. {max(d for d in range(1, min(cfg.steps, cfg.T)) if cfg.T % d == 0)} or {cfg.T})")
    common.check_at_least(cfg, ("length", "guide_steps", "eval_batches", "guide_lr", "guide_lambda"), 0)


# ----------------------------------------------------------------------------------------------
# Forward process: the sqrt schedule, q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0)


def sqrt_alpha_bar(tau, s=1e-4):
    """The paper's continuous schedule alpha_bar(tau) = 1 - sqrt(tau + s), tau in [0, 1] (App. A)."""
    return 1.0 - math.sqrt(tau + s)


class Schedule:
    """float64 tables over code steps k = 0..S-1 (paper step k + 1), from alpha_bar at those steps.

    betas are clipped at 0.999: alpha_bar(1) < 0, so the last one always is (docs/diffusion_lm.md).
    times holds each step's index on the full T-step schedule (the network's time input).
    """

    def __init__(self, alpha_bar, times, T):
        ab = alpha_bar.double()
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        self.T, self.times, self.alpha_bar, self.alpha_bar_prev = T, times, ab, ab_prev
        self.betas = 1 - ab / ab_prev
        # posterior q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, post_var) (DDPM eq. 6-7)
        self.coef_x0 = self.betas * ab_prev.sqrt() / (1 - ab)
        self.coef_xt = (1 - ab_prev) * (1 - self.betas).sqrt() / (1 - ab)
        self.post_var = self.betas * (1 - ab_prev) / (1 - ab)


def sqrt_schedule(T):
    """The full T-step schedule: beta_t = min(1 - alpha_bar(t/T) / alpha_bar((t-1)/T), 0.999)."""
    betas = torch.tensor([min(1 - sqrt_alpha_bar((k + 1) / T) / sqrt_alpha_bar(k / T), 0.999) for k in range(T)],
                         dtype=torch.float64)
    return Schedule(torch.cumprod(1 - betas, 0), torch.arange(T), T)


def respace(full, steps):
    """The S-step decode schedule: code step k of it is code step (k + 1) T / S - 1 of the full one."""
    times = torch.arange(1, steps + 1) * (full.T // steps) - 1
    return Schedule(full.alpha_bar[times], times, full.T)


def q_sample(x0, ab_t, noise):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4); x0 (B, L, d), ab_t (B,)."""
    ab_t = ab_t.to(x0.dtype)[:, None, None]
    return ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * noise


# ----------------------------------------------------------------------------------------------
# Clamping: the nearest word embedding (a fused kernel may compute it without the N x V scores)


@difflm_ops.fused("nearest_embedding")
def nearest_embedding(x, E, metric="cos"):
    """x (..., d), E (V, d) -> (...) ids: argmax of cosine, or argmin of L2 (as x.E - |E|^2 / 2, the same argmax
    as -|x - E|^2); equal scores go to the lowest id (the matmul may round two copies of a row apart)."""
    x2 = x.reshape(-1, x.shape[-1]).float()  # (N, d)
    if metric == "cos":  # norms in float64: their squares overflow fp32 from about 1e19
        scores = F.normalize(x2.double(), dim=-1).float() @ F.normalize(E.double(), dim=-1).float().T  # (N, V)
    elif metric == "l2":
        scores = x2 @ E.float().T - 0.5 * E.float().pow(2).sum(-1)
    else:
        common.die(f"unknown --clamp={metric!r}; use cos, l2 or none")
    return scores.argmax(-1).view(x.shape[:-1])  # torch.argmax returns the first maximum


def clamp(x0, E, metric):
    """Replace each predicted x_0 vector by its nearest embedding row (paper sec. 4.2)."""
    return E[nearest_embedding(x0, E, metric)].to(x0.dtype)


# ----------------------------------------------------------------------------------------------
# Model: embeddings + rounding head, and an x_0 denoiser on common's Transformer


class LatentTransformer(nn.Module):
    """(B, L, d) latents + code step (B,) -> (B, L, out): d -> C (Linear, tanh, Linear) plus learned
    positions, common's time-conditioned (adaLN) Transformer on those embeddings, then a head. The time
    input is t * 1000 / T, so the respaced schedules reuse the network (docs/diffusion_lm.md)."""

    def __init__(self, cfg, d, out, n_layer, T):
        super().__init__()
        C, self.T = cfg.n_embd, T
        self.inp = nn.Sequential(nn.Linear(d, C), nn.Tanh(), nn.Linear(C, C))
        # learned absolute positions (paper App. E) beside the backbone's rotary ones: length
        # control and position-dependent classifiers need to know where a position is
        self.pos = nn.Parameter(torch.randn(cfg.block_size, C) * 0.02)
        # vocab_size 0: no token table, the inputs are the latents' embeddings
        self.backbone = common.Transformer(0, n_layer, cfg.n_head, C, cfg.block_size, cfg.dropout, cond_dim=128)
        self.head = nn.Sequential(nn.Linear(C, C), nn.Tanh(), nn.Linear(C, out))

    def forward(self, xt, t):
        L = xt.shape[1]
        if L > self.pos.shape[0]:
            common.die(f"sequence of {L} positions is longer than block_size={self.pos.shape[0]}")
        h = self.backbone(self.inp(xt) + self.pos[:L], t.float() * 1000.0 / self.T)  # (B, L, C)
        return self.head(h)  # (B, L, out)


class DiffusionLM(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim)  # N(0, 1) init, as the reference
        self.round_bias = nn.Parameter(torch.zeros(vocab_size))  # tied rounding head, untied bias
        self.net = LatentTransformer(cfg, cfg.embed_dim, cfg.embed_dim, cfg.n_layer, cfg.T)
        sched = sqrt_schedule(cfg.T)
        self.T = cfg.T
        self.register_buffer("ab", sched.alpha_bar.float(), persistent=False)
        self.register_buffer("coef_x0", sched.coef_x0.float(), persistent=False)
        self.register_buffer("post_var", sched.post_var.float(), persistent=False)
        self.register_buffer("beta0", sched.betas[:1].float(), persistent=False)

    def denoise(self, xt, t):
        """x_0 parameterisation: f_theta(x_t, t) predicts the clean embeddings. (B, L, d), (B,)."""
        return self.net(xt, t)

    def round_logits(self, x):
        """log p(w | x) up to a constant: x E^T + b (paper sec. 4.1). (B, L, d) -> (B, L, V)."""
        return x @ self.embed.weight.T + self.round_bias

    def forward(self, w, t=None):
        """The end-to-end objective's terms per sequence (paper eq. 2 and App. E), w (B, L) -> dict of (B,).

        mse       x_0 MSE, against E[w] at the first step (the embedding term) and x_0 after it
        prior     mean (sqrt(alpha_bar_T) x_0)^2: keeps the embedding norms in check
        rounding  -log p(w | x_0) on the sampled x_0, per position
        sq_err, l_T, rounding_sum   sums over positions (and dimensions), for the NLL bound; t  the steps drawn
        """
        B = w.shape[0]
        emb = self.embed(w)  # (B, L, d)
        x0 = emb + self.beta0.sqrt() * torch.randn_like(emb)  # q_phi(x_0 | w) = N(E[w], (1 - alpha_bar_1) I)
        if t is None:
            t = torch.randint(self.T, (B,), device=w.device)
        xt = q_sample(x0, self.ab[t], torch.randn_like(x0))
        pred = self.denoise(xt, t)
        target = torch.where((t == 0)[:, None, None], emb, x0)
        err = (target - pred.float()).pow(2)
        ab_T = self.ab[-1]
        l_T = 0.5 * (-1 - torch.log1p(-ab_T) + (1 - ab_T) + ab_T * x0.pow(2)).sum((1, 2))  # KL(q(x_T|x_0) || N(0, I))
        rounding = common.token_nll(self.round_logits(x0).flatten(0, 1), w.flatten()).view_as(w)  # (B, L)
        return {"mse": err.mean((1, 2)), "prior": (ab_T * x0.pow(2)).mean((1, 2)), "rounding": rounding.mean(1),
                "sq_err": err.sum((1, 2)), "l_T": l_T, "rounding_sum": rounding.sum(1), "t": t}


# ----------------------------------------------------------------------------------------------
# Loss: the end-to-end objective, the sum of the terms the model's forward computes (paper eq. 2, App. E)


def loss_fn(model, w):
    terms = model(w)
    return (terms["mse"] + terms["prior"] + terms["rounding"]).mean()  # unweighted sum (paper App. E)


# ----------------------------------------------------------------------------------------------
# Data: one text per row (padded with PAD) from <split>.jsonl, or packed windows


class Rows:
    """E2E texts as <s> w ... </s> PAD ..., one per row (cut at block_size); .get like corpus.Batches."""

    def __init__(self, cfg, meta):
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.rows, self.mrs = {}, {}
        for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
            exs = corpus.load_jsonl(cfg, name, meta)
            self.rows[split] = pad_rows([e["text"] for e in exs], cfg.block_size)
            self.mrs[split] = [e["mr"] for e in exs]

    def get(self, split, batch_size, gen=None):
        ix = torch.randint(len(self.rows[split]), (batch_size,), generator=gen or self.gen)
        return self.rows[split][ix]  # (B, L)

    def sequential(self, split, batch_size):
        return self.rows[split].split(batch_size)


def pad_rows(texts, L):
    tok = corpus.WordTokenizer
    out = torch.full((len(texts), L), tok.PAD, dtype=torch.long)
    for i, ids in enumerate(texts):
        row = ([tok.START] + list(ids))[:L - 1] + [tok.END]
        out[i, :len(row)] = torch.tensor(row)
    return out


def make_batches(cfg, meta):
    if cfg.rows and meta.get("seq2seq"):  # data/e2e/prepare.py wrote <split>.jsonl beside the token files
        return Rows(cfg, meta)
    if cfg.rows:  # a packed corpus (data/text/prepare.py) is refused, not trained on as windows under rows=True
        fix = "rerun data/e2e/prepare.py" if (cfg.dataset, cfg.data_dir) == ("e2e", "") else "train on its packed windows with --rows=false"
        common.die(f"{corpus.data_path(cfg)} has no train.jsonl (one text per row); {fix}")
    return corpus.Batches(cfg, meta, cfg.seed)


# ----------------------------------------------------------------------------------------------
# The classifier on noisy latents p_phi(field = value | x_t, t), for semantic-content control


class Classifier(nn.Module):
    """Noisy latents (B, L, d) at code step t -> one categorical per E2E field ("absent" is value 0)."""

    def __init__(self, cfg, fields):
        super().__init__()
        self.fields = fields  # [(field, [values...])], values[0] == "" (absent)
        self.net = LatentTransformer(cfg, cfg.embed_dim, cfg.n_embd, cfg.classifier_layers, cfg.T)
        self.offsets = [0]
        for _, values in fields:
            self.offsets.append(self.offsets[-1] + len(values))
        self.head = nn.Linear(cfg.n_embd, self.offsets[-1])

    def forward(self, xt, t):
        # max-pooled over positions: a field is often one word, which a mean over 64 positions dilutes
        return self.head(self.net(xt, t).amax(1)).float()  # (B, sum of value counts)

    def log_probs(self, xt, t, targets):
        """targets [(field index, value index)] -> sum of log p(field = value | x_t) (B,)."""
        logits = self(xt, t)
        return sum(logits[:, self.offsets[f]:self.offsets[f + 1]].log_softmax(-1)[:, v] for f, v in targets)

    def parse_targets(self, spec, what="--control"):
        """'food=Italian,area=riverside' -> [(field index, value index)]; unknown ones die."""
        names = [f for f, _ in self.fields]
        out = []
        for item in [s.strip() for s in spec.split(",") if s.strip()]:
            field, eq, value = item.partition("=")
            field, value = field.strip(), value.strip()
            if not eq or field not in names:
                common.die(f"{what}: {item!r} must be field=value with a field from: {', '.join(names)}")
            values = self.fields[names.index(field)][1]
            if value not in values[1:]:
                common.die(f"{what}: {field} has no value {value!r}; known: {', '.join(values[1:])}")
            if names.index(field) in [f for f, _ in out]:  # one field, two values: a target no sample can meet
                common.die(f"{what}: {field} is given twice; give each field one value")
            out.append((names.index(field), values.index(value)))
        return out


def classifier_fields(mrs):
    fields = {}
    for mr in mrs:
        for k, v in mr.items():
            fields.setdefault(k, set()).add(v)
    return [(k, [""] + sorted(vs)) for k, vs in sorted(fields.items())]


def classifier_labels(mrs, fields):
    y = torch.zeros(len(mrs), len(fields), dtype=torch.long)
    for i, mr in enumerate(mrs):
        for j, (k, values) in enumerate(fields):
            if k in mr:
                y[i, j] = values.index(mr[k])
    return y  # (N, fields), 0 = absent


def classifier_loss(clf, embed, w, y, T, ab):
    """Cross-entropy of every field at a random step: x_t from q(x_t | x_0 = E[w]) (paper sec. 5.2)."""
    t = torch.randint(T, (w.shape[0],), device=w.device)
    with torch.no_grad():
        xt = q_sample(embed(w), ab[t], torch.randn(*w.shape, embed.weight.shape[1], device=w.device))
    logits = clf(xt, t)
    return sum(F.cross_entropy(logits[:, clf.offsets[j]:clf.offsets[j + 1]], y[:, j]) for j in range(len(clf.fields))) / len(clf.fields)


def train_classifier(cfg, model, meta):
    """Train p_phi(c | x_t, t) on E2E's MR fields with the language model's (frozen) embeddings."""
    if not meta.get("seq2seq"):  # meta: the model's
        common.die(f"--train_classifier needs E2E's meaning representations: a model trained on --dataset=e2e, not on "
                   f"the data in {corpus.data_path(cfg)}")
    corpus.prepare_data(cfg, meta)  # a folder moved or never prepared here: prepared, or named
    device, exs = next(model.parameters()).device, corpus.load_jsonl(cfg, "train", meta)
    fields = classifier_fields([e["mr"] for e in exs])
    rows = pad_rows([e["text"] for e in exs], cfg.block_size)
    y = classifier_labels([e["mr"] for e in exs], fields)
    clf = Classifier(cfg, fields).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    for it in range(cfg.classifier_iters):
        for g in opt.param_groups:
            g["lr"] = trainer.lr_at(dataclasses.replace(cfg, max_iters=cfg.classifier_iters), it)
        ix = torch.randint(len(rows), (cfg.batch_size,), generator=gen)
        loss = classifier_loss(clf, model.embed, rows[ix].to(device), y[ix].to(device), cfg.T, model.ab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
        opt.step()
        if it % cfg.log_interval == 0 or it == cfg.classifier_iters - 1:
            print(f"classifier iter {it:5d}/{cfg.classifier_iters} | loss {loss.item():.4f} | {trainer.fmt_time(time.time() - t0)}", flush=True)
    path = os.path.join(common.out_dir(cfg, METHOD), "classifier.pt")
    common.save_checkpoint(path, {"model": clf.state_dict(), "fields": fields, "config": dataclasses.asdict(cfg),
                                  "lm_embed": model.embed.weight.detach().cpu()})  # the model it reads the latents of
    print(f"classifier saved to {path}")
    return clf.eval()


def load_classifier(cfg, model, lm):
    """classifier.pt beside the language model's checkpoint lm, trained on that run's embeddings (its EMA's or
    its own; an older file does not say) -> on model's device, frozen."""
    path = os.path.join(common.out_dir(cfg, METHOD), "classifier.pt")
    if not os.path.isfile(path):  # (train_classifier refuses a model of other data)
        common.die(f"no classifier at {path}; train one with `python diffusion_lm.py --train_classifier --out_dir={os.path.dirname(path)}`"
                   if lm["meta"].get("seq2seq") else "--control needs a model trained on E2E's meaning representations (--dataset=e2e)")
    ckpt = common.load_checkpoint(path, METHOD, "--train_classifier")  # checksum and finite weights, as a model's
    ccfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ("n_embd", "n_head", "classifier_layers", "embed_dim")})
    clf = Classifier(ccfg, [(f, list(v)) for f, v in ckpt["fields"]])
    trainer.fit_state(clf, ckpt["model"], path, {}, ccfg, "classifier")  # its shapes come from its own config
    runs = [lm[k]["embed.weight"].float() for k in ("model", "ema") if "embed.weight" in lm.get(k, {})]
    if "lm_embed" in ckpt and not any(torch.equal(ckpt["lm_embed"].float(), e) for e in runs):
        common.die(f"{path} was trained on another model's embeddings (the model was retrained since); "
                   f"rerun `python diffusion_lm.py --train_classifier --out_dir={os.path.dirname(path)}` (--eval skips it with --control_targets=)")
    return clf.to(model.embed.weight.device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Samplers: ancestral with clamping on a respaced schedule, guidance, infilling


def guided(x, mean, var, t_prev, objective, cfg):
    """A few Adagrad steps on x_{t-1} (paper sec. 5.2): lambda |x - mu|^2 / (2 sigma^2) - log p(c | x_{t-1}).

    A fresh optimiser per step, as the reference (a sign step of guide_lr); objective(x, t) -> (B,) to minimise.
    """
    x = x.detach().clone().requires_grad_(True)
    t = torch.full((x.shape[0],), int(t_prev), device=x.device)
    for _ in range(cfg.guide_steps):
        opt = torch.optim.Adagrad([x], lr=cfg.guide_lr)
        with torch.enable_grad():
            loss = cfg.guide_lambda * (x - mean).pow(2).sum() / (2 * var) + objective(x, t).sum()
            x.grad, = torch.autograd.grad(loss, [x])  # x's alone: the length objective runs the model's weights
        opt.step()
    return x.detach()


@torch.no_grad()
def sample(model, cfg, n, fixed=None, objective=None, show=None):
    """n sequences (n, L) of word ids from x_T ~ N(0, I).

    fixed (L,) ids or -1 at free positions: known positions of x_t are set to their clean
    embeddings at every step (infilling). objective(x, t) -> (B,) turns on guidance.
    Each step: x0_hat = f(x_t, t), clamp it to the nearest embeddings, then
    x_{t-1} = mu_tilde(x_t, x0_hat) + sqrt(beta_tilde) z (the reference's posterior form).
    The last x0_hat is rounded by the head, argmax(x0_hat E^T + b) (docs/diffusion_lm.md).
    """
    sched = respace(sqrt_schedule(model.T), cfg.steps)
    L, device = cfg.block_size, model.embed.weight.device
    E = model.embed.weight
    x = torch.randn(n, L, E.shape[1], device=device)
    fixed = torch.full((L,), -1, device=device) if fixed is None else fixed.to(device)  # (L,) ids, -1 where free
    known, clean = fixed >= 0, E[fixed.clamp(min=0)][None].expand_as(x)
    for i in common.progress(range(cfg.steps - 1, -1, -1), "sampling"):
        x = torch.where(known[None, :, None], clean, x)
        t = torch.full((n,), int(sched.times[i]), device=device)
        with common.autocast(device):
            raw = model.denoise(x, t).float()
        x0 = clamp(raw, E, cfg.clamp) if cfg.clamp != "none" else raw
        if show:  # the held words as the sample will hold them
            show(cfg.steps - 1 - i, torch.where(known, fixed, model.round_logits(raw).argmax(-1)))
        if i == 0:
            break
        mean = float(sched.coef_x0[i]) * x0 + float(sched.coef_xt[i]) * x
        var = float(sched.post_var[i])
        x = mean + math.sqrt(var) * torch.randn_like(x)
        if objective is not None:
            x = guided(x, mean, var, sched.times[i - 1], objective, cfg)
    return torch.where(known, fixed, model.round_logits(raw).argmax(-1))  # (n, L)


def bleu(hyp, ref, n=4):
    """Sentence BLEU-n of word list hyp against ref: the geometric mean of the clipped n-gram precisions
    (add-one smoothing for n > 1, Lin and Och 2004, so one missing 4-gram does not zero it) times the
    brevity penalty. Written here, not sacrebleu (diffuser.py's corpus BLEU), so --sample needs no extra."""
    if not hyp:
        return 0.0
    log_p = min(0.0, 1 - len(ref) / len(hyp))  # brevity penalty
    for k in range(1, n + 1):
        h = collections.Counter(tuple(hyp[i:i + k]) for i in range(len(hyp) - k + 1))
        r = collections.Counter(tuple(ref[i:i + k]) for i in range(len(ref) - k + 1))
        match, total, add = sum(min(c, r[g]) for g, c in h.items()), max(len(hyp) - k + 1, 0), int(k > 1)
        if match + add == 0:
            return 0.0
        log_p += math.log((match + add) / (total + add)) / n
    return math.exp(log_p)


def mbr_pick(cands):
    """Minimum Bayes risk decoding (docs/diffusion_lm.md): argmin_w sum_{w' != w} -BLEU(w, w'), the candidate
    that agrees most with the others. cands: word lists; returns an index (the first on ties)."""
    score = [sum(bleu(h, r) for j, r in enumerate(cands) if j != i) for i, h in enumerate(cands)]
    return max(range(len(cands)), key=score.__getitem__)


def sample_mbr(model, cfg, tok, n, fixed=None, objective=None, show=None):
    """n sequences (n, L), each the MBR choice among cfg.mbr samples (one batch of n * mbr chains)."""
    k = cfg.mbr
    out = sample(model, cfg, n * k, fixed, objective, show)  # (n * k, L)
    if k == 1:
        return out
    words = [decode(tok, s, fixed).split() for s in out.tolist()]
    return torch.stack([out[i * k + mbr_pick(words[i * k:(i + 1) * k])] for i in range(n)])


def infill_template(tok, cfg):
    """--infill words with _ at free positions -> (L,) ids (START first under --rows, -1 where free); None if empty."""
    fixed = corpus.conditioning(tok, cfg, cfg.block_size, cfg.rows) if (cfg.prefix or cfg.suffix) else None
    if not cfg.infill:
        return fixed
    words = tok.split(cfg.infill)
    ids = ([tok.START] if cfg.rows else []) + [-1 if w == "_" else tok.stoi.get(w, tok.UNK) for w in words]  # packed text has no <s>
    if len(ids) > cfg.block_size:
        common.die(f"--infill takes {len(ids)} positions, more than the {cfg.block_size}-position sequence; shorten it")
    if cfg.length and max((i for i, w in enumerate(ids) if w >= 0), default=-1) >= cfg.length:  # --length puts </s> there
        common.die(f"--infill holds words at or past --length={cfg.length}, the position of </s>; raise --length or shorten it")
    unknown = [w for w in words if w != "_" and w not in tok.stoi]
    if unknown and not cfg.allow_unk:
        common.die(f"--infill has words outside the vocabulary: {' '.join(unknown)}; use known words or --allow_unk")
    out = torch.full((cfg.block_size,), -1, dtype=torch.long) if fixed is None else fixed
    out[:len(ids)] = torch.where(torch.tensor(ids) >= 0, torch.tensor(ids), out[:len(ids)])
    return out


def length_objective(model, length):
    """Length control: END at position `length`, PAD after it; the "classifier" is the MSE of
    f_theta(x_{t-1}) against those embeddings at the fixed positions (docs/diffusion_lm.md)."""
    E = model.embed.weight.detach()

    def objective(x, t):
        tgt = torch.full((x.shape[1] - length,), corpus.WordTokenizer.PAD, device=x.device)
        tgt[0] = corpus.WordTokenizer.END
        return (model.denoise(x, t)[:, length:] - E[tgt]).pow(2).sum((1, 2))
    return objective


def build_objective(model, cfg, clf=None, targets=None):
    """Sum of the control terms asked for (composing controls sums log-probabilities)."""
    terms = []
    if targets:
        terms.append(lambda x, t: -clf.log_probs(x, t, targets))
    if cfg.length:
        terms.append(length_objective(model, cfg.length))
    if not terms:
        return None
    return lambda x, t: sum(f(x, t) for f in terms)


def decode(tok, ids, fixed=None):
    """ids (L,) -> the text between <s> and the first </s>; under a template (fixed (L,), -1 where free) an
    </s> a blank drew before the last fixed word is dropped, not an end, so the fixed words always show."""
    last = -1 if fixed is None or not (fixed >= 0).any() else int((fixed >= 0).nonzero().max())
    words = []
    for pos, i in enumerate(ids):
        if i == tok.END and pos > last:
            break
        if i not in (tok.START, tok.END, tok.PAD):
            words.append(tok.words[i])
    return " ".join(words)


# ----------------------------------------------------------------------------------------------
# Evaluation: the NLL bound, control success, fluency


@torch.no_grad()
def evaluate(model, batches, cfg, full=False):
    """Validation loss terms and the NLL bound in nats per position (docs/diffusion_lm.md):
    L_T + sum_{t>=2} L_{t-1} + KL(q_phi(x_0|w) || p(x_0|x_1)) + -log p(w|x_0). Reverse variances: beta_tilde_t
    for t >= 2 (so L_{t-1} = weight_t * sq_err_t, the mean term alone) and beta_1 at t = 1 (q_phi's variance).
    The sum over t: eval_t_samples draws per sequence, P(t) mostly proportional to weight_t, a tenth uniform
    (unbiased; uniform draws rarely hit the few early steps that hold most of the weight, and swung widely)."""
    model.eval()
    device = model.embed.weight.device
    data, k = corpus.val_batches(batches, cfg, full, limit=cfg.eval_batches), cfg.eval_t_samples if full else 1
    weight = model.coef_x0[1:] ** 2 / (2 * model.post_var[1:])  # (T-1,) for t = 1..T-1
    prop = 0.9 * weight / weight.sum() + 0.1 / len(weight)  # the tenth bounds a late step's share when x_0 is easy
    sums, count, positions = {}, 0, 0
    for w in data:
        w = w.to(device)
        B = w.shape[0]
        first = model(w, torch.zeros(B, dtype=torch.long, device=device))
        bound = first["l_T"] + first["sq_err"] / (2 * model.beta0) + first["rounding_sum"]
        for _ in range(k):
            terms = model(w)
            t = 1 + torch.multinomial(prop, B, replacement=True)  # (B,)
            bound = bound + weight[t - 1] / prop[t - 1] * model(w, t)["sq_err"] / k
            for name in ("mse", "prior", "rounding"):
                sums[name] = sums.get(name, 0.0) + float(terms[name].sum()) / k
        sums["nelbo"] = sums.get("nelbo", 0.0) + float(bound.sum())
        count += B
        positions += w.numel()
    out = {f"val_{n}": v / count for n, v in sums.items() if n != "nelbo"}
    out["val_loss"] = out["val_mse"] + out["val_prior"] + out["val_rounding"]
    out["val_nelbo"] = sums["nelbo"] / positions  # nats per position
    return out


def as_stream(samples, tok):
    """Rows <s> w ... </s> PAD ... (n, L) -> (1, total): each text up to its </s>, packed end to end
    as the judge's training stream (data/e2e's train.bin), so PAD is never scored."""
    out = []
    for s in samples.tolist():
        end = s.index(tok.END) + 1 if tok.END in s else len(s)
        out += [i for i in s[:end] if i != tok.PAD]
    return torch.tensor([out], device=samples.device)  # (1, total), judged where it was drawn


def contains(text_words, value):
    """Exact field matching: the value's words occur contiguously in the sample."""
    v = corpus.WordTokenizer.split(value)
    return any(text_words[i:i + len(v)] == v for i in range(len(text_words) - len(v) + 1))


def control_eval(model, clf, tok, cfg, asked):
    """Guided vs unguided control success, by exact field matching, for each (spec, its parsed targets) asked."""
    torch.manual_seed(cfg.seed + 7)
    plain = [decode(tok, s).split() for s in sample(model, cfg, cfg.control_samples).tolist()]
    out = {}
    for spec, targets in asked:
        value = spec.partition("=")[2].strip()
        torch.manual_seed(cfg.seed + 7)
        got = [decode(tok, s).split() for s in
               sample(model, cfg, cfg.control_samples, objective=build_objective(model, cfg, clf, targets)).tolist()]
        g = sum(contains(s, value) for s in got) / len(got)
        u = sum(contains(s, value) for s in plain) / len(plain)
        out[spec] = (g, u)
        print(f"control {spec:32s} guided {100 * g:5.1f}% | unguided {100 * u:5.1f}% | "
              f"ratio {(f'{g / u:.1f}x') if u else 'n/a (unguided 0)'}  ({len(got)} samples each, exact word match)", flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# main


def build_model(cfg, meta):
    if meta.get("tokenizer") != "word":
        common.die(f"Diffusion-LM works on words; --dataset={cfg.dataset} has a {meta.get('tokenizer')} tokenizer "
                   "(use --dataset=e2e or shakespeare_word, or prepare your text with data/text/prepare.py --tokenizer=word)")
    return DiffusionLM(cfg, meta["vocab_size"])


def load(overrides):
    """load_for_inference, then check_config on the checkpoint's config under the overrides, and --length."""
    cfg, model, tok, meta, ckpt = trainer.load_for_inference(Config, overrides, METHOD, build_model)
    check_config(cfg)
    if cfg.length >= cfg.block_size or cfg.length and not cfg.rows:  # packed windows hold no </s> or <pad> to place
        common.die(f"--length={cfg.length} must lie in 1..{cfg.block_size - 1} (the END position)" if cfg.rows else
                   "--length places </s> in a row of one text; this model trained on packed windows (--rows=false)")
    return cfg, model, tok, meta, ckpt


def main(argv=None):
    verbs, cfg, overrides = common.parse_args(Config, argv, common.VERBS + ("train_classifier",))  # a verb of this method only
    check_config(cfg)
    if "train" in verbs:
        trainer.check_memory(cfg)
        meta = corpus.prepare_data(cfg)
        model = build_model(cfg, meta)
        trainer.train(cfg, METHOD, model, loss_fn, lambda m, b: evaluate(m, b, cfg), meta, make_batches(cfg, meta))
        if "RANK" in os.environ and int(os.environ["RANK"]) != 0:
            return
    if "train_classifier" in verbs:
        cfg, model, tok, meta, _ = load(overrides)
        own = dataclasses.replace(cfg, lr_decay_iters=overrides.get("lr_decay_iters", 0))  # not the language model's decay
        said = "interrupted; the classifier is saved at its last iteration: run --train_classifier again"
        with trainer.own_out_dir(common.out_dir(cfg, METHOD)), trainer.interruptible(lambda: said):
            train_classifier(own, model.requires_grad_(False), meta)
    if "sample" in verbs:
        cfg, model, tok, meta, lm = load(overrides)
        fixed = infill_template(tok, cfg)
        clf = load_classifier(cfg, model, lm) if cfg.control else None
        targets = clf.parse_targets(cfg.control) if clf else None
        t0 = time.time()
        out = sample_mbr(model, cfg, tok, cfg.num_samples, fixed, build_objective(model, cfg, clf, targets),
                         common.show_steps(tok, cfg))
        for i, s in enumerate(out.tolist()):
            print(f"=== sample {i}\n{decode(tok, s, fixed)}")
        print(f"({cfg.num_samples} samples, each the MBR choice of {cfg.mbr}, {cfg.steps} steps, "
              f"clamp={cfg.clamp}, {time.time() - t0:.1f}s)")
    if "eval" in verbs:
        cfg, model, tok, meta, ckpt = load(overrides)
        corpus.prepare_data(cfg, meta)  # a folder moved or never prepared here: prepared, or named
        measure = cfg.control_targets.strip(", ") if meta.get("seq2seq") else ""  # E2E's targets: control is measured
        trained = measure and os.path.isfile(os.path.join(common.out_dir(cfg, METHOD), "classifier.pt"))
        with torch.random.fork_rng(devices=[]):  # built on the CPU; one that does not fit stops the run before the pass, whose draws it leaves as without one
            clf = load_classifier(cfg, model, ckpt) if trained else None
        asked = [(s.strip(), clf.parse_targets(s, "--control_targets")) for s in measure.split(",") if s.strip()] if clf else []
        stats = {**evaluate(model, make_batches(cfg, meta), cfg, full=True), "data": cfg.eval_split}
        print(f"{cfg.eval_split} NELBO {stats['val_nelbo']:.4f} nats/position (PAD positions included) | "
              f"mse {stats['val_mse']:.4f} | prior {stats['val_prior']:.2e} | rounding {stats['val_rounding']:.4f} "
              f"({cfg.eval_t_samples} time samples per sequence, {f'{cfg.eval_batches} batches' if cfg.eval_batches else 'every batch'})")
        if clf is not None:
            for spec, (g, u) in control_eval(model, clf, tok, cfg, asked).items():
                stats[f"control {spec}"], stats[f"unguided {spec}"] = g, u
        elif measure:
            print(f"control: no classifier yet; run `python diffusion_lm.py --train_classifier --out_dir={common.out_dir(cfg, METHOD)}` to measure it")
        if cfg.gen:
            stats.update(trainer.generative_eval(cfg.judge, lambda n: as_stream(sample_mbr(model, cfg, tok, n), tok),
                                                cfg.num_samples, meta, tok, f"{cfg.steps} steps, clamp={cfg.clamp}, "
                                                f"MBR of {cfg.mbr}, texts packed as the judge's stream"))
        trainer.log_json(os.path.join(common.out_dir(cfg, METHOD), "log.jsonl"), {"eval_full": stats, "iter": ckpt["iter"],
                         "t_samples": cfg.eval_t_samples, "eval_batches": cfg.eval_batches})  # how much was scored


if __name__ == "__main__":
    main()
