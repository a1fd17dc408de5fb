"""DDPM: closed forms (hypothesis), exactness with the optimal Gaussian denoiser, learning on eight
Gaussians end to end through the CLI, and bad inputs."""
import dataclasses
import importlib.util
import math
import os
import re
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_cli

import common
import ddpm

SCHEDULES = st.sampled_from(["linear", "cosine"])


# ----------------------------------------------------------------------------------------------
# Forward process


@settings(max_examples=60, deadline=None)
@given(SCHEDULES, st.integers(30, 1000), st.floats(0, 1), st.floats(-5, 5))
def test_closed_form_q_equals_composed_one_step_kernels(schedule, T, frac, x0):
    betas = ddpm.betas_for(schedule, T)
    t = 1 + int(frac * (T - 1))
    # compose q(x_u | x_{u-1}) = N(sqrt(1 - beta_u) x_{u-1}, beta_u): mean and variance propagate affinely
    mean, var = x0, 0.0
    for u in range(t):
        mean, var = math.sqrt(1 - betas[u]) * mean, (1 - betas[u]) * var + betas[u]
    m, v = ddpm.q_mean_var(torch.tensor(x0, dtype=torch.float64), ddpm.alpha_bars(betas)[t - 1])
    assert abs(float(m) - mean) < 1e-9 * (1 + abs(x0))
    assert abs(float(v) - float(var)) < 1e-9


# The threshold: at alpha_bar_T < 1e-3 the signal left in x_T has std sqrt(1e-3) ~ 0.03 of a
# standardised coordinate, so starting the reverse chain from N(0, I) is off by a 3% mean shift
# at most, and the prior term of the bound is below ~1e-3 nats per dimension.
ALPHA_BAR_T_MAX = 1e-3


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alpha_bar_decreasing_and_ends_near_zero_at_T_1000(schedule):
    ab = ddpm.alpha_bars(ddpm.betas_for(schedule, 1000))
    assert (ab[1:] < ab[:-1]).all() and float(ab[0]) < 1
    assert float(ab[-1]) < ALPHA_BAR_T_MAX
    expected = {"linear": 4.0e-5, "cosine": 2.4e-9}[schedule]  # the figures docs/ddpm.md gives
    assert abs(math.log(float(ab[-1]) / expected)) < 0.1


@settings(max_examples=30, deadline=None)
@given(SCHEDULES, st.integers(25, 4000))
def test_alpha_bar_decreasing_for_any_T(schedule, T):
    ab = ddpm.alpha_bars(ddpm.betas_for(schedule, T))
    assert (ab[1:] < ab[:-1]).all() and float(ab[-1]) < ALPHA_BAR_T_MAX


def test_cosine_first_beta_is_set_by_the_offset_s():
    """Nichol & Dhariwal eq. 17 with s = 0.008: beta_1 = 4.1e-5 at T = 1000 (s = 0 gives 2.5e-6, a first step too
    small to see). alpha_bar_T alone cannot tell: beta_T is clipped at 0.999 either way."""
    betas = ddpm.betas_for("cosine", 1000)
    assert float(betas[0]) == pytest.approx(4.1e-5, rel=0.02)
    assert float(betas[-1]) == 0.999


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_reverse_variances_are_beta_or_the_clipped_posterior_variance(schedule):
    """sigma_t^2 = beta_t, or beta_tilde_t = beta_t (1 - ab_{t-1}) / (1 - ab_t) (eq. 7), with beta_tilde_2 at t = 1
    where beta_tilde_1 = 0 (the references' clipped log-variance)."""
    betas = ddpm.betas_for(schedule, 1000)
    ab = ddpm.alpha_bars(betas)
    assert torch.equal(ddpm.reverse_variances(betas, "beta"), betas)
    post = ddpm.reverse_variances(betas, "posterior")
    assert post.shape == betas.shape
    for t in (2, 3, 500, 1000):
        assert float(post[t - 1]) == pytest.approx(float(betas[t - 1] * (1 - ab[t - 2]) / (1 - ab[t - 1])), rel=1e-12)
    assert float(post[0]) == float(post[1])


@settings(max_examples=60, deadline=None)
@given(SCHEDULES, st.integers(30, 1000), st.floats(0, 1), st.floats(-3, 3), st.floats(-3, 3))
def test_posterior_agrees_with_bayes_rule_in_1d(schedule, T, frac, x0, z):
    betas = ddpm.betas_for(schedule, T)
    ab = ddpm.alpha_bars(betas)
    t = 2 + int(frac * (T - 2))  # paper step t >= 2 (beta_tilde_1 = 0 is a point mass)
    ab_t, ab_s, beta = ab[t - 1], ab[t - 2], float(betas[t - 1])
    xt = math.sqrt(ab_t) * x0 + math.sqrt(1 - ab_t) * z
    # Bayes: q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0), on a grid
    prior_m, prior_sd = math.sqrt(ab_s) * x0, math.sqrt(1 - ab_s)
    lik_m, lik_sd = xt / math.sqrt(1 - beta), math.sqrt(beta / (1 - beta))
    lo = min(prior_m - 12 * prior_sd, lik_m - 12 * lik_sd)
    hi = max(prior_m + 12 * prior_sd, lik_m + 12 * lik_sd)
    grid = torch.linspace(lo, hi, 200001, dtype=torch.float64)
    logp = -(xt - math.sqrt(1 - beta) * grid) ** 2 / (2 * beta) - (grid - prior_m) ** 2 / (2 * prior_sd**2)
    w = torch.exp(logp - logp.max())
    w = w / w.sum()
    num_mean = float((w * grid).sum())
    num_var = float((w * (grid - num_mean) ** 2).sum())
    mean, var = ddpm.posterior(torch.tensor(x0, dtype=torch.float64), torch.tensor(xt, dtype=torch.float64), ab_t, ab_s)
    assert abs(float(mean) - num_mean) < 1e-6 * (1 + abs(num_mean))
    assert abs(float(var) / num_var - 1) < 1e-4
    # and the one-step formula with beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
    assert abs(float(var) - beta * (1 - ab_s) / (1 - ab_t)) < 1e-12


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["eps", "x0", "v"]), st.floats(1e-4, 0.9999), st.integers(0, 2**31 - 1))
def test_eps_x0_v_conversions_round_trip(kind, ab, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(16, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 3, generator=g, dtype=torch.float64)
    ab = torch.tensor(ab, dtype=torch.float64)
    xt = ddpm.q_sample(x0, ab, eps)
    out = ddpm.target(x0, eps, ab, kind)
    x0_hat, eps_hat = ddpm.to_x0_eps(out, xt, ab, kind)
    tol = 1e-9 / math.sqrt(float(ab))  # x0 from eps divides by sqrt(alpha_bar)
    assert torch.allclose(x0_hat, x0, atol=tol) and torch.allclose(eps_hat, eps, atol=1e-9 / math.sqrt(1 - float(ab)))
    # v is the same from either side
    assert torch.allclose(ddpm.target(x0_hat, eps_hat, ab, "v"), ddpm.target(x0, eps, ab, "v"), atol=tol)


def randomised(model):
    """model with every weight drawn afresh: a random but non-trivial network (the output layer starts at 0)."""
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 40), st.integers(0, 1000), st.sampled_from(["eps", "x0", "v"]))
def test_ddim_eta0_is_deterministic_given_xT(steps, seed, pred):
    torch.manual_seed(seed)
    model = randomised(ddpm.Denoiser(2, 32, 2, 100, pred))
    betas = ddpm.betas_for("linear", 100)
    ab = ddpm.alpha_bars(betas)
    seq = ddpm.step_sequence(100, steps)
    xT = torch.randn(64, 2)
    runs = []
    for eta, rng in ((0.0, 1), (0.0, 2), (1.0, 3)):
        torch.manual_seed(rng)  # a different global RNG state each time
        runs.append(ddpm.sample(model, xT, ab, seq, pred, "ddim", eta=eta))
    assert torch.equal(runs[0], runs[1])
    if len(seq) > 1:  # eta = 1 draws noise, so the same x_T gives other samples
        assert not torch.allclose(runs[0], runs[2])


def test_v_is_the_papers_sign():
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022), as a v-model trained elsewhere predicts; a flip in
    target and to_x0_eps together would stay self-consistent and pass every other test."""
    ab = torch.tensor(0.36)
    assert float(ddpm.target(torch.tensor(1.0), torch.tensor(0.0), ab, "v")) == pytest.approx(-0.8)
    assert float(ddpm.target(torch.tensor(0.0), torch.tensor(1.0), ab, "v")) == pytest.approx(0.6)
    x0, eps = ddpm.to_x0_eps(torch.tensor(-0.8), torch.tensor(0.6), ab, "v")  # x_t = 0.6 x0 + 0.8 eps at x0 = 1, eps = 0
    assert (float(x0), float(eps)) == pytest.approx((1.0, 0.0))


def test_denoiser_time_input_is_the_paper_step_on_a_1000_step_scale():
    """The embedding sees t * 1000 / T for paper step t = k + 1, so code step 9 of T = 100 is code step 99 of
    T = 1000 (paper steps 10 and 100). A fresh network predicts 0, the mean of eps and of standardised x_0."""
    torch.manual_seed(0)
    a, b = ddpm.Denoiser(2, 16, 1, 100), ddpm.Denoiser(2, 16, 1, 1000)
    x = torch.randn(5, 2)
    assert not a(x, torch.arange(5)).any()
    b.load_state_dict(randomised(a).state_dict())
    for ka, kb in ((9, 99), (0, 9), (99, 999)):
        assert torch.allclose(a(x, torch.full((5,), ka)), b(x, torch.full((5,), kb)), atol=1e-5)
    assert not torch.allclose(b(x, torch.full((5,), 98)), b(x, torch.full((5,), 99)), atol=1e-5)


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_loss_is_the_mean_square_error_at_the_step_that_noised_x_t(pred):
    """Eq. 14: the network is called with the step k whose alpha_bar made x_t, and the loss is the mean over the
    batch and the dimensions. A network that knows x_0 and inverts q_sample at k scores 0; the zero network scores
    the target's mean square: E eps^2 = 1, x_0^2 = 4, or E[ab eps^2 + (1 - ab) x_0^2] for v."""
    ab = ddpm.alpha_bars(ddpm.betas_for("linear", 1000))
    x0 = torch.full((4096, 3), 2.0)

    def exact(xt, k):
        a = ab[k][:, None]
        return ddpm.target(x0.double(), (xt.double() - a.sqrt() * x0) / (1 - a).sqrt(), a, pred)
    torch.manual_seed(0)
    assert float(ddpm.loss_fn(exact, x0, ab, pred)) < 1e-6
    zero = float(ddpm.loss_fn(lambda xt, k: torch.zeros_like(xt), x0, ab, pred))
    want = {"eps": 1.0, "x0": 4.0, "v": float((ab + 4 * (1 - ab)).mean())}[pred]
    assert zero == pytest.approx(want, abs=0.1)


def test_step_sequence():
    assert ddpm.step_sequence(1000) == list(range(999, -1, -1))
    seq = ddpm.step_sequence(1000, 10)
    assert len(seq) == 10 and seq[0] == 999 and seq[-1] == 0 and seq == sorted(seq, reverse=True)
    assert ddpm.step_sequence(1000, 0, "1, 10,100,1000") == [999, 99, 9, 0]
    assert ddpm.step_sequence(1000, 1) == [999]  # one step denoises pure noise (it was step 0: the noise itself)
    with pytest.raises(SystemExit, match="1..1000"):
        ddpm.step_sequence(1000, 0, "0,5")
    with pytest.raises(SystemExit, match=re.escape("--timesteps='1,2.5,1000' must be comma-separated integers in 1..1000")):
        ddpm.step_sequence(1000, 0, "1,2.5,1000")
    with pytest.raises(SystemExit, match="the last 1000"):  # x_T ~ N(0, I) started a chain meant for step 100
        ddpm.step_sequence(1000, 0, "1,10,100")
    with pytest.raises(SystemExit, match="the last 1000"):  # at --train, not at every later --sample of the run
        ddpm.check_config(ddpm.Config(timesteps="1,10,100"))
    saved = {"config": dataclasses.asdict(ddpm.Config(timesteps="1,10,100,1000"))}  # one command's: a later --steps holds
    assert common.config_from_checkpoint(ddpm.Config, saved, {"steps": 10}).timesteps == ""
    with pytest.raises(SystemExit, match="between 1 and T"):
        ddpm.step_sequence(1000, 2000)


# ----------------------------------------------------------------------------------------------
# Exactness: Gaussian data, where E[x_0 | x_t] is linear in x_t and known in closed form

MEAN = torch.tensor([0.5, -1.0], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)


def gaussian_denoiser(alpha_bar, pred):
    """The optimal network for N(MEAN, COV): E[x_0 | x_t] = m + a C (a^2 C + b^2 I)^{-1} (x_t - a m)."""
    lam, U = torch.linalg.eigh(COV)

    def model(xt, k):
        ab = alpha_bar[k][:, None]  # (B, 1)
        a, b2 = ab.sqrt(), 1 - ab
        y = (xt.double() - a * MEAN) @ U  # eigen-coordinates
        x0 = MEAN + (y * a * lam / (ab * lam + b2)) @ U.T
        eps = (xt.double() - a * x0) / b2.sqrt()
        return ddpm.target(x0, eps, ab, pred)
    return model


@pytest.mark.parametrize("sampler,var,pred,eta", [("ancestral", "beta", "eps", 0.0), ("ancestral", "posterior", "v", 0.0),
                                                  ("ddim", "beta", "x0", 0.0), ("ddim", "beta", "eps", 1.0)])
def test_sampler_with_optimal_denoiser_reproduces_gaussian(sampler, var, pred, eta):
    """All 1000 steps: ancestral with either variance, DDIM at eta=0 (the probability-flow ODE) and at eta=1
    (its fresh noise sigma z balanced by the smaller eps_hat term of Song et al. eq. 12)."""
    betas = ddpm.betas_for("linear", 1000)
    ab = ddpm.alpha_bars(betas)
    torch.manual_seed(0)
    n = 20000
    x = ddpm.sample(gaussian_denoiser(ab, pred), torch.randn(n, 2, dtype=torch.float64), ab,
                    ddpm.step_sequence(1000), pred, sampler, var, eta).double()
    se = math.sqrt(float(COV.diagonal().max()) / n)
    assert (x.mean(0) - MEAN).abs().max() < 5 * se
    assert (torch.cov(x.T) - COV).abs().max() < 0.03


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_sampling_keeps_x0_hat_inside_the_datas_range(sampler):
    """The cosine schedule leaves sqrt(ab_T) = 5e-5, so an eps error of 0.1 at t = T put x0_hat 2,000 units out, and
    a chain thrown outside the data stayed out (3 of 1000 samples at radius 1,400-4,500 after --pred=eps training).
    clip holds x0_hat in the training data's range at every step, as the references clip images to [-1, 1]."""
    ab = ddpm.alpha_bars(ddpm.betas_for("cosine", 1000))
    exact = gaussian_denoiser(ab, "eps")
    off = lambda x, t: exact(x, t) + 0.1  # noqa: E731  (a small error everywhere)
    xT, seq = torch.randn(64, 2, dtype=torch.float64), ddpm.step_sequence(1000, 50)
    clip = (torch.tensor([-3.0, -2.0]), torch.tensor([4.0, 5.0]))  # (lo, hi) of each dimension
    inside = lambda x: ((x >= clip[0]) & (x <= clip[1])).all(-1)  # noqa: E731
    assert not inside(ddpm.sample(off, xT, ab, seq, "eps", sampler)).all()
    assert inside(ddpm.sample(off, xT, ab, seq, "eps", sampler, clip=clip)).all()
    torch.manual_seed(0)  # exact predictions inside the range: the clip changes nothing
    x = ddpm.sample(exact, torch.randn(4000, 2, dtype=torch.float64), ab, seq, "eps", sampler, clip=(MEAN - 10, MEAN + 10))
    assert (x.mean(0) - MEAN).abs().max() < 0.1


@pytest.mark.parametrize("sampler,var,eta", [("ancestral", "beta", 0.0), ("ancestral", "posterior", 0.0),
                                              ("ddim", "beta", 1.0), ("ddim", "beta", 0.5)])
def test_a_respaced_jumps_noise_has_its_own_variance(sampler, var, eta):
    """One jump t -> s of a respaced chain adds noise of variance beta = 1 - ab_t / ab_s, its posterior variance
    (1 - ab_s) / (1 - ab_t) beta, or DDIM's eta^2 times that. Over all 1000 steps the last two are close, so only
    a long jump tells them apart: a model that predicts eps = 0 from x_T = 0 leaves that noise alone at s."""
    ab = ddpm.alpha_bars(ddpm.betas_for("linear", 1000))
    t, s, n = 999, 49, 100000
    beta = float(1 - ab[t] / ab[s])
    post = float((1 - ab[s]) / (1 - ab[t])) * beta
    want = {"beta": beta, "posterior": post}[var] if sampler == "ancestral" else eta**2 * post
    seen = {}
    torch.manual_seed(0)
    ddpm.sample(lambda x, k: torch.zeros_like(x), torch.zeros(n, 2, dtype=torch.float64), ab, [t, s, 0], "eps",
                sampler, var, eta, show=lambda k, x: seen.setdefault(k, x.double()))
    x = seen[s]
    assert x.mean(0).abs().max() < 5 * math.sqrt(want / n)
    assert (x.var(0) / want - 1).abs().max() < 0.02  # the estimate's own error: sqrt(2 / n) = 0.45%


def test_ddim_after_the_clip_follows_the_clipped_x0():
    """With clip, eps_hat is recomputed from the clipped x0_hat, so a DDIM step is the map of eq. 12 for that x0
    (the references' order); a step mixing the clipped x0_hat with the network's eps lands elsewhere."""
    ab = ddpm.alpha_bars(ddpm.betas_for("linear", 1000))
    t, s = 999, 499
    xT = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=torch.float64)
    eps = torch.tensor([3.0, -4.0], dtype=torch.float64)  # x0_hat far outside the range below
    lo, hi = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    seen = {}
    ddpm.sample(lambda x, k: eps.expand_as(x), xT, ab, [t, s, 0], "eps", "ddim", clip=(lo, hi),
                show=lambda k, x: seen.setdefault(k, x.double()))
    a_t, a_s = ab[t].sqrt(), ab[s].sqrt()
    c = ((xT - (1 - ab[t]).sqrt() * eps) / a_t).clamp(-1, 1)
    expected = a_s * c + (1 - ab[s]).sqrt() * (xT - a_t * c) / (1 - ab[t]).sqrt()
    assert torch.allclose(seen[s], expected, atol=1e-5)


def test_show_sees_each_visited_step_then_the_samples():
    """--show draws x_t at steps of the chain and the samples last: show gets each visited code step before its
    network call, then -1 with the returned x_0."""
    ab = ddpm.alpha_bars(ddpm.betas_for("linear", 100))
    seen = []
    x = ddpm.sample(lambda x, k: torch.zeros_like(x), torch.randn(4, 2), ab, [99, 49, 0], "eps", "ddim",
                    show=lambda k, x: seen.append((k, x.clone())))
    assert [k for k, _ in seen] == [99, 49, 0, -1] and torch.equal(seen[-1][1], x)


def test_draw_samples_is_seeded_and_keeps_x0_hat_in_the_datas_range():
    """--sample draws x_T from --seed, whatever the global RNG (so DDIM at eta = 0 gives the same samples every
    run), and passes the data's range on to the sampler's clip."""
    torch.manual_seed(0)
    model = randomised(ddpm.Denoiser(2, 16, 1, 100))
    cfg = ddpm.Config(T=100, sampler="ddim", steps=5)
    betas = ddpm.betas_for("linear", 100)
    clip = (torch.tensor([-0.5, -0.5]), torch.tensor([0.5, 0.5]))
    torch.manual_seed(1)
    a, n = ddpm.draw_samples(model, cfg, betas, 64, clip)
    torch.manual_seed(2)
    b, _ = ddpm.draw_samples(model, cfg, betas, 64, clip)
    assert n == 5 and torch.equal(a, b) and (a.abs() <= 0.5).all()
    assert not torch.equal(a, ddpm.draw_samples(model, dataclasses.replace(cfg, seed=cfg.seed + 1), betas, 64, clip)[0])


def test_training_draws_every_step_including_the_first():
    """k is uniform over 0 .. T-1 (paper steps 1 .. T): the last step of every sampler predicts x_0 from k = 0."""
    ab = ddpm.alpha_bars(ddpm.betas_for("linear", 10))
    drawn = []
    ddpm.loss_fn(lambda x, k: drawn.append(k) or torch.zeros_like(x), torch.zeros(4000, 2), ab, "eps")
    assert sorted(set(torch.cat(drawn).tolist())) == list(range(10))


@pytest.mark.parametrize("steps", [50, 10])
def test_ddim_few_steps_is_the_exact_affine_map(steps):
    """With few steps DDIM is not exact: for Gaussian data each step is an affine map that shrinks the
    variance (Cauchy-Schwarz). The sampler must compute exactly that map, eigen-direction by direction."""
    betas = ddpm.betas_for("linear", 1000)
    ab = ddpm.alpha_bars(betas)
    seq = ddpm.step_sequence(1000, steps)
    lam, U = torch.linalg.eigh(COV)
    m = MEAN @ U
    gain, offset = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)  # x = gain x_T + offset
    for i, k in enumerate(seq):
        a, b = ab[k].sqrt(), (1 - ab[k]).sqrt()
        a_s, b_s = (ab[seq[i + 1]].sqrt(), (1 - ab[seq[i + 1]]).sqrt()) if i + 1 < len(seq) else (1.0, 0.0)
        c = a * lam / (a**2 * lam + b**2)  # x0_hat = m + c (x_t - a m) in eigen-coordinates
        slope = a_s * c + b_s * (1 - a * c) / b
        shift = (a_s - b_s * a / b) * (m - c * a * m)
        gain, offset = slope * gain, slope * offset + shift
    xT = torch.randn(256, 2, dtype=torch.float64)
    x = ddpm.sample(gaussian_denoiser(ab, "eps"), xT, ab, seq, "eps", "ddim", eta=0.0).double()
    expected = ((xT @ U) * gain + offset) @ U.T
    assert torch.allclose(x, expected, atol=1e-5)
    assert (gain**2 < lam).all()  # the shrink is real at these step counts


@pytest.mark.parametrize("schedule,var,max_gap", [("linear", "beta", 0.1), ("cosine", "beta", 0.1), ("linear", "posterior", 1.5)])
def test_bound_with_optimal_denoiser_is_not_below_true_nll(schedule, var, max_gap):
    """The bound of the optimal model is above the true NLL (up to Monte Carlo noise) and close to it.
    sigma_t^2 = beta_t is the better choice here (it is exact for N(0, I) data); the posterior variance
    is too narrow for spread-out data and costs about 1.2 nats (0.6 per dimension)."""
    betas = ddpm.betas_for(schedule, 1000)
    torch.manual_seed(1)
    x0 = MEAN + torch.randn(4000, 2, dtype=torch.float64) @ torch.linalg.cholesky(COV).T
    prior, kl, decoder = ddpm.vlb(gaussian_denoiser(ddpm.alpha_bars(betas), "eps"), x0, betas, "eps", var)
    bound = prior + kl + decoder  # (B,) nats
    nll = -torch.distributions.MultivariateNormal(MEAN, COV).log_prob(x0)
    gap = bound - nll
    se = float(gap.std()) / math.sqrt(len(gap))
    assert float(gap.mean()) > -3 * se, (float(gap.mean()), se)
    assert float(gap.mean()) < max_gap


@pytest.mark.parametrize("var,rows_per_call", [("beta", 65536), ("posterior", 64)])
def test_bound_term_by_term_for_a_network_that_predicts_x0_zero(var, rows_per_call):
    """With x0_hat = 0 every term of eq. 5 is deterministic: mu_theta = mu_tilde - c_t x_0 with
    c_t = beta_t sqrt(ab_{t-1}) / (1 - ab_t) (eq. 7), so per example, with s_t = sigma_t^2 and bt_t = beta_tilde_t,
    L_{t-1} = sum_d 1/2 (-1 + log s_t - log bt_t + bt_t / s_t + c_t^2 x_0^2 / s_t), L_0 = -log N(x_0; 0, s_1 I) and
    L_T = KL(N(sqrt(ab_T) x_0, 1 - ab_T) || N(0, 1)). Rows far apart, and steps split over many calls."""
    T = 200
    betas = ddpm.betas_for("linear", T)
    ab = ddpm.alpha_bars(betas)
    x0 = torch.tensor([[0.0, 0.0], [3.0, -1.0], [-20.0, 5.0]], dtype=torch.float64)
    D, sq = x0.shape[1], (x0**2).sum(1)
    bt = betas[1:] * (1 - ab[:-1]) / (1 - ab[1:])  # beta_tilde_2 .. beta_tilde_T
    s2 = betas if var == "beta" else torch.cat([bt[:1], bt])
    c = betas[1:] * ab[:-1].sqrt() / (1 - ab[1:])
    kl = D * float((0.5 * (-1 + s2[1:].log() - bt.log() + bt / s2[1:])).sum()) + 0.5 * float((c**2 / s2[1:]).sum()) * sq
    decoder = 0.5 * (D * torch.log(2 * math.pi * s2[0]) + sq / s2[0])
    prior = 0.5 * (D * (-1 - torch.log(1 - ab[-1]) + 1 - ab[-1]) + ab[-1] * sq)
    torch.manual_seed(0)
    got = ddpm.vlb(lambda x, k: torch.zeros_like(x), x0, betas, "x0", var, rows_per_call=rows_per_call)
    for g, w in zip(got, (prior, kl, decoder)):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-9), (g, w)


# ----------------------------------------------------------------------------------------------
# Data


def test_toys_and_standardisation():
    for name in ddpm.TOYS:
        data = ddpm.PointBatches(name)
        x = data.get("train", 5000)
        assert x.shape == (5000, 2) and x.dtype == torch.float32
        assert x.mean(0).abs().max() < 0.1 and (x.std(0) - 1).abs().max() < 0.1
        assert torch.allclose(data.standardise(data.unstandardise(x)), x, atol=1e-5)
    with pytest.raises(SystemExit, match="unknown toy"):
        ddpm.PointBatches("nine_gaussians")


def test_energy_distance_by_hand():
    """2 E|x - y| - E|x - x'| - E|y - y'| over all pairs (a point with itself included): x = {0, 2}, y = {0}
    gives 2 * 1 - 1 - 0; the same points give 0, and it is symmetric."""
    x, y = torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    assert ddpm.energy_distance(x, y) == pytest.approx(1.0) and ddpm.energy_distance(y, x) == pytest.approx(1.0)
    assert ddpm.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert ddpm.energy_distance(x, x + torch.tensor([3.0, 4.0])) == pytest.approx((10 + 41 ** 0.5 + 17 ** 0.5) / 2 - 2)


def test_quality_of_fresh_draws_of_the_data_law():
    """Fresh draws of the data score like the held-out split: energy distance near the noise floor, which compares
    two disjoint halves of the held-out split (one half with itself is 0), the held-out log-density, and 99% within
    3 std of a mode (a 2-D Gaussian puts 1 - exp(-4.5) = 98.9% there; 2 std would hold 86.5%)."""
    data = ddpm.PointBatches("eight_gaussians")
    x = data.standardise(ddpm.eight_gaussians(2000, torch.Generator().manual_seed(5)))
    stats = ddpm.quality(x, data, "eight_gaussians")
    assert 0 < stats["energy_distance_floor"] < 0.01 and stats["energy_distance"] < 0.01
    assert stats["sample_logp_per_dim"] == pytest.approx(stats["data_logp_per_dim"], abs=0.1)
    assert stats["within_3std"] == pytest.approx(1 - math.exp(-4.5), abs=0.01) and stats["min_per_mode"] > 150


def test_the_sampling_clip_is_the_datas_range_in_standardised_units():
    """x0_hat is clipped to the training data's range, in the standardised units the chain runs in: for the
    checkerboard (uniform, so sharp edges) the held-out split's own min and max."""
    data = ddpm.PointBatches("checkerboard")
    lo, hi = data.clip
    assert torch.allclose(lo.float(), data.held_out.min(0).values, atol=0.01)
    assert torch.allclose(hi.float(), data.held_out.max(0).values, atol=0.01)


def test_eight_gaussian_log_density_integrates_to_one():
    g = torch.linspace(-3, 3, 1201, dtype=torch.float64)
    xy = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mass = float(ddpm.mixture_log_density(xy, "eight_gaussians").exp().sum()) * float(g[1] - g[0]) ** 2
    assert abs(mass - 1) < 1e-3


def test_no_matplotlib_gives_a_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    x = torch.randn(10, 2, dtype=torch.float64)
    assert ddpm.save_png(str(tmp_path / "s.png"), x, x, "samples") is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "s.png").exists()


# ----------------------------------------------------------------------------------------------
# End to end: the default run on eight Gaussians, then --sample and --eval


def test_train_sample_eval_eight_gaussians(tmp_path):
    out = str(tmp_path / "ddpm")
    r = run_cli(["ddpm.py", "--train", f"--out_dir={out}"])  # the default: about a minute
    assert "done: 6000 iterations" in r.stdout
    r = run_cli(["ddpm.py", "--sample", f"--out_dir={out}", "--num_samples=1000", "--show"])
    assert "energy distance to held-out" in r.stdout
    raw = torch.from_numpy(np.load(os.path.join(out, "samples.npy")))
    assert raw.shape == (1000, 2)
    frac, counts = ddpm.mode_stats(raw)
    assert frac >= 0.9, f"only {100 * frac:.1f}% of samples within 3 std of a mode"
    assert (counts > 0).all(), f"a mode got no samples: {counts.tolist()}"
    if importlib.util.find_spec("matplotlib") is None:  # the PNG is optional: said, and the rest still runs
        assert "matplotlib is not installed" in r.stdout
    else:
        assert os.path.getsize(os.path.join(out, "samples.png")) > 1000
        (tmp_path / "a_file").write_text("")
        r = run_cli(["ddpm.py", "--sample", f"--out_dir={out}", "--num_samples=10", f"--png={tmp_path}/a_file/s.png"],
                    check=False)  # a folder that cannot be made: one line, before any sampling, and no partial file
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
        assert f"--png={tmp_path}/a_file/s.png cannot be written: {tmp_path}/a_file (" in r.stderr, r.stderr
        assert "samples," not in r.stdout and not list(tmp_path.glob("**/*.tmp"))
    r = run_cli(["ddpm.py", "--eval", f"--out_dir={out}", "--eval_points=300", "--sampler=ddim", "--steps=20"])
    line = next(l for l in r.stdout.splitlines() if l.startswith("bound on"))
    bound = float(line.split(": ")[1].split(" nats/dim")[0])
    floor = float(next(l for l in r.stdout.splitlines() if l.startswith("exact")).split()[3])
    assert floor - 0.05 < bound < floor + 1.0  # above the true NLL (up to sampling noise), and not far
    assert "bits/dim" in line and "energy distance" in r.stdout


# ----------------------------------------------------------------------------------------------
# .npy data and bad inputs


def test_npy_train_sample_eval_and_stats_in_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(300, 3)) * np.array([5.0, 0.1, 1.0]) + np.array([10.0, -2.0, 0.0])
    path = tmp_path / "x.npy"
    np.save(path, arr)
    out = str(tmp_path / "run")
    common = ["--T=100", f"--out_dir={out}"]
    run_cli(["ddpm.py", "--train", f"--dataset={path}", "--max_iters=30", "--eval_interval=30", "--log_interval=10"] + common)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    train_rows = np.random.default_rng(0).permutation(300)[30:]  # the 90/10 split
    assert np.allclose(ckpt["meta"]["mean"], arr[train_rows].mean(0))
    assert np.allclose(ckpt["meta"]["std"], arr[train_rows].std(0))
    assert ckpt["meta"]["dim"] == 3 and ckpt["meta"]["data"] == str(path)
    r = run_cli(["ddpm.py", "--sample", "--eval", "--num_samples=50", "--eval_points=30", "--sampler=ddim", "--steps=5"] + common)
    assert np.load(os.path.join(out, "samples.npy")).shape == (50, 3)
    assert "bits/dim" in r.stdout
    with pytest.raises(SystemExit, match="--T is fixed by the checkpoint"):
        ddpm.main(["--sample", "--T=200", f"--out_dir={out}"])
    # the data too: another --dataset was ignored (the checkpoint's own was scored), and a file changed since
    # training was standardised with the old file's statistics, silently
    with pytest.raises(SystemExit, match="--dataset=two_moons: the model was trained on"):
        ddpm.main(["--eval", "--dataset=two_moons", f"--out_dir={out}"])
    moved = tmp_path / "moved.npy"
    os.rename(path, moved)  # moved: named by its new path, and recognised by its contents
    with pytest.raises(SystemExit, match="x.npy, the data the model was trained on, is not there; give its new path"):
        ddpm.main(["--eval", f"--out_dir={out}"])
    r = run_cli(["ddpm.py", "--eval", f"--dataset={moved}", "--eval_points=30"] + common)
    assert "bits/dim" in r.stdout
    np.save(moved, arr * 5 + 10)
    with pytest.raises(SystemExit, match="moved.npy has changed since the model was trained on it"):
        ddpm.main(["--eval", f"--out_dir={out}", f"--dataset={moved}"])
    np.save(moved, arr[:, :2])
    with pytest.raises(SystemExit, match="moved.npy has 2 dimensions but the checkpoint was trained on 3"):
        ddpm.main(["--eval", f"--out_dir={out}", f"--dataset={moved}"])
    with pytest.raises(SystemExit, match="--eta is the noise of DDIM, not of the ancestral sampler"):
        ddpm.main(["--sample", "--eta=1", f"--out_dir={out}"])
    np.save(moved, arr)
    with pytest.raises(SystemExit, match="--var is the ancestral sampler's variance; DDIM's noise is --eta"):  # it was ignored
        ddpm.main(["--sample", "--sampler=ddim", "--var=posterior", f"--out_dir={out}", f"--dataset={moved}"])
    ckpt = ddpm.common.load_checkpoint(os.path.join(out, "ckpt.pt"), "ddpm")  # an older run saved an eta its
    ckpt["config"].update(eta=0.5, sampler="ancestral")  # ancestral sampler never read: it still evaluates
    ddpm.common.save_checkpoint(os.path.join(out, "ckpt.pt"), ckpt)
    r = run_cli(["ddpm.py", "--eval", f"--dataset={moved}", "--eval_points=30"] + common)
    assert "bits/dim" in r.stdout


def test_eval_reports_the_bound_of_the_held_out_points_in_data_units(tmp_path, capsys):
    """--eval prints vlb's bound over the first --eval_points held-out points (seeded) in standardised nats per
    dimension, that plus the mean log std of the standardisation in data units, and that over ln 2 in bits."""
    out = str(tmp_path / "run")
    ddpm.main(["--train", "--dataset=two_moons", "--T=50", "--n_layer=1", "--n_embd=16", "--batch_size=32",
               "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--warmup_iters=1", f"--out_dir={out}"])
    capsys.readouterr()
    ddpm.main(["--eval", f"--out_dir={out}", "--eval_points=50", "--sampler=ddim", "--steps=5"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("bound on"))
    data_nats, bits, std_nats = (float(v) for v in re.search(r": (\S+) nats/dim = (\S+) bits/dim in data units \((\S+) "
                                                              r"nats/dim standardised", line).groups())
    cfg, model, data, betas, _ = ddpm.load({"out_dir": out})
    torch.manual_seed(cfg.seed)
    x0 = data.held_out[:50]
    bound = sum(ddpm.vlb(model, x0, betas, cfg.pred, cfg.var))
    assert std_nats == pytest.approx(float(bound.mean()) / 2, abs=1e-4)
    assert data_nats == pytest.approx(std_nats + float(torch.log(data.std).mean()), abs=2e-4)
    assert bits == pytest.approx(data_nats / math.log(2), abs=2e-4)


def test_one_dimensional_data_is_drawn_as_histograms(tmp_path):
    """save_png plotted dimensions 0 and 1: 1-D samples ended --sample in an IndexError."""
    x = torch.randn(200, 1)
    assert ddpm.save_png(str(tmp_path / "s.png"), x, x + 1, "samples", strip=[(10, x), (1, x)])
    assert (tmp_path / "s.png").stat().st_size > 0


def test_a_constant_dimension_is_drawn_without_a_warning(tmp_path):
    """A dimension that never varies gave matplotlib equal axis limits, and its 'singular transformation' warning."""
    x = torch.randn(200, 2)
    x[:, 1] = 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ddpm.save_png(str(tmp_path / "s.png"), x, x.clone(), "samples")
    assert (tmp_path / "s.png").stat().st_size > 0


# bad inputs go through main(argv), the CLI's own entry point, in-process (no interpreter start-up)


@pytest.mark.parametrize("case", ["3d", "complex", "nan", "missing", "text", "npz", "few"])
def test_bad_npy(tmp_path, case):
    path = tmp_path / "bad.npy"
    if case == "3d":
        np.save(path, np.zeros((40, 2, 2)))
    elif case == "complex":  # numpy's cast to float warned and dropped the imaginary parts
        np.save(path, np.ones((40, 2)) * (1 + 2j))
    elif case == "nan":
        arr = np.zeros((40, 2))
        arr[3, 1] = np.nan
        np.save(path, arr)
    elif case == "text":
        path.write_text("1,2\n3,4\n")
    elif case == "npz":  # numpy.savez under an .npy name: np.load gives an archive, not an array
        with open(path, "wb") as f:
            np.savez(f, x=np.zeros((40, 2)))
    elif case == "few":  # too few rows to hold out a tenth
        np.save(path, np.zeros((19, 2)))
    expected = {"3d": "expected a real array of shape (N, D)", "complex": "dtype complex128; expected a real array", "nan": "NaN or infinite values in 1 rows",
                "missing": "no file", "text": "not a readable .npy array", "npz": "is an .npz archive",
                "few": "has shape (19, 2); need at least 20 rows (N) and one column (D)"}[case]
    with pytest.raises(SystemExit, match=re.escape(expected)):
        ddpm.main(["--train", f"--dataset={path}", f"--out_dir={tmp_path}"])
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_constant_npy_column_is_left_unscaled(tmp_path):
    """A column with no spread is standardised with std 1 (its mean subtracted), not divided by 0 into NaN."""
    arr = np.random.default_rng(0).normal(size=(100, 2))
    arr[:, 1] = 3.0
    np.save(tmp_path / "c.npy", arr)
    data = ddpm.PointBatches(str(tmp_path / "c.npy"))
    assert float(data.std[1]) == 1.0 and torch.isfinite(data.get("train", 50)).all()
    assert (data.held_out[:, 1] == 0).all()


def test_linear_schedule_refuses_a_T_where_beta_T_reaches_1():
    """The scaled linear schedule ends at beta_T = 0.02 * 1000 / T: T = 20 gives beta_T = 1, alpha_bar_T = 0 and a
    chain of NaNs; T = 21 is the smallest it takes, and the cosine schedule clips beta at 0.999 for any T."""
    with pytest.raises(SystemExit, match="--T=20 is too small for the linear schedule"):
        ddpm.check_config(ddpm.Config(T=20))
    ddpm.check_config(ddpm.Config(T=21))
    ddpm.check_config(ddpm.Config(T=20, schedule="cosine"))


def test_unknown_toy_and_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="unknown toy 'nine_gaussians'; use one of eight_gaussians"):
        ddpm.main(["--train", "--dataset=nine_gaussians", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match=re.escape(f"ddpm.py --train --out_dir={tmp_path / 'nothing'}`")):  # its own folder
        ddpm.main(["--sample", f"--out_dir={tmp_path / 'nothing'}"])
    with pytest.raises(SystemExit, match="unknown --schedule='quadratic'"):
        ddpm.main(["--train", "--schedule=quadratic", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="unknown --pred='score'"):
        ddpm.main(["--train", "--pred=score", f"--out_dir={tmp_path}"])
