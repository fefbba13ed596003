"""The trial runner, setup and input source, used without the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import TINY_BACKBONE


def setup_and_study(folder: Path, out: Path, **options: Any) -> tuple[Any, Any]:
    from rich.console import Console

    from tlengine._api import search_config
    from tlengine._search import open_search_study
    from tlengine._setup import make_setup

    options = {"epochs": 2, **options}
    config = search_config(data=str(folder), backbone=TINY_BACKBONE, weights="none", image_size=32, batch_size=8, out=str(out),
                           study_name="r", pruner="none", **options)
    console = Console(quiet=True)
    setup = make_setup(config, console)
    return setup, open_search_study(setup, console)


def source_for(setup: Any, cache: bool, cache_dir: Path) -> Any:
    from tlengine._inputs import input_source
    from tlengine._options import SearchConfig

    options = SearchConfig(cache=cache, cache_dir=str(cache_dir)).cache_options()
    return input_source(setup.data, setup.record.data_config, setup.device, seed=0, cache=options, base=setup.base,
                        backbone_id="timm:test_efficientnet", stages=setup.stages, log=print)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "plain"])
def test_runner_runs_the_recipes(cache: bool, tiny_folder: Path, tmp_path: Path) -> None:
    """One call per trial: the linear probe (solved exactly, one result), then the top half (its epochs); each leaves
    a checkpoint, its values and history, and the caches serve both when they are on (the probe its pooled features,
    the top half the features after its frozen stages; the runner never asks)."""
    from rich.console import Console

    from tlengine._runner import TrialRunner

    setup, study = setup_and_study(tiny_folder, tmp_path / "runs", trials=2)
    source = source_for(setup, cache, tmp_path / "cache")
    runner = TrialRunner(setup, study, source, console=Console(quiet=True))
    study.optimize(runner, n_trials=2)
    trials = [t for t in study.trials if t.state.name != "WAITING"]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"] and runner.running == 1
    assert [t.user_attrs["recipe"] for t in study.trials if t.state.name == "WAITING"] == ["full fine-tune"]
    assert [t.user_attrs["values"]["freeze_depth"] for t in trials] == [setup.record.stages, setup.record.stages // 2]
    for t, epochs in zip(trials, (1, 2)):
        assert Path(t.user_attrs["checkpoint"]).is_file() and not Path(t.user_attrs.get("epoch_checkpoint", "none")).exists()
        assert len(t.user_attrs["history"]) == epochs and t.value == t.user_attrs["history"][-1]["score"]
    assert trials[0].user_attrs["probe"]["features"] == ("cached" if cache else "computed") and "probe" not in trials[1].user_attrs
    assert (source.caches is not None and source.caches.trials_on_features == 2) == cache


def test_runner_gives_back_a_surplus_trial(tiny_folder: Path, tmp_path: Path) -> None:
    """Asked for a trial after the study has its ``--trials``, the runner gives it back (a recipe goes back in the queue)."""
    from rich.console import Console

    from tlengine._runner import Surplus, TrialRunner

    setup, study = setup_and_study(tiny_folder, tmp_path / "runs", trials=1)
    runner = TrialRunner(setup, study, source_for(setup, False, tmp_path / "cache"), console=Console(quiet=True))
    study.optimize(runner, n_trials=1)
    waiting = [t.user_attrs["recipe"] for t in study.trials if t.state.name == "WAITING"]
    study.optimize(runner, n_trials=1, catch=(Surplus,))  # another worker's call, after the study was full
    surplus = [t for t in study.trials if t.user_attrs.get("surplus")]
    assert len(surplus) == 1 and surplus[0].state.name == "FAIL"
    # the recipe it had taken is queued again, for a later --trials
    assert sorted(t.user_attrs["recipe"] for t in study.trials if t.state.name == "WAITING") == sorted(waiting)


def test_one_builder_for_search_and_export(tiny_run: Path) -> None:
    """``build_trial_model`` from a finished trial's checkpoint gives the weights the trial saved."""
    import torch
    from safetensors.torch import load_file

    from tlengine._model import build_trial_model
    from tlengine._record import read_record
    from tlengine._study import find_study, pick_trial
    from tlengine.plugins import get_registry

    study, _ = find_study("tiny", runs=str(tiny_run.parent))
    trial = pick_trial(study, "best")
    model = build_trial_model(get_registry(), read_record(study), trial.user_attrs["values"], checkpoint=Path(trial.user_attrs["checkpoint"]))
    saved = load_file(trial.user_attrs["checkpoint"])
    assert not model.training and saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    frozen = trial.user_attrs["values"]["freeze_depth"]
    assert any(not p.requires_grad for p in model.parameters()) == (frozen > 0)


def test_the_pruner_stops_a_trial_between_epochs_never_after_its_last(tiny_folder: Path, tmp_path: Path) -> None:
    """With a pruner that always says stop, a trial is pruned after its first epoch, but a trial whose last
    epoch is done completes (its training is spent; pruning it would throw the result away)."""
    import dataclasses

    import optuna
    from rich.console import Console

    from tlengine._runner import TrialRunner

    class Always(optuna.pruners.BasePruner):
        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            return True

    for epochs, expected in ((2, "PRUNED"), (1, "COMPLETE")):
        setup, study = setup_and_study(tiny_folder, tmp_path / f"runs{epochs}", trials=2, epochs=epochs, param={"freeze_depth": 0})
        study.pruner = Always()
        setup = dataclasses.replace(setup, pruner=study.pruner)
        runner = TrialRunner(setup, study, source_for(setup, False, tmp_path / "cache"), console=Console(quiet=True))
        study.optimize(runner, n_trials=1)
        trial = study.trials[0]
        assert trial.state.name == expected, (epochs, trial.user_attrs.get("prune_reason"))
        assert len(trial.intermediate_values) == 1


def test_a_trial_samples_only_what_its_augmentation_policy_uses(tiny_folder: Path, tmp_path: Path) -> None:
    """The policy is sampled first; ``crop_scale`` only for the cropping policies, ``hflip`` never for ``none``
    (stored as ``None``), and the augmentation the trial asks for follows from them."""
    import optuna
    from rich.console import Console

    from tlengine._loaders import Augment
    from tlengine._runner import TrialRunner

    setup, study = setup_and_study(tiny_folder, tmp_path / "runs", trials=2, param={"augment": "search"})
    runner = TrialRunner(setup, study, source_for(setup, False, tmp_path / "cache"), console=Console(quiet=True))
    sampled = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = sampled.ask()
        values = runner.sample(trial)
        policy = values["augment"]
        seen.add(policy)
        assert ("crop_scale" in trial.params) == (policy in ("crop", "randaugment"))
        assert (values["crop_scale"] is None) == (policy not in ("crop", "randaugment"))
        augment = Augment.of(values)
        assert (augment.crop_scale is None) == (policy in ("none", "flip"))
        assert augment.hflip == (0.0 if policy == "none" else 0.5) and bool(augment.randaugment) == (policy == "randaugment")
        assert augment.identity == (policy == "none")
        sampled.tell(trial, 0.0)
    assert seen == {"none", "flip", "crop", "randaugment"}


def test_a_fine_tuned_trial_starts_from_the_exact_probe_head(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LP-FT: the fine-tuning recipes' linear heads start as the exact linear probe's solution (the probe
    trial's saved head, bit for bit), solved once; with ``head_init = "random"`` (the default) it starts from timm's init."""
    import torch
    from rich.console import Console
    from safetensors.torch import load_file

    from tlengine._runner import TrialRunner

    starts: list[dict[str, torch.Tensor]] = []
    original = TrialRunner.start_from_probe

    def spy(self: Any, trial: Any, values: Any, model: Any) -> None:
        original(self, trial, values, model)
        starts.append({k: v.detach().clone() for k, v in model.head.state_dict().items()})

    monkeypatch.setattr(TrialRunner, "start_from_probe", spy)
    setup, study = setup_and_study(tiny_folder, tmp_path / "runs", trials=3, param={"head_init": "probe"})
    runner = TrialRunner(setup, study, source_for(setup, True, tmp_path / "cache"), console=Console(quiet=True))
    study.optimize(runner, n_trials=3)
    probe, half, full = study.trials[:3]
    assert [t.user_attrs["values"]["head_init"] for t in (half, full)] == ["probe", "probe"] and len(starts) == 2
    saved = load_file(probe.user_attrs["checkpoint"])
    for start in starts:
        assert torch.equal(start["weight"], saved["head.weight"]) and torch.equal(start["bias"], saved["head.bias"])
    assert full.user_attrs["head_init"]["l2"] == probe.user_attrs["probe"]["l2"] and "head_init" not in probe.user_attrs
    assert len(runner._probe_heads) == 1  # one solve for both

    starts.clear()
    setup, study = setup_and_study(tiny_folder, tmp_path / "random", trials=2)
    runner = TrialRunner(setup, study, source_for(setup, True, tmp_path / "cache"), console=Console(quiet=True))
    study.optimize(runner, n_trials=2)
    assert not starts and "head_init" not in study.trials[1].user_attrs
