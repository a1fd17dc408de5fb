"""
DDPM: Gaussian diffusion on continuous data, the model Diffusion-LM later moves into embedding space.
Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020; the cosine schedule from
Nichol & Dhariwal 2021; DDIM from Song, Meng, Ermon 2021; v-prediction from Salimans & Ho 2022.

Forward process: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps over integer steps t = 1..T.
An MLP with a sinusoidal time embedding predicts eps (or x_0, or v) from (x_t, t) and is trained
with the simple MSE (paper eq. 14). Sampling runs the reverse chain from x_T ~ N(0, I): ancestral
(variance beta_t or the posterior variance) or DDIM (any eta), on any subsequence of steps.
Data: 2-D toy distributions generated in code (the default trains in about a minute on a CPU),
or any (N, D) float array in a .npy file; both are standardised with statistics kept in the
checkpoint.

    python ddpm.py --train                                # eight Gaussians, about a minute on 2 CPU cores
    python ddpm.py --sample                               # out/ddpm/samples.png + quality figures
    python ddpm.py --sample --sampler=ddim --steps=50 --show
    python ddpm.py --eval                                 # variational bound (nats, bits/dim) + sample distance
    python ddpm.py --train --dataset=two_moons --out_dir=out/moons
    python ddpm.py --train --dataset=path/to/data.npy     # any (N, D) array
"""

import dataclasses
import hashlib
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import corpus
import trainer

# ----------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class Config(common.BaseConfig):
    dataset: str = "eight_gaussians"  # a toy name (see TOYS) or a path to an (N, D) .npy file
    # the denoiser: an MLP, n_layer residual blocks of width n_embd
    n_layer: int = 3
    n_embd: int = 128
    # diffusion
    T: int = 1000
    schedule: str = "linear"  # linear (beta 1e-4..0.02 at T=1000) | cosine (s=0.008)
    pred: str = "eps"  # what the network predicts: eps | x0 | v
    FIXED = ("T", "schedule", "pred")  # what a checkpoint fixes beside the shape (a class attribute, not a --key)
    TIED = {"sampler": ("ddim", ("eta",))}  # a saved DDIM run's eta (older runs saved one beside any sampler)
    # --eval draws --eval_points samples, --sample --num_samples; each verb reads --dataset (a moved .npy's new path)
    READ_BY = {"batch_size": "train", "dataset": "train|sample|eval", "num_samples": "sample|train"}
    var: str = "beta"  # reverse variance: beta (sigma_t^2 = beta_t) | posterior (beta_tilde_t)
    # optimisation (small MLP, 2-D points: big batches, short run)
    batch_size: int = 256
    max_iters: int = 6000
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_iters: int = 200
    ema: float = 0.995
    eval_interval: int = 2000
    eval_iters: int = 10
    log_interval: int = 500
    # sampling
    sampler: str = "ancestral"  # ancestral | ddim
    steps: int = 0  # number of reverse steps, evenly spaced over 1..T; 0: all T
    timesteps: str = ""  # an explicit subsequence of paper steps, e.g. "1,10,100,500,1000" (overrides steps)
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 ancestral with the posterior variance
    num_samples: int = 2000
    png: str = ""  # default <out_dir>/samples.png
    # evaluation
    eval_points: int = 2000  # held-out points for the bound and the sample distance


def check_config(cfg):
    """Every value at the command-line boundary -> one line naming the flag; the math below trusts cfg."""
    common.check_common(cfg)
    if cfg.png and not cfg.png.endswith(".png"):
        common.die(f"--png={cfg.png} must name a .png file")
    for key, known in (("schedule", ("linear", "cosine")), ("pred", ("eps", "x0", "v")), ("var", ("beta", "posterior")),
                       ("sampler", ("ancestral", "ddim"))):
        common.check_choice(cfg, key, known)
    common.check_at_least(cfg, ("n_layer",), 1)
    if cfg.n_embd < 2 or cfg.n_embd % 2:
        common.die(f"--n_embd={cfg.n_embd} must be even and at least 2 (the time embedding is sines and cosines)")
    common.check_at_least(cfg, ("T",), 2)
    if cfg.schedule == "linear" and cfg.T <= 20:
        common.die(f"--T={cfg.T} is too small for the linear schedule (beta_T = {20 / cfg.T:.2f} >= 1); use T > 20")
    if not 0.0 <= cfg.eta <= 1.0:
        common.die(f"--eta={cfg.eta} must be in [0, 1]")
    if cfg.eta and cfg.sampler != "ddim":  # the ancestral sampler's noise is --var's
        common.die(f"--eta is the noise of DDIM, not of the {cfg.sampler} sampler; add --sampler=ddim")
    if cfg.steps < 0:
        common.die(f"--steps={cfg.steps} must be 0 (all T) or more")
    step_sequence(cfg.T, cfg.steps, cfg.timesteps)  # --steps and --timesteps against T, before any training
    if cfg.eval_points < 2:
        common.die(f"--eval_points={cfg.eval_points} must be at least 2")


# ----------------------------------------------------------------------------------------------
# Data: 2-D toys generated in code, or an (N, D) .npy array; both standardised


def eight_gaussians(n, gen):
    """Eight Gaussians of std 0.2 on a circle of radius 2: modes 1.53 apart (7.7 std), so the 3-std discs are disjoint."""
    k = torch.randint(8, (n,), generator=gen)
    centers = EIGHT_CENTERS[k]
    return centers + EIGHT_STD * torch.randn(n, 2, generator=gen, dtype=torch.float64)


EIGHT_STD = 0.2
EIGHT_CENTERS = 2.0 * torch.stack([torch.cos(torch.arange(8) * math.pi / 4),
                                   torch.sin(torch.arange(8) * math.pi / 4)], 1).double()  # (8, 2)


def two_moons(n, gen):
    theta = math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    upper = torch.rand(n, generator=gen) < 0.5
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    return torch.stack([x, y], 1) + 0.05 * torch.randn(n, 2, generator=gen, dtype=torch.float64)


def swiss_roll(n, gen):
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=gen, dtype=torch.float64))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 5
    return x + 0.1 * torch.randn(n, 2, generator=gen, dtype=torch.float64)


def checkerboard(n, gen):
    """Uniform on the 8 black squares of a 4x4 board over [-2, 2] x [-1, 3]."""
    x1 = 4 * torch.rand(n, generator=gen, dtype=torch.float64) - 2
    x2 = torch.rand(n, generator=gen, dtype=torch.float64) - 2 * torch.randint(2, (n,), generator=gen).double()
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2 + 1], 1)


GAUSS_MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
GAUSS_COV = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)


def gaussian(n, gen):
    """A correlated 2-D Gaussian: the optimal denoiser is known in closed form."""
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return GAUSS_MEAN + z @ torch.linalg.cholesky(GAUSS_COV).T


TOYS = {"eight_gaussians": eight_gaussians, "two_moons": two_moons, "swiss_roll": swiss_roll,
        "checkerboard": checkerboard, "gaussian": gaussian}


def mixture_log_density(x, name):
    """Exact log p_data(x) (B,) in data units for the Gaussian-mixture toys, else None."""
    x = x.double()
    if name == "eight_gaussians":
        d2 = ((x[:, None] - EIGHT_CENTERS[None]) ** 2).sum(-1)  # (B, 8)
        return torch.logsumexp(-d2 / (2 * EIGHT_STD**2), 1) - math.log(8) - math.log(2 * math.pi * EIGHT_STD**2)
    if name == "gaussian":
        return torch.distributions.MultivariateNormal(GAUSS_MEAN, GAUSS_COV).log_prob(x)
    return None


def describe_data(dataset):
    """--dataset -> (raw train (N, D) and held-out arrays, float64, both None for a toy; meta without stats)."""
    if dataset in TOYS:
        return None, None, {"kind": "toy", "data": dataset, "dim": 2}
    if not dataset.endswith(".npy"):
        common.die(f"unknown toy {dataset!r}; use one of {', '.join(TOYS)} or a path to an (N, D) .npy file")
    if not os.path.isfile(dataset):
        common.die(f"no file {dataset}; give --dataset a toy name ({', '.join(TOYS)}) or an existing (N, D) .npy file")
    try:
        arr = np.load(dataset, allow_pickle=False)
    except Exception as e:
        common.die(f"{dataset} is not a readable .npy array ({type(e).__name__}); save it with numpy.save")
    if not isinstance(arr, np.ndarray):  # np.load reads an .npz archive whatever its name
        common.die(f"{dataset} is an .npz archive, not one array; save the (N, D) array with numpy.save")
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        common.die(f"{dataset} has shape {arr.shape} and dtype {arr.dtype}; expected a real array of shape (N, D), "
                   "e.g. flattened images: x.reshape(len(x), -1)")
    if arr.shape[0] < 20 or arr.shape[1] < 1:
        common.die(f"{dataset} has shape {arr.shape}; need at least 20 rows (N) and one column (D)")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(1).sum())
        common.die(f"{dataset} has NaN or infinite values in {bad} rows; drop or impute them first")
    # a fixed 90/10 split (seeded shuffle) so the held-out rows never train
    perm = np.random.default_rng(0).permutation(len(arr))
    n_val = max(1, len(arr) // 10)
    info = {"kind": "npy", "data": os.path.abspath(dataset), "dim": arr.shape[1],
            "sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()}  # a file changed later is named
    return arr[perm[n_val:]], arr[perm[:n_val]], info


class PointBatches:
    """Standardised batches of points for trainer.train: .get(split, batch_size, gen) -> (B, D) float32.

    A toy's train split is an endless stream from .gen; its held-out split is a fixed sample drawn
    with another seed. A .npy file is split 90/10 once. mean/std come from its training rows, or from a
    fixed draw of 100k points of a toy.
    """

    HELD_OUT_SEED = 2**31 - 7

    def __init__(self, dataset, n_held_out=10000, meta=None):
        self.name = dataset
        self.train, held_out, info = describe_data(dataset)
        self.gen = torch.Generator().manual_seed(0)
        if info["kind"] == "toy":
            held_out = TOYS[dataset](n_held_out, torch.Generator().manual_seed(self.HELD_OUT_SEED)).numpy()
            stats_from = TOYS[dataset](100000, torch.Generator().manual_seed(1)).numpy()
        else:
            stats_from = self.train
        if meta is None:
            mean, std = stats_from.mean(0), stats_from.std(0)
            std = np.where(std > 1e-8, std, 1.0)
            meta = {**info, "mean": mean.tolist(), "std": std.tolist(),  # and the range sampling keeps x0_hat in:
                    "lo": ((stats_from.min(0) - mean) / std).tolist(), "hi": ((stats_from.max(0) - mean) / std).tolist()}
        elif info["kind"] != meta["kind"] or (info["kind"] == "toy" and dataset != meta["data"]):
            common.die(f"--dataset={dataset}: the model was trained on {meta['data']}; give that (a moved .npy file: its "
                       "new path)")
        elif meta["dim"] != info["dim"]:
            common.die(f"{dataset} has {info['dim']} dimensions but the checkpoint was trained on {meta['dim']}")
        elif meta.get("sha256", info.get("sha256")) != info.get("sha256"):  # standardised with the old file's statistics
            common.die(f"{dataset} has changed since the model was trained on it; give it the file it was trained on")
        self.meta = meta
        self.mean = torch.tensor(meta["mean"], dtype=torch.float64)
        self.std = torch.tensor(meta["std"], dtype=torch.float64)
        self.clip = (torch.tensor(meta["lo"]), torch.tensor(meta["hi"])) if "lo" in meta else None  # standardised (D,)
        self.held_out = self.standardise(torch.from_numpy(held_out))  # (N_val, D) float32

    def standardise(self, x):
        return ((x.double() - self.mean) / self.std).float()

    def unstandardise(self, x):
        return x.double().cpu() * self.std + self.mean

    def get(self, split, batch_size, gen=None):
        gen = gen or self.gen
        if split == "train":
            if self.train is None:
                return self.standardise(TOYS[self.name](batch_size, gen))
            rows = torch.randint(len(self.train), (batch_size,), generator=gen)
            return self.standardise(torch.from_numpy(self.train[rows.numpy()]))
        rows = torch.randint(len(self.held_out), (batch_size,), generator=gen)
        return self.held_out[rows]  # (B, D)


# ----------------------------------------------------------------------------------------------
# Forward process: schedules, q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0)
# Code step k = paper step k + 1; alpha_bar is float64 and indexed by the code step.


def betas_for(schedule, T):
    """beta_1..beta_T (T,) float64."""
    if schedule == "linear":
        scale = 1000.0 / T  # keeps alpha_bar_T ~ 4e-5 for any T (docs/ddpm.md)
        return torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64)
    s = 0.008  # cosine: Nichol & Dhariwal 2021, eq. 17
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


def alpha_bars(betas):
    """alpha_bar_t = prod_{u<=t} (1 - beta_u), (T,) float64."""
    return torch.cumprod(1 - betas, 0)


def q_mean_var(x0, alpha_bar_t):
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (paper eq. 4)."""
    return alpha_bar_t.sqrt() * x0, 1 - alpha_bar_t


def q_sample(x0, alpha_bar_t, eps):
    # x0, eps (B, D); alpha_bar_t (B, 1) -> x_t (B, D)
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps


def posterior(x0, xt, ab_t, ab_s):
    """q(x_s | x_t, x_0) for any s < t (paper eq. 6-7; s = t - 1 is the usual case).

    With beta = 1 - ab_t / ab_s (the one jump from s to t), the mean is
    [beta sqrt(ab_s) / (1 - ab_t)] x_0 + [(1 - ab_s) sqrt(1 - beta) / (1 - ab_t)] x_t and the
    variance beta (1 - ab_s) / (1 - ab_t). ab_s = 1 (s = 0) gives mean x_0 and variance 0.
    x0, xt (B, D); ab_t, ab_s (B, 1) or 0-dim -> mean (B, D), variance shaped as ab_t.
    """
    beta = 1 - ab_t / ab_s
    mean = (beta * ab_s.sqrt() / (1 - ab_t)) * x0 + ((1 - ab_s) * (1 - beta).sqrt() / (1 - ab_t)) * xt
    return mean, beta * (1 - ab_s) / (1 - ab_t)


def to_x0_eps(out, xt, ab, kind):
    """Network output -> (x0_hat, eps_hat), with a = sqrt(ab), b = sqrt(1 - ab); out, xt (B, D), ab (B, 1) or 0-dim."""
    a, b = ab.sqrt(), (1 - ab).sqrt()
    if kind == "eps":
        return (xt - b * out) / a, out
    if kind == "x0":
        return out, (xt - a * out) / b
    return a * xt - b * out, b * xt + a * out  # v = a eps - b x0 (Salimans & Ho 2022)


def target(x0, eps, ab, kind):
    """What the network regresses onto for each parameterisation: x0, eps (B, D), ab (B, 1) -> (B, D)."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0  # v


# ----------------------------------------------------------------------------------------------
# Model: an MLP with a sinusoidal time embedding


class ResBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.time = nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, h, temb):
        return h + self.fc2(F.silu(self.fc1(self.norm(h) + self.time(temb))))


class Denoiser(nn.Module):
    """(x_t (B, D), code step k (B,) long) -> eps / x0 / v prediction (B, D)."""

    def __init__(self, dim, width, n_layer, T, pred="eps"):
        super().__init__()
        self.dim, self.T, self.pred = dim, T, pred
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(n_layer))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        nn.init.zeros_(self.out[1].weight)  # starts by predicting 0: the mean of eps (and of standardised x0)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, xt, k):
        # the time input is the paper step on a 1000-step scale, so any T shares the embedding's range
        temb = self.time_mlp(common.timestep_embedding((k.float() + 1) * (1000.0 / self.T), self.inp.out_features))
        h = self.inp(xt) + temb
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h)


# ----------------------------------------------------------------------------------------------
# Loss: the simple objective (paper eq. 14) and its x0 / v variants


def loss_fn(model, x0, alpha_bar, pred):
    """E_{t, eps} || target - net(x_t, t) ||^2, mean over dimensions; x0 (B, D) standardised, alpha_bar (T,).

    For eps it is eq. 14. The x0 and v losses are the same regression on their own targets; per
    example they equal the eps loss times 1/SNR_t and (1 + SNR_t)/SNR_t (x_0 = (x_t - b eps) / a), so
    they weight the noisy steps more than eq. 14 does.
    """
    B = x0.shape[0]
    k = torch.randint(len(alpha_bar), (B,), device=x0.device)
    ab = alpha_bar.to(x0.device)[k].float()[:, None]  # (B, 1)
    eps = torch.randn_like(x0)
    out = model(q_sample(x0, ab, eps), k)
    return F.mse_loss(out.float(), target(x0, eps, ab, pred))


# ----------------------------------------------------------------------------------------------
# Samplers. `model` is any callable (x_t (B, D), k (B,)) -> prediction of kind `pred`, so the
# tests can drive them with the closed-form optimal denoiser.


def step_sequence(T, steps=0, timesteps=""):
    """The code steps the reverse chain visits, descending, e.g. [999, ..., 0].

    timesteps: explicit paper steps "1,10,100,1000" (a subsequence of 1..T that holds T); else `steps`
    evenly spaced over 1..T (0: all T). The chain starts at the largest and ends at x_0.
    """
    if timesteps:
        try:
            paper = sorted({int(s) for s in timesteps.split(",") if s.strip()})
        except ValueError:
            common.die(f"--timesteps={timesteps!r} must be comma-separated integers in 1..{T}")
        if not paper or paper[0] < 1 or paper[-1] != T:  # x_T ~ N(0, I) is the law of step T alone
            common.die(f"--timesteps={timesteps!r} must be comma-separated integers in 1..{T}, the last {T}")
        return [p - 1 for p in reversed(paper)]
    steps = steps or T
    if not 1 <= steps <= T:
        common.die(f"--steps={steps} must be between 1 and T={T} (0 means all T)")
    return sorted({round(x) for x in np.linspace(T - 1, 0, steps).tolist()}, reverse=True)  # one step: from T


@torch.no_grad()
def sample(model, xT, alpha_bar, seq, pred="eps", sampler="ancestral", var="beta", eta=0.0, show=None, clip=None):
    """Run the reverse chain from x_T (B, D) over code steps seq (descending); returns x_0 (B, D).

    ancestral: x_s = mu_theta + sigma z with the posterior of the jump t -> s (paper eq. 11 on
      consecutive steps; the respaced chain of Nichol & Dhariwal sec. 4 on a subsequence);
      sigma^2 = beta = 1 - ab_t / ab_s ("fixed large") or the posterior variance ("fixed small").
    ddim: x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z (Song et al. eq. 12),
      sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s).
    The last step (to s = 0, ab = 1) returns x0_hat in both. clip (lo, hi), each (D,): x0_hat is kept inside the
    training data's range, as the references clip images to [-1, 1] (with a tiny ab_t an eps error grows 1/sqrt(ab_t)
    times, and a point thrown outside the data stays out), and eps_hat follows it.
    """
    x, B, device = xT, xT.shape[0], xT.device
    one = torch.ones((), dtype=torch.float64)
    # the (D,) range on x's device once; the per-step alpha_bars stay 0-dim CPU tensors, which CUDA ops take as
    # scalars: a copy to the GPU would wait for the work queued there, several times per step
    lo, hi = (c.to(device, torch.float32) for c in clip) if clip is not None else (None, None)  # as x0_hat
    for i, k in enumerate(seq):
        if show:
            show(k, x)
        ab_t = alpha_bar[k]
        ab_s = alpha_bar[seq[i + 1]] if i + 1 < len(seq) else one
        out = model(x, torch.full((B,), k, device=device, dtype=torch.long)).float()
        x0_hat, eps_hat = to_x0_eps(out, x, ab_t.float(), pred)
        if clip is not None:
            x0_hat = torch.clamp(x0_hat, lo, hi)
            eps_hat = (x - float(ab_t.sqrt()) * x0_hat) / float((1 - ab_t).sqrt())
        if i + 1 == len(seq):
            x = x0_hat
        elif sampler == "ancestral":
            mean, post_var = posterior(x0_hat, x, ab_t.float(), ab_s.float())
            beta = 1 - ab_t / ab_s
            v = float(beta) if var == "beta" else float(beta * (1 - ab_s) / (1 - ab_t))
            x = mean + math.sqrt(v) * torch.randn_like(x)
        else:
            sigma = eta * float(((1 - ab_s) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_s).sqrt())
            x = (float(ab_s.sqrt()) * x0_hat + math.sqrt(max(float(1 - ab_s) - sigma**2, 0.0)) * eps_hat
                 + sigma * torch.randn_like(x))
    if show:
        show(-1, x)
    return x


# ----------------------------------------------------------------------------------------------
# Evaluation: the variational bound (paper eq. 5) and sample-quality figures


def gaussian_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) per dimension, elementwise."""
    return 0.5 * (-1 + torch.log(v2) - torch.log(v1) + v1 / v2 + (m1 - m2) ** 2 / v2)


def reverse_variances(betas, var):
    """sigma_t^2 (T,) float64 of p_theta(x_{t-1} | x_t). beta_tilde_1 = 0, so the posterior choice uses
    beta_tilde_2 at t = 1 (the references' clipped log-variance); the beta choice uses beta_1."""
    if var == "beta":
        return betas.clone()
    ab = alpha_bars(betas)  # posterior
    post = betas[1:] * (1 - ab[:-1]) / (1 - ab[1:])
    return torch.cat([post[:1], post])


@torch.no_grad()
def vlb(model, x0, betas, pred="eps", var="beta", rows_per_call=65536):
    """-log p_theta(x_0) <= L_T + sum_{t>=2} L_{t-1} + L_0 (paper eq. 5), per example in nats (B,).

    L_T    KL(q(x_T | x_0) || N(0, I))
    L_t-1  KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)), one x_t ~ q(x_t | x_0) per step
    L_0    -log N(x_0; mu_theta(x_1, 1), sigma_1^2 I): a Gaussian density decoder, because the data
           are continuous, so this bounds a continuous density (not a discretised 8-bit one).
    Returns the three terms summed over dimensions: prior (B,), kl (B,), decoder (B,).
    Steps are batched so that one network call sees about rows_per_call rows.
    """
    B, D = x0.shape
    T = len(betas)
    device = x0.device
    betas = betas.to(device)
    ab = alpha_bars(betas)
    sig2 = reverse_variances(betas, var)
    m_T, v_T = q_mean_var(x0.double(), ab[-1])
    prior = gaussian_kl(m_T, v_T.expand_as(m_T), torch.zeros_like(m_T), torch.ones_like(m_T)).sum(1)
    kl, decoder = torch.zeros(B, dtype=torch.float64, device=device), None
    chunk = max(1, min(rows_per_call, 2**22 // D) // B)  # bounded memory for wide data
    for start in range(0, T, chunk):
        ks = torch.arange(start, min(T, start + chunk), device=device)  # code steps in this call
        n = len(ks)
        k = ks.repeat_interleave(B)  # (n B,)
        x0r = x0.repeat(n, 1).double()
        ab_t = ab[k][:, None]
        ab_s = torch.where(k > 0, ab[(k - 1).clamp(min=0)], 1.0)[:, None]
        xt = q_sample(x0r, ab_t, torch.randn_like(x0r))
        out = model(xt.float(), k).double()
        x0_hat, _ = to_x0_eps(out, xt, ab_t, pred)
        mu_theta, _ = posterior(x0_hat, xt, ab_t, ab_s)
        var_p = sig2[k][:, None].expand_as(xt)
        is_first = k == 0
        if (~is_first).any():
            mu_q, var_q = posterior(x0r, xt, ab_t, ab_s)
            terms = gaussian_kl(mu_q[~is_first], var_q[~is_first].expand(-1, D), mu_theta[~is_first], var_p[~is_first])
            kl += terms.sum(1).view(-1, B).sum(0)
        if is_first.any():  # t = 1: the Gaussian decoder
            nll = 0.5 * (torch.log(2 * math.pi * var_p[is_first]) + (x0r[is_first] - mu_theta[is_first]) ** 2 / var_p[is_first])
            decoder = nll.sum(1)
    return prior, kl, decoder


def energy_distance(x, y):
    """2 E|x - y| - E|x - x'| - E|y - y'| (>= 0, 0 iff the laws agree); x (N, D), y (M, D)."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mode_stats(x):
    """Eight Gaussians, data units: fraction within 3 std of the nearest mode, samples per mode (8,)."""
    d = torch.cdist(x.double(), EIGHT_CENTERS)  # (B, 8)
    dist, nearest = d.min(1)
    near = dist < 3 * EIGHT_STD
    return float(near.double().mean()), torch.bincount(nearest[near], minlength=8)


def quality(samples, data, name):
    """Figures for standardised samples vs the held-out split; returns a dict."""
    n = min(len(samples), len(data.held_out) // 2)
    ref, ref2 = data.held_out[:n], data.held_out[n:2 * n]
    stats = {"energy_distance": energy_distance(samples[:n].cpu(), ref),
             "energy_distance_floor": energy_distance(ref2, ref)}  # held-out vs held-out: the noise floor
    raw = data.unstandardise(samples)
    logp = mixture_log_density(raw, name)
    if logp is not None:
        D = samples.shape[1]
        stats["sample_logp_per_dim"] = float(logp.mean()) / D
        stats["data_logp_per_dim"] = float(mixture_log_density(data.unstandardise(ref), name).mean()) / D
    if name == "eight_gaussians":
        frac, counts = mode_stats(raw)
        stats["within_3std"], stats["min_per_mode"] = frac, int(counts.min())
    return stats


def quality_line(stats):
    s = f"energy distance to held-out {stats['energy_distance']:.4f} (held-out vs held-out {stats['energy_distance_floor']:.4f})"
    if "sample_logp_per_dim" in stats:
        s += f" | exact log p_data(samples) {stats['sample_logp_per_dim']:.4f} nats/dim (held-out data {stats['data_logp_per_dim']:.4f})"
    if "within_3std" in stats:
        s += f" | {100 * stats['within_3std']:.1f}% within 3 std of a mode, fewest per mode {stats['min_per_mode']}"
    return s


@torch.no_grad()
def evaluate_loss(model, batches, cfg, alpha_bar):
    """During training: the simple loss on eval_iters held-out batches."""
    model.eval()
    device = next(model.parameters()).device
    losses = [float(loss_fn(model, x0.to(device), alpha_bar, cfg.pred)) for x0 in corpus.val_batches(batches, cfg)]
    return {"val_loss": sum(losses) / len(losses)}


# ----------------------------------------------------------------------------------------------
# Pictures (matplotlib is the optional `plot` extra)


def save_png(path, data_pts, sample_pts, title, strip=None):
    """Data and samples side by side (first two dimensions, data units); strip: [(paper t, x_t)]."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install -e '.[plot]'); the figures above are the text output")
        return False
    rows = 2 if strip else 1
    cols = max(2, len(strip) if strip else 2)
    fig = plt.figure(figsize=(2.4 * cols, 2.6 * rows), dpi=80)
    pts = [data_pts[:, :2].numpy(), sample_pts[:, :2].numpy()]
    lo = np.minimum(pts[0].min(0), pts[1].min(0))
    hi = np.maximum(pts[0].max(0), pts[1].max(0))
    pad = np.where(hi > lo, 0.05 * (hi - lo), 1.0)  # a constant dimension still spans a range

    def draw(ax, p, color, name):  # two dimensions: a scatter of the points; one: their histogram
        if p.shape[1] == 1:
            ax.hist(p[:, 0], bins=60, density=True, color=color)
        else:
            ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.5, color=color, rasterized=True)
            ax.set_aspect("equal")
        ax.set_title(name, fontsize=8), ax.tick_params(labelsize=6)
    for i, (p, name) in enumerate(zip(pts, ["held-out data", title])):
        ax = fig.add_subplot(rows, 2, i + 1)
        draw(ax, p, "C0" if i == 0 else "C1", name)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        if p.shape[1] > 1:
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    for j, (t, x) in enumerate(strip or []):
        draw(fig.add_subplot(rows, len(strip), len(strip) + j + 1), x[:, :2].numpy(), "C2", f"x_t, t = {t}")
    fig.tight_layout()
    common.write_file(path, lambda f: fig.savefig(f, format="png"), "choose another --png or --out_dir")
    plt.close(fig)
    print(f"wrote {path}")
    return True


# ----------------------------------------------------------------------------------------------
# main


def build_model(cfg, meta):
    return Denoiser(meta["dim"], cfg.n_embd, cfg.n_layer, cfg.T, cfg.pred)


def load(overrides):
    """Checkpoint -> (cfg, model, data, betas, ckpt); T, schedule and pred are fixed by the checkpoint, and so is
    its data: --dataset names only the same data (an .npy file moved since: its new path, checked by content)."""
    cfg, model, _, meta, ckpt = trainer.load_for_inference(Config, overrides, "ddpm", build_model)
    check_config(cfg)
    step_sequence(cfg.T, cfg.steps, cfg.timesteps)  # --steps and --timesteps against the model's T
    if meta["kind"] == "npy" and "dataset" not in overrides and not os.path.isfile(meta["data"]):
        common.die(f"{meta['data']}, the data the model was trained on, is not there; give its new path with --dataset=PATH")
    data = PointBatches(overrides.get("dataset", meta["data"]), meta=meta)  # the held-out split of the model's data
    return cfg, model, data, betas_for(cfg.schedule, cfg.T), ckpt


def draw_samples(model, cfg, betas, n, clip=None, show=None):
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    xT = torch.randn(n, model.dim, generator=gen).to(device)
    seq = step_sequence(cfg.T, cfg.steps, cfg.timesteps)
    return sample(model, xT, alpha_bars(betas), seq, cfg.pred, cfg.sampler, cfg.var, cfg.eta, show, clip), len(seq)


def sampler_name(cfg, n_steps):
    return f"{cfg.sampler} {n_steps} steps" + (f", eta={cfg.eta:g}" if cfg.sampler == "ddim" else f", var={cfg.var}")


def main(argv=None):
    verbs, cfg, overrides = common.parse_args(Config, argv)
    check_config(cfg)
    if "train" in verbs:
        betas = betas_for(cfg.schedule, cfg.T)
        data = PointBatches(cfg.dataset)
        model = build_model(cfg, data.meta)
        ab = alpha_bars(betas).to(common.get_device(cfg))  # on the training device once: a copy per step syncs a GPU
        trainer.train(cfg, "ddpm", model, lambda m, x0: loss_fn(m, x0, ab, cfg.pred),
                     lambda m, b: evaluate_loss(m, b, cfg, ab), data.meta, batches=data)
        if "RANK" in os.environ and int(os.environ["RANK"]) != 0:
            return
    if "sample" in verbs:
        cfg, model, data, betas, _ = load(overrides)
        if "var" in overrides and cfg.sampler == "ddim" and "eval" not in verbs:  # --eval's bound reads it
            common.die("--var is the ancestral sampler's variance; DDIM's noise is --eta: drop --var or use --sampler=ancestral")
        strip, shown = [], set()
        if cfg.show:  # x_t at a few paper steps on the way down
            seq = step_sequence(cfg.T, cfg.steps, cfg.timesteps)
            # most of the structure appears late in the chain, so the marks crowd towards t = 0
            marks = {min(seq, key=lambda k: abs(k + 1 - f * cfg.T)) for f in (1.0, 0.35, 0.2, 0.1, 0.04)} | {-1}

            def show(k, x):
                if k in marks and k not in shown:
                    shown.add(k)
                    strip.append((k + 1, data.unstandardise(x)))
        t0 = time.time()
        x, n_steps = draw_samples(model, cfg, betas, cfg.num_samples, data.clip, show if cfg.show else None)
        elapsed = time.time() - t0
        raw = data.unstandardise(x)
        name = sampler_name(cfg, n_steps)
        print(f"{cfg.num_samples} samples, {name}, {elapsed:.1f}s; first five (data units):")
        for row in raw[:5].tolist():
            print("  " + " ".join(f"{v:+.4f}" for v in row))
        print(quality_line(quality(x, data, meta_name(data))))
        odir = common.out_dir(cfg, "ddpm")
        common.write_file(os.path.join(odir, "samples.npy"), lambda f: np.save(f, raw.numpy()), "choose another --out_dir")
        save_png(cfg.png or os.path.join(odir, "samples.png"), data.unstandardise(data.held_out[:cfg.num_samples]), raw,
                 f"samples ({name})", strip or None)
    if "eval" in verbs:
        cfg, model, data, betas, ckpt = load(overrides)
        device = next(model.parameters()).device
        x0 = data.held_out[:cfg.eval_points].to(device)
        torch.manual_seed(cfg.seed)
        prior, kl, decoder = vlb(model, x0, betas, cfg.pred, cfg.var)
        D = x0.shape[1]
        nats = float((prior + kl + decoder).mean()) / D
        log_std = float(torch.log(data.std).sum()) / D  # density change of the standardisation
        nats_data = nats + log_std
        print(f"bound on -log p(x_0), {len(x0)} held-out points, var={cfg.var}: {nats_data:.4f} nats/dim = "
              f"{nats_data / math.log(2):.4f} bits/dim in data units ({nats:.4f} nats/dim standardised; "
              f"prior {float(prior.mean()) / D:.2e}, sum of KL {float(kl.mean()) / D:.4f}, decoder {float(decoder.mean()) / D:.4f})")
        logp = mixture_log_density(data.unstandardise(x0), meta_name(data))
        if logp is not None:
            print(f"exact -log p_data(held-out) {-float(logp.mean()) / D:.4f} nats/dim (the bound's floor for a perfect model)")
        t0 = time.time()
        x, n_steps = draw_samples(model, cfg, betas, cfg.eval_points, data.clip)
        stats = quality(x, data, meta_name(data))
        print(f"samples ({sampler_name(cfg, n_steps)}, {time.time() - t0:.1f}s): {quality_line(stats)}")
        trainer.log_json(os.path.join(common.out_dir(cfg, "ddpm"), "log.jsonl"),
                        {"eval_full": {"bound_nats_per_dim": nats_data, "bound_bits_per_dim": nats_data / math.log(2), **stats},
                         "iter": ckpt["iter"], "sampler": sampler_name(cfg, n_steps)})


def meta_name(data):
    return data.meta["data"] if data.meta["kind"] == "toy" else None


if __name__ == "__main__":
    main()
