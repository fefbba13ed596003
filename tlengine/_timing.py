"""Where a search's time and memory go: wall time and peak memory per stage.

A search runs inside :func:`stopwatch`; the code of each stage (listing the images,
checking they decode, decoding them into the cache, computing frozen-prefix features,
training, exporting, drawing the report) runs inside :func:`stage`. Nested stages count
their own time only (decoding done while features are computed is decoding, not
features). The totals go into ``summary.json`` under ``stages``.

Memory per stage is read from Linux's ``/proc/self/status``: ``peak_rss_mb`` is the
process's peak resident set (``VmHWM``, reset at every stage boundary through
``/proc/self/clear_refs``), and ``peak_anon_mb`` the peak of its anonymous part
(``RssAnon``, sampled every 50 ms): what the process itself allocated, without the
pages of mapped files (libraries, and files other code maps). Elsewhere the memory figures are ``None``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(key: str) -> int | None:
    """One ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``, ``RssAnon``), or ``None``."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident set (Linux 4.0 and later); silently nothing elsewhere."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


@dataclass
class StageTotals:
    """One stage's totals: seconds (its own, not its nested stages'), calls, and peak memory in MB."""

    seconds: float = 0.0
    calls: int = 0
    peak_rss_mb: float | None = None
    peak_anon_mb: float | None = None


@dataclass
class Stopwatch:
    """The stages of one search, in the order they first ran."""

    stages: dict[str, StageTotals] = field(default_factory=dict)
    _open: list[list] = field(default_factory=list)  # [name, started, child seconds]
    _anon_kb: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _sample(self) -> None:
        anon = _status_kb("RssAnon")
        if anon is not None:
            with self._lock:
                self._anon_kb = max(self._anon_kb, anon)

    def _close_memory(self, name: str) -> None:
        """Fold the memory peaks since the last boundary into stage ``name`` (and reset them)."""
        self._sample()
        totals = self.stages[name]
        hwm = _status_kb("VmHWM")
        if hwm is not None:
            totals.peak_rss_mb = max(totals.peak_rss_mb or 0.0, hwm / 1024)
        with self._lock:
            if self._anon_kb:
                totals.peak_anon_mb = max(totals.peak_anon_mb or 0.0, self._anon_kb / 1024)
            self._anon_kb = _status_kb("RssAnon") or 0
        _reset_peak()

    def enter(self, name: str) -> None:
        """Start stage ``name`` (inside the current one, if any)."""
        if self._open:
            self._close_memory(self._open[-1][0])
        self.stages.setdefault(name, StageTotals())
        self._open.append([name, time.perf_counter(), 0.0])

    def exit(self) -> None:
        """End the innermost stage."""
        name, started, children = self._open.pop()
        elapsed = time.perf_counter() - started
        totals = self.stages[name]
        totals.seconds += elapsed - children
        totals.calls += 1
        self._close_memory(name)
        if self._open:
            self._open[-1][2] += elapsed

    def to_dict(self) -> dict[str, dict[str, float | int | None]]:
        """``{stage: {"seconds", "calls", "peak_rss_mb", "peak_anon_mb"}}``, for ``summary.json``."""
        return {name: {"seconds": round(t.seconds, 3), "calls": t.calls,
                       "peak_rss_mb": None if t.peak_rss_mb is None else round(t.peak_rss_mb, 1),
                       "peak_anon_mb": None if t.peak_anon_mb is None else round(t.peak_anon_mb, 1)}
                for name, t in self.stages.items()}


_CURRENT: ContextVar[Stopwatch | None] = ContextVar("tlengine_stopwatch", default=None)


@contextmanager
def stopwatch() -> Iterator[Stopwatch]:
    """Time the stages run inside the block (a thread samples anonymous memory meanwhile)."""
    watch = Stopwatch()
    token = _CURRENT.set(watch)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            watch._sample()

    sampler = threading.Thread(target=sample, name="tlengine-memory", daemon=True)
    _reset_peak()
    sampler.start()
    try:
        yield watch
    finally:
        done.set()
        sampler.join()
        _CURRENT.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Count the block as stage ``name`` of the running search (nothing outside a :func:`stopwatch`)."""
    watch = _CURRENT.get()
    if watch is None:
        yield
        return
    watch.enter(name)
    try:
        yield
    finally:
        watch.exit()


def current_stages() -> dict[str, dict[str, float | int | None]] | None:
    """The running search's stages so far (:meth:`Stopwatch.to_dict`), or ``None`` outside a :func:`stopwatch`."""
    watch = _CURRENT.get()
    return None if watch is None else watch.to_dict()
