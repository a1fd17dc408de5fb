"""The fused nearest-embedding kernel (Diffusion-LM's clamp) on CPU: parity with the PyTorch oracle
(up to float rounding on near-ties), exact ties to the lowest index, bad inputs, the fake (meta)
implementation, and the dispatch in diffusion_lm.nearest_embedding."""
import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import difflm_ops
import diffusion_lm
from test_kernels import fresh_gen

METRICS = ("cos", "l2")
# one row and one column; odd sizes (partial 6-row tiles, partial 16-row panels); E2E; wide d
SHAPES = [(1, 1, 1), (5, 3, 7), (7, 16, 17), (97, 16, 853), (200, 33, 1000), (13, 128, 5003)]


@pytest.fixture(scope="module")
def k():
    ops = difflm_ops.load()
    assert ops is not None, "the difflm kernels did not build"
    return ops


def kernel_space(E, metric):
    """(t, c) in fp64: the table the kernels score and its bias, so that x . t_v + c_v ranks the rows as
    the metric does (cosine: t = E normalised, c = 0; l2: t = E, c = -|E_v|^2 / 2)."""
    E = E.double()
    if metric == "cos":
        return F.normalize(E, dim=-1), torch.zeros(len(E), dtype=E.dtype)
    return E, -0.5 * E.pow(2).sum(-1)


def check_optimal(got, x, E, metric, ref, seed):
    """got is optimal up to fp32 rounding (every query), and equals ref where the best row is clear of the second.

    An fp32 score x . t_v + c_v is off by at most err = (d + 8) 2^-23 (|x| |t_v| + |c_v|), so an fp32 search
    picks within 2 err of the best, and two fp32 searches agree where the top two are 4 err apart."""
    t, c = kernel_space(E, metric)
    s = x.double() @ t.T + c
    err = (x.shape[1] + 8) * 2.0**-23 * (x.double().norm(dim=1) * t.norm(dim=1).max() + c.abs().max())  # (N,)
    picked = s.gather(1, got[:, None]).squeeze(1)
    assert (picked >= s.max(-1).values - 2 * err).all(), f"seed {seed}: a non-nearest row was picked"
    top2 = s.topk(min(2, E.shape[0]), -1).values
    clear = (top2[:, 0] - top2[:, -1] > 4 * err) if E.shape[0] > 1 else torch.ones(len(x), dtype=torch.bool)
    assert torch.equal(got[clear], ref[clear]), f"seed {seed}: differs on clear rows"


def crowd(x, E, row, first):
    """300 copies of E[row] from index first (more candidates than the screen keeps, 256), query 1 twice that
    row, and query 0 zero, which under cosine ties every row."""
    E[first:first + 300] = E[row]
    x[0], x[1] = 0, E[row] * 2


def near_copies(gen, N, d):
    """4 near copies of each of 40 rows (V = 160) and N queries near them: rows closer together than bf16
    can tell, but not fp32 -> x (N, d), E (160, d)."""
    base = torch.randn(40, d, generator=gen)
    E = (base.repeat(4, 1) + 0.05 * torch.randn(160, d, generator=gen)).contiguous()
    return base[torch.randint(40, (N,), generator=gen)] + 0.05 * torch.randn(N, d, generator=gen), E


SEARCHES = ("nearest_embedding", "nearest_embedding_screened")  # the fp32 search, the GPU's screened one


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_oracle(k, metric, shape):
    gen, seed = fresh_gen()
    N, d, V = shape
    x = torch.randn(N, d, generator=gen) * 2
    E = torch.randn(V, d, generator=gen) * torch.rand(V, 1, generator=gen) * 3  # norms differ: cos != l2
    got = k.nearest_embedding(x, E, metric)
    assert got.dtype == torch.long and got.shape == (N,)
    check_optimal(got, x, E, metric, diffusion_lm.nearest_embedding.oracle(x, E, metric), seed)


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("metric", METRICS)
def test_ties_go_to_the_lowest_index(k, metric, search):
    gen, seed = fresh_gen()
    E = torch.randn(40, 16, generator=gen)
    E[33] = E[5]  # an exact duplicate later in the table, in another 16-row panel
    E[21] = E[5]
    x = E[[5, 21, 33, 7]] + 0.01 * torch.randn(4, 16, generator=gen)
    x[0] = E[5]
    got = getattr(k, search)(x, E, metric)
    assert got[0] == 5 and got[1] == 5 and got[2] == 5, f"seed {seed}: {got.tolist()}"
    assert got[3] == diffusion_lm.nearest_embedding.oracle(x, E, metric)[3]  # (its matmul may round copies apart)
    # all rows equal: every query ties everywhere
    same = torch.ones(37, 8)
    assert (getattr(k, search)(torch.randn(9, 8, generator=gen), same, metric) == 0).all()
    if metric == "cos":  # rows of one direction, d = 1: each normalises to exactly 1, so all tie
        line = torch.rand(50, 1, generator=gen) + 0.1
        assert (getattr(k, search)(torch.rand(9, 1, generator=gen) + 0.1, line, metric) == 0).all()


@pytest.mark.parametrize("search", SEARCHES)
def test_huge_norms_keep_their_directions(k, search):
    """The oracle normalised in fp32, where a norm's square overflows from about 1e19: every row became 0, every
    score 0, and every query went to id 0. Scaled by 1e20 the answer is the unscaled one, on both paths."""
    gen, _ = fresh_gen()
    E, x = torch.randn(30, 6, generator=gen), torch.randn(9, 6, generator=gen)
    want = getattr(k, search)(x, E, "cos")
    for xs, Es in ((x * 1e20, E), (x, E * 1e20), (x * 1e20, E * 1e20)):
        assert torch.equal(getattr(k, search)(xs, Es, "cos"), want)
        assert torch.equal(diffusion_lm.nearest_embedding.oracle(xs, Es, "cos"), want)


@pytest.mark.parametrize("search", SEARCHES)
def test_zero_query_and_zero_rows_cosine(k, search):
    E = torch.randn(20, 4)
    E[0] = 0.0  # F.normalize maps a zero row to zero: score 0
    x = torch.zeros(3, 4)
    assert getattr(k, search)(x, E, "cos").tolist() == [0, 0, 0]
    assert torch.equal(getattr(k, search)(x, E, "cos"), diffusion_lm.nearest_embedding.oracle(x, E, "cos"))


def test_cosine_and_l2_differ_as_they_should(k):
    E = torch.tensor([[1.0, 0.0], [10.0, 1.0]])
    x = torch.tensor([[1.0, 0.05]])
    assert k.nearest_embedding(x, E, "l2").item() == 0  # close in distance
    assert k.nearest_embedding(x, E, "cos").item() == 1  # close in angle (0.05 vs 0.1 rad)


@pytest.mark.parametrize("search", SEARCHES)
def test_empty_queries(k, search):
    assert getattr(k, search)(torch.zeros(0, 5), torch.randn(3, 5), "cos").shape == (0,)


@pytest.mark.parametrize("args,msg", [
    ((torch.randn(3, 4, 2), torch.randn(5, 4), "cos"), "x must have shape"),
    ((torch.randn(3, 4), torch.randn(5), "cos"), "E must have shape"),
    ((torch.randn(3, 4), torch.randn(5, 3), "cos"), "columns like x"),
    ((torch.randn(3, 4).double(), torch.randn(5, 4), "cos"), "x must be float32"),
    ((torch.randn(3, 4), torch.randn(5, 4).half(), "l2"), "E must be float32"),
    ((torch.randn(4, 3).T, torch.randn(5, 4), "cos"), "x must be contiguous"),
    ((torch.randn(3, 4), torch.randn(0, 4), "cos"), "at least one row"),
    ((torch.randn(3, 4), torch.randn(5, 4), "dot"), "metric must be 'cos' or 'l2'"),
    ((torch.randn(3, 4), torch.randn(5, 4).index_fill(0, torch.tensor([2]), float("nan")), "cos"), "E must be finite"),
    ((torch.randn(3, 4).index_fill(1, torch.tensor([0]), float("inf")), torch.randn(5, 4), "l2"), "x must be finite"),
])
@pytest.mark.parametrize("search", SEARCHES)
def test_bad_inputs(k, args, msg, search):
    with pytest.raises(RuntimeError, match=msg):
        getattr(k, search)(*args)


@pytest.mark.parametrize("search", SEARCHES)
def test_fake_implementation(k, search):
    """Shapes under torch.compile / FakeTensor come from the fake registered in difflm_ops.py."""
    torch.library.opcheck(getattr(torch.ops.difflm, search).default, (torch.randn(6, 5), torch.randn(9, 5), "cos"),
                          test_utils=("test_schema", "test_faketensor"))


def test_dispatch_matches_pytorch_path(k):
    gen, seed = fresh_gen()
    x, E = torch.randn(3, 11, 16, generator=gen), torch.randn(100, 16, generator=gen)
    for metric in METRICS:
        got = diffusion_lm.nearest_embedding(x, E, metric)
        with difflm_ops.oracles_only():
            ref = diffusion_lm.nearest_embedding(x, E, metric)
        assert torch.equal(ref, diffusion_lm.nearest_embedding.oracle(x, E, metric))
        assert got.shape == (3, 11) and torch.equal(got, ref), f"seed {seed}"


@pytest.mark.parametrize("where", ["x", "E"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused_on_both_paths(k, where, value):
    """A NaN or infinite vector has no nearest row (the oracle's argmax would pick the NaN's column):
    the dispatch refuses it whichever path would run, and the op refuses it when called directly."""
    x, E = torch.randn(4, 3), torch.randn(6, 3)
    (x if where == "x" else E)[1, 2] = value
    for ctx in (difflm_ops.oracles_only, contextlib.nullcontext):
        with ctx(), pytest.raises(ValueError, match=f"{where} must be finite"):
            diffusion_lm.nearest_embedding(x, E, "cos")
    with pytest.raises(RuntimeError, match=f"{where} must be finite"):
        k.nearest_embedding(x, E, "l2")


# -- the screened search (a GPU's path for large tables), run here on the CPU: a bf16 screen, fp32 decides
# (the tests above that take `search` run it too)

@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape,chunk", [((1, 1, 1), 1), ((97, 16, 853), 1 << 27), ((200, 33, 1000), 5000),
                                         ((300, 256, 4099), 40000)])
def test_screened_matches_the_fp32_search(k, metric, shape, chunk):
    gen, seed = fresh_gen()
    N, d, V = shape
    x = torch.randn(N, d, generator=gen) * 2
    E = torch.randn(V, d, generator=gen) * torch.rand(V, 1, generator=gen) * 3
    got = k.nearest_embedding_screened(x, E, metric, chunk)  # chunk: queries in groups of chunk // V
    assert got.dtype == torch.long and got.shape == (N,)
    check_optimal(got, x, E, metric, k.nearest_embedding(x, E, metric), seed)


@pytest.mark.parametrize("metric", METRICS)
def test_screened_decides_in_fp32(k, metric):
    """Rows closer together than bf16 can tell (scores ~1e-3 apart, relative) but far apart for fp32: the
    screen alone picks wrongly, fp32 among its candidates picks the nearest."""
    gen, seed = fresh_gen()
    x, E = near_copies(gen, 300, 64)
    t, c = kernel_space(E, metric)
    bf16_pick = (x.bfloat16().double() @ t.bfloat16().double().T + c).argmax(-1)
    truth = (x.double() @ t.T + c).argmax(-1)
    assert (bf16_pick != truth).sum() >= 10, f"seed {seed}: the test needs rows that bf16 decides wrongly"
    got = k.nearest_embedding_screened(x, E, metric)
    check_optimal(got, x, E, metric, k.nearest_embedding(x, E, metric), seed)
    assert (got == truth).float().mean() > 0.99, f"seed {seed}"


def test_screened_crowded_queries_go_to_the_fp32_search(k):
    """A zero query under cosine ties every row, and 300 copies of a row crowd one query: more candidates
    than the screen keeps (256), so those queries take the fp32 search, ties to the lowest index. In chunks
    of two queries, crowded ones fall in the first and the last chunk, and each keeps its own answer."""
    gen, seed = fresh_gen()
    x, E = torch.randn(6, 40, generator=gen), torch.randn(700, 40, generator=gen)
    crowd(x, E, 7, 100)
    x[4], x[5] = 0, E[7]
    for metric, chunk in itertools.product(METRICS, (1 << 27, 2 * 700)):
        got = k.nearest_embedding_screened(x, E, metric, chunk)
        ref = k.nearest_embedding(x, E, metric)
        assert torch.equal(got, ref), f"seed {seed}, {metric}, chunk {chunk}"
        assert got[1] == got[5] == 7 and (metric == "l2" or got[0] == got[4] == 0), f"seed {seed}, {metric}"


def near_crowd(n):
    """n rows near query 0 before its exact copy, row 600 of 700: with the copy, n + 1 candidates of the screen."""
    gen = torch.Generator().manual_seed(0)
    E = torch.randn(700, 40, generator=gen)
    E[:n] = E[600] + 0.02 * torch.randn(n, 40, generator=gen)
    return E[[600]].clone(), E


@pytest.mark.parametrize("n", [255, 300])
def test_screened_a_crowd_before_the_nearest_row_does_not_hide_it(k, n):
    """The copy comes last: 256 candidates, as many as the screen keeps, are all scored; 301, more than it
    keeps, send the query to the fp32 search. The screen must not decide among the first 256 it saw."""
    x, E = near_crowd(n)
    for metric in METRICS:
        assert k.nearest_embedding_screened(x, E, metric).tolist() == [600], metric
        assert k.nearest_embedding(x, E, metric).tolist() == [600], metric


def test_the_search_runs_without_bf16_reduced_sums(k, monkeypatch):
    """The screen's bound allows cuBLAS one bf16 rounding of its sums: the dispatch turns torch's bf16
    reduced-precision reduction off for the call and back on after it, also when the op raises, and leaves
    the flag alone where it is already off."""
    matmul, seen, real = torch.backends.cuda.matmul, [], torch.ops.difflm.nearest_embedding_screened
    x, E = torch.randn(5, 16), torch.randn(20, 16)

    def spy(*a):
        seen.append(matmul.allow_bf16_reduced_precision_reduction)
        if len(seen) == 2:
            raise RuntimeError("the op failed")
        return real(*a)

    monkeypatch.setattr(torch.ops.difflm, "nearest_embedding_screened", spy)
    assert matmul.allow_bf16_reduced_precision_reduction is True  # torch's default
    ids = difflm_ops._nearest_embedding(x, E, "cos", screened=True)
    assert torch.equal(ids, k.nearest_embedding(x, E, "cos")) and seen == [False]
    assert matmul.allow_bf16_reduced_precision_reduction is True
    with pytest.raises(RuntimeError, match="the op failed"):
        difflm_ops._nearest_embedding(x, E, "cos", screened=True)
    assert seen == [False, False] and matmul.allow_bf16_reduced_precision_reduction is True
    get = torch._C._get_cublas_allow_bf16_reduced_precision_reduction  # newer torch: (reduce, split-K)
    matmul.allow_bf16_reduced_precision_reduction = (False, False) if isinstance(get(), tuple) else False
    try:
        before = get()
        difflm_ops._nearest_embedding(x, E, "l2", screened=True)
        assert get() == before and seen[-1] is False
    finally:
        matmul.allow_bf16_reduced_precision_reduction = True


def test_screened_bad_inputs(k):
    """What only the screened search takes (the checks both share are in test_bad_inputs)."""
    x, E = torch.randn(3, 16), torch.randn(20, 16)
    with pytest.raises(RuntimeError, match="chunk_entries must be >= 1"):
        k.nearest_embedding_screened(x, E, "cos", 0)
    with pytest.raises(RuntimeError, match="d <= 1024"):
        k.nearest_embedding_screened(torch.randn(2, 1025), torch.randn(3, 1025), "cos")
