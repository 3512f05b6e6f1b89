"""The public names of ``npg`` stay the documented ops however the package's modules are imported."""
import importlib
import subprocess
import sys

import npg


def test_public_names_survive_submodule_imports():
    # Importing a submodule binds it as an attribute of its package; had an op's module the op's name
    # (npg/knn.py defining knn), ``npg.knn`` would turn into that module after this import.
    for module in ("npg.neighbors", "npg.similarity", "npg.skinning", "npg.chamfer", "npg.raster", "npg.camera",
                   "npg.stage2.trainer", "npg.metrics"):
        importlib.import_module(module)
    for name in npg.__all__:
        if name == "__version__":
            continue
        value = getattr(npg, name)
        assert callable(value) and not isinstance(value, type(npg)), f"npg.{name} is {value!r}"
        assert value.__name__ == name


def test_importing_npg_loads_no_extension():
    code = "import sys, npg; npg.knn; npg.ssim; print(sorted(m for m in sys.modules if m.startswith('npg._') and m.endswith('_cuda')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
