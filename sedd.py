"""
SEDD: score entropy discrete diffusion.
Lou, Meng, Ermon, "Discrete Diffusion Modeling by Estimating the Ratios of the Data
Distribution", ICML 2024.

Forward process: a continuous-time Markov chain with rate sigma(t) * Q on every position
independently, for two graphs: absorbing (every token jumps to [MASK]) and uniform (every token
jumps to a uniformly random one). The network estimates the "concrete score", the ratios
s_y = p_t(x_t with this position set to y) / p_t(x_t), and is trained with the denoising score
entropy (DWDSE), whose integral over t bounds the negative log-likelihood. Sampling runs the
reverse chain with Euler tau-leaping or the analytic (Tweedie) step, then one denoising step.

    python sedd.py --train                      # absorbing graph, tiny Shakespeare char, ~10 min on 2 CPU cores
    python sedd.py --train --graph=uniform      # uniform graph (geometric schedule by default)
    python sedd.py --sample                     # print samples from out/sedd/ckpt.pt (analytic sampler)
    python sedd.py --sample --sampler=euler --prefix="ROMEO:" --steps=256 --show
    python sedd.py --sample --infill="ROMEO:\n____ ____ the ____ of ____\n" --show   # _ marks a free position
    python sedd.py --sample --seq_len=512 --top_p=0.9   # beyond one block: semi-autoregressive rounds
    python sedd.py --eval                       # validation NELBO (nats, bits per token, perplexity)

Notation follows docs/sedd.md: Q is N x N in column convention (Q[j, i] is the rate
i -> j), sigma_bar(t) the total noise, sigma(t) its rate, N = V + 1 states with MASK = N - 1 for
the absorbing graph and N = V for the uniform one.
"""

import dataclasses
import math
import os
import time

import torch
import torch.nn as nn

import common
import corpus
import difflm_ops
import hub
import trainer

GRAPHS = ("absorb", "uniform")
SCHEDULES = ("loglinear", "geometric")
SAMPLERS = ("analytic", "euler")

# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class Config(hub.PublishedConfig, common.PromptConfig, common.TextConfig, common.BaseConfig):
    max_iters: int = 2400  # mdlm.py's number of iterations; backbone, batch and lr from the common blocks
    graph: str = "absorb"  # absorb | uniform
    schedule: str = ""  # loglinear | geometric; "": loglinear with absorb, geometric with uniform
    RENAMED = {"noise": "schedule"}  # older checkpoints' names of keys (a class attribute, not a --key)
    FIXED = ("graph", "schedule", "eps", "sigma_min", "sigma_max")  # the forward process the checkpoint's scores are of
    eps: float = 1e-3  # log-linear: sigma_bar(1) = -log(eps), a token survives to t=1 with prob eps
    sigma_min: float = 1e-4  # geometric: sigma_bar(t) = sigma_min^(1-t) sigma_max^t
    sigma_max: float = 20.0
    t_min: float = 1e-3  # lowest training / evaluation time
    # The loss sums over the block_size positions (paper; docs/sedd.md), about block_size times
    # MDLM's per-token mean; Adam does not see the scale, the clip does: 128 = 1.0 per token at
    # block_size=128, the same clipping as mdlm.py. Scale it with --block_size.
    grad_clip: float = 128.0
    # sampling
    sampler: str = "analytic"  # analytic (Tweedie tau-leaping) | euler (tau-leaping)
    temperature: float = 1.0  # reshapes which token a moving position takes; 1: the exact sampler
    top_p: float = 1.0  # nucleus over the tokens a moving position may take; 1: off
    steps: int = 128
    t_end: float = 1e-5  # last predictor time before the denoising step
    seq_len: int = 0  # 0: block_size; longer: semi-autoregressive blocks
    stride: int = 0  # new tokens per semi-autoregressive round; 0: block_size // 2
    infill: str = ""  # a template: --placeholder marks each free position, the rest is held fixed
    placeholder: str = "_"
    # evaluation
    eval_t_samples: int = 4  # time samples per validation sequence in --eval
    READ_BY = dict.fromkeys("sampler temperature top_p steps t_end seq_len num_samples".split(),  # (a class attribute)
                            "sample|train|eval gen")  # --eval samples only with --gen
    gen: bool = False  # --eval --gen: score num_samples samples with the judge
    judge: str = "out/ar/ckpt.pt"  # an ar.py checkpoint (same data), or a transformers causal LM: hub id (gpt2-large) or directory
    # eval_data, eval_file, samples_out, samples_in, init_from, ddit, cond_dim: hub.PublishedConfig


def check_config(cfg):
    """Every value at the command-line boundary -> one line naming the flag; the math below trusts cfg."""
    common.check_common(cfg)
    common.check_choice(cfg, "graph", GRAPHS)
    common.check_choice(cfg, "schedule", SCHEDULES + ("",))
    common.check_choice(cfg, "sampler", SAMPLERS)
    common.check_at_least(cfg, ("steps", "eval_t_samples", "cond_dim"), 1)
    common.check_between(cfg, ("t_min",), 0, 1)
    common.check_between(cfg, ("eps", "t_end"), 1e-12, 1)  # 1 - eps is not 1 in float64; sigma_bar(t_end) not 0 in fp32
    if not 0 < cfg.sigma_min < cfg.sigma_max < math.inf:
        common.die(f"need 0 < --sigma_min ({cfg.sigma_min}) < --sigma_max ({cfg.sigma_max}), both finite")
    common.check_at_least(cfg, ("seq_len", "stride"), 0)  # 0: block_size, block_size // 2
    if not 0 < cfg.temperature < math.inf:
        common.die(f"--temperature={cfg.temperature} must be a finite number above 0")
    if not 0 < cfg.top_p <= 1:
        common.die(f"--top_p={cfg.top_p} must be in (0, 1]")


# ----------------------------------------------------------------------------------------------
# Noise schedules: total noise sigma_bar(t) and its rate sigma(t) = d sigma_bar / dt


def schedule_kind(cfg):
    return cfg.schedule or ("loglinear" if cfg.graph == "absorb" else "geometric")


def schedule(t, cfg):
    """t (any shape, tensor) -> (sigma_bar(t), sigma(t)), same shape and dtype."""
    if schedule_kind(cfg) == "loglinear":  # 1 - e^{-sigma_bar} = (1 - eps) t: MDLM's log-linear alpha_t
        return -torch.log1p(-(1 - cfg.eps) * t), (1 - cfg.eps) / (1 - (1 - cfg.eps) * t)
    log_min, log_max = math.log(cfg.sigma_min), math.log(cfg.sigma_max)  # geometric
    sigma_bar = torch.exp((1 - t) * log_min + t * log_max)
    return sigma_bar, sigma_bar * (log_max - log_min)


def log_expm1(x):
    """log(e^x - 1) without overflow or cancellation, for x > 0 (x ~ 1e-5 at t_end)."""
    return x + torch.log(-torch.expm1(-x))


def absorb_offset(sigma_bar, N):
    """(B,) -> the absorbing head's offset log expm1(sigma_bar) + log(N - 1), fp32: log s = h - offset (SEDD.forward)."""
    return log_expm1(sigma_bar.float()) + math.log(N - 1)


def unshift(log_score, shift):
    """(B, ..., N) log-scores + shift (B,), as the loss and the steps take them -> log-scores, fp32 (no shift: as is)."""
    return log_score if shift is None else log_score.float() - shift.float().view(-1, *[1] * (log_score.dim() - 1))


# ----------------------------------------------------------------------------------------------
# Forward process: the two graphs in closed form (identity plus rank one; never a dense N x N)
#
# Every function takes token ids x (...) and returns one row (..., N) per id; sigma broadcasts
# against x (a float, or (B, 1) for per-sequence noise).


def num_states(vocab_size, graph):
    return vocab_size + 1 if graph == "absorb" else vocab_size


def _onehot(x, N, dtype):
    return torch.zeros(*x.shape, N, dtype=dtype, device=x.device).scatter_(-1, x.unsqueeze(-1), 1.0)


def rates_from(x, N, graph, dtype=torch.float32):
    """Q[:, x]: the rate of x -> y for every y (..., N); the diagonal is -1 on absorb (0 at MASK), 1/N - 1 on uniform;
    rows sum to 0."""
    target = _onehot(torch.full_like(x, N - 1), N, dtype) if graph == "absorb" else torch.full((*x.shape, N), 1.0 / N, dtype=dtype, device=x.device)
    return target - _onehot(x, N, dtype)


def rates_into(x, N, graph, dtype=torch.float32):
    """Q[x, :]: the rate of y -> x for every y (..., N). The loss and the Euler step weigh by it."""
    if graph == "absorb":  # only MASK is entered: Q[M, y] = 1 for y != M
        into = (x == N - 1).to(dtype)[..., None].expand(*x.shape, N)
    else:
        into = torch.full((*x.shape, N), 1.0 / N, dtype=dtype, device=x.device)
    return into - _onehot(x, N, dtype)


def transition(x, sigma, N, graph):
    """exp(sigma Q)[:, x] = p(x_t = y | x_0 = x) after total noise sigma (..., N); a distribution.

    exp(sigma Q) = e^{-sigma} I + (1 - e^{-sigma}) e_M 1^T (absorb) or ... 1 1^T / N (uniform).
    Negative sigma gives exp(-|sigma| Q), the inverse (not a distribution).
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    stay, leave = torch.exp(-sigma)[..., None], -torch.expm1(-sigma)[..., None]
    limit = _onehot(torch.full_like(x, N - 1), N, torch.float64) if graph == "absorb" else torch.full((*x.shape, N), 1.0 / N, dtype=torch.float64, device=x.device)
    return stay * _onehot(x, N, torch.float64) + leave * limit


def transition_into(x, sigma, N, graph):
    """exp(sigma Q)[x, :] = p(x_t = x | x_0 = y) for every y (..., N): the Tweedie step's weights."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    stay, leave = torch.exp(-sigma)[..., None], -torch.expm1(-sigma)[..., None]
    into = (x == N - 1).double()[..., None].expand(*x.shape, N) if graph == "absorb" else torch.full((*x.shape, N), 1.0 / N, dtype=torch.float64, device=x.device)
    return stay * _onehot(x, N, torch.float64) + leave * into


def sample_transition(x0, sigma, N, graph):
    """x_t ~ exp(sigma Q)[:, x_0], per position independently; x0 (B, L), sigma broadcasts -> (B, L)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x0.device)
    move = torch.rand(x0.shape, device=x0.device) < -torch.expm1(-sigma)  # left its state at least once
    if graph == "absorb":
        return torch.where(move, N - 1, x0)
    return torch.where(move, torch.randint_like(x0, N), x0)  # a jump lands uniformly, itself included


def limit(shape, N, graph, device="cpu"):
    """A sample of the limit distribution (t = 1): all MASK, or uniform tokens."""
    if graph == "absorb":
        return torch.full(shape, N - 1, dtype=torch.long, device=device)
    return torch.randint(N, shape, device=device)


def limit_distribution(N, graph):
    return _onehot(torch.tensor(N - 1), N, torch.float64) if graph == "absorb" else torch.full((N,), 1.0 / N, dtype=torch.float64)


def staggered_score(score, dsigma, graph):
    """exp(-dsigma Q) s (..., N) for scores s (..., N) and dsigma broadcasting against s[..., 0].

    Absorb: e^{dsigma} s_y for y != M, and s_M gets e^{dsigma} s_M + (1 - e^{dsigma}) sum_z s_z.
    Uniform: e^{dsigma} s_y + (1 - e^{dsigma}) sum_z s_z / N. Negative dsigma applies exp(|dsigma| Q).
    """
    dsigma = torch.as_tensor(dsigma, dtype=score.dtype, device=score.device)[..., None]
    total = score.sum(-1, keepdim=True)
    grow = torch.expm1(dsigma)  # e^{dsigma} - 1
    if graph == "absorb":
        out = score * (1 + grow)
        out[..., -1:] -= grow * total
        return out
    return score + grow * (score - total / score.shape[-1])


def per_row(rows, *xs):
    """rows (b, l), the sequence and position (R,) each of R positions, as mask.nonzero(as_tuple=True)
    gives them (the one host sync; gathers from then on); each x per sequence (B,) or per position
    (B, L, ...) -> its values there, as R sequences of length 1: (R,) or (R, 1, ...). Absorbing: only
    masked rows carry a loss term or can move, so the loss and the samplers compute only those."""
    return [x[rows[0]] if x.dim() == 1 else x[rows][:, None] for x in xs]


# ----------------------------------------------------------------------------------------------
# Model: common's Transformer conditioned on sigma_bar, and a log-score head over the N states


class SEDD(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.graph, self.vocab_size = cfg.graph, vocab_size
        self.num_states = num_states(vocab_size, cfg.graph)
        self.mask_id = self.num_states - 1 if cfg.graph == "absorb" else None
        self.backbone = common.Transformer(self.num_states, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size,
                                           cfg.dropout, causal=False, cond_dim=cfg.cond_dim,
                                           norm_weight=cfg.ddit, mlp_bias=cfg.ddit)
        self.head = nn.Linear(cfg.n_embd, self.num_states, bias=cfg.ddit)
        nn.init.zeros_(self.head.weight)  # h = 0: the offset below alone gives the right total mass
        if cfg.ddit:
            nn.init.zeros_(self.head.bias)

    def forward(self, xt, sigma_bar, rows=None, split=False):
        """xt (B, L), sigma_bar (B,) -> log-scores log s_theta (B, L, N), fp32; with rows, the (b, l)
        indices of R positions (per_row), the head runs only on those positions -> (R, N).

        Absorbing "scale by sigma": log s_y = h_y - log expm1(sigma_bar) - log(N - 1), so with
        h = 0 the scores of a masked position sum to 1 / expm1(sigma_bar), the true total, and
        h plays the part of an unnormalised log p(x_0 | x_t). The current token's score is its
        ratio to itself, 1.

        split=True -> (h, shift): the head's output in its own dtype (bf16 under autocast) and the
        offset (B,) or (R,) fp32, None on the uniform graph, for score_entropy and the sampling
        steps (shift=...). The offset (up to ~18) needs fp32, so the log-scores need an fp32
        (B, L, N); the loss and the sampler then hold the bf16 h alone.
        """
        h = self.backbone(xt, sigma_bar)  # (B, L, C)
        if rows is not None:
            h, xt, sigma_bar = h[rows], xt[rows], per_row(rows, sigma_bar)[0]  # (R, C), (R,), (R,)
        h = self.head(h)  # (B, L, N) or (R, N)
        shift = absorb_offset(sigma_bar, self.num_states) if self.graph == "absorb" else None  # (B,) or (R,)
        if split:
            return h, shift
        return unshift(h, shift).float().scatter_(-1, xt.unsqueeze(-1), 0.0)


# ----------------------------------------------------------------------------------------------
# Loss: denoising score entropy (paper eq. 8 / 10 with the diffusion-weighted form, Thm 3.6)


def K(a):
    """K(a) = a (log a - 1), the constant that makes each score-entropy term >= 0 (K(0) = 0)."""
    return torch.where(a > 0, a * (torch.log(a) - 1), torch.zeros_like(a))


def register_score_entropy_autograd(ops):
    """The autograd of the fused score entropy (run by difflm_ops.py once the extension is loaded).

    score_entropy only reads the scores; its backward streams them once more and writes the
    gradient, already scaled by the incoming gradient of the (B, L) loss. score_entropy_with_grad
    (CPU) writes the gradient of loss.sum() in the loss's own pass; its backward scales it in place.
    Either way the gradient is the only B x L x N tensor made.
    """
    def recompute(ctx, grad_loss):
        log_score, xt, x0, sigma_bar, shift = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient to differentiate again, through the oracle
            loss = score_entropy.oracle(log_score, xt, x0, sigma_bar, ctx.graph, shift)
            return torch.autograd.grad(loss, log_score, grad_loss, create_graph=True)[0]
        return ops.score_entropy_backward(grad_loss.float().contiguous(), log_score, xt, x0, sigma_bar, ctx.graph,
                                          shift)

    def setup_context(ctx, inputs, output):
        log_score, xt, x0, sigma_bar, ctx.graph, *shift = inputs
        ctx.save_for_backward(log_score, xt, x0, sigma_bar, shift[0] if shift else None)

    def backward(ctx, grad_loss):
        return recompute(ctx, grad_loss), None, None, None, None, None

    torch.library.register_autograd("difflm::score_entropy", backward, setup_context=setup_context)

    def setup_context_with_grad(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.grad = output[1]  # not saved_tensors: backward scales it in place
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # else backward gets a B x L x N zero tensor for output[1]

    def backward_with_grad(ctx, grad_loss, _):
        if ctx.grad is None or torch.is_grad_enabled():  # a retained graph's second backward: the first one
            return recompute(ctx, grad_loss), None, None, None, None, None  # consumed it; or create_graph=True
        grad, ctx.grad = ctx.grad, None
        g, w = grad.view(-1, grad.shape[-1]), grad_loss.reshape(-1, 1)  # (B * L, N), (B * L, 1) fp32
        n = max(1, 2**20 // g.shape[-1])  # rows of 2^20 entries at a time: a bf16 g's mul_ by an fp32 w
        for i in range(0, g.shape[0], n):  # makes two fp32 copies of all it scales
            g[i:i + n].mul_(w[i:i + n])
        return grad, None, None, None, None, None

    torch.library.register_autograd("difflm::score_entropy_with_grad", backward_with_grad,
                                    setup_context=setup_context_with_grad)


@difflm_ops.fused("score_entropy", on_load=register_score_entropy_autograd)
def score_entropy(log_score, xt, x0, sigma_bar, graph, shift=None):
    """Per-position DWDSE D^l (B, L) fp32, NOT weighted by sigma(t).

    log_score (B, L, N) bf16 or fp32: log s_theta, or with shift (B,) fp32 log s_theta + shift[b] (a
    bf16 head's output, whose per-sequence offset (SEDD.forward) bf16 could not hold); the entry at xt
    is read as log 1 = 0 whatever it holds. xt, x0 (B, L) int64; sigma_bar (B,) fp32.
        D = sum_{y != x} Q[x, y] [s_y - rho_y log s_y + K(rho_y)],  rho_y = p(y | x_0) / p(x | x_0)
    with x = x_t. Its gradient w.r.t. log s_y is Q[x, y] (s_y - rho_y), 0 at y = x.
    """
    ls = unshift(log_score, shift).float()  # fp32 before exp: the terms cancel at O(r log r)
    N = ls.shape[-1]
    out = torch.zeros(xt.shape, dtype=torch.float32, device=ls.device)
    if graph == "absorb":
        # only x = MASK is entered (Q[M, y] = 1, y != M); rho_y = r delta_{y, x0}, r = 1/expm1(sigma_bar):
        # D = sum_{y != M} s_y - r log s_{x0} + K(r) = (S' - r) - r (log s_{x0} - log r)
        rows = (xt == N - 1).nonzero(as_tuple=True)  # row copies of the masked positions only
        ls_m = ls[rows][:, :N - 1]  # (n, V): the MASK column is x itself, ignored
        log_r = -log_expm1(sigma_bar.float())[rows[0]]
        r = torch.exp(log_r)
        s_sum = ls_m.exp().sum(-1)
        ls_x0 = ls_m.gather(-1, x0[rows].unsqueeze(-1)).squeeze(-1)
        return out.index_put(rows, (s_sum - r) - r * (ls_x0 - log_r))
    if graph == "uniform":
        # every position: Q[x, y] = 1/N for y != x; e = expm1(sigma_bar), r = e / (e + N) = 1 / (1 + N/e),
        # written through 1/e, which is 0 where e overflows fp32 (sigma_bar > 88), so r -> 1, not inf/inf
        inv_e = 1 / torch.expm1(sigma_bar.float())[:, None]  # (B, 1)
        r = 1 / (1 + N * inv_e)
        ls = ls.scatter(-1, xt.unsqueeze(-1), 0.0)  # log s_x = 0: drops out of both sums below
        s_plus = (ls.exp().sum(-1) - 1) / N  # (1/N) sum_{y != x} s_y
        lam = ls.sum(-1) / N  # (1/N) sum_{y != x} log s_y
        same = s_plus - r * lam + (N - 1) / N * K(r)  # x = x0: all rho_y = r
        ls_x0 = ls.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        # x != x0: rho_{x0} = 1/r, other rho_y = 1, and (1/r - 1)/N = 1/e
        moved = s_plus - lam - ls_x0 * inv_e + (K(1 / r) - (N - 2)) / N
        return torch.where(xt == x0, same, moved)
    common.die(f"unknown graph {graph!r}; use absorb or uniform")


def nelbo_terms(model, x0, t, cfg, N):
    """Per-position NELBO integrand sigma(t) D^l (B, L) at times t (B,), with x_t drawn from x_0.

    model is any callable (xt, sigma_bar, rows=None, split=False) as SEDD.forward, called here with
    split=True -> (log-scores + shift, shift or None), (B, L, N) or (R, N) at the positions rows (b, l)
    index; possibly wrapped (DDP, torch.compile), so the number of states N comes separately.
    """
    sigma_bar, sigma = schedule(t, cfg)
    xt = sample_transition(x0, sigma_bar[:, None], N, cfg.graph)
    if cfg.graph == "uniform":
        h, shift = model(xt, sigma_bar, split=True)  # (B, L, N), None
        return sigma[:, None] * score_entropy(h, xt, x0, sigma_bar, cfg.graph, shift)
    # absorbing: only masked positions carry a term (Q[x, .] = 0 elsewhere), so the head runs only
    # there, and the rows go to score_entropy as R sequences of length 1
    rows = common.masked_rows(xt, N - 1)  # (R,) each: the masked positions
    h, shift = model(xt, sigma_bar, rows=rows, split=True)  # (R, N), (R,)
    d = score_entropy(h[:, None], *per_row(rows, xt, x0, sigma_bar), cfg.graph, shift)  # (R, 1)
    terms = torch.zeros(x0.shape, dtype=d.dtype, device=d.device).index_put(rows, d[:, 0])  # (B, L)
    return sigma[:, None] * terms


def loss_fn(model, x0, cfg, N):
    t = common.sample_times(x0.shape[0], cfg.t_min, x0.device)
    return nelbo_terms(model, x0, t, cfg, N).sum(1).mean()  # summed over positions, mean over the batch


# ----------------------------------------------------------------------------------------------
# Samplers: one step t -> s of the reverse chain, per position ("tau-leaping"), then a denoiser


def _two_stage(w, w_stay, xt, u):
    """Draw the next token of every row from move weights w (B, L, N), 0 at y = x, and a stay weight (B, L).

    Exact in any precision (docs/sedd.md): the row moves iff u[..., 0] < M / (M + w_stay),
    M = sum_y w_y, and then takes y by inverse CDF over w with u[..., 1] (float64). Negative
    weights are clamped: a negative weight never wins.
    """
    w, w_stay = w.clamp(min=0), w_stay.clamp(min=0)
    total = w.sum(-1)
    move = u[..., 0] < total / (total + w_stay)  # 0 / 0 (nothing to move to, nothing to stay) stays
    return torch.where(move, common.sample_categorical(w, u[..., 1]), xt)


def _split_stay(w, xt):
    # (B, L, N) weights over all y -> (move weights with w_x = 0, stay weight w_x)
    w_stay = w.gather(-1, xt.unsqueeze(-1)).squeeze(-1)
    return w.scatter(-1, xt.unsqueeze(-1), 0.0), w_stay


def euler_weights(log_score, xt, rate_dt, graph, shift=None):
    """Euler (tau-leaping) weights: w_y = sigma(t) dt Q[x, y] s_y (y != x), w_x = 1 - sum_{y != x} w_y.

    log_score (B, L, N), or with shift (B,) log-scores + shift[b], as score_entropy takes them; xt
    (B, L); rate_dt (B,) float64 = sigma(t) dt. Returns (w (B, L, N) with w_x = 0, w_stay (B, L)),
    float64 and unclamped. Absorbing rows with x != MASK are never entered by anything
    (Q[x, y] = 0), so they stay.
    """
    N = log_score.shape[-1]
    s = unshift(log_score, shift).double().exp().scatter(-1, xt.unsqueeze(-1), 1.0)
    w = rate_dt.double()[:, None, None] * rates_into(xt, N, graph, torch.float64) * s
    w, _ = _split_stay(w, xt)
    return w, 1 - w.sum(-1)


@difflm_ops.fused("sedd_euler_step")
def euler_step(log_score, xt, rate_dt, u, graph, shift=None):
    """One Euler tau-leaping step t -> t - dt (B, L) int64; u (B, L, 2) float64 uniforms."""
    w, w_stay = euler_weights(log_score, xt, rate_dt, graph, shift)
    return _two_stage(w, w_stay, xt, u)


def tweedie_weights(log_score, xt, dsigma, graph, final=False, shift=None):
    """Analytic (Tweedie) weights: w_y = [exp(-dsigma Q) s]_y exp(dsigma Q)[x, y], the staggered
    score times the transition into x (paper eq. 19); dsigma (B,) float64 = sigma_bar(t) - sigma_bar(s).

    Absorbing, x = M: w_y = (e^{dsigma} - 1) s_y and w_M = 1 - (e^{dsigma} - 1) sum_{y != M} s_y;
    rows with x != M keep all their weight on x. final: the denoiser, MASK dropped (w_M = 0) so
    every masked row resolves. shift as in euler_weights. Returns (w with w_x = 0, w_stay), float64,
    unclamped.
    """
    N = log_score.shape[-1]
    s = unshift(log_score, shift).double().exp().scatter(-1, xt.unsqueeze(-1), 1.0)
    dsigma = dsigma.double()[:, None]  # (B, 1)
    w = staggered_score(s, dsigma, graph) * transition_into(xt, dsigma, N, graph)
    w, w_stay = _split_stay(w, xt)
    if final and graph == "absorb":
        w_stay = torch.where(xt == N - 1, 0.0, w_stay)
    return w, w_stay


@difflm_ops.fused("sedd_tweedie_step")
def tweedie_step(log_score, xt, dsigma, u, graph, final=False, shift=None):
    """One analytic tau-leaping step t -> s (B, L) int64; final=True is the denoising step."""
    w, w_stay = tweedie_weights(log_score, xt, dsigma, graph, final, shift)
    return _two_stage(w, w_stay, xt, u)


def decoding_weights(w, temperature=1.0, top_p=1.0):
    """Temperature and nucleus on the move weights w (B, L, N) float64 (w_x = 0): the probability
    that a position moves is kept, the law of where it moves to becomes w^(1/temperature)
    truncated to its top_p nucleus. Both off: w unchanged (the exact sampler)."""
    if temperature == 1 and top_p == 1:
        return w
    w = w.clamp(min=0)
    total = w.sum(-1, keepdim=True)
    # w^(1/temperature) normalised, in logs: weights near 1e-3 underflow to 0 at temperature 0.003 otherwise
    lw = torch.log(w)  # the max taken first: a tiny temperature cannot overflow to inf - inf
    q = torch.softmax((lw - lw.amax(-1, keepdim=True)) / temperature, -1).nan_to_num(0.0)  # a row with no weight stays 0
    if top_p < 1:
        p, order = q.sort(-1, descending=True)
        drop = (p.cumsum(-1) - p) >= top_p  # tokens after the smallest set holding top_p of the mass
        q = q.masked_fill(drop.scatter(-1, order, drop), 0.0)
        q = q / q.sum(-1, keepdim=True).clamp_min(1e-300)
    return q * total


def controlled_step(log_score, xt, arg, u, cfg, final=False, shift=None):
    """The pure weight functions, decoding_weights, then the two-stage draw: the path that the
    fused steps would bypass when --temperature or --top_p is set. arg: rate_dt (euler) or dsigma."""
    if cfg.sampler == "euler" and not final:
        w, w_stay = euler_weights(log_score, xt, arg, cfg.graph, shift)
    else:
        w, w_stay = tweedie_weights(log_score, xt, arg, cfg.graph, final, shift)
    return _two_stage(decoding_weights(w, cfg.temperature, cfg.top_p), w_stay, xt, u)


def time_grid(steps, t_end):
    return torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64)  # t_0 = 1 > ... > t_S = t_end


@torch.no_grad()
def sample_chain(model, x, cfg, fixed=None, show=None):
    """Run the reverse chain from x (B, L) (a limit sample) and return (x_0 (B, L), network calls).

    model: a SEDD, or any module with num_states called as in nelbo_terms, (xt, sigma_bar (B,),
    rows=None, split=True) -> (log-scores + shift, shift or None), (B, L, N) and (B,), or (R, N)
    and (R,) at rows; the steps take the two as they come. fixed (L,) or (B, L): token ids, -1 at
    free positions; they are projected back after every step, so every state the chain (and show)
    sees holds them: the conditional ratios are the unconditional ones with the fixed positions held
    (no conditional training needed). Every step draws u (B, L, 2) float64 once. Absorbing: a token
    other than MASK never moves, so the head and the step run only on the masked rows, each as a
    sequence of length 1 (the same tokens as the whole batch would get).
    """
    B, device = x.shape[0], x.device
    grid = time_grid(cfg.steps, cfg.t_end).to(device)
    sigma_bars, sigmas = schedule(grid, cfg)  # float64
    keep = fixed is not None and bool((fixed >= 0).any())
    controls = cfg.temperature != 1 or cfg.top_p != 1
    calls = 0

    def project(x):
        return torch.where(fixed >= 0, fixed, x) if keep else x

    def step(x, i, arg, final=False):  # arg (B,): rate_dt (Euler) or dsigma (Tweedie) -> the next x (B, L)
        nonlocal calls
        u = torch.rand(B, x.shape[1], 2, dtype=torch.float64, device=device)
        rows = (x == model.num_states - 1).nonzero(as_tuple=True) if cfg.graph == "absorb" else None  # those that move
        if rows is not None and not len(rows[0]):
            return x
        calls += 1
        with common.autocast(device):
            h, shift = model(x, sigma_bars[i].float().expand(B), rows=rows, split=True)  # (B, L, N) or (R, N); (R,), None on uniform
        xs, us, args = x, u, arg
        if rows is not None:  # the masked rows as R sequences of length 1
            h, (xs, us, args) = h[:, None], per_row(rows, x, u, arg)
        if controls:  # float64 work: a block of sequences at a time
            decode = lambda h, x, a, u, s: controlled_step(h, x, a, u, cfg, final, s)  # noqa: E731
            new = common.by_blocks(decode, h, xs, args, us, shift)
        elif cfg.sampler == "euler" and not final:
            new = euler_step(h, xs, args, us, cfg.graph, shift)
        else:
            new = tweedie_step(h, xs, args, us, cfg.graph, final, shift)
        if rows is None:
            return new
        x = x.clone()
        x[rows] = new[:, 0]
        return x

    x = project(x)
    for i in common.progress(range(cfg.steps), "sampling"):
        if cfg.sampler == "euler":
            x = step(x, i, (sigmas[i] * (grid[i] - grid[i + 1])).expand(B))
        else:
            x = step(x, i, (sigma_bars[i] - sigma_bars[i + 1]).expand(B))
        x = project(x)
        if show:
            show(i, x)
    # the denoiser: one Tweedie step from t_end to sigma_bar = 0, MASK dropped
    x = step(x, cfg.steps, sigma_bars[cfg.steps].expand(B), final=True)
    return project(x), calls


@torch.no_grad()
def generate(model, cfg, fixed, num_samples, show=None):
    """fixed (T,) token ids or -1 at free positions -> samples (num_samples, T), network calls.

    T <= block_size: one chain. T > block_size: semi-autoregressive rounds as in mdlm.py (the
    generated context is held fixed like a prompt).
    """
    L, T = model.backbone.block_size, fixed.shape[0]
    device = next(model.parameters()).device
    fixed = fixed.to(device).expand(num_samples, T)

    def chain(window):  # (B, W) ids or -1 -> the chain from a limit sample, fixed positions held
        return sample_chain(model, limit(window.shape, model.num_states, cfg.graph, device), cfg, window, show)
    return common.semi_autoregressive(chain, fixed, L, cfg.stride or L // 2)


# ----------------------------------------------------------------------------------------------
# Evaluation: the NELBO on the validation split


def prior_kl(cfg, N):
    """KL(p_{1|0}(. | x_0) || limit) per token (the same for every x_0).

    Uniform: finite and tiny at sigma_bar(1) = 20. Absorbing: with eps > 0 a token survives to
    t = 1 with probability eps, which the all-MASK start gives probability 0: the KL is infinite,
    and, as in mdlm.py, the term is dropped (0 is returned).
    """
    if cfg.graph == "absorb":
        return 0.0
    sigma_bar_1, _ = schedule(torch.tensor(1.0, dtype=torch.float64), cfg)
    p = transition(torch.tensor(0), sigma_bar_1, N, cfg.graph)  # (N,)
    return float((p * torch.log(p * N)).sum())


@torch.no_grad()
def evaluate(model, batches, cfg, full=False):
    """NELBO in nats per token: every validation window with eval_t_samples stratified times each
    (full=True, --eval), or eval_iters random batches (during training). The integral runs over
    [t_min, 1] as in mdlm.py, plus the prior term."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    k = cfg.eval_t_samples if full else 1
    for x0 in corpus.val_batches(batches, cfg, full):
        x0 = x0.to(device)
        t = common.sample_times(k * x0.shape[0], cfg.t_min, device)  # (k B,): strata over k copies of the batch
        for tj in t.split(x0.shape[0]):  # a copy at a time: one batch of scores in memory, not k
            total += float(nelbo_terms(model, x0, tj, cfg, model.num_states).sum()) / k
        count += x0.numel()
    nats = total / count + prior_kl(cfg, model.num_states)
    return trainer.nats_figures("val_nelbo", nats)


# ----------------------------------------------------------------------------------------------
# main


def build_model(cfg, meta):
    return SEDD(cfg, meta["vocab_size"])


def load(overrides):
    """load_for_inference (or the published weights of --init_from), then the checks again on the checkpoint's config
    under the overrides."""
    if overrides.get("init_from"):
        cfg, model, tok, meta, ckpt = trainer.load_published(Config, overrides, "sedd", build_model)
    else:
        cfg, model, tok, meta, ckpt = trainer.load_for_inference(Config, overrides, "sedd", build_model)
    check_config(cfg)
    if cfg.stride >= cfg.block_size:  # (a published model's block_size is known only now)
        common.die(f"--stride={cfg.stride} must be below the model's block_size={cfg.block_size} (0: block_size // 2)")
    return cfg, model, tok, meta, ckpt


def main(argv=None):
    verbs, cfg, overrides = common.parse_args(Config, argv)
    check_config(cfg)
    if "train" in verbs:
        # --init_from fine-tunes the published model on this run's data
        cfg, model, meta, overrides = trainer.model_to_train(cfg, "sedd", Config, overrides, build_model, check_config)
        cfg = dataclasses.replace(cfg, schedule=schedule_kind(cfg))  # saved by name: a later --schedule naming it matches
        trainer.train(cfg, "sedd", model, lambda m, x0: loss_fn(m, x0, cfg, model.num_states),
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
            hub.write_samples(cfg.samples_out, [tok.decode(s) for s in samples.tolist()], hub.sample_settings(cfg, "sedd"))
        print(f"({cfg.num_samples} samples of {length} tokens, {cfg.sampler} sampler, {cfg.steps} steps, "
              f"{calls} network calls, {time.time() - t0:.1f}s)")
    if "eval" in verbs:
        cfg, model, tok, meta, ckpt = load(overrides)
        cfg, batches, what = corpus.eval_batches(cfg, meta, bos=False)  # --eval_data: wrapped as in SEDD's code
        with common.autocast(next(model.parameters()).device):
            stats = {**evaluate(model, batches, cfg, full=True), "data": what}  # what the log record scored
        print(f"{what} NELBO {stats['val_nelbo']:.4f} nats/token | {stats['val_bits']:.4f} bits/token | "
              f"perplexity <= {stats['val_ppl']:.3f} ({cfg.graph} graph, {schedule_kind(cfg)} schedule, "
              f"{cfg.eval_t_samples} time samples per sequence)")
        if cfg.gen:
            free = torch.full((cfg.seq_len or cfg.block_size,), -1)
            stats.update(trainer.generative_eval(cfg.judge, lambda n: generate(model, cfg, free, n)[0], cfg.num_samples,
                                                meta, tok, f"{cfg.sampler} sampler, {cfg.steps} steps, temperature "
                                                f"{cfg.temperature}, top_p {cfg.top_p}", cfg.samples_in, next(model.parameters()).device))
        trainer.log_json(os.path.join(common.out_dir(cfg, "sedd"), "log.jsonl"),
                        {"eval_full": stats, "iter": ckpt["iter"], "t_samples": cfg.eval_t_samples,
                         "init_from": cfg.init_from or None,  # the weights scored, where not this folder's
                         **({"gen_settings": hub.sample_settings(cfg, "sedd")} if cfg.gen and not cfg.samples_in else {})})


if __name__ == "__main__":
    main()
