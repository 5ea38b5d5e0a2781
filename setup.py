"""Build and install dcgmm_fast.

Install against the torch that is already there (never let pip pick one: a bare ``torch`` on a machine
without it resolves to the multi-GB CUDA build):

    pip install torch==2.13.0            # or the CUDA torch you already have (>= 2.11)
    pip install --no-build-isolation -e .

The C++ extension ``dcgmm_fast._C`` is built from ``csrc/**/*.cpp`` when such sources exist; until then the
package installs as pure Python and the ``reference`` backend serves every op. The torch-free CUDA library
``dcgmm_fast/libdcgmm_cuda.so`` is built from ``csrc/cuda/*.cu`` (``tools/cuda_build.py``) whenever nvcc is found,
whether or not torch is a CUDA build; without nvcc, or when nvcc fails (a warning, never a failed install), the
``cuda`` backend says how to get it. ``DCGMM_NO_CUDA=1`` skips it; ``DCGMM_NO_EXTENSION=1`` skips the C++ extension
(and with it the build_ext step that builds the library: ``python tools/cuda_build.py build`` does it by hand).
``triton_kernels/`` is installed as ``dcgmm_fast.triton_kernels`` (a top-level ``triton_kernels`` already exists on PyPI and in Triton's repo).
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext as _SetuptoolsBuildExt

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_build_module():
    spec = importlib.util.spec_from_file_location("dcgmm_cuda_build", os.path.join(ROOT, "tools", "cuda_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_cuda_library(out_dir: str) -> None:
    """libdcgmm_cuda.so into out_dir when nvcc is found (``tools/cuda_build.py build_for_install``: warns, never
    fails the install)."""
    try:
        cb = _cuda_build_module()
    except Exception as e:  # a source tree without tools/: nothing to build
        print(f"dcgmm_fast: CUDA library not built ({e})", file=sys.stderr)
        return
    cb.build_for_install(out_dir)


def _with_cuda_library(base):
    """build_ext that also builds the CUDA library next to the package's modules (in place for -e installs)."""

    class BuildExt(base):
        def run(self):
            super().run()
            out = os.path.join(ROOT, "dcgmm_fast") if self.inplace else os.path.join(self.build_lib, "dcgmm_fast")
            os.makedirs(out, exist_ok=True)
            build_cuda_library(out)

    return BuildExt


def _extensions():
    """The C++ CPU extension, when its sources exist (ATen + torch/library.h only, no pybind11)."""
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources or os.environ.get("DCGMM_NO_EXTENSION") == "1":
        return [], {"build_ext": _with_cuda_library(_SetuptoolsBuildExt)}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        "dcgmm_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": _with_cuda_library(BuildExtension.with_options(use_ninja=True))}


ext_modules, cmdclass = _extensions()

setup(
    name="dcgmm_fast",
    version="0.1.0",
    description="Deep Convolutional Gaussian Mixture Models with fused CPU/GPU kernels",
    python_requires=">=3.10",
    packages=["dcgmm_fast", "dcgmm_fast.backends", "dcgmm_fast.triton_kernels"],
    package_dir={"dcgmm_fast": "dcgmm_fast", "dcgmm_fast.triton_kernels": "triton_kernels"},
    package_data={"dcgmm_fast": ["_shipped/*.npz", "_shipped/*.txt", "libdcgmm_cuda.so"],
                  "dcgmm_fast.backends": ["cuda_dispatch.json"]},
    # A range, never an exact pin: a user's CUDA torch (e.g. 2.11 on the GPU box) must stay as it is.
    install_requires=["torch>=2.11", "numpy>=1.24", "pillow>=9", "tqdm>=4.60"],
    entry_points={"console_scripts": ["dcgmm = dcgmm_fast.cli:main"]},
    extras_require={
        # triton runs the kernels on CPU under TRITON_INTERPRET=1 in tests; CUDA torch brings its own.
        "test": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.6"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
