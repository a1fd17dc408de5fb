"""Fused kernels (csrc/, CPU): parity with the PyTorch oracles in sedd.py, mdlm.py and common.py (each
marked function's .oracle), gradients, exact samples for the same uniforms, sampled distributions, input
checks, the first-use self-check, the DIFFLM_KERNELS=0 and failed-build fallbacks, and training and
sampling that agree with and without the kernels.

The first test to ask for the kernels JIT-builds them (~10 s on 2 cores, then cached)."""
import contextlib
import math
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import ar
import common
import corpus
import difflm_ops
import mdlm
import sedd
import trainer
from conftest import ROOT, write_toy_dataset
from test_sedd import CHARS, toy_language

GRAPHS = ("absorb", "uniform")
DTYPES = (torch.float32, torch.bfloat16)
# (B, L, V): odd sizes, V = 1, a row long enough for several vector blocks and CDF blocks
SHAPES = [(1, 1, 1), (2, 3, 1), (3, 5, 6), (2, 7, 65), (3, 4, 1031), (1, 3, 5003)]


@pytest.fixture(scope="module")
def k():
    ops = difflm_ops.load()
    assert ops is not None, "the kernels did not build (see the warning above); the fused path is untested"
    return ops


def inputs(graph, B, L, V, dtype, gen, masked=0.5, scale=2.0):
    """Random log-scores (B, L, N) and states: a fraction `masked` of absorbing rows at MASK; x0 != MASK;
    uniform rows with x = x0 about half the time."""
    N = V + 1 if graph == "absorb" else V
    ls = (torch.randn(B, L, N, generator=gen) * scale).to(dtype)
    if graph == "absorb":
        x0 = torch.randint(V, (B, L), generator=gen)
        xt = torch.where(torch.rand(B, L, generator=gen) < masked, N - 1, x0)
    else:
        xt = torch.randint(N, (B, L), generator=gen)
        x0 = torch.where(torch.rand(B, L, generator=gen) < 0.5, xt, torch.randint(N, (B, L), generator=gen))
    sigma_bar = torch.rand(B, generator=gen) * 4 + 1e-3
    return ls, xt, x0, sigma_bar


def fresh_gen():
    g = torch.Generator()
    g.manual_seed(int(torch.randint(2**31, ())))  # fresh inputs each run; the seed is in the failure message
    return g, g.initial_seed()


# ----------------------------------------------------------------------------------------------
# score entropy: loss and gradient


@pytest.mark.parametrize("graph,masked", [("absorb", 0.5), ("absorb", 0.0), ("absorb", 1.0), ("uniform", 0.5)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", ["two_pass", "fused"])
def test_score_entropy_matches_oracle_and_autograd(k, graph, masked, dtype, shape, path):
    """two_pass: score_entropy reads, its backward recomputes; fused: score_entropy_with_grad writes
    the gradient in the loss's pass and backward scales it (what sedd.py uses on the CPU)."""
    gen, seed = fresh_gen()
    ls, xt, x0, sb = inputs(graph, *shape, dtype, gen, masked=masked)
    w = torch.rand(shape[:2], generator=gen) + 0.5  # an upstream gradient that is not all ones

    ref_ls = ls.clone().requires_grad_()
    ref = sedd.score_entropy.oracle(ref_ls, xt, x0, sb, graph)
    (ref * w).sum().backward()
    got_ls = ls.clone().requires_grad_()
    fn = k.score_entropy if path == "two_pass" else lambda *a: k.score_entropy_with_grad(*a)[0]
    loss = fn(got_ls, xt, x0, sb, graph)
    (loss * w).sum().backward()

    assert loss.dtype == torch.float32 and loss.shape == shape[:2]
    assert got_ls.grad.dtype == dtype
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-5, msg=lambda m: f"seed {seed}: {m}")
    # bf16 gradients are rounded once more than the oracle's (written, then scaled): 2 ulp
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(got_ls.grad.float(), ref_ls.grad.float(), **tol, msg=lambda m: f"seed {seed}: {m}")
    if graph == "absorb":  # unmasked rows and the MASK column cost nothing and get nothing
        assert (loss[xt != ls.shape[-1] - 1] == 0).all()
        assert (got_ls.grad[xt != ls.shape[-1] - 1] == 0).all() and (got_ls.grad[..., -1] == 0).all()


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_shift_is_the_log_scores_it_stands_for(k, graph, dtype):
    """score_entropy(h, ..., shift) is score_entropy(h - shift in fp32, ...): the same loss and the same fp32
    gradient, bit for bit, and for a bf16 h that gradient rounded to bf16 once. So SEDD's loss may pass its bf16
    head output and the fp32 offset, and keep no fp32 copy of the (B, L, N) scores."""
    gen, seed = fresh_gen()
    h, xt, x0, sb = inputs(graph, 3, 5, 41, dtype, gen)
    shift = torch.rand(3, generator=gen) * 16 - 2
    ls = h.float() - shift[:, None, None]  # (B, L, N) fp32: the log-scores
    w = torch.rand(3, 5, generator=gen) + 0.5
    assert torch.equal(k.score_entropy(h, xt, x0, sb, graph, shift), k.score_entropy(ls, xt, x0, sb, graph)), seed
    grad = k.score_entropy_backward(w, h, xt, x0, sb, graph, shift)
    assert grad.dtype == dtype and torch.equal(grad, k.score_entropy_backward(w, ls, xt, x0, sb, graph).to(dtype)), seed
    loss, grad_sum = k.score_entropy_with_grad(h, xt, x0, sb, graph, shift)
    assert torch.equal(loss, k.score_entropy(ls, xt, x0, sb, graph))
    assert torch.equal(grad_sum, k.score_entropy_with_grad(ls, xt, x0, sb, graph)[1].to(dtype)), seed
    # the marked function: kernel and oracle agree with a shift, and a shift that is not one per sequence is refused
    # on both paths (the oracle alone would broadcast it)
    torch.testing.assert_close(sedd.score_entropy(h, xt, x0, sb, graph, shift),
                               sedd.score_entropy.oracle(h, xt, x0, sb, graph, shift), rtol=2e-5, atol=2e-5)
    for path in (contextlib.nullcontext, difflm_ops.oracles_only):
        with path(), pytest.raises(ValueError, match=r"shift must have shape \(B,\) = \(3,\), one value per sequence"):
            sedd.score_entropy(h, xt, x0, sb, graph, shift[:1])


@pytest.mark.parametrize("graph", GRAPHS)
def test_a_bf16_loss_allocates_its_gradient_and_little_more(k, graph):
    """Forward and backward from a bf16 head output and its shift allocate the bf16 gradient and fp32 work for a
    block of rows at a time (the CPU's backward scales the gradient that the loss's pass wrote: one mul_ by the
    fp32 upstream gradient made two fp32 copies of all of it). The fp32 log-scores that SEDD.forward makes cost
    2 units of the bf16 output, and their gradient 2 more."""
    import bench
    gen, _ = fresh_gen()
    h, xt, x0, sb = inputs(graph, 16, 256, 4098, torch.bfloat16, gen, masked=1.0)
    h.requires_grad_()
    shift = torch.rand(16, generator=gen) * 16 - 2

    def peak(loss):
        h.grad = None

        def step():
            (loss() * (sb[:, None] + 1)).sum().backward()  # an upstream gradient that is not all ones
            return h.grad
        return bench._peak_extra_bytes(step, torch.device("cpu")) / (h.numel() * h.element_size())

    ours = peak(lambda: sedd.score_entropy(h, xt, x0, sb, graph, shift))
    fp32 = peak(lambda: sedd.score_entropy(h.float() - shift[:, None, None], xt, x0, sb, graph))
    assert ours < 1.5 and fp32 >= 4, (ours, fp32)


def test_score_entropy_with_grad_is_the_loss_and_the_gradient_of_its_sum(k):
    gen, _ = fresh_gen()
    for graph in GRAPHS:
        ls, xt, x0, sb = inputs(graph, 3, 5, 11, torch.float32, gen)
        loss, grad = k.score_entropy_with_grad(ls, xt, x0, sb, graph)
        assert torch.equal(loss, k.score_entropy(ls, xt, x0, sb, graph))
        torch.testing.assert_close(grad, k.score_entropy_backward(torch.ones(3, 5), ls, xt, x0, sb, graph),
                                   rtol=0, atol=0)
        # no gradient wanted (eval, no_grad): the wrapper takes the read-only op
        with torch.no_grad():
            assert torch.equal(sedd.score_entropy.kernel(ls.requires_grad_(), xt, x0, sb, graph), loss)


def test_score_entropy_is_what_sedd_uses_and_backward_can_run_twice(k):
    gen, _ = fresh_gen()
    ls, xt, x0, sb = inputs("absorb", 2, 9, 13, torch.float32, gen, masked=1.0)
    a = ls.clone().requires_grad_()
    loss = sedd.score_entropy(a, xt, x0, sb, "absorb")  # dispatches to the kernel
    torch.testing.assert_close(loss, k.score_entropy(ls, xt, x0, sb, "absorb"), rtol=0, atol=0)
    g1, = torch.autograd.grad(loss.sum(), a, retain_graph=True)
    g2, = torch.autograd.grad(loss.sum(), a)
    assert torch.equal(g1, g2)


def test_opcheck_fake_and_autograd_registration(k):
    gen, _ = fresh_gen()
    ls, xt, x0, sb = inputs("uniform", 2, 3, 7, torch.float32, gen)
    u = torch.rand(2, 3, 2, dtype=torch.float64)
    t = torch.rand(2, dtype=torch.float64)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    shift = torch.rand(2) * 4
    for args in ((), (shift,)):  # without a shift and with one
        torch.library.opcheck(k.score_entropy.default, (ls.requires_grad_(), xt, x0, sb, "uniform", *args),
                              test_utils=utils)
        ls = ls.detach()
        torch.library.opcheck(k.score_entropy_backward.default, (torch.rand(2, 3), ls, xt, x0, sb, "uniform", *args),
                              test_utils=utils[:2])
    for args in ((), (shift,)):
        torch.library.opcheck(k.score_entropy_with_grad.default, (ls.requires_grad_(), xt, x0, sb, "uniform", *args),
                              test_utils=utils)
        ls = ls.detach()
    for args in ((), (shift,)):
        torch.library.opcheck(k.sedd_euler_step.default, (ls, xt, t, u, "uniform", *args), test_utils=utils)
        torch.library.opcheck(k.sedd_tweedie_step.default, (ls, xt, t, u, "uniform", True, *args), test_utils=utils)
    torch.library.opcheck(k.mdlm_ancestral_step.default, (ls, xt, t, u, 6), test_utils=utils)
    cos, sin = common.rotary_tables(3, 4)
    qkv = torch.randn(2, 3, 4, 2, 4)[:, :, 1:]
    for transpose in (False, True):
        torch.library.opcheck(k.rotary.default, (qkv.detach().requires_grad_(), cos, sin, transpose), test_utils=utils)


# ----------------------------------------------------------------------------------------------
# sampling steps: exactly the oracle's tokens for the same uniforms


def step_pairs(k, graph, ls, xt, t, u):
    """(name, kernel output, oracle output) for every step of this graph."""
    out = [("euler", k.sedd_euler_step(ls, xt, t, u, graph), sedd.euler_step.oracle(ls, xt, t, u, graph)),
           ("tweedie", k.sedd_tweedie_step(ls, xt, t, u, graph, False), sedd.tweedie_step.oracle(ls, xt, t, u, graph)),
           ("denoiser", k.sedd_tweedie_step(ls, xt, t, u, graph, True),
            sedd.tweedie_step.oracle(ls, xt, t, u, graph, final=True))]
    if graph == "absorb":
        N = ls.shape[-1]
        p = torch.rand(t.shape, dtype=torch.float64)
        out.append(("mdlm", k.mdlm_ancestral_step(ls, xt, p, u, N - 1),
                    mdlm.ancestral_step.oracle(ls, xt, p, u, N - 1)))
    return out


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_steps_return_the_oracles_tokens(k, graph, dtype, shape):
    gen, seed = fresh_gen()
    moved = 0
    for masked, t_scale in ((0.5, 0.3), (1.0, 3.0), (0.0, 0.3)):  # some rows move, most rows move, none masked
        ls, xt, _, _ = inputs(graph, *shape, dtype, gen, masked=masked)
        t = torch.rand(shape[0], dtype=torch.float64, generator=gen) * t_scale
        u = torch.rand(*shape[:2], 2, dtype=torch.float64, generator=gen)
        for name, got, ref in step_pairs(k, graph, ls, xt, t, u):
            assert got.dtype == torch.int64 and got.shape == xt.shape
            assert torch.equal(got, ref), f"seed {seed}: {name} differs at {(got != ref).nonzero()[:5].tolist()}"
            moved += int((ref != xt).sum())
    if shape[2] > 1:
        assert moved > 0, "no row moved: the comparison tested nothing but the stay path"


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_step_with_a_shift_is_the_step_on_the_log_scores_it_stands_for(k, graph, dtype):
    """A SEDD step on (h, shift) is the step on h - shift in fp32: the oracle's tokens on those log-scores, from
    the op and from the oracle, for the same uniforms. So SEDD's sampler passes its bf16 head output and the fp32
    offset, as its loss does, and holds no fp32 copy of the scores. A shift that is not one per sequence is refused
    on both paths."""
    gen, seed = fresh_gen()
    B, L = 4, 33
    ls, xt, _, _ = inputs(graph, B, L, 41, dtype, gen)
    shift = torch.rand(B, generator=gen) * 16 - 2
    h = (ls.float() + shift[:, None, None]).to(dtype)  # (B, L, N): as the head gives them, offset included
    ls = h.float() - shift[:, None, None]  # the log-scores h stands for
    t = torch.rand(B, dtype=torch.float64, generator=gen) * 0.5 + 0.05
    u = torch.rand(B, L, 2, dtype=torch.float64, generator=gen)
    moved = 0
    for name, step, final in (("euler", sedd.euler_step, ()), ("tweedie", sedd.tweedie_step, (False,)),
                              ("denoiser", sedd.tweedie_step, (True,))):
        ref = step.oracle(ls, xt, t, u, graph, *final)
        for path, fn in (("op", step.kernel), ("oracle", step.oracle)):
            got = fn(h, xt, t, u, graph, *final, shift)
            assert torch.equal(got, ref), f"seed {seed}: {name} ({path}) differs at {(got != ref).nonzero()[:5].tolist()}"
        moved += int((ref != xt).sum())
    assert 0 < moved < 3 * xt.numel(), f"seed {seed}: only one outcome was tested"
    for path in (contextlib.nullcontext, difflm_ops.oracles_only):
        with path(), pytest.raises(ValueError, match=r"shift must have shape \(B,\) = \(4,\), one value per sequence"):
            sedd.tweedie_step(h, xt, t, u, graph, False, shift[:1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("graph", GRAPHS)
def test_steps_at_the_stay_move_threshold(k, graph, dtype):
    """The steps settle 'stay' in fp32 when u0 is clear of the move threshold p = M / (M + w_x) by a
    relative 1e-4 (uniform Tweedie first against the bound q a S >= M, a few percent above it), and
    redo the rest in fp64: u0 placed at p (1 + d) for d from -0.3 to 0.3 must still give the oracle's
    tokens on both sides of each band's edges."""
    gen, seed = fresh_gen()
    B, L, V = 4, 64, 66
    ls, xt, _, _ = inputs(graph, B, L, V, dtype, gen)
    if graph == "absorb":  # sum_y s_y ~ 7 rather than ~500, so that masked rows have 0 < p < 1
        ls = (ls.float() - math.log(V)).to(dtype)
    t = torch.rand(B, dtype=torch.float64, generator=gen) * 0.3 + 0.01
    for name, weights, step in (("euler", sedd.euler_weights, k.sedd_euler_step),
                                ("tweedie", sedd.tweedie_weights, lambda *a: k.sedd_tweedie_step(*a, False))):
        w, w_stay = weights(ls, xt, t, graph)
        total = w.clamp(min=0).sum(-1)
        p = total / (total + w_stay.clamp(min=0))  # (B, L)
        for d in (-0.3, -0.05, -1e-2, -1e-3, -2e-4, -1e-4, -5e-5, -1e-6, 1e-6, 5e-5, 1e-4, 2e-4, 1e-3, 1e-2, 0.05, 0.3):
            u = torch.rand(B, L, 2, dtype=torch.float64, generator=gen)
            u[..., 0] = (p * (1 + d)).clamp(0, 1 - 1e-12)
            ref = (sedd.euler_step if name == "euler" else sedd.tweedie_step).oracle(ls, xt, t, u, graph)
            got = step(ls, xt, t, u, graph)
            assert torch.equal(got, ref), f"seed {seed}: {name} at u0 = p (1 + {d}) differs"
            sel = (p > 0) & (p < 0.9)  # rows that can go either way (p = 1: w_x clamped to 0, always moves)
            moved = (ref != xt)[sel]
            assert sel.any() and (moved.all() if d < 0 else not moved.any()), f"seed {seed}: {name} at d={d}"


@pytest.mark.parametrize("graph", GRAPHS)
def test_steps_with_log_scores_beyond_an_fp32_exp(k, graph):
    """e^95 overflows fp32 (the oracle's fp64 holds it): rows with such a score must skip the fp32
    screens and give the oracle's tokens, with rates small enough that p = M / (M + w_x) is moderate."""
    gen, seed = fresh_gen()
    B, L, V = 2, 64, 66
    ls, xt, _, _ = inputs(graph, B, L, V, torch.float32, gen)
    ls[..., 3] = 95.0
    t = torch.full((B,), 2e-42 if graph == "absorb" else 1e-40, dtype=torch.float64)  # M = O(0.1-1)
    u = torch.rand(B, L, 2, dtype=torch.float64, generator=gen)
    for name, step in (("euler", k.sedd_euler_step), ("tweedie", lambda *a: k.sedd_tweedie_step(*a, False))):
        ref = (sedd.euler_step if name == "euler" else sedd.tweedie_step).oracle(ls, xt, t, u, graph)
        assert torch.equal(step(ls, xt, t, u, graph), ref), f"seed {seed}: {name}"
        assert (ref != xt).any() and (ref == xt).any(), f"seed {seed}: {name} tested only one outcome"


def test_steps_on_exact_ties_of_the_uniforms(k):
    """u0 exactly at the move probability stays (u0 < p moves), and u1 exactly on a step of the CDF takes the next
    token (searchsorted right=True): equal weights and dyadic rates make both ties exact in fp64."""
    B, L, V = 1, 4, 4
    ls = torch.zeros(B, L, V + 1)  # every score 1: the CDF steps are exact multiples of the weight
    xt = torch.full((B, L), V)
    u = torch.tensor([[[0.0, 0.0], [0.0, 0.25], [0.0, 0.5], [0.0, 0.75]]], dtype=torch.float64)
    rate = torch.tensor([0.25], dtype=torch.float64)  # M = 1: every masked row moves
    ref = sedd.euler_step.oracle(ls, xt, rate, u, "absorb")
    assert ref.tolist() == [[0, 1, 2, 3]]
    assert torch.equal(k.sedd_euler_step(ls, xt, rate, u, "absorb"), ref)
    p = torch.tensor([0.5], dtype=torch.float64)
    ref = mdlm.ancestral_step.oracle(ls, xt, p, u, V)
    assert ref.tolist() == [[0, 1, 2, 3]]
    assert torch.equal(k.mdlm_ancestral_step(ls, xt, p, u, V), ref)
    u[..., 0] = 0.5  # exactly p_unmask: stays masked
    assert torch.equal(k.mdlm_ancestral_step(ls, xt, p, u, V), xt)
    assert torch.equal(mdlm.ancestral_step.oracle(ls, xt, p, u, V), xt)
    # uniform graph, x = 0: its own weight is 0, so u1 = 0 takes token 1, not x
    ls, xt = torch.zeros(B, L, V), torch.zeros(B, L, dtype=torch.long)
    u = torch.zeros(B, L, 2, dtype=torch.float64)
    ref = sedd.euler_step.oracle(ls, xt, rate, u, "uniform")
    assert (ref == 1).all()
    assert torch.equal(k.sedd_euler_step(ls, xt, rate, u, "uniform"), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mdlm_step_with_logits_beyond_an_fp32_exp(k, dtype):
    """e^95 overflows fp32: the softmax must subtract the row's largest logit first, as torch.softmax does."""
    gen, seed = fresh_gen()
    ls, xt, _, _ = inputs("absorb", 2, 64, 66, dtype, gen, masked=1.0)
    ls[..., 3], ls[..., 10] = 95.0, 94.0
    N = ls.shape[-1]
    p = torch.full((2,), 0.9, dtype=torch.float64)
    u = torch.rand(2, 64, 2, dtype=torch.float64, generator=gen)
    ref = mdlm.ancestral_step.oracle(ls, xt, p, u, N - 1)
    assert torch.equal(k.mdlm_ancestral_step(ls, xt, p, u, N - 1), ref), f"seed {seed}"
    assert (ref == 3).any() and (ref == 10).any(), f"seed {seed}"


def test_steps_are_reproducible_under_manual_seed(k):
    gen, _ = fresh_gen()
    ls, xt, _, _ = inputs("uniform", 4, 50, 37, torch.float32, gen)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        u = torch.rand(4, 50, 2, dtype=torch.float64)
        outs.append(k.sedd_tweedie_step(ls, xt, t, u, "uniform", False))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(124)
    assert not torch.equal(outs[0], k.sedd_tweedie_step(ls, xt, t, torch.rand(4, 50, 2, dtype=torch.float64), "uniform"))


def chi_square_pvalue(counts, probs):
    """P(chi^2 >= observed) for counts (K,) against probabilities (K,), via the regularised gamma."""
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a zero-probability outcome was drawn"
    exp = probs[keep] * n
    stat = ((counts[keep] - exp) ** 2 / exp).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("case", ["euler-absorb", "tweedie-uniform", "denoiser-absorb", "mdlm"])
def test_sampled_distribution_chi_square(k, case):
    """One row repeated 40,000 times: the kernel's draws follow the two-stage step's exact law."""
    L, V = 40_000, 7
    graph = "uniform" if case == "tweedie-uniform" else "absorb"
    N = V + 1 if graph == "absorb" else V
    row = torch.tensor([0.3, -1.0, 1.2, 0.0, -0.4, 2.0, 0.7, -2.0][:N])
    ls = row.expand(1, L, N).contiguous()
    x = 2 if graph == "uniform" else N - 1
    xt = torch.full((1, L), x)
    t = torch.tensor([0.08], dtype=torch.float64)
    u = torch.rand(1, L, 2, dtype=torch.float64)
    if case == "mdlm":
        w = torch.softmax(row.index_fill(0, torch.tensor([N - 1]), -float("inf")), 0).double() * 0.6
        w_stay = torch.tensor(0.4, dtype=torch.float64)
        got = k.mdlm_ancestral_step(ls, xt, torch.tensor([0.6], dtype=torch.float64), u, N - 1)
    elif case == "euler-absorb":
        w, w_stay = sedd.euler_weights(ls[:, :1], xt[:, :1], t, graph)
        got = k.sedd_euler_step(ls, xt, t, u, graph)
    else:
        final = case == "denoiser-absorb"
        w, w_stay = sedd.tweedie_weights(ls[:, :1], xt[:, :1], t, graph, final)
        got = k.sedd_tweedie_step(ls, xt, t, u, graph, final)
    w, w_stay = w.reshape(-1).clamp(min=0), w_stay.reshape(()).clamp(min=0)
    probs = w.clone()
    probs[x] = w_stay
    probs /= probs.sum()
    counts = torch.bincount(got.reshape(-1), minlength=N).double()
    p = chi_square_pvalue(counts, probs)
    assert p > 1e-4, f"{case}: chi-square p = {p:.2e}; counts {counts.tolist()} vs expected {(probs * L).tolist()}"


# ----------------------------------------------------------------------------------------------
# bad inputs: the binding names the argument and what it expected


def test_bad_inputs_name_the_argument(k):
    B, L, V = 2, 3, 5
    N = V + 1
    ls = torch.randn(B, L, N)
    xt = torch.full((B, L), N - 1)
    x0 = torch.zeros(B, L, dtype=torch.long)
    sb = torch.ones(B)
    u = torch.rand(B, L, 2, dtype=torch.float64)
    t = torch.full((B,), 0.1, dtype=torch.float64)
    cos, sin = common.rotary_tables(L, 4)
    qkv = torch.randn(B, L, 3, 2, 4)
    cases = [
        (lambda: k.score_entropy(ls.double(), xt, x0, sb, "absorb"), "log_score must be float32 or bfloat16"),
        (lambda: k.score_entropy(ls[0], xt, x0, sb, "absorb"), r"log_score must have shape \(B, L, N\)"),
        (lambda: k.score_entropy(ls.transpose(0, 1).contiguous().transpose(0, 1), xt, x0, sb, "absorb"),
         "log_score must be contiguous"),
        (lambda: k.score_entropy(ls, xt.int(), x0, sb, "absorb"), "xt must be Long"),
        (lambda: k.score_entropy(ls, xt[:, :2], x0, sb, "absorb"), r"xt must have shape \(B, L\)"),
        (lambda: k.score_entropy(ls, xt + 1, x0, sb, "absorb"), r"xt holds token ids in \[6, 6\] but must lie in \[0, 5\]"),
        (lambda: k.score_entropy(ls, xt, x0 + V, sb, "absorb"), "x0 holds token ids .* MASK = N - 1 is not one"),
        (lambda: k.score_entropy(ls, xt, x0 - 1, sb, "absorb"), r"x0 holds token ids in \[-1, -1\]"),
        (lambda: k.score_entropy(ls, xt, x0, sb[:1], "absorb"), r"sigma_bar must have shape \(B,\)"),
        (lambda: k.score_entropy(ls, xt, x0, sb.long(), "absorb"), "sigma_bar must be float32 or float64"),
        (lambda: k.score_entropy(ls, xt, x0, sb, "masked"), "graph must be 'absorb' or 'uniform'"),
        (lambda: k.score_entropy(ls[..., :1].contiguous(), torch.zeros_like(xt), x0, sb, "absorb"),
         "needs at least 2 states"),
        (lambda: k.score_entropy_backward(torch.ones(B, L, dtype=torch.float64), ls, xt, x0, sb, "absorb"),
         "grad_loss must be Float"),
        (lambda: k.score_entropy_backward(torch.ones(B, 1), ls, xt, x0, sb, "absorb"),
         r"grad_loss must have shape \(B, L\)"),
        (lambda: k.sedd_euler_step(ls, xt, t.float(), u, "absorb"), "rate_dt must be Double"),
        (lambda: k.sedd_euler_step(ls, xt, t, u.float(), "absorb"), "u must be Double"),
        (lambda: k.sedd_euler_step(ls, xt, t, u[..., :1].contiguous(), "absorb"), r"u must have shape \(B, L, 2\)"),
        (lambda: k.sedd_tweedie_step(ls, xt, t[:1], u, "uniform", False), r"dsigma must have shape \(B,\)"),
        (lambda: k.sedd_tweedie_step(ls, xt + 1, t, u, "uniform", False), "xt holds token ids"),
        (lambda: k.mdlm_ancestral_step(ls, xt, t, u, N), r"mask_id must lie in \[0, 5\]"),
        (lambda: k.mdlm_ancestral_step(ls, xt, t.float(), u, N - 1), "p_unmask must be Double"),
        (lambda: k.rotary(torch.randn(2, 3, 4), cos, sin), r"qkv must have shape \(B, L, 3, H, D\)"),
        (lambda: k.rotary(qkv[:, :, :2], cos, sin), r"qkv must have shape \(B, L, 3, H, D\)"),
        (lambda: k.rotary(qkv.double(), cos, sin), "qkv must be float32 or bfloat16"),
        (lambda: k.rotary(qkv.transpose(3, 4), cos, sin), "qkv must be contiguous in its last dimension"),
        (lambda: k.rotary(qkv[..., :3], cos[..., :3], sin[..., :3]), r"head size\) must be even, got 3"),
        (lambda: k.rotary(qkv, cos[:2], sin), r"cos must have shape \(L, 1, 1, D\)"),
        (lambda: k.rotary(qkv, cos, sin.double()), "sin must be Float"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


def test_meta_and_mixed_devices_are_refused_naming_the_argument(k):
    """A meta tensor among CPU ones reaches the fake implementation, not the binding: it must refuse
    too rather than return uninitialised memory. All-meta inputs are shape inference and give meta."""
    ls, xt, x0, sb = inputs("absorb", 2, 3, 5, torch.float32, torch.Generator().manual_seed(0))
    u, t = torch.rand(2, 3, 2, dtype=torch.float64), torch.full((2,), 0.1, dtype=torch.float64)
    meta = lambda x: x.to("meta")  # noqa: E731
    cases = [(lambda: k.score_entropy(ls, meta(xt), x0, sb, "absorb"), "xt must be on cpu"),
             (lambda: k.score_entropy(ls, xt, x0, meta(sb), "absorb"), "sigma_bar must be on cpu"),
             (lambda: k.score_entropy_backward(meta(torch.ones(2, 3)), ls, xt, x0, sb, "absorb"), "log_score must be on meta"),
             (lambda: k.sedd_euler_step(ls, xt, t, meta(u), "absorb"), "u must be on cpu"),
             (lambda: k.sedd_tweedie_step(ls, xt, meta(t), u, "absorb", False), "dsigma must be on cpu"),
             (lambda: k.mdlm_ancestral_step(meta(ls), xt, t, u, 5), "xt must be on meta"),
             (lambda: k.nearest_embedding(torch.randn(3, 4), meta(torch.randn(5, 4)), "cos"), "E must be on cpu"),
             (lambda: k.rotary(torch.randn(1, 2, 3, 1, 4), *(meta(t) for t in common.rotary_tables(2, 4))),
              "cos must be on cpu like qkv")]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()
    out = k.score_entropy(meta(ls), meta(xt), meta(x0), meta(sb), "absorb")
    assert out.device.type == "meta" and out.shape == (2, 3)
    # through the dispatch point a meta call runs the oracle (shape inference in PyTorch)
    assert sedd.euler_step(meta(ls), meta(xt), meta(t), meta(u), "absorb").device.type == "meta"


@pytest.mark.parametrize("value", [1.0, 1.5, -0.25, float("nan"), float("inf")])
@pytest.mark.parametrize("which", [0, 1])
def test_uniforms_outside_0_1_are_refused_by_op_and_dispatch(k, value, which):
    """u >= 1 (or NaN) made the absorbing steps pick the last token where the oracle kept MASK: the
    uniforms lie in [0, 1), and both paths refuse anything else."""
    ls, xt, _, _ = inputs("absorb", 2, 3, 5, torch.float32, torch.Generator().manual_seed(1), masked=1.0)
    t = torch.full((2,), 0.3, dtype=torch.float64)
    u = torch.rand(2, 3, 2, dtype=torch.float64)
    u[1, 2, which] = value
    steps = [(sedd.euler_step, k.sedd_euler_step, (ls, xt, t, u, "absorb")),
             (sedd.tweedie_step, lambda *a: k.sedd_tweedie_step(*a, False), (ls, xt, t, u, "absorb")),
             (mdlm.ancestral_step, k.mdlm_ancestral_step, (ls, xt, t, u, 5))]
    for fn, op, args in steps:
        with pytest.raises(RuntimeError, match=r"u must lie in \[0, 1\)"):
            op(*args)
        for ctx in (contextlib.nullcontext, difflm_ops.oracles_only):
            with ctx(), pytest.raises(ValueError, match=r"u must lie in \[0, 1\)"):
                fn(*args)


def test_a_step_with_an_unknown_graph_or_mask_id_is_refused_on_both_paths():
    """The oracles read any graph but "absorb" as uniform, and a mask_id outside the scores masked nothing: a
    typo (graph="absorbing") sampled from another process, silently, where the op was not used."""
    ls, xt, _, _ = inputs("absorb", 2, 3, 5, torch.float32, torch.Generator().manual_seed(1), masked=1.0)
    t, u = torch.full((2,), 0.3, dtype=torch.float64), torch.rand(2, 3, 2, dtype=torch.float64)
    for ctx in (contextlib.nullcontext, difflm_ops.oracles_only):
        for step in (sedd.euler_step, sedd.tweedie_step):
            with ctx(), pytest.raises(ValueError, match="unknown graph 'absorbing'; use absorb or uniform"):
                step(ls, xt, t, u, "absorbing")
        for mask_id in (-1, ls.shape[-1]):
            with ctx(), pytest.raises(ValueError, match=f"mask_id={mask_id} is not a state of the {ls.shape[-1]} scores"):
                mdlm.ancestral_step(ls, xt, t, u, mask_id)


@pytest.mark.parametrize("value", [0.0, -0.5, float("inf"), float("nan")])
def test_absorbing_sigma_bar_outside_0_inf_is_refused_by_op_and_dispatch(k, value):
    """The absorbing rate 1 / expm1(sigma_bar) exists only for 0 < sigma_bar < inf: the oracle gave
    NaN and the op finite numbers. Both refuse; the uniform graph is defined there and agrees."""
    ls, xt, x0, sb = inputs("absorb", 2, 3, 5, torch.float32, torch.Generator().manual_seed(2), masked=1.0)
    sb[0] = value
    with pytest.raises(RuntimeError, match="sigma_bar must be positive and finite"):
        k.score_entropy(ls, xt, x0, sb, "absorb")
    for ctx in (contextlib.nullcontext, difflm_ops.oracles_only):
        with ctx(), pytest.raises(ValueError, match="sigma_bar must be positive and finite"):
            sedd.score_entropy(ls, xt, x0, sb, "absorb")
    ls, xt, x0, sb = inputs("uniform", 2, 3, 5, torch.float32, torch.Generator().manual_seed(2))
    sb[0] = value
    torch.testing.assert_close(k.score_entropy(ls, xt, x0, sb, "uniform"),
                               sedd.score_entropy.oracle(ls, xt, x0, sb, "uniform"), equal_nan=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("graph", GRAPHS)
def test_non_finite_scores_behave_as_the_oracle(k, graph, value):
    """A NaN or infinite score goes through both paths alike: the same loss (NaN where the oracle's
    is NaN) and the same tokens."""
    gen = torch.Generator().manual_seed(3)
    ls, xt, x0, sb = inputs(graph, 2, 5, 6, torch.float32, gen, masked=0.8)
    ls[0, 1, 2] = value
    ls[1, 3, -1] = value
    torch.testing.assert_close(k.score_entropy(ls, xt, x0, sb, graph),
                               sedd.score_entropy.oracle(ls, xt, x0, sb, graph), equal_nan=True)
    u = torch.rand(2, 5, 2, dtype=torch.float64, generator=gen)
    t = torch.tensor([0.3, 0.2], dtype=torch.float64)
    assert torch.equal(k.sedd_euler_step(ls, xt, t, u, graph), sedd.euler_step.oracle(ls, xt, t, u, graph))
    for final in (False, True):
        assert torch.equal(k.sedd_tweedie_step(ls, xt, t, u, graph, final),
                           sedd.tweedie_step.oracle(ls, xt, t, u, graph, final))
    if graph == "absorb":
        assert torch.equal(k.mdlm_ancestral_step(ls, xt, t, u, 6), mdlm.ancestral_step.oracle(ls, xt, t, u, 6))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 50.0])
def test_the_score_at_x_itself_is_ignored_by_the_uniform_steps(k, value):
    """The oracle never reads the score at x_t (it sets it to 1); the kernel's first screen took its bound from a
    row maximum that counted it, and a NaN there hid the true maximum, so rows stayed that the oracle moved."""
    L = 4000
    ls = torch.tensor([1.0, value, 0.45]).expand(1, L, 3).contiguous()  # (1, L, 3), x_t = 1 everywhere
    xt = torch.ones(1, L, dtype=torch.long)
    u = torch.rand(1, L, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    rate = torch.tensor([0.3], dtype=torch.float64)
    assert torch.equal(k.sedd_euler_step(ls, xt, rate, u, "uniform"), sedd.euler_step.oracle(ls, xt, rate, u, "uniform"))
    for final in (False, True):
        assert torch.equal(k.sedd_tweedie_step(ls, xt, rate, u, "uniform", final),
                           sedd.tweedie_step.oracle(ls, xt, rate, u, "uniform", final))


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), -float("inf")])
def test_step_rates_outside_0_inf_are_refused_by_op_and_dispatch(k, value):
    """A rate, a sigma_bar difference or an unmasking probability is finite and >= 0 (at -inf the
    absorbing denoiser revealed where the oracle kept MASK): both paths refuse anything else."""
    ls, xt, _, _ = inputs("absorb", 2, 3, 5, torch.float32, torch.Generator().manual_seed(5), masked=1.0)
    t = torch.tensor([0.3, value], dtype=torch.float64)
    u = torch.rand(2, 3, 2, dtype=torch.float64)
    steps = [(sedd.euler_step, k.sedd_euler_step, (ls, xt, t, u, "absorb"), "rate_dt"),
             (sedd.tweedie_step, lambda *a: k.sedd_tweedie_step(*a, True), (ls, xt, t, u, "absorb"), "dsigma"),
             (mdlm.ancestral_step, k.mdlm_ancestral_step, (ls, xt, t, u, 5), "p_unmask")]
    for fn, op, args, name in steps:
        with pytest.raises(RuntimeError, match=f"{name} must be finite and >= 0"):
            op(*args)
        for ctx in (contextlib.nullcontext, difflm_ops.oracles_only):
            with ctx(), pytest.raises(ValueError, match=f"{name} must be finite and >= 0"):
                fn(*args)


# ----------------------------------------------------------------------------------------------
# rotary positions: the oracle's outputs and gradients bit for bit, so every training figure stands

# (B, L, H, D): one position, a head of two values, odd sizes, the default model's attention
ROTARY_SHAPES = [(1, 1, 1, 2), (2, 5, 3, 6), (3, 7, 2, 10), (2, 128, 4, 32)]


def rotary_pairs(shape, dtype, device, random_tables):
    """(what, kernel result, oracle result) for the output and the gradient of a strided (B, L, 3, H, D)
    projection; the gradient comes back through the attention's (B, H, L, D) views."""
    B, L, H, D = shape
    gen, seed = fresh_gen()
    if random_tables:  # the op assumes nothing of the tables' structure
        cos, sin = (torch.randn(L, 1, 1, D, generator=gen) for _ in range(2))
    else:
        cos, sin = common.rotary_tables(L, D)
    qkv = torch.randn(B, L, 4, H, D, generator=gen).to(dtype).to(device)[:, :, 1:]  # strided, as a slice would be
    w = torch.randn(3, B, H, L, D, generator=gen).to(dtype).to(device)  # a gradient for queries, keys, values
    cos, sin = cos.to(device), sin.to(device)
    got = []
    for fn in (common.apply_rotary.kernel, common.apply_rotary.oracle):
        leaf = qkv.clone().requires_grad_()
        q, key, v = fn(leaf, cos, sin).permute(2, 0, 3, 1, 4)  # (B, H, L, D) each, as attention takes them
        g, = torch.autograd.grad((q * w[0]).sum() + (key * w[1]).sum() + (v * w[2]).sum(), leaf)
        got.append((fn(qkv, cos, sin), g))
    return [(f"output (seed {seed})", got[0][0], got[1][0]), (f"gradient (seed {seed})", got[0][1], got[1][1])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROTARY_SHAPES)
@pytest.mark.parametrize("random_tables", [False, True])
def test_rotary_is_the_oracle_bit_for_bit(k, dtype, shape, random_tables):
    for what, got, ref in rotary_pairs(shape, dtype, "cpu", random_tables):
        assert got.dtype == ref.dtype and torch.equal(got, ref), what


def test_ar_trains_and_samples_the_same_with_and_without_kernels(k):
    """The rotary op runs in every Transformer: a causal one's loss, gradients and cached samples are the
    PyTorch path's bit for bit."""
    cfg = ar.Config(n_layer=2, n_head=2, n_embd=32, block_size=16)
    torch.manual_seed(0)
    model = ar.build_model(cfg, {"vocab_size": 9})
    torch.nn.init.normal_(model.head.weight, std=0.5)  # away from the zero init: samples depend on the weights
    x0 = torch.randint(9, (4, 16))
    outs = []
    for path in (contextlib.nullcontext, difflm_ops.oracles_only):
        model.zero_grad()
        with path():
            loss = ar.loss_fn(model, x0, model.bos_id)
            loss.backward()
            torch.manual_seed(3)
            samples = ar.generate(model, cfg, torch.tensor([1, 2]), 3, 24)[0]
        outs.append([loss.detach(), samples] + [p.grad.clone() for p in model.parameters()])
    assert difflm_ops._PASSED[("rotary", "cpu")]
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.fixture
def undecided(monkeypatch):
    """No op decided yet in this process, and a trace that asks for the extension fails."""
    real = difflm_ops.available

    def available(device):
        assert not torch.compiler.is_compiling(), "a trace asked for the extension"
        return real(device)

    monkeypatch.setattr(difflm_ops, "available", available)
    monkeypatch.setattr(difflm_ops, "_PASSED", {})


def recording(graphs):
    """A torch.compile backend that runs each traced graph as it is and appends it to graphs."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


@pytest.mark.parametrize("decided", [False, True], ids=["undecided", "prepared"])
def test_compile_traces_the_ops_decided_before_it(k, undecided, decided):
    """torch.compile traces what difflm_ops.prepare decided: a trace never builds or checks an op (a build in
    a trace broke the graph and left the Transformer's forward uncompiled), an undecided op is traced as
    its oracle, a prepared one as itself; one graph either way, with eager's loss and gradients."""
    cfg = ar.Config(n_layer=2, n_head=2, n_embd=32, block_size=16)
    torch.manual_seed(0)
    model = ar.build_model(cfg, {"vocab_size": 9})
    x0 = torch.randint(9, (4, 16))
    graphs, results = [], []

    if decided:
        difflm_ops.prepare("cpu")
    torch._dynamo.reset()
    for m in (torch.compile(model, backend=recording(graphs)), model):  # compiled first: its trace is the first use
        model.zero_grad()
        loss = ar.loss_fn(m, x0, model.bos_id)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    torch._dynamo.reset()
    assert len(graphs) == 1, f"{len(graphs)} graphs: the trace broke"
    held = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert any("difflm.rotary" in t for t in held) == decided, held
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", [mdlm, sedd], ids=["mdlm", "sedd"])
def test_compile_traces_the_masked_rows_once_for_any_count(k, undecided, monkeypatch, method):
    """The absorbing methods' head runs on the masked rows, as many as the batch happens to have: traced once
    with that count dynamic (common.masked_rows), not again at the second batch, with eager's losses."""
    cfg = method.Config(n_layer=1, n_head=2, n_embd=32, block_size=16)
    torch.manual_seed(0)
    model = method.build_model(cfg, {"vocab_size": 9})
    graphs, counts, results = [], set(), []
    masked_rows = common.masked_rows

    def counted(xt, mask_id):
        rows = masked_rows(xt, mask_id)
        counts.add(len(rows[0]))
        return rows

    monkeypatch.setattr(common, "masked_rows", counted)
    difflm_ops.prepare("cpu")  # as the trainer does before torch.compile
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording(graphs))
    for seed in range(3):
        for m in (compiled, model):
            torch.manual_seed(seed)
            model.zero_grad()
            loss = method.loss_fn(m, torch.randint(9, (4, 16)), cfg, 9 if method is mdlm else 10)
            loss.backward()
            results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    torch._dynamo.reset()
    assert len(counts) == 3, counts  # three batches, three counts of masked rows
    assert len(graphs) == 1, f"{len(graphs)} graphs for the 3 batches"
    for a, b in zip(results[0::2], results[1::2]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_compiled_training_decides_the_ops_first(k, undecided, tmp_path):
    """`--compile` end to end (inductor, with the rotary op's fake and autograd): the trainer decides the
    ops before the trace, which then neither builds nor checks, and does not break."""
    from torch._dynamo.utils import counters
    data = write_toy_dataset(tmp_path / "data", [toy_language(4_000)], CHARS)
    cfg = ar.Config(data_dir=data, out_dir=str(tmp_path / "out"), n_layer=1, n_head=2, n_embd=32, block_size=16,
                    batch_size=4, max_iters=3, eval_interval=3, eval_iters=1, log_interval=1, compile=True)
    meta = corpus.prepare_data(cfg)
    model = ar.build_model(cfg, meta)
    torch._dynamo.reset()
    counters.clear()

    def evaluate(m, b):
        with difflm_ops.oracles_only():  # decides nothing: an op decided after the run was decided by the trainer
            return ar.evaluate(m, b, cfg)

    try:
        trainer.train(cfg, "ar", model, lambda m, x0: ar.loss_fn(m, x0, model.bos_id), evaluate, meta)
        breaks = dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert not breaks, breaks
    assert difflm_ops._PASSED.get(("rotary", "cpu")), "the trainer did not decide the ops before the trace"


# ----------------------------------------------------------------------------------------------
# the first-use self-check (difflm_ops.py): every op against its oracle, once per device


def test_self_check_passes_for_every_cpu_op(k):
    import diffusion_lm  # noqa: F401  (marks nearest_embedding)
    assert set(difflm_ops.FUSED) == {"score_entropy", "sedd_euler_step", "sedd_tweedie_step", "mdlm_ancestral_step",
                                  "nearest_embedding", "rotary"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, f in difflm_ops.FUSED.items():
            assert f.self_check("cpu"), name
            # the first use may come inside an eval or a bf16 region: the check is the same there
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                assert f.self_check("cpu"), f"{name} under inference_mode and autocast"


def wrong_ops():
    """(op name, a wrong stand-in built on the real op, the oracle's arguments, what the warning names)."""
    gen = torch.Generator().manual_seed(4)
    ls, xt, x0, sb = inputs("absorb", 2, 5, 6, torch.float32, gen, masked=1.0)
    t = torch.full((2,), 0.4, dtype=torch.float64)
    u = torch.rand(2, 5, 2, dtype=torch.float64, generator=gen)
    k = torch.ops.difflm

    def shifted_tokens(*a):  # every moved token one higher: the law of a different step
        out = k.sedd_euler_step(*a)
        return torch.where(out != a[1], (out + 1) % a[0].shape[-1], out)

    def nan_loss(*a):  # a NaN where the oracle has a number
        return k.score_entropy(*a).index_fill(1, torch.tensor([0]), float("nan"))

    class ScaledGrad(torch.autograd.Function):  # the right loss, a gradient 1% too large
        @staticmethod
        def forward(ctx, ls, xt, x0, sb, graph, shift):
            ctx.save_for_backward(ls, xt, x0, sb, shift)
            ctx.graph = graph
            return k.score_entropy(ls, xt, x0, sb, graph, shift)

        @staticmethod
        def backward(ctx, g):
            ls, xt, x0, sb, shift = ctx.saved_tensors
            grad = k.score_entropy_backward(g.contiguous(), ls, xt, x0, sb, ctx.graph, shift)
            return 1.01 * grad, None, None, None, None, None

    def raises(*a):  # a launch that fails (binding.cpp's cuda_ok) leaves the device usable: the oracle takes over
        raise RuntimeError("difflm: CUDA kernel mdlm_step failed: too many resources requested for launch")

    qkv, (cos, sin) = torch.randn(2, 5, 3, 3, 4, generator=gen), common.rotary_tables(5, 4)
    return [("rotary", lambda *a: k.rotary(*a) * 1.001, (common.apply_rotary, qkv, cos, sin), "output, float32"),
            ("sedd_euler_step", shifted_tokens, (sedd.euler_step, ls, xt, t, u, "absorb"), "tokens differ"),
            ("score_entropy", nan_loss, (sedd.score_entropy, ls, xt, x0, sb, "absorb"), "largest difference inf"),
            ("score_entropy", lambda ls, *a: ScaledGrad.apply(ls.contiguous(), *a),
             (sedd.score_entropy, ls.clone().requires_grad_(), xt, x0, sb, "absorb"), "gradient"),
            ("mdlm_ancestral_step", raises, (mdlm.ancestral_step, ls, xt, t, u, 5), "too many resources")]


@pytest.mark.parametrize("case", range(5), ids=["rotary off", "wrong tokens", "NaN loss", "wrong gradient", "raises"])
def test_a_wrong_op_is_switched_off_with_one_warning(k, case):
    name, wrong, (fn, *args), phrase = wrong_ops()[case]
    with difflm_ops.replace(name, wrong), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [fn(*args) for _ in range(3)]
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and f"difflm kernel {name} on cpu disagrees" in msgs[0] and phrase in msgs[0], msgs
    ref = fn.oracle(*args)
    for out in outs:  # after the warning, every call is the oracle's
        assert torch.equal(out, ref)
    with warnings.catch_warnings():  # the real op is checked afresh once the stand-in is gone, and passes
        warnings.simplefilter("error")
        fn(*args)


@pytest.mark.parametrize("error, message", [
    ("AcceleratorError", "CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA"),
    ("RuntimeError", "CUDA error: device-side assert triggered"),
    ("RuntimeError", "difflm: CUDA kernel rotary failed: an illegal memory access was encountered")])
def test_a_gpu_fault_in_the_check_stops_with_one_line(k, monkeypatch, error, message):
    """A GPU fault (an illegal address, a device-side assert) is sticky: after it nothing runs on the device, the
    oracle included, so the check stops the process with one line instead of switching the op off. torch raises it
    as AcceleratorError from 2.8, as a RuntimeError whose message starts "CUDA error" before; an op's own launch
    check words it "CUDA kernel ... failed", and was switched off. What tells a fault is the device: it no longer
    computes (here a stand-in for one that faulted). An op that raises on a device that still computes (a launch
    the GPU refused, a bad configuration) is switched off as before."""
    kind = getattr(torch, error, None) or RuntimeError  # (torch < 2.8 has no AcceleratorError: the same check twice)

    def faulting(*a):
        raise kind(message)

    qkv, (cos, sin) = torch.randn(2, 5, 3, 3, 4), common.rotary_tables(5, 4)
    assert difflm_ops.device_runs("cpu")
    monkeypatch.setattr(difflm_ops, "device_runs", lambda device: False)
    with difflm_ops.replace("rotary", faulting), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "switched off" warning
        with pytest.raises(RuntimeError, match="DIFFLM_KERNELS=0") as err:
            common.apply_rotary(qkv, cos, sin)
        assert ("rotary", "cpu") not in difflm_ops._PASSED
    assert "difflm kernel rotary on cpu" in str(err.value) and f"({message.splitlines()[0]})" in str(err.value)
    monkeypatch.setattr(difflm_ops, "device_runs", lambda device: True)
    with difflm_ops.replace("rotary", faulting), pytest.warns(UserWarning, match="rotary on cpu disagrees .*it raised"):
        assert torch.equal(common.apply_rotary(qkv, cos, sin), common.apply_rotary.oracle(qkv, cos, sin))
        assert difflm_ops._PASSED["rotary", "cpu"] is False


def test_the_gpu_check_sizes_reach_every_thread_layout(k, monkeypatch):
    """On the GPU the check also runs rows of N > 2048 and N > 16384 (the kernels' block-per-row layouts):
    an op wrong only on such rows passes the CPU's small check and is switched off by the GPU's sizes,
    which the right ops pass."""
    real = k.sedd_tweedie_step

    def wrong_on_wide_rows(ls, *a):  # a stand-in whose 512-thread layout drops its last token
        out = real(ls, *a)
        return (out + 1) % ls.shape[-1] if ls.shape[-1] > 16384 else out

    with difflm_ops.replace("sedd_tweedie_step", wrong_on_wide_rows), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sedd.tweedie_step.self_check("cpu")
    monkeypatch.setitem(difflm_ops.CHECK_SIZES, "cpu", difflm_ops.CHECK_SIZES["cuda"])
    with difflm_ops.replace("sedd_tweedie_step", wrong_on_wide_rows), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not sedd.tweedie_step.self_check("cpu")
    assert len(caught) == 1 and "tokens differ" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("score_entropy", "sedd_euler_step", "sedd_tweedie_step", "mdlm_ancestral_step"):
            assert difflm_ops.FUSED[name].self_check("cpu"), name


def test_the_check_runs_the_cpu_backward_that_recomputes(k, monkeypatch):
    """On the CPU a training step's gradient comes from the loss's own pass; the backward that recomputes
    it (under torch.compile, or a retained graph's second backward) is checked as well."""
    real = k.score_entropy_backward
    # the op the registered autograd calls, 1% too large (patched: torch 2.6 refuses to register an autograd twice)
    monkeypatch.setattr(k, "score_entropy_backward", lambda *a: 1.01 * real(*a))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not sedd.score_entropy.self_check("cpu")
    checked = [str(w.message) for w in caught]
    assert len(checked) == 1 and "gradient of a second backward" in checked[0], checked
    monkeypatch.undo()
    assert sedd.score_entropy.self_check("cpu")


def corner_wrong_ops():
    """(op name, a stand-in wrong in one corner only, the marked function, what the warning names): each corner
    is one the first-use check must reach (one token, bf16 scores, the denoiser, the uniform graph's last token in a row that
    barely moves, a worse row, the gradient, a sequence with no masked row)."""
    import diffusion_lm
    k = torch.ops.difflm

    def one_token(*a):  # the oracle's tokens but one
        out = k.sedd_euler_step(*a).clone()
        out[0, 0] = (out[0, 0] + 1) % a[0].shape[-1]
        return out

    def wrong_on_bf16(*a):  # moved tokens one higher, for bf16 scores only
        out = k.sedd_euler_step(*a)
        return torch.where(out != a[1], (out + 1) % a[0].shape[-1], out) if a[0].dtype == torch.bfloat16 else out

    def wrong_denoiser(*a):  # the final step's moved tokens one higher
        out = k.sedd_tweedie_step(*a)
        return torch.where(out != a[1], (out + 1) % a[0].shape[-1], out) if a[5] else out

    def last_token_as_mask(*a):  # the uniform graph's denoiser moves a last token N - 1 it kept, as if it were MASK
        out = k.sedd_tweedie_step(*a)
        N = a[0].shape[-1]
        return torch.where((a[1] == N - 1) & (out == N - 1), 0, out) if a[4] == "uniform" and a[5] else out

    def next_row(x, E, metric):  # the row after the nearest: a worse pick
        return (difflm_ops._nearest_embedding(x, E, metric) + 1) % E.shape[0]

    class ScaledRotaryGrad(torch.autograd.Function):  # the right output, a gradient 1% too large
        @staticmethod
        def forward(ctx, qkv, cos, sin):
            ctx.save_for_backward(cos, sin)
            return k.rotary(qkv.contiguous(), cos, sin, False)

        @staticmethod
        def backward(ctx, g):
            cos, sin = ctx.saved_tensors
            return 1.01 * k.rotary(g.contiguous(), cos, sin, True), None, None

    def nan_where_nothing_is_masked(ls, xt, x0, sb, graph, shift):  # NaN for a sequence without a masked row
        loss = k.score_entropy(ls.contiguous(), xt, x0, sb, graph, shift)
        clean = (xt != ls.shape[-1] - 1).all(1, keepdim=True) & (graph == "absorb")
        return torch.where(clean, float("nan"), loss)

    return [("sedd_euler_step", one_token, sedd.euler_step, "1 of"),
            ("sedd_euler_step", wrong_on_bf16, sedd.euler_step, "bfloat16"),
            ("sedd_tweedie_step", wrong_denoiser, sedd.tweedie_step, "final"),
            ("sedd_tweedie_step", last_token_as_mask, sedd.tweedie_step, "uniform, float32, final"),
            ("nearest_embedding", next_row, diffusion_lm.nearest_embedding, "score of the picked row"),
            ("rotary", ScaledRotaryGrad.apply, common.apply_rotary, "gradient"),
            ("score_entropy", nan_where_nothing_is_masked, sedd.score_entropy, "largest difference inf")]


@pytest.mark.parametrize("case", range(7), ids=["one token", "bf16 only", "denoiser only", "uniform last token", "worse row",
                                                "gradient only", "no masked row"])
def test_an_op_wrong_in_one_corner_is_switched_off(k, case):
    name, wrong, f, phrase = corner_wrong_ops()[case]
    with difflm_ops.replace(name, wrong), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not f.self_check("cpu")
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and f"difflm kernel {name} on cpu disagrees" in msgs[0] and phrase in msgs[0], msgs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f.self_check("cpu")


def test_inputs_the_binding_refuses_run_the_oracle(k):
    """The dispatch hands an op only what its binding takes: int32 ids, a bf16 sigma_bar, an empty projection
    with a strided last dimension run the oracle, as without kernels (a mask_id outside the scores is refused)."""
    gen = torch.Generator().manual_seed(5)
    ls, xt, x0, sb = inputs("absorb", 2, 5, 6, torch.float32, gen)
    t, u = torch.full((2,), 0.4, dtype=torch.float64), torch.rand(2, 5, 2, dtype=torch.float64, generator=gen)
    qkv, (cos, sin) = torch.randn(0, 4, 3, 8, 2).transpose(3, 4), common.rotary_tables(4, 8)  # (0, 4, 3, 2, 8)
    calls = [(sedd.score_entropy, (ls, xt.int(), x0, sb, "absorb")), (sedd.score_entropy, (ls, xt, x0, sb.bfloat16(), "absorb")),
             (sedd.euler_step, (ls, xt.int(), t, u, "absorb")), (common.apply_rotary, (qkv, cos, sin))]
    def outcome(fn, a):  # the result, or the error (torch 2.6's scatter refuses int32 ids: the dispatch must too)
        try:
            return fn(*a)
        except RuntimeError as e:
            return str(e)
    for fn, a in calls:
        with difflm_ops.oracles_only():
            ref = outcome(fn, a)
        got = outcome(fn, a)
        assert (got == ref) if isinstance(ref, str) else torch.equal(got, ref), (fn.__name__, got)
    # tables that require a gradient (learnt ones): the op gives none for them, so the oracle runs
    qkv, tables = torch.randn(2, 4, 3, 2, 8, generator=gen), [t.clone().requires_grad_() for t in common.rotary_tables(4, 8)]
    grads = []
    for off in (False, True):
        with difflm_ops.oracles_only() if off else contextlib.nullcontext():
            grads.append(torch.autograd.grad(common.apply_rotary(qkv, *tables).sum(), tables))
    assert all(torch.allclose(a, b) for a, b in zip(*grads))


def test_trust_skips_the_check_and_zero_turns_the_ops_off():
    code = """
        import warnings, torch, difflm_ops, sedd
        warnings.simplefilter("error")
        ls, xt = torch.randn(2, 3, 6), torch.full((2, 3), 5)
        t, u = torch.full((2,), 0.5, dtype=torch.float64), torch.rand(2, 3, 2, dtype=torch.float64)
        marker = torch.full((2, 3), 4)
        with difflm_ops.replace("sedd_euler_step", lambda *a: marker):
            out = sedd.euler_step(ls, xt, t, u, "absorb")
            print(torch.equal(out, marker), len(difflm_ops._PASSED), len(difflm_ops._CHECK_SECONDS))
    """
    r = run_py(code, {"DIFFLM_KERNELS": "trust"})
    assert r.returncode == 0 and r.stdout.split() == ["True", "1", "0"], r.stdout + r.stderr[-2000:]
    r = run_py(code, {"DIFFLM_KERNELS": "0"})  # no ops at all: not even a stand-in runs
    assert r.returncode == 0 and r.stdout.split() == ["False", "0", "0"], r.stdout + r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# fallbacks: DIFFLM_KERNELS=0 and a failed build


def run_py(code, env, cwd=ROOT):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_disabled_kernels_fall_back_to_pytorch(value):
    r = run_py("""
        import warnings, torch, difflm_ops, sedd, mdlm
        warnings.simplefilter("error")
        assert difflm_ops.load() is None
        ls = torch.randn(2, 3, 6); xt = torch.full((2, 3), 5); u = torch.rand(2, 3, 2, dtype=torch.float64)
        t = torch.full((2,), 0.5, dtype=torch.float64)
        print(sedd.euler_step(ls, xt, t, u, "absorb").tolist(), mdlm.ancestral_step(ls, xt, t, u, 5).tolist())
        print(float(sedd.score_entropy(ls, xt, torch.zeros_like(xt), torch.ones(2), "absorb").sum()))
    """, {"DIFFLM_KERNELS": value})  # "off" and "false" left them on, silently
    assert r.returncode == 0, r.stderr[-2000:]


def test_failed_build_warns_once_and_falls_back(tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "broken.cpp").write_text("this is not C++;\n")
    r = run_py(f"""
        import warnings, difflm_ops
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert difflm_ops.load({str(src)!r}) is None
            assert difflm_ops.load({str(src)!r}) is None
        msgs = [str(w.message) for w in caught]
        assert len(msgs) == 1 and "difflm kernels failed to build" in msgs[0], msgs
    """, {"DIFFLM_BUILD": str(tmp_path / "build")})
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_killed_build_does_not_hang_the_next(tmp_path):
    """A build killed mid-way leaves torch's marker file behind, on which every later torch build up to
    2.13 would wait forever; difflm_ops.load removes it (with a warning) and goes on. Later torch locks
    that file (it stays after every build): no warning there, and no wait."""
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "broken.cpp").write_text("this is not C++;\n")
    r = run_py(f"""
        import os, warnings, difflm_ops
        from torch.utils import cpp_extension
        os.makedirs(difflm_ops.build_dir("cpu"))
        open(os.path.join(difflm_ops.build_dir("cpu"), "lock"), "w").close()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert difflm_ops.load({str(src)!r}) is None
        msgs = [str(w.message) for w in caught]
        baton = hasattr(cpp_extension, "FileBaton")  # the marker whose existence blocks
        assert len(msgs) == 1 + baton and ("left by a kernel build" in msgs[0]) == baton and "failed to build" in msgs[-1], msgs
    """, {"DIFFLM_BUILD": str(tmp_path / "build")})
    assert r.returncode == 0, r.stderr[-2000:]


def test_failed_cuda_build_keeps_the_cpu_kernels(tmp_path):
    """With a GPU in sight but a CUDA source that does not compile (here a broken .cu; on a CPU torch
    any .cu fails), one warning, and the C++ ops are still built: only GPU tensors take PyTorch."""
    src = tmp_path / "csrc"
    shutil.copytree(os.path.join(ROOT, "csrc"), src, ignore=shutil.ignore_patterns("*.cu"))
    (src / "broken.cu").write_text("this is not CUDA;\n")
    torch.manual_seed(0)
    ls, xt, x0 = torch.randn(2, 3, 6), torch.tensor([[5, 1, 5], [5, 5, 2]]), torch.tensor([[0, 1, 4], [3, 2, 2]])
    ref = sedd.score_entropy.oracle(ls, xt, x0, torch.ones(2), "absorb").tolist()
    r = run_py(f"""
        import warnings, torch
        torch.cuda.is_available = lambda: True  # difflm_ops.load now adds the .cu sources
        torch.cuda.get_device_capability = lambda device=None: (9, 0)
        import difflm_ops
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            k = difflm_ops.load({str(src)!r})
        msgs = [str(w.message) for w in caught]
        assert len(msgs) == 1 and "CUDA kernels failed to build" in msgs[0], msgs
        assert k is not None and not k.cuda_built()
        torch.manual_seed(0)
        ls, xt, x0 = torch.randn(2, 3, 6), torch.tensor({xt.tolist()}), torch.tensor({x0.tolist()})
        got = k.score_entropy(ls, xt, x0, torch.ones(2), "absorb")
        assert torch.allclose(got, torch.tensor({ref}), atol=1e-5), got
    """, {"DIFFLM_BUILD": str(tmp_path / "build"), "TORCH_CUDA_ARCH_LIST": "9.0"})  # else torch 2.6 warns, reading the fake card
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_build_cache_is_one_per_torch_version_and_gpu_architecture(monkeypatch, tmp_path):
    """A cache shared by an A100 and an H100 node, or kept across a torch upgrade, would hand one of them a
    module built for the other: each gets its own folder."""
    monkeypatch.setenv("DIFFLM_BUILD", str(tmp_path))
    folders = set()
    for version, capability in (("2.13.0", (8, 0)), ("2.13.0", (9, 0)), ("2.14.0", (9, 0))):
        monkeypatch.setattr(torch, "__version__", version)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        folders.add(difflm_ops.build_dir("cuda"))
        assert os.path.dirname(difflm_ops.build_dir("cuda")) == str(tmp_path)
    assert len(folders) == 3, folders
    assert difflm_ops.build_dir("cpu").endswith("cpu-torch2.14.0")


def test_a_prebuilt_module_without_cuda_warns_where_a_gpu_is_seen(k, tmp_path):
    """`DIFFLM_BUILD_EXT=1 pip install -e .` on a machine without a GPU builds the C++ part only; copied
    to a GPU machine it was loaded in preference to the JIT build and the CUDA ops were off, in silence."""
    (tmp_path / "difflm_kernels.py").write_text(  # stands in for the compiled module: importing it registers the ops
        "import glob, os, difflm_ops\ndifflm_ops._build(sorted(glob.glob(os.path.join(difflm_ops.ROOT, 'csrc', '*.cpp'))))\n")
    r = run_py("""
        import warnings, torch
        import difflm_ops
        torch.cuda.is_available = lambda: True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            k = difflm_ops.load()
        msgs = [str(w.message) for w in caught]
        assert k is not None and not k.cuda_built()
        assert len(msgs) == 1 and "prebuilt difflm_kernels has no CUDA part" in msgs[0], msgs
    """, {"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]


def test_an_ahead_of_time_build_without_torch_in_sight_is_one_line(tmp_path):
    """pip's isolated build environment has no torch: setup.py died with a ModuleNotFoundError traceback."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DIFFLM_BUILD_EXT": "1", "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: DIFFLM_BUILD_EXT=1 builds csrc/ against the installed torch; add --no-build-isolation to the pip command"], r.stderr


def test_the_modules_import_beside_hugging_faces_kernels_package(tmp_path):
    """transformers installs Hugging Face's `kernels` package; difflm's module was kernels.py too, so outside the
    repository (an installed difflm, found after site-packages) `import mdlm` got theirs and failed."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("HUGGING_FACE = True\n")  # stands in for theirs
    r = run_py(f"""
        import sys
        sys.path.append({ROOT!r})
        import mdlm, sedd, kernels
        assert kernels.HUGGING_FACE and mdlm.ancestral_step.oracle and sedd.euler_step.oracle
    """, {"PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_prebuilt_module_that_does_not_load_gives_way_to_the_jit_build(k, tmp_path):
    """A module built for another torch (an undefined symbol) raised its ImportError from every method."""
    (tmp_path / "difflm_kernels.py").write_text("raise ImportError('difflm_kernels.so: undefined symbol: _ZN3c10x')\n")
    r = run_py("""
        import warnings, difflm_ops
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            k = difflm_ops.load()
        msgs = [str(w.message) for w in caught]
        assert k is not None and len(msgs) == 1 and "prebuilt difflm_kernels does not load" in msgs[0], msgs
    """, {"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_sigma_bar_that_needs_its_gradient_takes_the_oracle(k):
    """The op's backward gives the scores' gradient alone: sigma_bar's came back None, silently."""
    ls = torch.randn(2, 3, 7, requires_grad=True)
    xt, x0 = torch.tensor([[6, 1, 6], [2, 6, 6]]), torch.tensor([[3, 1, 4], [2, 5, 0]])
    grads = []
    for path in (contextlib.nullcontext, difflm_ops.oracles_only):
        sb = torch.tensor([0.7, 1.9], requires_grad=True)
        with path():
            sedd.score_entropy(ls, xt, x0, sb, "absorb").sum().backward()
        grads.append(sb.grad)
    assert grads[0] is not None and torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("graph", GRAPHS)
def test_a_gradient_differentiated_again_is_the_oracles(k, graph):
    """create_graph=True (a gradient penalty): the op's backward is no differentiable graph, so the second
    gradient was cut, or silently wrong."""
    torch.manual_seed(0)
    base, xt, x0 = torch.randn(2, 3, 7), torch.tensor([[6, 1, 6], [2, 6, 6]]), torch.tensor([[3, 1, 4], [2, 5, 0]])
    if graph == "uniform":
        base, xt = torch.randn(2, 3, 6), torch.tensor([[5, 1, 0], [2, 3, 4]])
    grads = []
    for path in (contextlib.nullcontext, difflm_ops.oracles_only):
        ls = base.clone().requires_grad_()
        with path():
            loss = sedd.score_entropy(ls, xt, x0, torch.tensor([0.7, 1.9]), graph).sum()
            g = torch.autograd.grad(loss, ls, create_graph=True)[0]
            (loss + (g ** 2).sum()).backward()
        grads.append(ls.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the methods give the same results with and without the kernels


def tiny_sedd(graph, V=11):
    cfg = sedd.Config(graph=graph, n_layer=1, n_head=2, n_embd=32, block_size=16, steps=12)
    torch.manual_seed(0)
    model = sedd.build_model(cfg, {"vocab_size": V})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # away from the zero init, so scores differ per token
    return cfg, model


@pytest.mark.parametrize("graph", GRAPHS)
def test_sedd_training_step_same_with_and_without_kernels(k, graph):
    cfg, model = tiny_sedd(graph)
    x0 = torch.randint(11, (8, 16))
    grads = []
    for path in (contextlib.nullcontext, difflm_ops.oracles_only):
        model.zero_grad()
        torch.manual_seed(5)
        with path():
            loss = sedd.loss_fn(model, x0, cfg, model.num_states)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("graph,sampler", [("absorb", "euler"), ("absorb", "tweedie"), ("uniform", "tweedie"),
                                           ("uniform", "euler")])
def test_sedd_sampling_same_with_and_without_kernels(k, graph, sampler):
    cfg, model = tiny_sedd(graph)
    cfg.sampler = sampler
    outs = []
    for path in (contextlib.nullcontext, difflm_ops.oracles_only):
        torch.manual_seed(7)
        with path():
            outs.append(sedd.generate(model, cfg, torch.full((16,), -1), 6)[0])
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("sampler", ["ddpm", "ddpm_cache"])
def test_mdlm_sampling_same_with_and_without_kernels(k, sampler):
    cfg = mdlm.Config(n_layer=1, n_head=2, n_embd=32, block_size=16, steps=20, sampler=sampler)
    torch.manual_seed(0)
    model = mdlm.build_model(cfg, {"vocab_size": 9}).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    outs = []
    for path in (contextlib.nullcontext, difflm_ops.oracles_only):
        torch.manual_seed(3)
        with path():
            outs.append(mdlm.generate(model, cfg, torch.full((16,), -1), 5)[0])
    assert torch.equal(outs[0], outs[1])
