"""
difflm: reference implementations of diffusion language models.

    pip install -e .            # the modules and their dependencies
    pip install -e ".[test]"    # + pytest, hypothesis and what the tests of the extras below import
    pip install -e ".[hub]"     # + the papers' checkpoints, zero-shot sets and transformers judges (hub.py)
    DIFFLM_BUILD_EXT=1 pip install -e . --no-build-isolation   # also compile csrc/ ahead of time (else JIT
                                                              # on first use), against the installed torch

torch is required as "torch>=2.6" and Python as 3.10 or later, the oldest on which the test suite passes
(the transformers that the test and hub extras install refuses an older torch; torchrun under Python 3.9
misses a module). An installed torch (CPU or CUDA build) satisfies it, so pip never replaces it with a
download.
"""
import glob
import os
import sys

from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))
kwargs = {}
if os.environ.get("DIFFLM_BUILD_EXT") == "1" and glob.glob(os.path.join(here, "csrc", "*.cpp")):
    try:
        import torch
    except ImportError:  # pip's isolated build environment holds no torch, and one it downloaded would not be yours
        raise SystemExit("error: DIFFLM_BUILD_EXT=1 builds csrc/ against the installed torch; "
                         "add --no-build-isolation to the pip command")
    from torch.utils import cpp_extension
    sources = sorted(glob.glob("csrc/*.cpp"))
    ext_cls = cpp_extension.CppExtension
    if torch.cuda.is_available() or os.environ.get("DIFFLM_BUILD_CUDA") == "1":
        sources += sorted(glob.glob("csrc/*.cu"))
        ext_cls = cpp_extension.CUDAExtension
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple's clang has none (difflm_ops.OPENMP)
    cxx_flags = ["-O3", "-DDIFFLM_PYMODULE"] + openmp + (["-DDIFFLM_CUDA"] if ext_cls is cpp_extension.CUDAExtension else [])
    kwargs = dict(
        ext_modules=[ext_cls("difflm_kernels", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
                             extra_link_args=openmp)],
        cmdclass={"build_ext": cpp_extension.BuildExtension},
    )

setup(
    name="difflm",
    version="0.1.0",
    description="Readable reference implementations of diffusion language models, with fused kernels",
    py_modules=[m for m in ("common", "corpus", "trainer", "difflm_ops", "hub", "mdlm", "sedd", "ddpm", "diffusion_lm", "diffuser", "ar", "bench")
                if os.path.isfile(os.path.join(here, m + ".py"))],
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "tiktoken", "ninja", "tqdm"],  # ninja: the JIT build of csrc/; tqdm: common.progress
    extras_require={"test": ["pytest", "hypothesis", "scipy", "sacrebleu", "safetensors", "huggingface_hub", "pyarrow", "datasets",
                             "transformers", "matplotlib"],
                    "hub": ["huggingface_hub", "safetensors", "datasets", "transformers"], "plot": ["matplotlib"],
                    "bleu": ["sacrebleu"]},
    **kwargs,
)
