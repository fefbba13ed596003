"""The cache store: ``.npy`` files read and written in place (:class:`NpyFile`), capped, least
recently used evicted first; the hashes that key them; and decoding a split into one of them
on several threads.

Writes go to a temporary file renamed into place, so concurrent writers of one key
never leave a torn file (the last rename wins; both wrote the same bytes). Every use
touches a file's modification time; before a write, the least recently used files
are deleted until the folder fits under the cap.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tlengine._errors import UserError
from tlengine._preprocess import Preprocess


def default_cache_dir() -> Path:
    """``$TLENGINE_CACHE``, else ``~/.cache/tlengine``."""
    env = os.environ.get("TLENGINE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tlengine"


#: What the store holds: decoded images, frozen-prefix features, and a distillation teacher's outputs.
KINDS = ("images", "features", "teacher")


def digest(*parts: Any) -> str:
    """A short hex key for JSON-able ``parts``."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def images_digest(images: Sequence[Any]) -> str:
    """Hash of a split's images: path, size and mtime of files; the bytes of in-memory images."""
    import numpy as np
    from PIL import Image

    h = hashlib.sha256()
    for item in images:
        if isinstance(item, np.ndarray):
            h.update(f"array{item.shape}{item.dtype}".encode())
            h.update(hashlib.sha256(np.ascontiguousarray(item).tobytes()).digest())
        elif isinstance(item, Image.Image):
            h.update(f"pil{item.mode}{item.size}".encode())
            h.update(hashlib.sha256(item.tobytes()).digest())
        else:
            path = Path(item)
            stat = path.stat()
            h.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def state_digest(state: dict[str, Any]) -> str:
    """Hash of a state dict's names, shapes, dtypes and values."""
    import torch

    h = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class NpyFile:
    """A ``.npy`` file read and written in place with ``pread``/``pwrite``: rows on demand, never the whole file.

    Why not numpy's memory maps: every page of a memory map that a process touches counts
    in its resident set until the map is closed, so a search that reads its cached images
    or features once per epoch would grow by the size of the cache (33 KB per image at
    32 px, gigabytes for a few hundred thousand images). Read with ``pread``, the pages stay
    in the kernel's page cache, shared by every process and dropped under memory pressure,
    and the process holds one batch. Row indexing covers what the loaders need: an integer,
    a contiguous slice (one read), or an array of integers.

    Args:
        path: An existing C-ordered ``.npy`` file (see :meth:`create`).
        writable: Open it for writing too.
    """

    def __init__(self, path: Path, writable: bool = False) -> None:
        import numpy as np

        self.path, self.writable = Path(path), writable
        with open(self.path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not read in place")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if os.path.getsize(self.path) < self.offset + self.row_bytes * self.shape[0]:
            raise ValueError(f"{path}: shorter than its header says")
        self._fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    @classmethod
    def create(cls, path: Path, shape: Sequence[int], dtype: str) -> NpyFile:
        """A new zero-filled ``.npy`` file (sparse where the file system allows), open for writing."""
        import numpy as np

        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(int(s) for s in shape)}
        with open(path, "wb") as f:
            np.lib.format.write_array_header_2_0(f, header)
            f.truncate(f.tell() + _nbytes(shape, dtype) - 128)
        return cls(path, writable=True)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the array's data."""
        return self.row_bytes * self.shape[0]

    def _rows(self, start: int, stop: int) -> Any:
        import numpy as np

        count = max(0, stop - start)
        data = os.pread(self._fd, count * self.row_bytes, self.offset + start * self.row_bytes)
        if len(data) != count * self.row_bytes:
            raise OSError(f"{self.path}: short read")
        return np.frombuffer(bytearray(data), dtype=self.dtype).reshape(count, *self.shape[1:])

    def __getitem__(self, key: Any) -> Any:
        """Rows ``key`` (an int, a slice, or integers; then, in a tuple, indices within them) as a new writable array."""
        import numpy as np

        if isinstance(key, tuple):
            rows = self[key[0]] if key else self.copy()
            rest = key[1:] if isinstance(key[0], (int, np.integer)) else (slice(None), *key[1:])
            return rows[rest]

        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            rows = self._rows(start, stop)
            return rows if step == 1 else rows[::step]
        if isinstance(key, (int, np.integer)):
            index = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= index < len(self):
                raise IndexError(f"index {key} out of range for {len(self)} rows")
            return self._rows(index, index + 1)[0]
        indices = np.asarray(key)
        if indices.dtype.kind not in "iu":
            raise TypeError(f"rows are indexed by integers, slices or integer arrays, not {indices.dtype}")
        return np.stack([self[int(i)] for i in indices.reshape(-1)]).reshape(*indices.shape, *self.shape[1:]) if indices.size else \
            np.empty((*indices.shape, *self.shape[1:]), self.dtype)

    def __setitem__(self, key: int | slice, value: Any) -> None:
        """Write rows ``key`` (an int or a contiguous slice)."""
        import numpy as np

        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise TypeError("rows are written by int or contiguous slice")
        else:
            start = int(key) + len(self) if key < 0 else int(key)
            stop = start + 1
            if not 0 <= start < len(self):
                raise IndexError(f"index {key} out of range for {len(self)} rows")
        rows = np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=self.dtype), (max(0, stop - start), *self.shape[1:])))
        os.pwrite(self._fd, rows.tobytes(), self.offset + start * self.row_bytes)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> Any:
        whole = self._rows(0, len(self))
        return whole if dtype is None else whole.astype(dtype)

    def fill(self, value: Any) -> None:
        """Set every element to ``value`` (written a few MB at a time)."""
        step = max(1, (8 << 20) // max(1, self.row_bytes))
        for start in range(0, len(self), step):
            self[start : start + step] = value

    def copy(self) -> Any:
        """The whole array, read into memory."""
        return self._rows(0, len(self))

    def astype(self, dtype: Any) -> Any:
        """The whole array read into memory as ``dtype``."""
        return self._rows(0, len(self)).astype(dtype)

    def flush(self) -> None:
        """Push written rows to the file system."""
        if self.writable:
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the file (also when the object goes away)."""
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    __del__ = close

    def __getstate__(self) -> dict[str, Any]:  # a loader's worker process opens the file again
        return {"path": self.path, "writable": self.writable}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["writable"])


class Store:
    """``.npy`` files under a folder, read in place (:class:`NpyFile`), capped, least recently used evicted first.

    Args:
        root: The cache folder (created).
        cap_bytes: The most bytes the folder may hold.

    Raises:
        UserError: The folder cannot be created.
    """

    def __init__(self, root: Path, cap_bytes: int) -> None:
        self.root = Path(root)
        self.cap_bytes = int(cap_bytes)
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}
        self.made_extra: dict[str, int] = {}
        self.evicted = 0
        try:
            for kind in KINDS:
                (self.root / kind).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--cache-dir {root}: cannot create it ({exc.strerror}); choose a writable folder or pass --no-cache") from exc

    def path(self, kind: str, key: str) -> Path:
        """Where the file for ``key`` lives."""
        return self.root / kind / f"{key}.npy"

    def get(self, kind: str, key: str) -> Any:
        """The array of ``key`` (an :class:`NpyFile`), or ``None``; marks it as just used."""
        path = self.path(kind, key)
        try:
            array = NpyFile(path)
            os.utime(path)
        except (FileNotFoundError, ValueError, OSError):
            return None
        return array

    def get_or_make(self, kind: str, key: str, shape: tuple[int, ...], dtype: str, fill: Callable[[Any], None],
                    extras: Sequence[tuple[str, tuple[int, ...], str]] = (), *, count: bool = True) -> Any:
        """The array of ``key``, made with ``fill(array)`` when missing; ``None`` if it cannot fit under the cap.

        ``fill`` writes into a temporary :class:`NpyFile` that is renamed into
        place once full, so readers never see a partial file. ``extras`` are more
        ``(key, shape, dtype)`` files the same pass can fill for free: those missing that
        fit in the cap's free space (never evicting for them) are made too, and ``fill``
        then gets ``(array, {key: array})``. ``count``: ``False`` leaves the use out of :attr:`hits`,
        :attr:`misses` and :attr:`made_extra` (the checks made before the first trial).
        """
        array = self.get(kind, key)
        if array is not None and array.shape == tuple(shape):
            self.hits[kind] = self.hits.get(kind, 0) + count
            return array
        self.misses[kind] = self.misses.get(kind, 0) + count
        nbytes = _nbytes(shape, dtype)
        if nbytes > self.cap_bytes:
            return None
        self.evict(nbytes)
        free = self.cap_bytes - self.size_bytes() - nbytes
        wanted = {}
        for extra, extra_shape, extra_dtype in extras:
            if extra != key and extra not in wanted and not self.path(kind, extra).is_file() and _nbytes(extra_shape, extra_dtype) <= free:
                wanted[extra] = (tuple(extra_shape), extra_dtype)
                free -= _nbytes(extra_shape, extra_dtype)
        files = {k: (self.path(kind, k), self.path(kind, k).with_name(f".{k}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))
                 for k in [key, *wanted]}
        try:
            outs = {k: NpyFile.create(files[k][1], sh, d)
                    for k, (sh, d) in {key: (tuple(shape), dtype), **wanted}.items()}
            out = outs.pop(key)
            fill(out, outs) if extras else fill(out)  # an extra ``fill`` removes from ``outs`` is not kept
            kept = [key, *outs]
            for array in [out, *outs.values()]:
                array.close()
            del out, outs
            for k in kept:
                os.replace(files[k][1], files[k][0])
        finally:
            for _, tmp in files.values():
                tmp.unlink(missing_ok=True)
        self.made_extra[kind] = self.made_extra.get(kind, 0) + (len(kept) - 1) * count
        return self.get(kind, key)

    def files(self) -> list[tuple[float, int, Path]]:
        """``(mtime, bytes, path)`` of every cached file, oldest first."""
        found = []
        for kind in KINDS:
            for path in (self.root / kind).glob("*.npy"):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                found.append((stat.st_mtime, stat.st_size, path))
        return sorted(found)

    def evict(self, incoming: int) -> None:
        """Delete the least recently used files until ``incoming`` more bytes fit under the cap."""
        files = self.files()
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total + incoming <= self.cap_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.evicted += 1

    def size_bytes(self) -> int:
        """Bytes the cached files take."""
        return sum(size for _, size, _ in self.files())


def decode_threads() -> int:
    """Threads for decoding: the CPUs this process may run on, at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def thread_map(fn: Callable[[int], Any], n: int, threads: int, window: int = 256) -> Iterator[Any]:
    """``fn(i)`` for ``i`` in ``range(n)`` on ``threads`` threads, in order, with at most ``window`` calls pending.

    ``ThreadPoolExecutor.map`` submits every call at once, which for a few hundred
    thousand images holds as many futures (about 1.5 KB each); this keeps a window.
    The first error is raised when its result is reached.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    if threads <= 1 or n < 2:
        for i in range(n):
            yield fn(i)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="tlengine") as pool:
        pending: deque = deque()
        for i in range(n):
            pending.append(pool.submit(fn, i))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def decode_into(out: Any, items: Sequence[Any], crop: Preprocess, threads: int | None = None) -> None:
    """Decode, resize and crop every item into ``out[i]`` (uint8 ``(N, H, W, 3)``), on ``threads`` threads
    (default :func:`decode_threads`).

    Threads, not processes: Pillow releases the GIL while it decodes and resizes, and the
    threads write straight into the output file.
    """
    def one(i: int) -> None:
        out[i] = crop.pixels(items[i])  # pixels() loads the item (tlengine._preprocess.load_image)

    for _ in thread_map(one, len(items), decode_threads() if threads is None else threads):  # re-raises the first error
        pass


def _nbytes(shape: Sequence[int], dtype: str) -> int:
    import numpy as np

    return int(np.prod(shape)) * np.dtype(dtype).itemsize + 128
