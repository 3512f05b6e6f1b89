"""Run every kernel benchmark (KNN, 2D chamfer, skinning, SSIM) and write benchmarks/results/kernels.json.

Usage (GPU machine): ``python -m benchmarks.kernels [--out benchmarks/results/kernels.json]``
"""
from __future__ import annotations

import argparse
import importlib

from benchmarks.common import format_table, write_json

MODULES = ["benchmarks.bench_knn", "benchmarks.bench_skinning", "benchmarks.bench_ssim"]


def run() -> list[dict]:
    rows = []
    for name in MODULES:
        module = importlib.import_module(name)
        rows.extend(module.run())
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    args = parser.parse_args(argv)
    rows = run()
    write_json(rows, args.out)
    print(format_table(rows))


if __name__ == "__main__":
    main()
