"""The plugin passes tlengine's contract tests."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from tlengine.testing import BackboneContract, DatasetContract


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def idx_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 6)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 3)
    return tmp_path


class TestMiniCnn(BackboneContract):
    backbone = "minicnn"


class TestIdx(DatasetContract):
    dataset = "idx"

    @pytest.fixture
    def data_path(self, idx_folder: Path) -> str:
        return str(idx_folder)
