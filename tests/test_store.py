"""tlengine._store.NpyFile: a .npy file read and written in place, indexed as numpy indexes an array."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest


def test_npyfile_reads_what_numpy_wrote(tmp_path: Path) -> None:
    from tlengine._store import NpyFile

    array = np.arange(5 * 3 * 2, dtype=np.float16).reshape(5, 3, 2)
    np.save(tmp_path / "a.npy", array)
    f = NpyFile(tmp_path / "a.npy")
    assert f.shape == (5, 3, 2) and f.dtype == np.float16 and len(f) == 5 and f.ndim == 3 and f.nbytes == array.nbytes
    np.testing.assert_array_equal(f[2], array[2])
    np.testing.assert_array_equal(f[-1], array[-1])
    np.testing.assert_array_equal(f[1:4], array[1:4])
    np.testing.assert_array_equal(f[::2], array[::2])
    np.testing.assert_array_equal(f[np.array([4, 0, 4])], array[[4, 0, 4]])
    np.testing.assert_array_equal(f[1, 2], array[1, 2])
    np.testing.assert_array_equal(f[1:3, 0], array[1:3, 0])
    np.testing.assert_array_equal(np.asarray(f), array)
    np.testing.assert_array_equal(f.astype(np.float32), array.astype(np.float32))
    assert f[7:9].shape == (0, 3, 2)
    with pytest.raises(IndexError):
        f[5]
    row = f[0]
    row[:] = 99  # a copy: the file stays as it was
    np.testing.assert_array_equal(f[0], array[0])
    again = pickle.loads(pickle.dumps(f))  # what a loader's worker process gets
    np.testing.assert_array_equal(again[3], array[3])


def test_npyfile_writes_a_file_numpy_reads(tmp_path: Path) -> None:
    from tlengine._store import NpyFile

    f = NpyFile.create(tmp_path / "b.npy", (4, 2, 3), "uint8")
    f.fill(7)
    f[1] = np.full((2, 3), 1)
    f[2:4] = np.arange(12).reshape(2, 2, 3)
    f.close()
    expected = np.full((4, 2, 3), 7, dtype=np.uint8)
    expected[1] = 1
    expected[2:4] = np.arange(12).reshape(2, 2, 3)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), expected)


def test_npyfile_refuses_a_truncated_file(tmp_path: Path) -> None:
    from tlengine._store import NpyFile

    np.save(tmp_path / "c.npy", np.zeros((100, 10)))
    path = tmp_path / "c.npy"
    path.write_bytes(path.read_bytes()[:-80])
    with pytest.raises(ValueError, match="shorter"):
        NpyFile(path)


def test_store_reads_do_not_grow_the_resident_set(tmp_path: Path) -> None:
    """Reading a cached file row by row leaves it in the page cache, not in the process (Linux)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs /proc/self/status")
    from tlengine._store import Store

    def rss_file_kb() -> int:
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("RssFile:"))

    store = Store(tmp_path, 10**9)
    rows = 2000
    store.get_or_make("images", "k", (rows, 64, 64, 3), "uint8", lambda out: out.fill(3))  # 24.6 MB
    array = store.get("images", "k")
    before = rss_file_kb()
    total = 0
    for start in range(0, rows, 64):
        total += int(array[start : start + 64][:, 0, 0, 0].sum())
    assert total == 3 * rows
    assert rss_file_kb() - before < 4_000  # a memory map would hold all 24,600 KB


def test_thread_map_keeps_order_bounds_pending_calls_and_raises_the_first_error() -> None:
    import threading

    from tlengine._store import thread_map

    running, most = 0, 0
    lock = threading.Lock()

    def square(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return i * i
        finally:
            with lock:
                running -= 1

    results = thread_map(square, 5000, threads=4, window=16)
    assert list(results) == [i * i for i in range(5000)]
    assert most <= 4

    submitted = []

    def slow(i: int) -> int:
        submitted.append(i)
        return i

    lazy = thread_map(slow, 10_000, threads=2, window=8)
    assert next(lazy) == 0 and len(submitted) <= 16  # not every call submitted at once
    list(lazy)

    def fails(i: int) -> int:
        if i == 7:
            raise ValueError("image 7")
        return i

    with pytest.raises(ValueError, match="image 7"):
        list(thread_map(fails, 100, threads=3))
