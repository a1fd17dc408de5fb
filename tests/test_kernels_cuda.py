"""Fused kernels on CUDA: the same parity checks as tests/test_kernels.py, on the GPU, against the
oracles run on the GPU, plus the three thread layouts of the CUDA code (a warp per row up to
N = 2048, 256 threads up to 16384, 512 beyond) and unaligned rows for its 16-byte vector path.
Where torch sees no GPU they run on the CPU ops, so that the checks themselves are tested before a GPU
runs them; the few that only a GPU can answer (its device errors, its synchronisations) skip there."""
import warnings

import pytest
import torch

import difflm_ops
import mdlm
import sedd
from test_kernels import ROTARY_SHAPES, fresh_gen, rotary_pairs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device; this torch sees none")

GRAPHS = ("absorb", "uniform")
DTYPES = (torch.float32, torch.bfloat16)
# V = 1; odd N so rows start unaligned; each thread layout; the GPT-2 vocabulary
SHAPES = [(2, 3, 1), (3, 5, 6), (4, 33, 67), (2, 9, 3001), (2, 5, 20011), (2, 4, 50257)]


@pytest.fixture(scope="module")
def k():
    ops = difflm_ops.load()
    assert ops is not None and (DEVICE == "cpu" or ops.cuda_built()), "the kernels were not built with CUDA"
    return ops


def inputs(graph, B, L, V, dtype, gen, masked=0.5, scale=2.0):
    N = V + 1 if graph == "absorb" else V
    ls = (torch.randn(B, L, N, generator=gen) * scale).to(dtype)
    if graph == "absorb":
        x0 = torch.randint(V, (B, L), generator=gen)
        xt = torch.where(torch.rand(B, L, generator=gen) < masked, N - 1, x0)
    else:
        xt = torch.randint(N, (B, L), generator=gen)
        x0 = torch.where(torch.rand(B, L, generator=gen) < 0.5, xt, torch.randint(N, (B, L), generator=gen))
    sb = torch.rand(B, generator=gen) * 4 + 1e-3
    return [t.to(DEVICE) for t in (ls, xt, x0, sb)]


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shifted", [False, True])
def test_cuda_score_entropy_matches_oracle(k, graph, dtype, shape, shifted):
    gen, seed = fresh_gen()
    ls, xt, x0, sb = inputs(graph, *shape, dtype, gen)
    w = torch.rand(shape[:2], generator=gen).to(DEVICE) + 0.5
    shift = (torch.rand(shape[0], generator=gen) * 16 - 2).to(DEVICE) if shifted else None  # SEDD's absorbing offset
    ref_ls = ls.clone().requires_grad_()
    ref = sedd.score_entropy.oracle(ref_ls, xt, x0, sb, graph, shift)
    (ref * w).sum().backward()
    got_ls = ls.clone().requires_grad_()
    loss = k.score_entropy(got_ls, xt, x0, sb, graph, shift)
    (loss * w).sum().backward()
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-5, msg=lambda m: f"seed {seed}: {m}")
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(got_ls.grad.float(), ref_ls.grad.float(), **tol, msg=lambda m: f"seed {seed}: {m}")
    # the CPU kernel computes the same function
    cpu_loss = k.score_entropy(ls.cpu(), xt.cpu(), x0.cpu(), sb.cpu(), graph, None if shift is None else shift.cpu())
    torch.testing.assert_close(loss.cpu(), cpu_loss, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_score_entropy_scores_and_gradient_aligned_differently(k, dtype):
    """Scores at a storage offset of one element: the gradient (a fresh buffer) and the scores
    no longer share their 16-byte alignment, so the backward takes its scalar path."""
    gen, seed = fresh_gen()
    B, L, V = 3, 7, 2049  # the 256-thread layout
    ls, xt, x0, sb = inputs("uniform", B, L, V, dtype, gen)
    shifted = torch.empty(ls.numel() + 1, dtype=dtype, device=DEVICE)[1:].view_as(ls).copy_(ls)
    assert shifted.is_contiguous() and shifted.storage_offset() == 1
    w = torch.rand(B, L, generator=gen).to(DEVICE) + 0.5
    ref_ls = ls.clone().requires_grad_()
    (sedd.score_entropy.oracle(ref_ls, xt, x0, sb, "uniform") * w).sum().backward()
    got_ls = shifted.requires_grad_()
    (k.score_entropy(got_ls, xt, x0, sb, "uniform") * w).sum().backward()
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(got_ls.grad.float(), ref_ls.grad.float(), **tol, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shifted", [False, True])
def test_cuda_steps_return_the_oracles_tokens(k, graph, dtype, shape, shifted):
    gen, seed = fresh_gen()
    B, L, V = shape
    for masked, t_scale in ((0.5, 0.3), (1.0, 3.0)):
        ls, xt, _, _ = inputs(graph, *shape, dtype, gen, masked=masked)
        t = (torch.rand(B, dtype=torch.float64, generator=gen) * t_scale).to(DEVICE)
        u = torch.rand(B, L, 2, dtype=torch.float64, generator=gen).to(DEVICE)
        N = ls.shape[-1]
        sh = (torch.rand(B, generator=gen) * 16 - 2).to(DEVICE) if shifted else None  # SEDD's sampler, absorbing
        h = (ls.float() + sh[:, None, None]).to(dtype) if shifted else ls
        pairs = [("euler", k.sedd_euler_step(h, xt, t, u, graph, sh), sedd.euler_step.oracle(h, xt, t, u, graph, sh)),
                 ("tweedie", k.sedd_tweedie_step(h, xt, t, u, graph, False, sh),
                  sedd.tweedie_step.oracle(h, xt, t, u, graph, False, sh)),
                 ("denoiser", k.sedd_tweedie_step(h, xt, t, u, graph, True, sh),
                  sedd.tweedie_step.oracle(h, xt, t, u, graph, True, sh))]
        if graph == "absorb" and not shifted:
            p = t.clamp(max=1.0)
            pairs.append(("mdlm", k.mdlm_ancestral_step(ls, xt, p, u, N - 1),
                          mdlm.ancestral_step.oracle(ls, xt, p, u, N - 1)))
        for name, got, ref in pairs:
            assert torch.equal(got, ref), f"seed {seed}: {name} differs at {(got != ref).nonzero()[:5].tolist()}"


@needs_gpu
def test_cuda_bad_device_mix_is_an_error(k):
    ls = torch.randn(2, 3, 6, device=DEVICE)
    xt = torch.full((2, 3), 5)
    with pytest.raises(RuntimeError, match="xt must be on cuda"):
        k.sedd_euler_step(ls, xt, torch.ones(2, dtype=torch.float64, device=DEVICE),
                          torch.rand(2, 3, 2, dtype=torch.float64, device=DEVICE), "absorb")


def cpp_warnings(call, capfd):
    """The messages of the warnings C++ code raised during call(). An op called through torch.ops prints its C++
    warnings (TORCH_WARN, the sync debug mode's among them) to stderr instead of raising Python warnings, so both are read."""
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(c.message) for c in caught] + [line for line in capfd.readouterr().err.splitlines() if "Warning:" in line]


def test_cpp_warnings_of_a_torch_ops_call_are_counted(capfd):
    """What the sync count below relies on, checked where it runs on the CPU: a C++ warning from an op called
    through torch.ops (an out tensor resized) is seen once a call, on every torch version it is read on."""
    a, out = torch.ones(3), torch.ones(2)
    seen = cpp_warnings(lambda: torch.ops.aten.add.out(a, a, out=out), capfd)
    assert len([m for m in seen if "resized" in m]) == 1, seen
    assert cpp_warnings(lambda: torch.ops.aten.add.out(a, a, out=out), capfd) == []  # the right shape now: no warning


@needs_gpu
def test_cuda_ops_wait_for_the_gpu_once_a_call(k, capfd):
    """The binding's range checks (token ids, sigma_bar, rates, uniforms) copy their minima and maxima to the host
    together: one synchronisation for each call of score entropy, of its backward and of each sampling step (three
    before), counted by torch's sync debug mode."""
    ls, xt, x0, sb = inputs("absorb", 2, 5, 67, torch.float32, torch.Generator().manual_seed(0), masked=1.0)
    t = torch.full((2,), 0.3, dtype=torch.float64, device=DEVICE)
    u = torch.rand(2, 5, 2, dtype=torch.float64, device=DEVICE)
    w, N = torch.ones(2, 5, device=DEVICE), ls.shape[-1]
    calls = {"score_entropy": lambda: k.score_entropy(ls, xt, x0, sb, "absorb"),
             "score_entropy_backward": lambda: k.score_entropy_backward(w, ls, xt, x0, sb, "absorb"),
             "sedd_euler_step": lambda: k.sedd_euler_step(ls, xt, t, u, "absorb"),
             "sedd_tweedie_step": lambda: k.sedd_tweedie_step(ls, xt, t, u, "uniform", False),
             "mdlm_ancestral_step": lambda: k.mdlm_ancestral_step(ls, xt, t, u, N - 1)}
    for name, call in calls.items():
        call()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            seen = cpp_warnings(call, capfd)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [m for m in seen if "synchroniz" in m]
        assert len(syncs) == 1, (name, syncs)


def test_cuda_self_check_passes_for_every_op(k):
    """The first-use check (difflm_ops.py) on the GPU: every op agrees with its oracle there."""
    import diffusion_lm  # noqa: F401  (marks nearest_embedding)
    for name, f in difflm_ops.FUSED.items():
        assert f.self_check(DEVICE), f"{name} failed its self-check on the GPU (see the warning)"


@needs_gpu
def test_cuda_meta_and_mixed_devices_are_refused(k):
    ls = torch.randn(2, 3, 6, device=DEVICE)
    xt, sb = torch.full((2, 3), 5, device=DEVICE), torch.ones(2, device=DEVICE)
    with pytest.raises(RuntimeError, match="xt must be on cuda"):
        k.score_entropy(ls, xt.to("meta"), xt, sb, "absorb")
    with pytest.raises(RuntimeError, match="sigma_bar must be on cuda"):
        k.score_entropy(ls, xt, xt, sb.cpu(), "absorb")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROTARY_SHAPES + [(8, 1024, 12, 64), (3, 33, 5, 18)])
def test_cuda_rotary_is_the_oracle_bit_for_bit(k, dtype, shape):
    for what, got, ref in rotary_pairs(shape, dtype, DEVICE, True):
        assert got.dtype == ref.dtype and torch.equal(got, ref), what
