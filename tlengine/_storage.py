"""Where studies live: storage URLs, the default storage of a run folder, and storages with a heartbeat.

Optuna's storage is tlengine's distributed engine: every worker on every machine opens
the same URL, and Optuna hands out the trials. Every storage made here carries a
heartbeat, so a trial whose worker died is failed and re-enqueued by Optuna's retry
callback (see :mod:`tlengine._resume` for how the retry resumes it): Optuna's own
heartbeat on RDB storages (SQLite, PostgreSQL, MySQL), and the same on the journal file
storage through ``HeartbeatJournalStorage``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlengine._errors import UserError

if TYPE_CHECKING:
    import optuna

#: Seconds between heartbeats of a running trial.
HEARTBEAT_INTERVAL = 20
#: A running trial without a heartbeat for this long is stale.
GRACE_PERIOD = 60
#: A trial is retried at most this many times.
MAX_RETRY = 3


def retry_callback() -> optuna.storages.RetryFailedTrialCallback:
    """Optuna's callback that re-enqueues a failed trial with its parameters and attributes."""
    import warnings

    import optuna

    callback = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental / deprecation notes of Optuna's own API
        return (callback or optuna.storages.RetryFailedTrialCallback)(max_retry=MAX_RETRY)


def _heartbeat_journal_class() -> type:
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
        """Optuna's journal file storage with the heartbeat Optuna gives RDB storages.

        The heartbeat is a system attribute of the running trial holding the wall
        clock time (the machines sharing a journal file need synchronised clocks,
        as they do for PostgreSQL's ``now()``).
        """

        def __init__(self, backend: Any, heartbeat_interval: int, grace_period: int, callback: Any) -> None:
            super().__init__(backend)
            self._heartbeat_interval, self._grace_period, self._callback = heartbeat_interval, grace_period, callback

        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, "heartbeat", time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now = time.time()
            return [
                t._trial_id
                for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if "heartbeat" in t.system_attrs and now - t.system_attrs["heartbeat"] > self._grace_period
            ]

        def get_heartbeat_interval(self) -> int | None:
            return self._heartbeat_interval

        def get_heartbeat_stale_trial_callback(self) -> Callable[[Any, Any], None] | None:
            return self._callback

    return HeartbeatJournalStorage


def journal_storage(path: str) -> optuna.storages.JournalStorage:
    """A journal file storage at ``path`` with heartbeats and retries of stale trials."""
    import optuna

    backend = optuna.storages.journal.JournalFileBackend(path)
    return _heartbeat_journal_class()(backend, HEARTBEAT_INTERVAL, GRACE_PERIOD, retry_callback())


def rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage for ``url`` with Optuna's heartbeat and retries of stale trials."""
    import inspect
    import warnings

    import optuna

    parameters = inspect.signature(optuna.storages.RDBStorage).parameters
    callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in parameters else "failed_trial_callback"
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the heartbeat is an experimental Optuna feature
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD, **{callback: retry_callback()},
                    engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
                )
        except Exception as exc:
            # Workers starting together on an empty database race to create Optuna's tables;
            # the losers see a unique-key violation and find the tables made a moment later.
            if attempt == 4 or not any(word in str(exc) for word in ("UniqueViolation", "already exists", "duplicate key")):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """The Optuna storage for ``--storage``: an RDB URL (``sqlite:///``, ``postgresql://``, ...), or
    ``journal://PATH`` for Optuna's journal file storage (several processes, one file); both with a
    heartbeat that fails and retries the trials of dead workers.

    Raises:
        UserError: A journal path whose folder does not exist.
    """
    if not url.startswith("journal://"):
        return rdb_storage(url)
    path = Path(url.removeprefix("journal://"))
    if not path.parent.is_dir():
        raise UserError(f"--storage {url}: folder {path.parent} does not exist")
    return journal_storage(str(path))


def default_storage(run_dir: Path, workers: int = 1) -> str:
    """The storage of a run folder when ``--storage`` is not given: its SQLite database, or its
    journal file when it has one or when several workers will share it."""
    journal = run_dir / "study.journal"
    if not (run_dir / "study.db").is_file() and (journal.is_file() or workers > 1):
        return f"journal://{journal.resolve()}"
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def study_storage(storage: str | None, runs: str, study_name: str) -> str:
    """``--storage`` as given, or the storage in ``RUNS/STUDY/`` for commands that read a study.

    Raises:
        UserError: No ``--storage`` and no study in ``RUNS/STUDY/``.
    """
    if storage:
        return storage
    run_dir = Path(runs) / study_name
    if not (run_dir / "study.db").is_file() and not (run_dir / "study.journal").is_file():
        raise UserError(f"--study-name {study_name}: no study database at {run_dir}; pass --storage")
    return default_storage(run_dir)


def safe_url(url: str) -> str:
    """``url`` without a password, for messages and pages."""
    import re

    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)
