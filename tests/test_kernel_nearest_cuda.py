"""The nearest-embedding kernel on CUDA: parity with the PyTorch oracle on the GPU and with the CPU
kernel, exact ties to the lowest index, and the partial 64-row tiles of the CUDA code. Where torch sees
no GPU they run on the CPU op, so that the checks themselves are tested before a GPU runs them."""
import pytest
import torch

import difflm_ops
import diffusion_lm
from test_kernel_nearest import check_optimal, crowd
from test_kernels import fresh_gen

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.cuda

# one row; partial 64-row query and table tiles; d not a multiple of 16; E2E; GPT-2 width (on a GPU: its
# fp32 oracle takes 25 s on two CPU cores, and the smaller shapes check the same test code)
SHAPES = [(1, 1, 1), (65, 17, 63), (200, 16, 821), (1000, 130, 4099)] + ([(8192, 128, 50257)] if DEVICE == "cuda" else [])


def oracle_fp32(x, E, metric):
    """The PyTorch oracle on the GPU with true fp32 matmuls: common.get_device turns TF32 on for the
    process once any test has picked the GPU, and TF32's 10-bit products would decide near rows."""
    with difflm_ops.cublas_off("allow_tf32"):
        return diffusion_lm.nearest_embedding.oracle(x.to(DEVICE), E.to(DEVICE), metric).cpu()


@pytest.fixture(scope="module")
def k():
    ops = difflm_ops.load()
    assert ops is not None and (DEVICE == "cpu" or ops.cuda_built()), "the kernels were not built with CUDA"
    with difflm_ops.cublas_off("allow_bf16_reduced_precision_reduction"):  # the raw ops, as the dispatch calls them
        yield ops


@pytest.mark.parametrize("metric", ("cos", "l2"))
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_matches_oracle(k, metric, shape):
    gen, seed = fresh_gen()
    N, d, V = shape
    x = torch.randn(N, d, generator=gen)
    E = torch.randn(V, d, generator=gen) * torch.rand(V, 1, generator=gen) * 3
    got = k.nearest_embedding(x.to(DEVICE), E.to(DEVICE), metric).cpu()
    check_optimal(got, x, E, metric, k.nearest_embedding(x, E, metric), seed)  # the CPU kernel
    check_optimal(got, x, E, metric, oracle_fp32(x, E, metric), seed)


def test_cuda_ties(k):
    E = torch.randn(200, 16)
    E[150] = E[3]
    E[70] = E[3]
    x = E[[3, 70, 150]].clone()
    for metric in ("cos", "l2"):
        assert k.nearest_embedding(x.to(DEVICE), E.to(DEVICE), metric).tolist() == [3, 3, 3]
        assert (k.nearest_embedding(torch.randn(100, 8).to(DEVICE), torch.ones(300, 8).to(DEVICE), metric) == 0).all()


@pytest.mark.parametrize("metric", ("cos", "l2"))
def test_cuda_screened_matches_the_cpu(k, metric):
    """The screened search on the GPU (bf16 tensor cores into fp32) against the same search on the CPU
    and the fp32 kernel, in chunks of queries, with crowded queries that take the fp32 search."""
    gen, seed = fresh_gen()
    x = torch.randn(700, 96, generator=gen)
    E = torch.randn(5000, 96, generator=gen) * torch.rand(5000, 1, generator=gen) * 3
    crowd(x, E, 11, 4000)
    got = k.nearest_embedding_screened(x.to(DEVICE), E.to(DEVICE), metric, 300000).cpu()
    check_optimal(got, x, E, metric, k.nearest_embedding(x, E, metric), seed)
    check_optimal(got, x, E, metric, k.nearest_embedding_screened(x, E, metric, 300000), seed)
    assert got[1] == 11, f"seed {seed}"


@pytest.mark.parametrize("metric", ("cos", "l2"))
def test_cuda_screened_with_few_queries_per_gemm(k, metric):
    """Chunks of 8 queries against GPT-2's vocabulary at d = 1024: a GEMM with few rows and a long sum, the
    shape for which cuBLAS may split the sum over d; with bf16 reduction off, as the dispatch runs it, the
    bound holds and the ids are an fp32 search's."""
    gen, seed = fresh_gen()
    x = torch.randn(64, 1024, generator=gen)
    E = torch.randn(50258, 1024, generator=gen) * torch.rand(50258, 1, generator=gen) * 3
    with difflm_ops.cublas_off("allow_bf16_reduced_precision_reduction"):
        got = k.nearest_embedding_screened(x.to(DEVICE), E.to(DEVICE), metric, 8 * 50258).cpu()
    check_optimal(got, x, E, metric, k.nearest_embedding(x, E, metric), seed)
