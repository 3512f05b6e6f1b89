import os
from pathlib import Path

import pytest

# Triton kernels run on the CPU through the interpreter when no GPU is present. The variable must be
# set before triton is first imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NPG_SHARED", REPO.parent / "shared"))
REFDATA = SHARED / "refdata"
DATA = SHARED / "data"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set NPG_SHARED to the folder holding refdata/ and data/)")
    return path


@pytest.fixture(scope="session")
def refdata_dir() -> Path:
    return _require(REFDATA, "reference renders ../shared/refdata")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA, "shared data ../shared/data")


@pytest.fixture(scope="session")
def cuda_device():
    if not _HAS_CUDA:
        pytest.skip("no CUDA device")
    return torch.device("cuda")
