"""The CUDA kernels' own source (csrc/cuda_kernels.cu), run on the CPU: compiled by g++ against
tests/cuda_emulator.h (a std::thread per CUDA thread, real barriers, warp shuffles through memory) and
called through their launchers, against the CPU ops on the same inputs. It checks the kernels' logic on a
machine without a GPU; the CUDA tests on a GPU remain the proof of the hardware path. Also: binding.cpp's
CUDA branches, which a CPU build never compiles, must compile."""
import ctypes
import math
import os
import re
import shutil
import subprocess

import pytest
import torch

import difflm_ops
import sedd
from test_kernel_nearest import check_optimal, crowd, near_copies, near_crowd
from test_kernels import fresh_gen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) to build the emulated kernels")


def host_launches(src):
    """kernel<<<grid, block, 0, stream>>>(args); -> emulated_launch(grid, block, [&] { kernel(args); });"""
    out, i = [], 0
    for m in re.finditer(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<", src):
        if m.start() < i:
            continue
        close = src.index(">>>(", m.end())
        grid, block = split_top(src[m.end():close])[:2]
        depth, j = 1, close + 4
        while depth:  # the matching parenthesis of the argument list
            depth += {"(": 1, ")": -1}.get(src[j], 0)
            j += 1
        out += [src[i:m.start()], f"emulated_launch(({grid}), ({block}), [&] {{ {m.group(1)}({src[close + 4:j - 1]}); }})"]
        i = j
    return "".join(out + [src[i:]])


def split_top(text):
    """Split on the commas outside parentheses and angle brackets."""
    parts, depth, cur = [], 0, ""
    for c in text:
        depth += {"(": 1, "<": 1, ")": -1, ">": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts, cur = parts + [cur.strip()], ""
        else:
            cur += c
    return parts + [cur.strip()]


class Strides4(ctypes.Structure):
    _fields_ = [("b", ctypes.c_int64), ("l", ctypes.c_int64), ("j", ctypes.c_int64), ("h", ctypes.c_int64)]


class NearestTable(ctypes.Structure):
    _fields_ = [("t", ctypes.c_void_p), ("ct", ctypes.c_void_p), ("V", ctypes.c_int64), ("d", ctypes.c_int64)]


@pytest.fixture(scope="module")
def cu(tmp_path_factory):
    d = tmp_path_factory.mktemp("emulated")
    with open(os.path.join(ROOT, "csrc", "cuda_kernels.cu")) as f:
        src = host_launches(f.read())
    # the rotary grid's cap, settable (test_rotary_grid_stride): its grid-stride loop turns only past 2^23 rows
    cap = "most = int64_t(1) << 20"
    assert cap in src, "the rotary launcher's grid cap moved: update test_rotary_grid_stride"
    src = '#include <stdint.h>\nextern "C" { int64_t emulated_rotary_most = int64_t(1) << 20; }\n' + src.replace(cap, "most = emulated_rotary_most")
    (d / "cuda_runtime.h").write_text('#include "cuda_emulator.h"\n')
    (d / "kernels.cpp").write_text(src)
    lib = d / "kernels.so"
    # -O0 with the sanitizer: a misaligned 16-byte access is reported (uint4 is 16-byte aligned, as on
    # a GPU, where it faults) instead of crashing the process through an aligned SSE move
    cmd = ["g++", "-std=c++20", "-O0", "-fsanitize=undefined", "-fno-sanitize=vptr", "-pthread", "-shared", "-fPIC",
           "-ffp-contract=off", f"-I{d}", f"-I{os.path.join(ROOT, 'tests')}", f"-I{os.path.join(ROOT, 'csrc')}", str(d / "kernels.cpp"), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return ctypes.CDLL(str(lib))


@pytest.fixture(autouse=True)
def no_undefined_behaviour(capfd):
    """What the sanitizer reports on stderr (misaligned vector access, out-of-bounds shared array,
    overflow, bad shift) fails the test that ran it; each place is reported once per process."""
    yield
    err = capfd.readouterr().err
    assert "runtime error" not in err, err[:2000]


GUARD = 64  # elements either side of every buffer a kernel writes: 16-byte aligned offsets in every dtype


@pytest.fixture
def empty():
    """torch.empty for the kernels' outputs, inside a larger buffer whose margins must still hold their
    fill when the test ends: a kernel that writes past either end of its output fails the test."""
    buffers = []

    def make(*shape, dtype=torch.float32):
        n = math.prod(shape)
        buf = torch.full((n + 2 * GUARD,), 77, dtype=dtype)
        buffers.append(buf)
        return buf[GUARD:GUARD + n].view(shape)
    yield make
    for buf in buffers:
        margins = torch.cat([buf[:GUARD], buf[-GUARD:]])
        assert (margins == 77).all(), f"a kernel wrote outside its {buf.numel() - 2 * GUARD}-element {buf.dtype} output"


def cuda_include():
    """The CUDA toolkit's include folder (cuda_runtime.h), or None."""
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, homes):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


@pytest.mark.skipif(cuda_include() is None, reason="needs the CUDA toolkit's headers (cuda_runtime.h)")
def test_binding_cuda_branch_compiles(tmp_path):
    """A CPU wheel of torch ships the c10 CUDA headers but not the one its CUDA build generates, which
    only says that c10's CUDA library is shared: written here, the binding's CUDA branches can be checked."""
    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    from torch.utils.cpp_extension import include_paths
    # C++20, as torch's own extension builds: from torch 2.14 its headers do not parse as C++17
    cmd = (["g++", "-std=c++20", "-fsyntax-only", "-DDIFFLM_CUDA"] + [f"-I{p}" for p in include_paths()]
           + [f"-I{tmp_path}", f"-I{cuda_include()}", f"-I{os.path.join(ROOT, 'csrc')}",
              os.path.join(ROOT, "csrc", "binding.cpp")])
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def k():
    ops = difflm_ops.load()
    assert ops is not None, "the difflm kernels did not build"
    return torch.ops.difflm


def p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def dtype_code(t):
    return 1 if t.dtype == torch.bfloat16 else 0


SE_CONSTS = STEP_CONSTS = 5  # sizeof(SEConsts), sizeof(StepConsts) in float64s: four doubles and the float shift,
# padded (kernels.h)


# the launchers, called as binding.cpp calls them (outputs from empty(), ids int64, times and uniforms float64)
def se_call(cu, ls, xt, x0, sb, shift, graph, loss, w, grad, consts):
    B, L, N = ls.shape
    return cu.difflm_launch_score_entropy(p(ls), dtype_code(ls), p(xt), p(x0), p(sb), p(shift),
                                          0 if graph == "absorb" else 1,
                                          ctypes.c_int64(B), ctypes.c_int64(L), ctypes.c_int64(N), p(loss), p(w),
                                          p(grad), p(consts), None)


def sedd_call(cu, h, xt, t, shift, u, step, graph, final, out, consts):
    B, L, N = h.shape
    return cu.difflm_launch_sedd_step(p(h), dtype_code(h), p(xt), p(t), p(shift), p(u), step,
                                      0 if graph == "absorb" else 1, int(final), ctypes.c_int64(B), ctypes.c_int64(L),
                                      ctypes.c_int64(N), p(out), p(consts), None)


def mdlm_call(cu, h, xt, pu, u, out):
    B, L, N = h.shape
    return cu.difflm_launch_mdlm_step(p(h), dtype_code(h), p(xt), p(pu), p(u), ctypes.c_int64(N - 1),
                                      ctypes.c_int64(B), ctypes.c_int64(L), ctypes.c_int64(N), p(out), None)


def rotary_call(cu, qkv, cos, sin, transpose, out):
    B, L, _, H, D = qkv.shape
    return cu.difflm_launch_rotary(p(qkv), dtype_code(qkv), Strides4(*qkv.stride()[:4]), p(cos), p(sin),
                                   int(transpose), ctypes.c_int64(B), ctypes.c_int64(L), ctypes.c_int64(H),
                                   ctypes.c_int64(D), p(out), None)


def fp32_search(cu, empty, x, E, metric):
    """The fp32 search (pack + tiled search) -> ids (N,)."""
    (N, d), V = x.shape, E.shape[0]
    out, table, bias = empty(N, dtype=torch.long), empty(V, d), empty(V)
    assert cu.difflm_launch_nearest_embedding(p(x), ctypes.c_int64(N), ctypes.c_int64(d), p(E), ctypes.c_int64(V),
                                              0 if metric == "cos" else 1, p(table), p(bias), p(out), None) == 0
    return out


def screened_select(cu, empty, x, E, metric):
    """The screened search's select kernel, fed the bf16 screen as binding.cpp's nearest_screened_impl prepares
    it on the CPU -> ids (N,), -1 for a query left to the fp32 search."""
    (N, d), V = x.shape, E.shape[0]
    sq = E.double().pow(2).sum(1)
    t = E if metric == "l2" else (E * sq.sqrt().clamp_min(1e-12).reciprocal().float()[:, None]).contiguous()
    screen = (x.bfloat16().float() @ t.bfloat16().float().T).bfloat16()
    ct = torch.stack([(sq * -0.5).float(), sq.sqrt().float()], 1) if metric == "l2" else None
    h = x.norm(dim=1) / 32 * (1.0 if metric == "l2" else float(t.norm(dim=1).max()))
    tab = NearestTable(t.data_ptr(), ct.data_ptr() if ct is not None else None, V, d)
    ids = empty(N, dtype=torch.long)
    assert cu.difflm_launch_nearest_select(p(screen), ctypes.c_int64(N), p(x), p(h), tab, p(ids), None) == 0
    return ids


WIDTHS = [(3, 1, 2), (2, 5, 40), (2, 2, 3000), (2, 1, 20000)]  # warps for 8 rows; 256, 512 threads a row
DTYPES = [torch.float32, torch.bfloat16]


def every_layout(test):
    """Each thread layout, both graphs, both dtypes."""
    for mark in (pytest.mark.parametrize("B,L,V", WIDTHS), pytest.mark.parametrize("graph", ["absorb", "uniform"]),
                 pytest.mark.parametrize("dtype", DTYPES)):
        test = mark(test)
    return test


@every_layout
def test_score_entropy(cu, k, empty, B, L, V, graph, dtype):
    gen, seed = fresh_gen()
    N = V + 1 if graph == "absorb" else V
    x0 = torch.randint(V, (B, L), generator=gen)
    other = torch.full((B, L), N - 1) if graph == "absorb" else torch.randint(N, (B, L), generator=gen)
    xt = torch.where(torch.rand(B, L, generator=gen) < 0.5, other, x0)
    ls = torch.randn(B, L, N, generator=gen).to(dtype)
    sb = torch.rand(B, generator=gen, dtype=torch.float64) * 3 + 0.05
    w = torch.rand(B, L, generator=gen)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)  # one bf16 ulp
    for shift in (None, torch.rand(B, generator=gen) * 16 - 2):  # without and with SEDD's per-sequence offset
        loss, grad, consts = empty(B, L), empty(B, L, N, dtype=dtype), empty(B, SE_CONSTS, dtype=torch.float64)
        for out_loss, grad_loss, out_grad in ((loss, None, None), (None, w, grad)):
            assert se_call(cu, ls, xt, x0, sb, shift, graph, out_loss, grad_loss, out_grad, consts) == 0
        torch.testing.assert_close(loss, k.score_entropy(ls, xt, x0, sb, graph, shift), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"seed {seed}, shift {shift}: loss: {m}")
        torch.testing.assert_close(grad.float(), k.score_entropy_backward(w, ls, xt, x0, sb, graph, shift).float(),
                                   **tol, msg=lambda m: f"seed {seed}, shift {shift}: gradient: {m}")


@every_layout
def test_sampling_steps(cu, k, empty, B, L, V, graph, dtype):
    """Rows that stay (the screen) and rows that move (the fp64 path and its inverse-CDF walk). The last two
    cases pass the scores with a per-sequence shift added, and the shift (SEDD's sampler, absorbing)."""
    gen, seed = fresh_gen()
    N = V + 1 if graph == "absorb" else V
    cases = ((-math.log(N) + 1.5, 0.3, False), (1.0, 0.5, True), (1.0, 0.05, True))
    for level, t, shifted in cases if N < 16384 else cases[1:2]:  # the widest rows: one case where every row moves
        sh = torch.rand(B, generator=gen) * 16 - 2 if shifted else None
        h = torch.randn(B, L, N, generator=gen) + level + (sh[:, None, None] if shifted else 0.0)
        h = h.to(dtype)
        masked = torch.rand(B, L, generator=gen) < 0.5
        xt = torch.where(masked, N - 1, torch.randint(N - 1, (B, L), generator=gen)) if graph == "absorb" else \
            torch.randint(N, (B, L), generator=gen)
        u = torch.rand(B, L, 2, generator=gen, dtype=torch.float64)
        tt = t * (0.5 + torch.rand(B, generator=gen, dtype=torch.float64))  # each sequence its own time
        consts = empty(B, STEP_CONSTS, dtype=torch.float64)
        for step, final in ((0, False), (1, False), (1, True)):
            out = empty(B, L, dtype=torch.long)
            assert sedd_call(cu, h, xt, tt, sh, u, step, graph, final, out, consts) == 0
            ref = k.sedd_euler_step(h, xt, tt, u, graph, sh) if step == 0 else \
                k.sedd_tweedie_step(h, xt, tt, u, graph, final, sh)
            assert torch.equal(out, ref), f"seed {seed}: step {step}, final {final}, level {level:.2f}, shifted {shifted}"
        if graph == "absorb":
            pu = torch.full((B,), 0.7, dtype=torch.float64)
            out = empty(B, L, dtype=torch.long)
            assert mdlm_call(cu, h, xt, pu, u, out) == 0
            assert torch.equal(out, k.mdlm_ancestral_step(h, xt, pu, u, N - 1)), f"seed {seed}: mdlm"


@pytest.mark.parametrize("B,L,H,D", [(2, 5, 3, 6), (1, 7, 2, 64), (2, 3, 1, 70)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_bit_for_bit(cu, k, empty, B, L, H, D, dtype):
    gen, seed = fresh_gen()
    cos, sin = torch.randn(L, 1, 1, D, generator=gen), torch.randn(L, 1, 1, D, generator=gen)
    qkv = torch.randn(B, L, 4, H, D, generator=gen).to(dtype)[:, :, 1:]  # strided: every stride but the last
    for transpose in (False, True):
        out = empty(B, L, 3, H, D, dtype=dtype)
        assert rotary_call(cu, qkv, cos, sin, transpose, out) == 0
        assert torch.equal(out, k.rotary(qkv, cos, sin, transpose)), f"seed {seed}: transpose {transpose}"


@pytest.mark.parametrize("metric", ["cos", "l2"])
@pytest.mark.parametrize("kind", ["odd sizes", "crowded", "closer than bf16"])
def test_nearest_searches(cu, k, empty, metric, kind):
    """The fp32 search (pack + tiled search) and the screened search's select kernel, fed the bf16 screen
    as binding.cpp's nearest_screened_impl prepares it on the CPU; crowded queries come back as -1."""
    gen, seed = fresh_gen()
    N, d, V = {"odd sizes": (65, 17, 63), "crowded": (70, 40, 700), "closer than bf16": (60, 64, 160)}[kind]
    x = torch.randn(N, d, generator=gen) * 2
    E = torch.randn(V, d, generator=gen) * torch.rand(V, 1, generator=gen) * 3
    if kind == "crowded":
        crowd(x, E, 7, 100)
    if kind == "closer than bf16":
        x, E = near_copies(gen, N, d)
        x[0] *= 1e-3  # a query near 0, whose bound h is no other query's
    out = fp32_search(cu, empty, x, E, metric)
    exact = k.nearest_embedding(x, E, metric)
    check_optimal(out, x, E, metric, exact, seed)
    ids = screened_select(cu, empty, x, E, metric)
    crowded = ids < 0  # 300 copies crowd query 1, and every row ties for query 0 under cosine
    assert kind == "crowded" or not crowded.any(), f"seed {seed}: V <= 256 rows, yet a query was left undecided"
    assert kind != "crowded" or (crowded[1] and (metric == "l2" or crowded[0])), f"seed {seed}"
    ids[crowded] = exact[crowded]
    check_optimal(ids, x, E, metric, k.nearest_embedding_screened(x, E, metric), seed)


@pytest.mark.parametrize("B,L,V", [(2, 3, 40), (1, 1, 3000)])
@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_score_entropy_backward_with_scores_off_the_gradients_alignment(cu, k, empty, B, L, V, graph, dtype):
    """Scores one element into an aligned buffer (a contiguous view at an offset), the gradient aligned: the
    16-byte path must not store at the scores' alignment (the sanitizer reports it) and the gradient is the CPU's."""
    gen, seed = fresh_gen()
    N = V + 1 if graph == "absorb" else V
    x0 = torch.randint(V, (B, L), generator=gen)
    xt = torch.where(torch.rand(B, L, generator=gen) < 0.5, N - 1 if graph == "absorb" else
                     torch.randint(N, (B, L), generator=gen), x0)
    ls = torch.randn(B * L * N + 8, generator=gen).to(dtype)[1:1 + B * L * N].view(B, L, N)
    sb, w = torch.rand(B, generator=gen, dtype=torch.float64) + 0.1, torch.rand(B, L, generator=gen)
    grad, consts = empty(B, L, N, dtype=dtype), empty(B, SE_CONSTS, dtype=torch.float64)
    assert se_call(cu, ls, xt, x0, sb, None, graph, None, w, grad, consts) == 0
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(grad.float(), k.score_entropy_backward(w, ls, xt, x0, sb, graph).float(), **tol,
                               msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("B,L,V", [(4, 8, 40), (2, 2, 3000)])
def test_mdlm_reveals_with_each_sequences_probability(cu, k, empty, B, L, V):
    """p_unmask per sequence, 0 and 1 in turn: every masked row of the odd sequences is revealed, none of the even."""
    gen, seed = fresh_gen()
    h = torch.randn(B, L, V + 1, generator=gen)
    xt = torch.full((B, L), V)
    pu = (torch.arange(B) % 2).double()
    u = torch.rand(B, L, 2, generator=gen, dtype=torch.float64)
    out = empty(B, L, dtype=torch.long)
    assert mdlm_call(cu, h, xt, pu, u, out) == 0
    ref = k.mdlm_ancestral_step(h, xt, pu, u, V)
    assert ((ref != V) == pu.bool()[:, None]).all()
    assert torch.equal(out, ref), f"seed {seed}"


@pytest.mark.parametrize("B,L,V", [(4, 16, 40), (1, 4, 3000)])
@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_steps_just_below_the_move_threshold(cu, k, empty, B, L, V, graph, dtype):
    """u0 = p (1 - 1e-9), p = M / (M + w_x) in fp64: every row moves, as the oracle's (the screen's fp32 row sum
    is off by ~1e-7: only its margin keeps it from settling such rows 'stay'); u0 = p (1 + 1e-6): every row stays,
    which the screen leaves to the exact path."""
    gen, seed = fresh_gen()
    N = V + 1 if graph == "absorb" else V
    h = (torch.randn(B, L, N, generator=gen) - (math.log(N) if graph == "absorb" else 0.0)).to(dtype)
    xt = torch.full((B, L), N - 1) if graph == "absorb" else torch.randint(N, (B, L), generator=gen)
    t = torch.rand(B, generator=gen, dtype=torch.float64) * 0.2 + 0.05
    for step, weights in ((0, sedd.euler_weights), (1, sedd.tweedie_weights)):
        w, w_stay = weights(h, xt, t, graph)
        M = w.clamp(min=0).sum(-1)
        pm = M / (M + w_stay.clamp(min=0))
        assert ((pm > 0) & (pm < 0.9)).all(), f"seed {seed}: rows that cannot stay"
        for d in (-1e-9, 1e-6):  # all move, all stay
            u = torch.rand(B, L, 2, generator=gen, dtype=torch.float64)
            u[..., 0] = pm * (1 + d)
            out, consts = empty(B, L, dtype=torch.long), empty(B, STEP_CONSTS, dtype=torch.float64)
            assert sedd_call(cu, h, xt, t, None, u, step, graph, False, out, consts) == 0
            ref = k.sedd_euler_step(h, xt, t, u, graph) if step == 0 else k.sedd_tweedie_step(h, xt, t, u, graph, False)
            assert ((ref != xt) == (d < 0)).all() and torch.equal(out, ref), f"seed {seed}: step {step}, d {d}"


@pytest.mark.parametrize("B,L,V", [(2, 3, 40), (1, 2, 3000)])
@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_steps_on_zero_uniforms(cu, k, empty, B, L, V, graph):
    """u = 0: every row that can move does, to the first token of positive weight (searchsorted right=True),
    past scores whose exp is 0 in fp64 (a whole first warp segment of them at the block width) and past x."""
    N = V + 1 if graph == "absorb" else V
    h = torch.zeros(B, L, N)
    h[:, 0, :1], h[:, 1:, :N // 6] = -1000.0, -1000.0  # exp(-1000) = 0: zero weight
    xt = torch.full((B, L), N - 1) if graph == "absorb" else torch.zeros(B, L, dtype=torch.long)
    xt[:, -1] = N - 1 if graph == "absorb" else N // 6  # uniform: x is the first token of positive weight
    u = torch.zeros(B, L, 2, dtype=torch.float64)
    t = torch.full((B,), 0.25, dtype=torch.float64)
    for step, final in ((0, False), (1, False), (1, True)):
        out, consts = empty(B, L, dtype=torch.long), empty(B, STEP_CONSTS, dtype=torch.float64)
        assert sedd_call(cu, h, xt, t, None, u, step, graph, final, out, consts) == 0
        ref = k.sedd_euler_step(h, xt, t, u, graph) if step == 0 else k.sedd_tweedie_step(h, xt, t, u, graph, final)
        assert (ref != xt).all() and torch.equal(out, ref), f"step {step}, final {final}: {out} vs {ref}"
    if graph == "absorb":
        out, pu = empty(B, L, dtype=torch.long), torch.ones(B, dtype=torch.float64)
        assert mdlm_call(cu, h, xt, pu, u, out) == 0
        assert torch.equal(out, k.mdlm_ancestral_step(h, xt, pu, u, N - 1))


@pytest.mark.parametrize("metric", ["cos", "l2"])
def test_nearest_ties_to_the_lowest_index(cu, k, empty, metric):
    """Exact copies of a row at indices that different lanes, threads and tiles hold: both searches return the
    lowest, as argmax does; and the screened select decides every query that is not crowded (no -1)."""
    gen, seed = fresh_gen()
    N, d, V = 24, 20, 150
    E = torch.randn(V, d, generator=gen)
    rows = [(3, 21, 70, 149), (40, 41, 137), (100, 5)]  # (the lowest index last: 5)
    for r in rows:
        E[list(r[1:])] = E[r[0]].clone()
    x = torch.randn(N, d, generator=gen)
    x[:12] = E[[r[0] for r in rows] * 4] + 0.01 * torch.randn(12, d, generator=gen)
    out = fp32_search(cu, empty, x, E, metric)
    exact = k.nearest_embedding(x, E, metric)
    assert exact[:12].tolist() == [3, 40, 5] * 4, f"seed {seed}"
    assert torch.equal(out, exact), f"seed {seed}: fp32 search"
    ids = screened_select(cu, empty, x, E, metric)
    assert torch.equal(ids, exact), f"seed {seed}: screened select"


@pytest.mark.parametrize("metric", ["cos", "l2"])
def test_screened_select_scores_as_many_candidates_as_it_keeps(cu, empty, metric):
    """256 candidates, the nearest the last: the select keeps and scores every one (-1 only past 256)."""
    for n, want in ((255, 600), (300, -1)):
        x, E = near_crowd(n)
        assert screened_select(cu, empty, x, E, metric).tolist() == [want], n


def test_rotary_bf16_rounds_ties_to_even(cu, k, empty):
    """x = +-2^k times cos = 1 + 2^-8 (sin 0) lies exactly halfway between two bf16 values: round to even gives
    x back, in the forward and in the backward (which rounds each product to bf16 too)."""
    gen, seed = fresh_gen()
    B, L, H, D = 1, 3, 2, 8
    x = (2.0 ** torch.randint(-4, 5, (B, L, 3, H, D), generator=gen)) * (torch.randint(2, (B, L, 3, H, D),
                                                                                       generator=gen) * 2 - 1)
    x = x.bfloat16()
    cos, sin = torch.full((L, 1, 1, D), 1 + 2.0 ** -8), torch.zeros(L, 1, 1, D)
    for transpose in (False, True):
        out = empty(B, L, 3, H, D, dtype=torch.bfloat16)
        assert rotary_call(cu, x, cos, sin, transpose, out) == 0
        assert torch.equal(out, x) and torch.equal(out, k.rotary(x, cos, sin, transpose)), f"transpose {transpose}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_grid_stride(cu, k, empty, dtype):
    """A grid of one block (8 warps) for 19 positions: the grid-stride loop, which the launcher's cap
    (2^20 blocks) turns only past 2^23 positions, must visit every position once."""
    gen, seed = fresh_gen()
    B, L, H, D = 1, 19, 2, 6
    cos, sin = torch.randn(L, 1, 1, D, generator=gen), torch.randn(L, 1, 1, D, generator=gen)
    qkv = torch.randn(B, L, 3, H, D, generator=gen).to(dtype)
    most = ctypes.c_int64.in_dll(cu, "emulated_rotary_most")
    most.value = 1
    try:
        out = empty(B, L, 3, H, D, dtype=dtype)
        assert rotary_call(cu, qkv, cos, sin, False, out) == 0
    finally:
        most.value = 1 << 20
    assert torch.equal(out, k.rotary(qkv, cos, sin, False)), f"seed {seed}"
