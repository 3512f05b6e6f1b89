"""Build script for npg.

The CUDA extensions under csrc/ are built when torch with CUDA support and a CUDA toolkit are both
importable at build time (use ``pip install --no-build-isolation -e .`` next to a CUDA build of torch).
Otherwise npg installs as pure Python: every op then runs through its PyTorch reference path.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extensions():
    if os.environ.get("NPG_NO_CUDA", "0") == "1":
        return [], {}, "NPG_NO_CUDA=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}, "torch is not importable in the build environment"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return [], {}, "no CUDA toolkit (CUDA_HOME / nvcc) was found"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0")
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    extensions = []
    for name in ("raster", "knn"):
        sources = sorted(glob.glob(os.path.join("csrc", name, "*.cu")) + glob.glob(os.path.join("csrc", name, "*.cpp")))
        if not sources:
            continue
        extensions.append(
            CUDAExtension(
                name=f"npg._{name}_cuda",
                sources=sources,
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
            )
        )
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}, None


ext_modules, cmdclass, reason = cuda_extensions()
if reason is not None:
    print(f"npg: CUDA extension not built ({reason}); the PyTorch paths will be used.", file=sys.stderr)

setup(
    name="npg",
    version="0.1.0",
    description="Neural Parametric Gaussians for monocular non-rigid reconstruction, with its own GPU kernels",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["npg", "npg.*"]) + ["npg.kernels"],
    package_dir={"npg.kernels": "kernels"},
    package_data={"npg": ["assets/**/*", "configs/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "scipy",
        "imageio>=2.30",
        "imageio-ffmpeg",
        "opencv-python-headless",
        "tqdm",
        "pygltflib",
        "filelock",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "triton>=3.6"],
    },
    entry_points={
        "console_scripts": [
            "npg-train=npg.cli:train_main",
            "npg-render=npg.cli:render_main",
            "npg-prep=npg.cli:prep_main",
            "npg-make-scene=npg.cli:make_scene_main",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
