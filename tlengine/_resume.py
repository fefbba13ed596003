"""Losing nothing: epoch checkpoints, stale trials, retries that resume, Ctrl-C.

A trial writes its weights and training state (optimizer, gradient scaler, RNG
states, epoch, step) to one safetensors file at every epoch end and records the
path in its ``epoch_checkpoint`` attribute. A trial that stops without finishing
(its worker killed, the machine lost, Ctrl-C, a full disk) is failed and
re-enqueued with Optuna's ``RetryFailedTrialCallback``; the retry reads the
failed trial's checkpoint and continues from it.

Stale trials are found by the heartbeat of every storage tlengine opens
(:mod:`tlengine._storage`) and, at once, without waiting for a grace period, when a
trial's worker ran on this machine and its process is gone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

CHECKPOINT_FORMAT = 1


def retried_from(trial: optuna.Trial) -> int | None:
    """The number of the trial that the running ``trial`` retries, or ``None`` (Optuna's
    ``RetryFailedTrialCallback.retried_trial_number`` on the trial as stored)."""
    import warnings

    import optuna

    frozen = trial.study._storage.get_trial(trial._trial_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryFailedTrialCallback.retried_trial_number(frozen)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_identity() -> dict[str, Any]:
    """Who runs a trial: host, boot, process id and start time."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "start": _process_start(pid)}


def _worker_gone(worker: dict[str, Any]) -> bool:
    """Whether ``worker`` ran on this machine and its process no longer exists."""
    if worker.get("host") != socket.gethostname():
        return False  # another machine's worker: the heartbeat decides
    boot = _boot_id()
    if worker.get("boot") and boot and worker["boot"] != boot:
        return True  # the machine rebooted since
    pid = worker.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return worker.get("start") is not None and _process_start(pid) != worker["start"]  # the PID was reused


def retry(study: Any, trial_number: int) -> None:
    """Enqueue the retry of a failed trial (it resumes from the trial's epoch checkpoint)."""
    import copy

    storage = study._storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, trial_number)
    from tlengine._storage import retry_callback

    retry_callback()(study, copy.deepcopy(storage.get_trial(trial_id)))


def fail_and_retry(study: Any, trial_number: int, reason: str) -> bool:
    """Fail a running trial and enqueue its retry; ``False`` if another worker got there first."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, trial_number)
    try:
        storage.set_trial_user_attr(trial_id, "stopped", reason)
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    retry(study, trial_number)
    return True


def keep_for_resume(study: optuna.Study, number: int | None, always: bool) -> None:
    """After trial ``number`` stopped unfinished (Ctrl-C, a full disk), enqueue its retry, which resumes from its
    checkpoint; a failed trial is retried when ``always`` or when it was marked ``resumable``."""
    from optuna.trial import TrialState

    if number is None:
        return
    trial = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
    if trial.state == TrialState.RUNNING:
        fail_and_retry(study, number, "stopped")
    elif trial.state == TrialState.FAIL and (always or "resumable" in trial.user_attrs):
        retry(study, number)


def recover_dead_workers(study: Any) -> list[int]:
    """Fail and re-enqueue the running trials whose worker on this machine has died.

    Returns:
        The numbers of the trials recovered.
    """
    from optuna.trial import TrialState

    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if isinstance(worker, dict) and _worker_gone(worker) and fail_and_retry(study, trial.number, "its worker process died"):
            recovered.append(trial.number)
    return recovered


def save_checkpoint(path: Path, model: Any, state: Any) -> None:
    """Write ``model``'s weights and a :class:`~tlengine._train.TrainingState` to one safetensors file.

    Tensors (weights, optimizer moments, RNG states) are safetensors tensors; the
    rest is JSON in the file's metadata. Written to a temporary file and renamed,
    so a crash leaves the previous checkpoint or the new one, never half of one.

    Raises:
        OSError: The file could not be written (the temporary file is removed).
    """
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    optimizer_scalars: dict[str, dict[str, Any]] = {}
    for index, values in state.optimizer["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().clone().contiguous()
            else:
                optimizer_scalars.setdefault(str(index), {})[key] = value
    rng = dict(state.rng)
    tensors["rng.torch"] = rng.pop("torch")
    for i, cuda in enumerate(rng.pop("cuda")):
        tensors[f"rng.cuda.{i}"] = cuda
    loader = rng.pop("loader")
    if loader is not None:
        tensors["rng.loader"] = loader
    groups = [{k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in g.items()} for g in state.optimizer["param_groups"]]
    meta = {
        "format": CHECKPOINT_FORMAT, "epoch": state.epoch, "step": state.step, "updates": state.updates,
        "micro_batch": state.micro_batch, "history": [h.__dict__ for h in state.history], "param_groups": groups,
        "optimizer_scalars": optimizer_scalars, "scaler": state.scaler, "rng": rng,
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"tlengine": json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, model: Any) -> Any:
    """Load the weights of a :func:`save_checkpoint` file into ``model``; return its training state.

    Raises:
        ValueError: The file is not a tlengine training checkpoint or does not fit ``model``.
    """
    from safetensors import safe_open

    from tlengine._train import EpochResult, TrainingState

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if "tlengine" not in metadata:
        raise ValueError(f"{path} is not a tlengine training checkpoint")
    meta = json.loads(metadata["tlengine"])
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')}, expected {CHECKPOINT_FORMAT}")
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    optimizer_state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["optimizer_scalars"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len(tensors)) if f"rng.cuda.{i}" in tensors]
    rng = {**meta["rng"], "torch": tensors["rng.torch"], "cuda": cuda, "loader": tensors.get("rng.loader")}
    return TrainingState(
        epoch=meta["epoch"], step=meta["step"], updates=meta["updates"], micro_batch=meta["micro_batch"],
        history=tuple(EpochResult(**h) for h in meta["history"]),
        optimizer={"state": optimizer_state, "param_groups": meta["param_groups"]}, scaler=meta["scaler"], rng=rng,
    )


class StopRequest:
    """Ctrl-C (or SIGTERM) handling for a search: the first asks the running trial to checkpoint and stop,
    the second stops at once (finished trials are in the study either way).

    Attributes:
        requested: Whether a stop was asked for.
        signum: The signal that asked first (``SIGINT`` or ``SIGTERM``), or ``None``.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.requested


@contextmanager
def catch_interrupts(on_first: Callable[[int], None] = lambda signum: None) -> Iterator[StopRequest]:
    """Install the two-stage handler of Ctrl-C and SIGTERM (main thread only) for the duration of the block.

    SIGTERM, what a cluster scheduler or a spot instance sends before it kills, is a
    first Ctrl-C: the running trial checkpoints and is kept for resumption. ``on_first``
    gets the signal number.
    """
    import threading

    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested, stop.signum = True, signum
        on_first(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
