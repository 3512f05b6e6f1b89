#!/usr/bin/env bash
# Build npg's CUDA extensions in place, then run the GPU tests, compute-sanitizer and the benchmarks.
#
# Usage on a GPU machine, from the repository root:
#   bash benchmarks/gpu_check.sh [build] [test] [sanitize] [bench] [bench-npg] [profile] [kernels]
#   (no step named: build test bench)
# Logs and benchmarks/results/rasterizer.json go to $OUT (default ./gpu_out). NPG_SHARED must name
# the folder holding refdata/ (default ../shared). The benchmark takes gsplat 1.5.3 from the Python
# environment, or installs it from .whl/ (`pip download --no-deps gsplat==1.5.3 -d .whl`); gsplat
# compiles its CUDA code on first use (about 90 s, started in the background after the build).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
# Logs go to LOGS; the results JSON files go to OUT.
LOGS=${LOGS:-$OUT}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test bench)
has() { [[ " ${steps[*]} " == *" $1 "* ]]; }
stamp() { echo "[$(date +%T)] $*"; }

gsplat_pid=""
if has bench; then
  if ! python3 -c "import gsplat" 2>/dev/null && ls .whl/gsplat-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  fi
  # Compile gsplat's CUDA code while the tests run.
  mkdir -p "$LOGS"; (python3 -c "from gsplat.cuda._backend import _C; assert _C is not None" > "$LOGS/gsplat_build.log" 2>&1) &
  gsplat_pid=$!
fi

if has build; then
  # Editable metadata only (no compile), so that kernels/ imports as npg.kernels.
  NPG_NO_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$LOGS/install.log" 2>&1
  stamp "build npg._raster_cuda and npg._knn_cuda (in parallel, setup.py's flags)"
  build_pids=()
  for op in raster knn; do
    python3 - "$op" > "$LOGS/build_$op.log" 2>&1 <<'EOF' &
import glob, os, sys
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension
op = sys.argv[1]
sources = sorted(glob.glob(f"csrc/{op}/*.cu") + glob.glob(f"csrc/{op}/*.cpp"))
setup(
    name=f"npg-{op}-inplace",
    script_args=["build_ext", "--inplace", "--build-temp", f"build/tmp_{op}"],
    ext_modules=[CUDAExtension(
        f"npg._{op}_cuda", sources, include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]},
    )],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
EOF
    build_pids+=($!)
  done
  wait "${build_pids[@]}"  # not a bare wait: that would also reap the gsplat build
  for op in raster knn; do
    python3 -c "import torch, npg._${op}_cuda" || { echo "BUILD FAILED: $op"; grep -E "error" "$LOGS/build_$op.log" | head -30; exit 1; }
  done
  stamp "built"
fi

if has test; then
  stamp "tests"
  # One pytest process per file, so that a crash in one file cannot hide the others' results.
  for f in tests/test_raster_cuda.py tests/test_raster_refdata.py tests/test_raster_api.py tests/test_knn.py \
           tests/test_chamfer.py tests/test_skinning.py tests/test_ssim.py ${EXTRA_TESTS:-}; do
    timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "$f" > "$LOGS/test_$(basename "$f" .py).log" 2>&1
    echo "$f: rc=$? $(tail -1 "$LOGS/test_$(basename "$f" .py).log")"
  done 2>&1 | tee "$LOGS/tests.log"
  stamp "tests done"
fi

if has sanitize; then
  stamp "compute-sanitizer memcheck"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool memcheck --error-exitcode 99 python3 - <<'EOF' 2>&1 | tee "$LOGS/sanitizer.log" | tail -25
import os
from pathlib import Path
import numpy as np, torch
import npg
from npg.camera import Camera
root = Path(os.environ.get("NPG_SHARED", "../shared")) / "refdata" / "raster"
names = {"rand_sh3": "shs", "rand_precomp": "colors", "rand_cov3d": "cov3d", "odd_size_scalemod": "", "big_opaque": "",
         "single": "", "garden_v0": ""}
keys = {"means3D": "means3d", "opacities": "opacities", "shs": "shs", "colors_precomp": "colors", "scales": "scales",
        "rotations": "rotations", "cov3D_precomp": "cov3d"}
for name in names:
    z = dict(np.load(root / f"{name}.npz"))
    leaves = {keys[k[4:]]: torch.from_numpy(v).cuda().requires_grad_(True) for k, v in z.items() if k.startswith("in__")}
    cam = Camera.from_fov(torch.from_numpy(z["cam__w2c"]), float(z["cam__tanfovx"]), float(z["cam__tanfovy"]),
                          int(z["cam__width"]), int(z["cam__height"]))
    out = npg.rasterize(**leaves, camera=cam, sh_degree=int(z["cam__sh_degree"]),
                        scale_modifier=float(z["cam__scale_modifier"]), background=torch.from_numpy(z["cam__bg"]).cuda())
    (out.color.sum() + out.depth.sum() * 0.1 + out.alpha.sum()).backward()
    torch.cuda.synchronize()
    print(name, "ok", float(out.color.mean()))
# edge cases: no Gaussians, a 1x1 image
for n, w, h in ((0, 40, 30), (200, 1, 1)):
    cam = Camera.from_fov(torch.eye(4), 0.5, 0.5, w, h)
    m = torch.rand(n, 3, device="cuda") - 0.5; m[:, 2] += 3
    p = [m, torch.rand(n, 1, device="cuda"), torch.rand(n, 3, device="cuda") * 0.3 + 0.05, torch.randn(n, 4, device="cuda"), torch.rand(n, 3, device="cuda")]
    p = [t.requires_grad_(True) for t in p]
    out = npg.rasterize(p[0], p[1], cam, scales=p[2], rotations=p[3], colors=p[4])
    out.color.sum().backward(); torch.cuda.synchronize()
    print("edge", n, w, h, "ok")
EOF
  stamp "sanitizer done"
fi

if has bench || has bench-npg; then
  stamp "benchmark"
  bench_args=(--out "$OUT/rasterizer.json")
  if has bench; then
    wait "$gsplat_pid" || { echo "gsplat did not build:"; tail -20 "$LOGS/gsplat_build.log"; bench_args+=(--no-gsplat); }
  else
    bench_args+=(--no-gsplat)
  fi
  has profile && bench_args+=(--profile)
  python3 -m benchmarks.rasterizer "${bench_args[@]}" 2>&1 | tee "$LOGS/bench.log" | tail -120
  stamp "benchmark done"
fi

if has kernels; then
  stamp "kernel benchmarks"
  python3 -m benchmarks.kernels --out "$OUT/kernels.json" 2>&1 | tee "$LOGS/kernels.log" | tail -60
  stamp "kernel benchmarks done"
fi
