"""Build and install dcgmm_fast.

Install against the torch that is already there (never let pip pick one: a bare ``torch`` on a machine
without it resolves to the multi-GB CUDA build):

    pip install torch==2.13.0            # or the CUDA torch you already have (>= 2.11)
    pip install --no-build-isolation -e .

The C++ extension ``dcgmm_fast._C`` is built from ``csrc/**/*.cpp`` when such sources exist; until then the
package installs as pure Python and the ``reference`` backend serves every op. ``triton_kernels/`` is installed
as ``dcgmm_fast.triton_kernels`` (a top-level ``triton_kernels`` already exists on PyPI and in Triton's repo).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    """The C++ CPU extension, when its sources exist (ATen + torch/library.h only, no pybind11)."""
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources or os.environ.get("DCGMM_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        "dcgmm_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="dcgmm_fast",
    version="0.1.0",
    description="Deep Convolutional Gaussian Mixture Models with fused CPU/GPU kernels",
    python_requires=">=3.10",
    packages=["dcgmm_fast", "dcgmm_fast.backends", "dcgmm_fast.triton_kernels"],
    package_dir={"dcgmm_fast": "dcgmm_fast", "dcgmm_fast.triton_kernels": "triton_kernels"},
    package_data={"dcgmm_fast": ["_shipped/*.npz", "_shipped/*.txt"]},
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
