"""MDLM: forward-process properties, exactness on an enumerable toy, learning, samplers, CLI."""
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import common
import mdlm
from conftest import ROOT, fixed_batches, host_syncs, run_cli, terms_and_grads, write_toy_dataset

SCHEDULES = ["loglinear", "cosine"]


# ----------------------------------------------------------------------------------------------
# Forward process


@settings(max_examples=25, deadline=None)
@given(t=st.floats(0.02, 0.98), schedule=st.sampled_from(SCHEDULES), seed=st.integers(0, 2**31 - 1))
def test_masked_fraction_matches_one_minus_alpha(t, schedule, seed):
    g = torch.manual_seed(seed)
    x0 = torch.randint(0, 10, (64, 256), generator=g)
    cfg = mdlm.Config(schedule=schedule)
    xt = mdlm.q_sample(x0, torch.full((64,), t), 10, cfg)
    n = x0.numel()
    p = float(mdlm.mask_prob(torch.tensor(t), cfg))
    frac = (xt == 10).float().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9  # 5 sigma of the binomial
    kept = xt != 10
    assert torch.equal(xt[kept], x0[kept])  # unmasked tokens are unchanged


def test_training_times_take_one_draw_from_each_stratum():
    """MDLM's and SEDD's low-discrepancy times: the batch's i-th time lies in the i-th of B equal strata of
    [t_min, 1], the last one (the noisiest times) included."""
    B, t_min = 64, 1e-3
    torch.manual_seed(0)
    t = common.sample_times(B, t_min, "cpu")
    assert torch.equal(((t - t_min) / (1 - t_min) * B).floor().long(), torch.arange(B))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_monotone_with_endpoints(schedule):
    eps = 1e-3
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    a = 1 - mdlm.mask_prob(t, mdlm.Config(schedule=schedule, eps=eps))
    assert torch.all(a[1:] < a[:-1])
    assert a[0].item() == pytest.approx(1.0, abs=1e-12)
    assert a[-1].item() == pytest.approx(eps, abs=1e-12)


def test_defaults_are_the_papers():
    """The paper's settings, as docs/mdlm.md's flag table gives them: kappa = t_min = 1e-3, t_end = 1e-5, the log-linear
    schedule, no time conditioning, the cached ancestral sampler and the exact sampler's decoding controls."""
    cfg = mdlm.Config()
    assert (cfg.eps, cfg.t_min, cfg.t_end, cfg.schedule) == (1e-3, 1e-3, 1e-5, "loglinear")
    assert (cfg.time_cond, cfg.sampler, cfg.temperature, cfg.top_p) == (False, "ddpm_cache", 1.0, 1.0)


@settings(max_examples=40, deadline=None)
@given(t=st.floats(1e-3, 1.0), schedule=st.sampled_from(SCHEDULES))
def test_nelbo_weight_is_minus_alpha_prime_over_one_minus_alpha(t, schedule):
    tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    cfg = mdlm.Config(schedule=schedule)
    a = 1 - mdlm.mask_prob(tt, cfg)
    (da,) = torch.autograd.grad(a, tt)
    expected = (-da / (1 - a)).detach()
    w = mdlm.nelbo_weight(torch.tensor(t, dtype=torch.float64), cfg)
    assert float(w) == pytest.approx(expected.item(), rel=1e-9)
    if schedule == "loglinear":
        assert float(w) == pytest.approx(1 / t, rel=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mask_probability_and_time_input_keep_their_digits_near_zero(schedule):
    """1 - alpha_t and sigma_bar = -log alpha_t in fp32 at the smallest training times, against float64: written
    as 1 - alpha_t and log(alpha_t) they lost up to 2% (cosine) of a mask probability of about 1e-6."""
    cfg = mdlm.Config(schedule=schedule)
    t = torch.tensor([1e-5, 1e-4, 1e-3, 1e-2, 0.5, 1.0])
    exact = mdlm.mask_prob(t.double(), cfg)
    assert torch.allclose(exact, 1 - (1 - mdlm.mask_prob(t.double(), cfg)), rtol=1e-9)  # float64 needs no care
    assert torch.allclose(mdlm.mask_prob(t, cfg).double(), exact, rtol=1e-6, atol=0)
    small = t <= 0.5  # (near t = 1, alpha_t ~ eps carries fp32's rounding of t either way)
    assert torch.allclose(mdlm.sigma_bar(t, cfg).double()[small], -torch.log1p(-exact[small]), rtol=1e-6, atol=0)
    want = cfg.eps + (1 - cfg.eps) * torch.cos(torch.pi / 2 * t.double()) if schedule == "cosine" else 1 - (1 - cfg.eps) * t.double()
    assert torch.allclose(1 - exact, want, rtol=1e-12)  # alpha_t of the paper


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 9))
def test_subs_zero_mask_mass_and_carry_over(seed, V):
    g = torch.manual_seed(seed)
    logits = torch.randn(3, 7, V + 1, generator=g) * 3
    xt = torch.randint(0, V + 1, (3, 7), generator=g)
    before = logits.clone()
    p = mdlm.subs_log_probs(logits, xt, V).exp()
    assert torch.equal(logits, before)  # a pure function: the caller's [MASK] logit is not overwritten
    assert torch.all(p[..., V] == 0)  # zero masking
    assert torch.allclose(p.sum(-1), torch.ones(3, 7), atol=1e-6)
    unmasked = xt != V
    onehot = torch.nn.functional.one_hot(xt, V + 1).float()
    assert torch.equal(p[unmasked], onehot[unmasked])  # carry-over unmasking
    masked = ~unmasked  # the samplers' final noise removal takes the same argmax without building the law
    best = p.gather(-1, mdlm.most_likely(logits.clone(), V).unsqueeze(-1)).squeeze(-1)  # (a tie may pick either)
    assert torch.equal(best[masked], p.max(-1).values[masked])


@pytest.mark.parametrize("ddit", [False, True])
def test_an_untrained_model_predicts_the_uniform_law(ddit):
    """The zero-initialised head (and --ddit's head bias): before training p_theta(x_0 | x_t) is uniform over the V
    real tokens."""
    V = 5
    torch.manual_seed(0)
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=8, ddit=ddit, cond_dim=16)
    model = mdlm.build_model(cfg, {"vocab_size": V})
    xt = torch.tensor([[V, 0, V, 1, 2, V, V, 4]])
    p = mdlm.subs_log_probs(model(xt), xt, V).exp()[xt == V]
    assert torch.allclose(p, torch.tensor([1 / V] * V + [0.0]).expand(4, -1))


def test_a_time_conditioned_model_reads_its_time_input():
    """--time_cond feeds sigma_bar to adaLN: the same x_t at two times gives other logits; without it the time is
    ignored."""
    xt = torch.randint(0, 12, (2, 8), generator=torch.Generator().manual_seed(0))
    for time_cond in (False, True):
        model = random_model(mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=8, time_cond=time_cond))
        a, b = (model(xt, torch.full((2,), s)) for s in (0.1, 3.0))
        assert torch.equal(a, b) != time_cond


# ----------------------------------------------------------------------------------------------
# Exactness on an enumerable toy: vocabulary 3, length 3


class ExactDenoiser(torch.nn.Module):
    """p(x_0^l | x_t) computed by enumeration from a known data distribution over V^L sequences."""

    def __init__(self, probs, V, L):
        super().__init__()
        self.mask_id, self.time_cond, self.V = V, False, V
        self.seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))  # (K, L)
        self.probs = probs  # (K,)
        self.calls = 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, xt, sigma=None, rows=None):
        self.calls += 1
        consistent = ((xt[:, None, :] == self.mask_id) | (xt[:, None, :] == self.seqs[None])).all(-1)  # (B, K)
        w = consistent.double() * self.probs[None]
        onehot = torch.nn.functional.one_hot(self.seqs, self.V).double()  # (K, L, V)
        marg = torch.einsum("bk,klv->blv", w, onehot)
        marg = marg / marg.sum(-1, keepdim=True)
        logits = torch.cat([marg.log(), torch.zeros(*marg.shape[:2], 1, dtype=marg.dtype)], -1)
        logits = logits.float().clamp_min(-1e4)
        return logits if rows is None else logits[rows]


def toy_distribution(seed, V=3, L=3):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(V ** L, generator=g, dtype=torch.float64) ** 3  # skewed, no zeros
    return p / p.sum()


def test_sampler_with_exact_denoiser_reproduces_data():
    torch.manual_seed(0)
    V, L, n = 3, 3, 20000
    probs = toy_distribution(1)
    model = ExactDenoiser(probs, V, L)
    cfg = mdlm.Config(steps=400, sampler="ddpm")
    x = torch.full((n, L), V)
    samples, _ = mdlm.sample_chain(model, x, cfg)
    idx = (samples * torch.tensor([V * V, V, 1])).sum(-1)
    emp = torch.bincount(idx, minlength=V ** L).double() / n
    tv = 0.5 * (emp - probs).abs().sum().item()
    # sampling noise alone gives E[TV] ~ 0.5 * sum_k sqrt(2 p_k / (pi n)) ~ 0.013 here; the 400-step
    # grid adds the rare case of two positions revealed in one step (drawn independently): < 1%.
    noise = 0.5 * torch.sqrt(2 * probs / (math.pi * n)).sum().item()
    assert tv < 2 * noise + 0.01, (tv, noise)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_nelbo_is_not_below_true_nll(schedule):
    """With the exact denoiser the continuous-time bound is tight (every unmasking order is an
    exact chain rule), so its Monte Carlo estimate matches the NLL within noise; with a wrong
    denoiser it lies above."""
    torch.manual_seed(0)
    V, L = 3, 3
    probs = toy_distribution(2)
    exact = ExactDenoiser(probs, V, L)
    cfg = mdlm.Config(schedule=schedule, eps=0.0, t_min=1e-6)
    x0 = exact.seqs[torch.multinomial(probs, 40000, replacement=True)]
    true_nll = -(probs * probs.log()).sum().item()  # nats per sequence
    t = common.sample_times(x0.shape[0], cfg.t_min, "cpu")
    terms = mdlm.nelbo_terms(exact, x0, t, cfg, V).sum(-1).double()  # nats per sequence
    mean, se = terms.mean().item(), terms.std().item() / math.sqrt(len(terms))
    assert mean > true_nll - 4 * se
    assert abs(mean - true_nll) < 4 * se + 1e-3

    class Wrong(ExactDenoiser):  # a denoiser that ignores the data: uniform over tokens
        def forward(self, xt, sigma=None, rows=None):
            return torch.zeros(*xt.shape, V + 1) if rows is None else torch.zeros(len(rows[0]), V + 1)
    terms = mdlm.nelbo_terms(Wrong(probs, V, L), x0, t, cfg, V).sum(-1).double()
    assert terms.mean().item() > true_nll + 0.1


def full_head_nelbo_terms(model, x0, t, cfg, mask_id):
    """The reference: the head and the SUBS log-probabilities over every position (B, L, N)."""
    xt = mdlm.q_sample(x0, t, mask_id, cfg)
    logp = mdlm.subs_log_probs(model(xt, mdlm.sigma_bar(t, cfg)), xt, mask_id)
    return -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1) * mdlm.nelbo_weight(t, cfg)[:, None]


@pytest.mark.parametrize("time_cond", [False, True])
def test_gathered_head_matches_full_head(time_cond):
    """Running the head only on masked rows gives the full-head bound and gradients to float rounding."""
    V, B, L = 37, 4, 16
    cfg = mdlm.Config(n_layer=1, n_head=2, n_embd=32, block_size=L, dropout=0.0, time_cond=time_cond)
    torch.manual_seed(0)
    model = mdlm.build_model(cfg, {"vocab_size": V})
    torch.nn.init.normal_(model.head.weight, std=0.5)
    x0 = torch.randint(0, V, (B, L))
    t = torch.tensor([0.05, 0.3, 0.7, 1.0])
    losses, grads = terms_and_grads(model, (mdlm.nelbo_terms, full_head_nelbo_terms), x0, t, cfg, V)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert (losses[0] == 0).sum() > 0 and (losses[0] > 0).sum() > 0  # both kinds of position present
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_training_step_and_a_cached_sampling_step_wait_for_the_gpu_as_little_as_they_can():
    """Each host sync drains a GPU's queue. The loss picked its masked rows by a boolean mask, an implicit nonzero
    each time: 5 waits a training step; the cached sampler about 7 a step. Now one nonzero in the loss; per
    step of the sampler, the revealed rows' nonzero, the stale sequences' nonzero and the step's check of its
    arguments (the reveal probability is host arithmetic, counted here though it never waits)."""
    torch.manual_seed(0)
    cfg = mdlm.Config(n_layer=1, n_head=2, n_embd=32, block_size=16)
    model = mdlm.build_model(cfg, {"vocab_size": 11})
    x0 = torch.randint(0, 11, (4, 16))
    step = lambda: mdlm.loss_fn(model, x0, cfg, model.mask_id).backward()  # noqa: E731
    step()  # the kernels' first-use check, once per process
    assert host_syncs(step) == 1

    def chain(steps):  # 64 masks over 16 or 32 steps
        return mdlm.cached_chain(model, torch.full((4, 16), model.mask_id), dataclasses.replace(cfg, steps=steps))
    chain(16)
    waits = [host_syncs(lambda: chain(steps)) for steps in (16, 32)]
    assert waits[1] - waits[0] <= 4 * 16, waits


@pytest.mark.parametrize("t_min", [1e-3, 0.5])
def test_loss_is_the_mean_term_per_token_at_stratified_times(t_min):
    """loss_fn: nats per token, the mean of nelbo_terms over batch and positions, at sample_times(B, t_min)."""
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=16, t_min=t_min)
    model = random_model(cfg)
    x0 = torch.randint(0, 11, (8, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(2)
        loss = mdlm.loss_fn(model, x0, cfg, 11)
        torch.manual_seed(2)
        t = common.sample_times(8, t_min, "cpu")
        terms = mdlm.nelbo_terms(model, x0, t, cfg, 11)
    assert float(loss) == pytest.approx(float(terms.sum()) / x0.numel(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Samplers


def random_model(cfg, V=11):
    """Every weight random, the residual gates too: at their zero init each position's logits depend on its own
    token alone, and a sampler reusing a stale network output would go unseen."""
    torch.manual_seed(0)
    model = mdlm.build_model(cfg, {"vocab_size": V}).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # a spread law: the draws differ where the logits do
    return model


@pytest.mark.parametrize("sampler", ["ddpm", "confidence"])
def test_a_time_conditioned_model_is_told_each_steps_time(sampler):
    """sample_chain hands the network sigma_bar of the step's own time t (not the next one, s), and t_end
    to the final noise removal; ExactDenoiser and the unconditioned models ignore it."""
    cfg = mdlm.Config(steps=5, sampler=sampler, t_end=0.2)
    V, L, seen = 4, 3, []

    class Stub(torch.nn.Module):
        mask_id = V

        def forward(self, xt, sigma):
            seen.append(sigma)
            return torch.zeros(*xt.shape, V + 1)  # uniform: tokens revealed at random, some left at t_end

    torch.manual_seed(0)
    mdlm.sample_chain(Stub(), torch.full((64, L), V), cfg)
    grid = mdlm.time_grid(cfg.steps, cfg.t_end).tolist()
    want = [float(mdlm.sigma_bar(torch.tensor(t, dtype=torch.float64), cfg)) for t in grid[:-1] + [cfg.t_end]]
    got = [float(s[0]) for s in seen]
    assert all(torch.equal(s, s[:1].expand_as(s)) for s in seen)  # one time for the whole batch
    if sampler == "ddpm":
        assert got == pytest.approx(want)
    else:  # reused while the batch does not change: a subsequence of the step times
        assert got[0] == pytest.approx(want[0]) and all(g in [pytest.approx(w) for w in want] for g in got)


@pytest.mark.parametrize("method", ["mdlm", "sedd"])
@pytest.mark.parametrize("k", [1, 4])
def test_evaluate_averages_over_tokens_and_time_samples(method, k, monkeypatch):
    """evaluate() divides the summed terms by the eval_t_samples repeats and the tokens: a model whose every
    term is 1 nat scores 1 nat per token (plus SEDD's prior term), whatever k and the last batch's size. The k
    repeats of a batch go one at a time (one batch of scores in memory), their times one in each of k B strata."""
    import importlib
    M = importlib.import_module(method)
    cfg = M.Config(n_layer=1, n_embd=32, n_head=2, block_size=8, batch_size=3, eval_t_samples=k)
    model, seen, times = M.build_model(cfg, {"vocab_size": 5}), [], []

    def terms(model, xs, t, cfg, mask_id):
        seen.append((xs.shape[0], t.shape[0]))
        times.append(t)
        return torch.ones(xs.shape)

    monkeypatch.setattr(M, "nelbo_terms", terms)
    prior = M.prior_kl(cfg, model.num_states) if method == "sedd" else 0.0
    windows = fixed_batches(torch.zeros(3, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))  # a short last one
    assert M.evaluate(model, windows, cfg, full=True)["val_nelbo"] == pytest.approx(1.0 + prior)
    assert seen == [(3, 3)] * k + [(2, 2)] * k
    u = (torch.cat(times[:k]) - cfg.t_min) / (1 - cfg.t_min)  # the first batch's k B times, back on [0, 1)
    assert sorted((u * 3 * k).floor().long().tolist()) == list(range(3 * k))


def test_evaluate_during_training_takes_one_stratified_time_per_window_in_eval_mode(monkeypatch):
    """Without full (the evaluations during training): eval_iters random batches of batch_size windows, one time
    each from sample_times(B, t_min) (--eval_t_samples is --eval's), and the model in eval mode (no dropout)."""
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=8, batch_size=3, eval_iters=2, eval_t_samples=4,
                      t_min=0.5, dropout=0.1)
    model, seen = mdlm.build_model(cfg, {"vocab_size": 5}), []

    def terms(model, xs, t, cfg, mask_id):
        seen.append((xs.shape[0], t, model.training))
        return t[:, None].expand(xs.shape)  # each window's time in nats per token

    monkeypatch.setattr(mdlm, "nelbo_terms", terms)
    torch.manual_seed(0)
    want = [common.sample_times(3, 0.5, "cpu") for _ in range(2)]
    torch.manual_seed(0)
    nats = mdlm.evaluate(model.train(), fixed_batches(torch.zeros(3, 8, dtype=torch.long)), cfg)["val_nelbo"]
    assert [(n, training) for n, _, training in seen] == [(3, False), (3, False)]
    assert all(torch.equal(t, w) for (_, t, _), w in zip(seen, want))
    assert nats == pytest.approx(float(torch.cat(want).mean()))


def test_word_overlap_is_the_share_of_known_words_and_zero_without_words():
    """--eval's spelling statistic: the share of the samples' words found in the training text; samples without a
    word (punctuation only) score 0 of 0 words rather than dividing by zero."""
    assert mdlm.word_overlap(["the cat sat", "on zzq!"], "the cat, on a mat") == (3 / 5, 5)
    assert mdlm.word_overlap(["?! ..", ""], "the cat") == (0.0, 0)


def test_cached_sampler_matches_uncached_with_fewer_calls():
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=24, steps=100)
    model = random_model(cfg)
    fixed = torch.full((24,), -1)
    for batch in (1, 4):
        out = {}
        for sampler in ("ddpm", "ddpm_cache"):
            torch.manual_seed(123)
            out[sampler] = mdlm.generate(model, dataclasses.replace(cfg, sampler=sampler), fixed, batch)
        assert torch.equal(out["ddpm"][0], out["ddpm_cache"][0])
        # a call is needed only after a step that changed some sequence of the batch
        assert out["ddpm"][1] == 100 and out["ddpm_cache"][1] <= min(100, batch * 24 + 1)
        if batch == 1:
            assert out["ddpm_cache"][1] <= 25


def backbone_rows(model):
    """A counter of the sequence positions the backbone evaluates: rows[0] grows on each call."""
    rows = [0]
    model.backbone.register_forward_pre_hook(lambda m, args: rows.__setitem__(0, rows[0] + args[0].numel()))
    return rows


@pytest.mark.parametrize("controls", [{}, {"temperature": 0.7, "top_p": 0.8}])
def test_per_sequence_cache_gives_the_same_states_with_fewer_rows(controls):
    """ddpm_cache (head at the revealed rows, backbone on the changed sequences) against the
    uncached ddpm: identical states after every step for the same seed, with infill positions,
    semi-autoregressive rounds and decoding controls, and fewer backbone rows."""
    cfg = mdlm.Config(n_layer=2, n_embd=32, n_head=2, block_size=16, steps=40, stride=6, **controls)
    model = random_model(cfg)
    fixed = torch.full((30,), -1)
    fixed[[0, 5, 17, 29]] = torch.tensor([1, 2, 3, 4])
    for batch in (1, 5):
        out, rows = {}, backbone_rows(model)
        for sampler in ("ddpm", "ddpm_cache"):
            states, rows[0] = [], 0
            torch.manual_seed(7)
            samples, calls = mdlm.generate(model, dataclasses.replace(cfg, sampler=sampler), fixed, batch,
                                           lambda i, x: states.append(x.clone()))
            out[sampler] = samples, states, rows[0]
        assert torch.equal(out["ddpm"][0], out["ddpm_cache"][0])
        assert len(out["ddpm"][1]) == len(out["ddpm_cache"][1]) == 4 * 40  # 16 positions, then rounds of 6, 6, 2
        assert all(torch.equal(a, b) for a, b in zip(out["ddpm"][1], out["ddpm_cache"][1]))
        assert out["ddpm_cache"][2] < out["ddpm"][2] / 2
        assert torch.equal(out["ddpm"][0][:, fixed >= 0], fixed[fixed >= 0].expand(batch, -1))


def test_confidence_reuses_the_output_only_while_no_sequence_changed(monkeypatch):
    """--sampler=confidence keeps the network output across steps that change no sequence of the batch: the same
    tokens as the chain that calls the network at every step (ddpm's loop with the confidence step)."""
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=16, steps=100, sampler="confidence")
    model, x = random_model(cfg), torch.full((6, 16), 11)
    torch.manual_seed(5)
    cached, calls = mdlm.sample_chain(model, x, cfg)
    monkeypatch.setattr(mdlm, "ancestral_step", mdlm.confidence_step)
    torch.manual_seed(5)
    fresh, every = mdlm.sample_chain(model, x, dataclasses.replace(cfg, sampler="ddpm"))
    assert torch.equal(cached, fresh) and calls < every


def test_per_sequence_cache_ends_unmasked_with_the_argmax():
    """Few steps leave masks for the final noise removal: the same argmax at the same rows."""
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=24, steps=3)
    model = random_model(cfg)
    out = {}
    for sampler in ("ddpm", "ddpm_cache"):
        torch.manual_seed(3)
        out[sampler] = mdlm.generate(model, dataclasses.replace(cfg, sampler=sampler), torch.full((24,), -1), 6)[0]
    assert torch.equal(out["ddpm"], out["ddpm_cache"]) and (out["ddpm"] < 11).all()


@pytest.mark.parametrize("sampler", mdlm.SAMPLERS)
def test_masks_left_at_t_end_take_the_argmax_at_the_last_state(sampler):
    """From t_end = 0.5 many positions are still masked after the last step: the final noise removal fills each with
    the argmax of p_theta(x_0 | x_S) at the last state x_S, and changes nothing else."""
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=16, steps=4, t_end=0.5, sampler=sampler)
    model, states = random_model(cfg), []
    torch.manual_seed(0)
    out, _ = mdlm.sample_chain(model, torch.full((3, 16), 11), cfg, lambda i, x: states.append(x.clone()))
    last = states[-1]
    left = last == 11
    with torch.no_grad():
        want = model(last)[..., :11].argmax(-1)
    assert left.any() and torch.equal(out[~left], last[~left]) and torch.equal(out[left], want[left])


def test_ddpm_calls_the_network_at_t_end_for_the_final_noise_removal():
    """ddpm's final noise removal is one more call, at t_end, also after a last step that changed nothing: a
    time-conditioned model's output at the last step's time is not its output at t_end."""
    cfg = mdlm.Config(steps=3, sampler="ddpm", t_end=0.9)
    V, seen, states = 4, [], []

    class Stub(torch.nn.Module):
        mask_id = V

        def forward(self, xt, sigma):
            seen.append(float(sigma[0]))
            return torch.zeros(*xt.shape, V + 1)

    torch.manual_seed(0)
    out, calls = mdlm.sample_chain(Stub(), torch.full((1, 2), V), cfg, lambda i, x: states.append(x.clone()))
    assert torch.equal(states[-1], torch.full((1, 2), V))  # masks left, the last step revealed none
    want = [float(mdlm.sigma_bar(torch.tensor(t, dtype=torch.float64), cfg)) for t in (1.0, 29 / 30, 28 / 30, 0.9)]
    assert calls == 4 and seen == pytest.approx(want) and (out < V).all()


def test_per_sequence_cache_reruns_only_the_sequences_that_changed():
    """ddpm_cache refreshes the backbone on the sub-batch of sequences changed since: one with nothing masked runs
    once, in the first call, and the other in every call."""
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=16, steps=20)
    model = random_model(cfg)
    rows = backbone_rows(model)
    x = torch.full((2, 16), 11)
    x[0] = torch.arange(16) % 11
    torch.manual_seed(0)
    out, calls = mdlm.sample_chain(model, x, cfg)
    assert torch.equal(out[0], x[0]) and (out[1] < 11).all() and calls > 2 and rows[0] == 16 * (calls + 1)


def test_conditioning_and_semi_autoregressive():
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=16, steps=20, stride=6)
    model = random_model(cfg)
    fixed = torch.full((40,), -1)
    fixed[:3] = torch.tensor([1, 2, 3])
    fixed[20] = 7  # an infill position in a later round
    fixed[-2:] = torch.tensor([4, 5])
    samples, calls = mdlm.generate(model, cfg, fixed, 3)
    assert samples.shape == (3, 40) and (samples < 11).all()  # no [MASK] left
    keep = fixed >= 0
    assert torch.equal(samples[:, keep], fixed[keep].expand(3, -1))


def test_generate_frees_only_the_minus_one_positions_and_strides_half_a_block(monkeypatch):
    """generate() hands each chain [MASK] exactly at the -1 positions (a fixed id 0 is held like any other),
    and with --stride=0 every round after the first generates block_size // 2 new tokens."""
    cfg = mdlm.Config(n_layer=1, n_embd=32, n_head=2, block_size=16)
    model, canvases = random_model(cfg), []

    def chain(model, x, cfg, show=None):
        canvases.append(x.clone())
        return torch.where(x == model.mask_id, 1, x), 1

    monkeypatch.setattr(mdlm, "sample_chain", chain)
    fixed = torch.full((40,), -1)
    fixed[[0, 3, 20]] = torch.tensor([0, 2, 0])
    out, _ = mdlm.generate(model, cfg, fixed, 2)
    assert torch.equal(canvases[0][0], torch.where(fixed[:16] >= 0, fixed[:16], 11))
    assert [int((c[0] == 11).sum()) for c in canvases] == [14, 7, 8, 8]  # rounds of 8 new tokens; 20 is held
    assert torch.equal(out[:, [0, 3, 20]], torch.tensor([[0, 2, 0]] * 2)) and (out != 11).all()


def test_ancestral_step_unmask_probability():
    """The two-stage step reveals a masked token with probability (alpha_s - alpha_t)/(1 - alpha_t)."""
    torch.manual_seed(0)
    cfg = mdlm.Config()
    t, s = 0.5, 0.45
    p = mdlm.unmask_probability(t, s, cfg)
    assert p == pytest.approx((t - s) / t, rel=1e-12)  # log-linear
    n = 200000
    xt = torch.full((1, n), 5)
    u = torch.rand(1, n, 2, dtype=torch.float64)
    x = mdlm.ancestral_step(torch.zeros(1, n, 6), xt, torch.tensor([p], dtype=torch.float64), u, 5)
    frac = (x != 5).double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_unmask_probability_follows_the_schedule(schedule):
    """P(revealed between t and s) = (alpha_s - alpha_t) / (1 - alpha_t), alpha_t written out from the paper."""
    eps = 1e-3
    alpha = {"loglinear": lambda t: 1 - (1 - eps) * t,
             "cosine": lambda t: eps + (1 - eps) * math.cos(math.pi / 2 * t)}[schedule]
    cfg = mdlm.Config(schedule=schedule, eps=eps)
    for t, s in ((1.0, 0.9), (0.5, 0.45), (0.02, 1e-5)):
        assert mdlm.unmask_probability(t, s, cfg) == pytest.approx((alpha(s) - alpha(t)) / (1 - alpha(t)), rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Learning: a toy language whose validity is checkable

WORDS = ["cat", "dog", "owl", "emu", "yak", "bee"]  # fixed length: the structure is learnable in a minute
TOY_CHARS = sorted(set(" " + "".join(WORDS)))


def toy_corpus(n_words, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = [WORDS[i] for i in torch.randint(len(WORDS), (n_words,), generator=g).tolist()]
    text = " ".join(words)
    stoi = {c: i for i, c in enumerate(TOY_CHARS)}
    return [stoi[c] for c in text]


def valid_fraction(text):
    """Share of the complete words (strictly inside the window) that are in the dictionary."""
    words = text.split(" ")[1:-1]
    return sum(w in WORDS for w in words) / max(1, len(words))


def test_learns_toy_language(tmp_path):
    data = write_toy_dataset(tmp_path / "toy", [toy_corpus(40000)], TOY_CHARS)
    out = tmp_path / "out"
    args = ["mdlm.py", "--train", "--sample", f"--data_dir={data}", f"--out_dir={out}", "--n_layer=2", "--n_embd=64",
            "--n_head=2", "--block_size=32", "--batch_size=32", "--max_iters=1000", "--lr=2e-3", "--warmup_iters=20",
            "--eval_interval=1000", "--log_interval=500", "--num_samples=16", "--steps=128"]
    r = run_cli(args)
    texts = r.stdout.split("=== sample ")[1:]
    texts = [t.split("\n", 1)[1].split("\n(")[0].rstrip("\n") for t in texts]
    assert len(texts) == 16
    score = sum(valid_fraction(t) for t in texts) / len(texts)
    # chance: random characters almost never spell one of five words
    rand = torch.randint(len(TOY_CHARS), (16, 32), generator=torch.Generator().manual_seed(0))
    chance = sum(valid_fraction("".join(TOY_CHARS[i] for i in row)) for row in rand.tolist()) / 16
    # about 20 s on 2 cores; 1000 iterations because the zero-init residual gates make the first few
    # hundred slower; measured 0.66 (seeds 1 and 2: 0.53, 0.56); chance ~0.003
    assert score > 0.4 and chance < 0.02, (score, chance, texts[:3])


# ----------------------------------------------------------------------------------------------
# CLI, bad inputs, checkpoints

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4", "--log_interval=1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("mdlm_tiny")
    run_cli(["mdlm.py", "--train", f"--data_dir={char_data}", f"--out_dir={out}", "--max_iters=6",
             "--eval_interval=3", "--eval_iters=2"] + TINY)
    return str(out), char_data


def test_cli_train_sample_eval(tiny_run):
    out, data = tiny_run
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={out}", "--prefix=ROMEO:", "--suffix=end.", "--steps=16",
                 "--num_samples=2"])
    samples = [s.split("\n", 1)[1] for s in r.stdout.split("=== sample ")[1:]]
    assert len(samples) == 2
    assert all(s.startswith("ROMEO:") for s in samples)
    assert all(s.split("\n(")[0].rstrip("\n").endswith("end.") for s in samples)
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={out}", "--seq_len=80", "--steps=8", "--num_samples=1"])
    assert len(r.stdout.split("=== sample 0\n")[1].split("\n(")[0]) == 80  # semi-autoregressive, 65 chars + no masks
    r = run_cli(["mdlm.py", "--eval", f"--out_dir={out}", f"--data_dir={data}", "--eval_t_samples=1", "--steps=8"])
    assert "nats/token" in r.stdout and "generated words occur in the training text" in r.stdout
    nats = float(r.stdout.split("val NELBO ")[1].split()[0])
    assert 0 < nats < 6
    with open(os.path.join(out, "log.jsonl")) as f:
        assert any("eval_full" in json.loads(line) for line in f)


def test_a_time_conditioned_model_samples_with_the_defaults(char_data, tmp_path):
    """--time_cond trains with the default sampler saved (ddpm_cache, which reuses outputs such a model cannot);
    --sample and --eval then take the ddpm sampler where they refused until --sampler=ddpm was given."""
    run_cli(["mdlm.py", "--train", "--time_cond", f"--data_dir={char_data}", f"--out_dir={tmp_path}", "--max_iters=2",
             "--eval_iters=1"] + TINY)
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={tmp_path}", "--steps=4", "--num_samples=1"])
    assert "=== sample 0" in r.stdout
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={tmp_path}", "--steps=4", "--sampler=ddpm_cache"], check=False)
    assert r.returncode == 1 and "use --sampler=ddpm" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--train", "--lerning_rate=1"], "unknown config key --lerning_rate"),
    (["--train", "--lr=abc"], "--lr takes a number, not 'abc'"),
    (["--train", "--max_iters=1e3"], "--max_iters takes a whole number, not '1e3'"),  # it said "takes a int"
    (["--train", "--dataset=nosuch"], "no data/nosuch/prepare.py"),
    (["--sample", "--out_dir=/nonexistent/x"], "python mdlm.py --train"),
    (["--eval", "--out_dir=/nonexistent/x"], "no checkpoint"),
    (["--sample", "--sampler=nosuch"], "unknown --sampler"),
])
def test_bad_inputs(args, message, tiny_run):
    out, _ = tiny_run
    if "--sampler=nosuch" in args:
        args = args + [f"--out_dir={out}"]
    r = run_cli(["mdlm.py"] + args, check=False)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_help_lists_verbs_and_keys():
    r = run_cli(["mdlm.py", "--help"])
    assert "--train" in r.stdout and "--lr=" in r.stdout and "--sampler='ddpm_cache'" in r.stdout


def test_bad_conditioning(tiny_run):
    out, _ = tiny_run
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={out}", "--prefix=caf\u00e9"], check=False)
    assert r.returncode != 0 and "outside the model's 65-character vocabulary" in r.stderr
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={out}", "--prefix=" + "a" * 20, "--suffix=" + "b" * 20], check=False)
    assert r.returncode != 0 and "more than the 32-token sequence" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={out}", "--infill=" + "ab" * 20], check=False)
    assert r.returncode == 1 and r.stderr.strip().endswith("mark each free position with '_'") and "Traceback" not in r.stderr
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={out}", "--infill=_RO_EO:\\n__", "--steps=8", "--num_samples=2", "--show"])
    samples = [s.split("\n", 1)[1][:9] for s in r.stdout.split("=== sample ")[1:]]
    assert len(samples) == 2 and all(s[1:3] == "RO" and s[4:7] == "EO:" and s[7] == "\n" and "_" not in s for s in samples), samples
    assert "--- step 1/8" in r.stdout


def test_corrupt_checkpoint_is_reported(tiny_run, tmp_path):
    out, _ = tiny_run
    bad = tmp_path / "bad"
    bad.mkdir()
    data = open(os.path.join(out, "ckpt.pt"), "rb").read()
    (bad / "ckpt.pt").write_bytes(data[: len(data) // 2])
    r = run_cli(["mdlm.py", "--sample", f"--out_dir={bad}"], check=False)
    assert r.returncode != 0 and "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_run, tmp_path):
    out, data = tiny_run
    run_dir = tmp_path / "nan"
    run_dir.mkdir()
    (run_dir / "ckpt.pt").write_bytes(open(os.path.join(out, "ckpt.pt"), "rb").read())
    before = (run_dir / "ckpt.pt").read_bytes()
    r = run_cli(["mdlm.py", "--train", "--resume", f"--data_dir={data}", f"--out_dir={run_dir}", "--max_iters=40",
                 "--eval_interval=100", "--lr=1e30", "--warmup_iters=0", "--grad_clip=0"] + TINY, check=False)
    assert r.returncode != 0 and "at iteration" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (run_dir / "ckpt.pt").read_bytes() == before  # the last good checkpoint is intact
    torch.load(run_dir / "ckpt.pt", weights_only=True)


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_resume_reproduces_uninterrupted_run(tmp_path, char_data):
    common_args = ["mdlm.py", "--train", f"--data_dir={char_data}", "--lr_decay_iters=10", "--eval_interval=5",
                   "--eval_iters=1", "--dropout=0.1",
                   "--device=cpu"] + TINY  # bitwise: a GPU's attention backward is not deterministic
    run_cli(common_args + [f"--out_dir={tmp_path / 'full'}", "--max_iters=10"])
    run_cli(common_args + [f"--out_dir={tmp_path / 'part'}", "--max_iters=5"])
    run_cli(common_args + [f"--out_dir={tmp_path / 'part'}", "--max_iters=10", "--resume"])
    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(part) == list(range(10))
    assert all(full[i] == part[i] for i in range(10)), (full, part)
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)
    for part in ("model", "ema"):  # the averaged weights too, which --sample and --eval read
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def torchrun(*args):
    """torchrun over two CPU processes (gloo), one thread each, from the repository root."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path, char_data):
    out = tmp_path / "ddp"
    r = torchrun(os.path.join(ROOT, "tests", "ddp_worker.py"), str(out), char_data)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    w0 = torch.load(out / "rank0.pt", weights_only=True)
    w1 = torch.load(out / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0["model"][k], w1["model"][k]) for k in w0["model"])
    assert not torch.equal(w0["first_batch"], w1["first_batch"])  # each rank trains on its own data stream
    logged = [json.loads(line) for line in open(out / "log.jsonl")]
    loss0 = next(r["loss"] for r in logged if r.get("iter") == 0 and "loss" in r)
    assert loss0 == pytest.approx((w0["first_loss"] + w1["first_loss"]) / 2, rel=1e-5)  # the step's whole batch
    assert os.path.isfile(out / "ckpt.pt")


def test_ddp_overwrite_starts_over_and_a_second_run_without_it_is_refused(tmp_path, char_data):
    """Under torchrun (gloo, two CPU processes): a run into a folder with a checkpoint is refused on every rank
    and leaves it as it was; --overwrite replaces checkpoint and log with the new run's, whose first
    checkpoint the held log records join."""
    out = tmp_path / "ddp"

    def train(*extra):
        return torchrun("mdlm.py", "--train", f"--out_dir={out}", f"--data_dir={char_data}", "--device=cpu", "--n_layer=1",
                        "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=2", "--eval_iters=1",
                        "--log_interval=1", "--warmup_iters=1", *extra)

    def records():
        return [json.loads(line) for line in open(out / "log.jsonl")]

    r = train("--max_iters=3", "--eval_interval=3")
    assert r.returncode == 0, r.stderr[-3000:]
    first = (out / "ckpt.pt").read_bytes()
    r = train("--max_iters=2", "--eval_interval=2")
    assert r.returncode != 0 and "holds a checkpoint of an earlier run" in r.stderr, r.stderr[-3000:]
    assert (out / "ckpt.pt").read_bytes() == first and max(x["iter"] for x in records()) == 2
    r = train("--max_iters=5", "--eval_interval=5", "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 4
    logged = records()
    assert [x["iter"] for x in logged if "loss" in x] == [0, 1, 2, 3, 4] and [x["iter"] for x in logged if "eval" in x] == [4]
    # resumed by one process: each step now trains on half the batch, which the run says (it went on silently)
    r = run_cli(["mdlm.py", "--train", "--resume", f"--out_dir={out}", "--max_iters=6", "--eval_interval=6"])
    assert "was trained by 2 process(es), this run has 1: a step's batch is 1 x 2 x 1 " in r.stdout, r.stdout
    assert "was 2 x 2 x 1" in r.stdout and "fresh random streams" not in r.stdout
