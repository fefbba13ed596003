"""Nothing lost: epoch checkpoints, resume inside a trial, SIGKILL, Ctrl-C, out-of-memory backoff, stale trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY_BACKBONE


def tiny_training(seed: int = 0) -> tuple[Any, Any, Any, Any, Any]:
    """A tiny timm model with its optimizer, loaders and plan, built the way a trial builds them."""
    import torch

    from tlengine._model import build_model
    from tlengine._loaders import loader
    from tlengine._train import TrainPlan, param_groups
    from tlengine.plugins import get_registry

    torch.manual_seed(seed)
    registry = get_registry()
    backbone = registry.backbones["timm"].factory("test_efficientnet", "none")
    model = build_model(backbone, registry.heads["linear"].factory(backbone.num_features, 3, "classification"), "classification")
    optimizer = registry.optimizers["adamw"].factory(param_groups(model, 0.01, 1.0), 1e-3, 0.01)
    g = torch.Generator().manual_seed(1)
    train = torch.utils.data.TensorDataset(torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 3, (24,), generator=g))
    val = torch.utils.data.TensorDataset(torch.randn(9, 3, 32, 32, generator=g), torch.randint(0, 3, (9,), generator=g))
    plan = TrainPlan(epochs=3, task="classification", metric="accuracy", num_classes=3)
    return model, optimizer, loader(train, 8, True, "cpu", seed=5), loader(val, 16, False, "cpu"), plan


def test_resume_at_an_epoch_end_is_bit_exact(tmp_path: Path) -> None:
    """Three epochs straight, or one epoch, a checkpoint file, and two more in a fresh model: the same weights."""
    import torch

    from tlengine._resume import load_checkpoint, save_checkpoint
    from tlengine._train import fit

    model, optimizer, train, val, plan = tiny_training()
    straight = fit(model, optimizer, train, val, plan, device="cpu")
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer, train, val, plan = tiny_training()
    path = tmp_path / "t.last.safetensors"
    saved = []

    def save(state: Any) -> None:
        save_checkpoint(path, model, state)
        saved.append(state.epoch)
        if state.epoch == 1:
            raise KeyboardInterrupt  # the process dies right after the first epoch's checkpoint

    with pytest.raises(KeyboardInterrupt):
        fit(model, optimizer, train, val, plan, device="cpu", save=save)
    torch.manual_seed(123)  # a new process: other RNG states until the checkpoint restores them
    model, optimizer, train, val, plan = tiny_training(seed=7)
    state = load_checkpoint(path, model)
    assert (state.epoch, state.step, len(state.history)) == (1, 0, 1)
    resumed = fit(model, optimizer, train, val, plan, device="cpu", resume=state)
    assert [h.score for h in resumed] == [h.score for h in straight]
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch() -> None:
    """A model that runs out of memory above 3 images trains to the same weights through gradient accumulation."""
    import torch

    from tlengine._loaders import loader
    from tlengine._train import TrainPlan, fit

    def model_and_data() -> tuple[Any, Any, Any, Any]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        model.task = "classification"
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g))
        return model, torch.optim.SGD(model.parameters(), lr=0.1), loader(data, 8, True, "cpu", seed=2), loader(data, 32, False, "cpu")

    plan = TrainPlan(epochs=2, task="classification", metric="accuracy", warmup=0.0)
    model, optimizer, train, val = model_and_data()
    fit(model, optimizer, train, val, plan, device="cpu")
    expected = [p.detach().clone() for p in model.parameters()]

    model, optimizer, train, val = model_and_data()
    forward = model.forward
    sizes, backoffs = [], []

    def limited(x: Any) -> Any:
        if len(x) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        sizes.append(len(x))
        return forward(x)

    model.forward = limited
    fit(model, optimizer, train, val, plan, device="cpu", on_backoff=backoffs.append)
    assert backoffs == [4, 2] and max(sizes) == 2
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(expected, model.parameters()))


@pytest.fixture
def oom_backbone(register_plugin: Any) -> dict[str, int]:
    """A backbone plugin ``oom`` whose model runs out of memory above ``limit["images"]`` images per training pass."""
    import timm
    import torch

    from tlengine import hookimpl
    from tlengine._records import Backbone

    limit = {"images": 4}

    def factory(arch: str | None, weights: str) -> Any:
        model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
        forward = model.forward

        def limited(x: Any) -> Any:
            if model.training and len(x) > limit["images"]:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return forward(x)

        model.forward = limited
        return model

    class Plugin:
        @hookimpl
        def register_backbones(self, register: Any) -> None:
            register(Backbone("oom", factory, "runs out of memory above a few images"))

    register_plugin(Plugin(), "oom-plugin")
    return limit


def test_out_of_memory_in_a_search_backs_off_then_prunes_below_the_floor(tiny_folder: Path, tmp_path: Path, oom_backbone: dict[str, int]) -> None:
    from tlengine._cli import main

    args = ["search", "--data", str(tiny_folder), "--backbone", "oom", "--weights", "none", "--trials", "2", "--epochs", "1",
            "--image-size", "32", "--batch-size", "8", "--param", "freeze_depth=0", "--pruner", "none"]
    assert main([*args, "--out", str(tmp_path), "--study-name", "fits"]) == 0
    fits = _study(tmp_path, "fits")
    assert [t.state.name for t in _ran(fits)] == ["COMPLETE", "COMPLETE"]
    assert [t.user_attrs["micro_batch"] for t in _ran(fits)] == [4, 4]  # batch 8 as 2 x 4, accumulated

    oom_backbone["images"] = 1  # below the floor of 2: every trial is pruned with the reason, and the study goes on
    assert main([*args, "--out", str(tmp_path), "--study-name", "floor"]) == 0
    study = _study(tmp_path, "floor")
    assert [t.state.name for t in _ran(study)] == ["PRUNED", "PRUNED"]
    assert all(t.user_attrs["prune_reason"].startswith("out of memory even at micro-batch 2") for t in _ran(study))


def _study(run: Path, name: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run / name / 'study.db'}")


def _retry_of(study: Any, number: int) -> Any:
    return next(t for t in study.trials if t.system_attrs.get("failed_trial") == number)


def _ran(study: Any) -> list[Any]:
    """The trials that ran (an enqueued opening recipe beyond --trials waits)."""
    return [t for t in study.trials if t.state.name != "WAITING"]


def _epoch_of(checkpoint: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(checkpoint), framework="pt") as f:
            return json.loads(f.metadata()["tlengine"])["epoch"]
    except Exception:
        return None


#: ``python -c SLOW SECONDS ARGS...``: tlengine with a backbone ``slow`` whose training steps each sleep SECONDS.
SLOW = """
import sys, time, timm
from tlengine import hookimpl
from tlengine._records import Backbone
from tlengine.plugins import load_plugins, pm

def factory(arch, weights):
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    forward = model.forward
    def slow(x):
        if model.training:
            time.sleep(float(sys.argv[1]))
        return forward(x)
    model.forward = slow
    return model

class Plugin:
    @hookimpl
    def register_backbones(self, register):
        register(Backbone("slow", factory, "sleeps in every training step"))

load_plugins()
pm.register(Plugin(), "slow-plugin")
from tlengine._cli import main
sys.exit(main(sys.argv[2:]))
"""


def _search(folder: Path, out: Path, sleep: float = 0.0) -> tuple[list[str], list[str]]:
    """The arguments of a two-trial search, and the command that runs it with each training step sleeping ``sleep`` s."""
    args = ["search", "--data", str(folder), "--backbone", "slow", "--weights", "none", "--trials", "2", "--epochs", "3",
            "--image-size", "32", "--batch-size", "8", "--pruner", "none", "--param", "freeze_depth=0",
            "--out", str(out), "--study-name", "k"]
    return args, [sys.executable, "-c", SLOW, str(sleep), *args]


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rerun(args: list[str]) -> None:
    """The same command again (no sleeping), to its end."""
    done = subprocess.run([sys.executable, "-c", SLOW, "0", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _wait_for_epoch(process: subprocess.Popen, checkpoint: Path, epoch: int) -> int:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        reached = _epoch_of(checkpoint) if checkpoint.is_file() else None
        if reached is not None and reached >= epoch:
            return reached
        time.sleep(0.02)
    raise AssertionError(f"{checkpoint} never reached epoch {epoch}")


def test_sigkill_mid_trial_then_the_same_command_resumes_it(tiny_folder: Path, tmp_path: Path) -> None:
    """A real process killed with SIGKILL in trial 1: the rerun keeps trial 0 as it was and continues trial 1 from its epoch."""
    args, command = _search(tiny_folder, tmp_path, sleep=0.1)
    process = _start(command)
    reached = _wait_for_epoch(process, tmp_path / "k" / "trials" / "1.last.safetensors", 1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = _study(tmp_path, "k")
    finished = before.trials[0]
    assert finished.state.name == "COMPLETE" and before.trials[1].state.name == "RUNNING"
    checkpoint0 = Path(finished.user_attrs["checkpoint"]).read_bytes()

    _rerun(args)
    after = _study(tmp_path, "k")
    assert after.trials[0].value == finished.value and after.trials[0].params == finished.params
    assert Path(after.trials[0].user_attrs["checkpoint"]).read_bytes() == checkpoint0  # untouched
    killed, retry = after.trials[1], _retry_of(after, 1)
    assert killed.state.name == "FAIL" and killed.user_attrs["stopped"] == "its worker process died"
    assert retry.state.name == "COMPLETE" and retry.params == killed.params
    assert retry.user_attrs["resumed_from"]["trial"] == 1 and retry.user_attrs["resumed_from"]["epoch"] >= reached >= 1
    assert len(retry.intermediate_values) == 3  # the epochs before the kill were not trained again, but are all reported
    assert not any((tmp_path / "k" / "trials").glob("*.last.safetensors"))  # epoch checkpoints go once a trial is done


@pytest.mark.parametrize(("signum", "code", "said"), [(signal.SIGINT, 130, "stopping: saving"), (signal.SIGTERM, 143, "stopping (SIGTERM): saving")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_prints_the_resume_command_and_exits_128_plus_the_signal(
        tiny_folder: Path, tmp_path: Path, signum: int, code: int, said: str) -> None:
    """SIGTERM (a scheduler's or spot instance's warning) is a first Ctrl-C: checkpoint, keep for resumption, exit 143."""
    args, command = _search(tiny_folder, tmp_path, sleep=0.1)
    process = _start(command)
    _wait_for_epoch(process, tmp_path / "k" / "trials" / "1.last.safetensors", 1)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert f"{said} trial 1's checkpoint first" in err
    assert "interrupted: trial 1's checkpoint saved; finished trials are kept. Resume with:" in err
    resume = err.strip().splitlines()[-1].strip()
    assert resume.startswith("tlengine search --data") and resume.endswith("--study-name k")
    stopped = _study(tmp_path, "k").trials[1]
    assert stopped.state.name == "FAIL" and stopped.user_attrs["resumable"].startswith("interrupted in epoch")

    _rerun(args)
    retry = _retry_of(_study(tmp_path, "k"), 1)
    assert retry.state.name == "COMPLETE" and retry.user_attrs["resumed_from"]["trial"] == 1
    at = retry.user_attrs["resumed_from"]
    assert at["epoch"] >= 1 and (at["epoch"], at["step"]) != (0, 0)


def test_second_ctrl_c_stops_at_once_and_loses_no_finished_trial(tiny_folder: Path, tmp_path: Path) -> None:
    """The first Ctrl-C waits for the running step; the second, during that step, stops at once."""
    args, command = _search(tiny_folder, tmp_path, sleep=0.5)
    process = _start(command)
    _wait_for_epoch(process, tmp_path / "k" / "trials" / "1.last.safetensors", 1)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)  # the step under way sleeps 0.5 s: this second Ctrl-C comes before it ends
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "stopped at once; the running trial resumes from its last epoch" in err
    study = _study(tmp_path, "k")
    assert study.trials[0].state.name == "COMPLETE" and study.trials[1].state.name == "FAIL"
    assert _retry_of(study, 1).state.name == "WAITING"  # resumes from trial 1's last epoch checkpoint
    _rerun(args)
    study = _study(tmp_path, "k")
    assert study.trials[0].state.name == "COMPLETE" and _retry_of(study, 1).user_attrs["resumed_from"]["epoch"] >= 1


def test_journal_storage_has_a_heartbeat_that_retries_stale_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial on another machine whose heartbeat stopped is failed and re-enqueued, as Optuna does for RDB storages."""
    import optuna

    from tlengine import _storage
    from tlengine._storage import make_storage

    def fail_stale_trials(study: Any) -> None:  # what Study.optimize runs before each trial
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name="j", storage=make_storage(f"journal://{tmp_path / 'j.journal'}"))
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    trial.set_user_attr("worker", {"host": "another-machine", "pid": 1})
    study._storage.record_heartbeat(trial._trial_id)
    fail_stale_trials(study)
    assert study.trials[0].state.name == "RUNNING"  # its heartbeat is fresh
    later = time.time() + _storage.GRACE_PERIOD + 1
    monkeypatch.setattr(_storage.time, "time", lambda: later)
    fail_stale_trials(study)
    reopened = optuna.load_study(study_name="j", storage=make_storage(f"journal://{tmp_path / 'j.journal'}"))
    assert [t.state.name for t in reopened.trials] == ["FAIL", "WAITING"]
    assert reopened.trials[1].system_attrs["failed_trial"] == 0 and reopened.trials[1].params == trial.params


def test_a_dead_local_worker_is_recovered_at_once(tmp_path: Path) -> None:
    import optuna

    from tlengine._resume import recover_dead_workers, worker_identity
    from tlengine._storage import make_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name="d", storage=make_storage(f"sqlite:///{tmp_path / 'd.db'}"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    alive, gone = study.ask(), study.ask()
    alive.set_user_attr("worker", worker_identity())
    gone.set_user_attr("worker", {**worker_identity(), "pid": int(dead), "start": "0"})
    assert recover_dead_workers(study) == [1]
    assert [t.state.name for t in study.trials] == ["RUNNING", "FAIL", "WAITING"]


def _finished_by_worker(study: Any) -> set[int]:
    return {t.user_attrs["worker"]["pid"] for t in study.trials if t.state.name == "COMPLETE"}


def test_workers_share_one_study_through_a_journal_file(tiny_folder: Path, tmp_path: Path) -> None:
    """--workers 2 starts two processes on one journal-file study; --trials is the study's total.

    Twelve trials of two epochs (about 3 s of work for one worker alone), so that the second worker,
    which starts within about 0.6 s of the first, finds trials left: with five one-epoch trials (0.1 s
    each) the first worker sometimes finished them all before the second asked for one."""
    import optuna

    from tlengine._cli import main

    assert main(["search", "--data", str(tiny_folder), "--backbone", TINY_BACKBONE, "--weights", "none", "--trials", "12",
                 "--epochs", "2", "--image-size", "32", "--pruner", "none", "--workers", "2", "--out", str(tmp_path),
                 "--study-name", "w"]) == 0
    assert (tmp_path / "w" / "study.journal").is_file() and not (tmp_path / "w" / "study.db").exists()
    study = optuna.load_study(study_name="w", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "w" / "study.journal"))))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 12 and not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    assert len(_finished_by_worker(study)) == 2 and os.getpid() not in _finished_by_worker(study)
    assert (tmp_path / "w" / "best.onnx").is_file()
    assert main(["export", "--runs", str(tmp_path), "--study-name", "w", "--out", str(tmp_path / "w.onnx")]) == 0


def _postgres() -> str:
    url = os.environ.get("TLENGINE_TEST_POSTGRES")
    if not url:
        pytest.skip("no PostgreSQL server: set TLENGINE_TEST_POSTGRES (.ci/run starts one with .ci/postgres)")
    try:
        import sqlalchemy

        sqlalchemy.create_engine(url).connect().close()
    except Exception as exc:  # no driver, or no server
        pytest.skip(f"PostgreSQL at {url} not reachable: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    return url


def test_three_workers_on_postgresql_finish_exactly_twelve_trials(tiny_folder: Path, tmp_path: Path) -> None:
    """Three separate processes, as on three machines, against one PostgreSQL study: 12 trials, none lost or duplicated."""
    import optuna

    url = _postgres()
    name = f"pg-{os.getpid()}-{time.time_ns()}"
    args = ["search", "--data", str(tiny_folder), "--backbone", TINY_BACKBONE, "--weights", "none", "--trials", "12",
            "--epochs", "1", "--image-size", "32", "--pruner", "none", "--storage", url, "--study-name", name]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "tlengine", *args, "--out", str(tmp_path / str(i))], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outputs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    study = optuna.load_study(study_name=name, storage=url)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 12
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING", "PRUNED")]
    assert sorted(t.user_attrs.get("recipe", "") for t in complete if t.user_attrs.get("recipe")) == [
        "full fine-tune", "linear probe", "top half"]  # enqueued once, however many workers started
    assert len({Path(t.user_attrs["checkpoint"]) for t in complete}) == 12
    assert all(Path(t.user_attrs["checkpoint"]).is_file() for t in complete)
    assert len(_finished_by_worker(study)) >= 2
    optuna.delete_study(study_name=name, storage=url)
