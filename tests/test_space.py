"""The search space: defaults, config file, overrides, and that each dimension changes what is trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_BACKBONE
from tlengine import UserError
from tlengine._space import build_space, parse_override, read_config

LR = {"adamw": (1e-5, 1e-2), "sgd": (1e-4, 1e-1)}
TINY = ["--backbone", TINY_BACKBONE, "--weights", "none", "--image-size", "32", "--batch-size", "8"]


def space(config=None, overrides=None, task="classification", params=None):
    return build_space(config or {}, overrides or {}, params or {"sgd": {"momentum": 0.9}, "mlp": {"hidden": 1024, "dropout": 0.2}},
                       n_stages=6, lr_ranges=LR, heads=["linear", "mlp"], task=task, where="--config c.toml")


def test_defaults() -> None:
    s = space()
    assert [n for n, d in s.items() if d.searched] == ["freeze_depth", "lr", "layer_decay", "label_smoothing", "augment", "crop_scale"]
    assert s["augment"].choices == ("none", "flip", "crop", "randaugment") and (s["crop_scale"].low, s["crop_scale"].high) == (0.25, 1.0)
    assert s["head_init"].value == "random" and s["randaugment"].value == 9
    assert (s["freeze_depth"].low, s["freeze_depth"].high, s["freeze_depth"].kind) == (0, 6, "int")
    assert (s["lr"].low, s["lr"].high, s["lr"].log) == (1e-5, 1e-2, True)
    assert s["head"].value == "linear" and s["optimizer"].value == "adamw" and s["batch_size"].value == 32
    assert s["sgd.momentum"].value == 0.9 and s["mlp.hidden"].value == 1024


def test_regression_fixes_classification_only_dimensions() -> None:
    s = space(task="regression")
    assert not s["label_smoothing"].searched and s["label_smoothing"].value == 0.0
    with pytest.raises(UserError, match="mixup applies to classification only"):
        space({"mixup": 0.4}, task="regression")


def test_specs_and_precedence() -> None:
    s = space(
        {"head": ["linear", "mlp"], "weight_decay": {"low": 1e-5, "high": 1e-1, "log": True}, "batch_size": [16, 32],
         "optimizer": "search", "randaugment": {"low": 0, "high": 10, "step": 5}, "sgd": {"momentum": {"low": 0.8, "high": 0.99}},
         "lr": 1e-3},
        {"lr": (3e-4, "--param lr"), "freeze_depth": (2, "--param freeze_depth")},
    )
    assert s["head"].choices == ("linear", "mlp") and s["optimizer"].choices == ("adamw", "sgd")
    assert s["weight_decay"].log and s["batch_size"].kind == "categorical"
    assert s["randaugment"].grid() == [0, 5, 10] and s["sgd.momentum"].kind == "float"
    assert s["lr"].value == 3e-4 and s["lr"].source == "cli"  # the CLI beats the config
    assert s["freeze_depth"].value == 2
    searched_lr = space({"optimizer": ["adamw", "sgd"]})["lr"]
    assert (searched_lr.low, searched_lr.high) == (1e-5, 1e-1)  # spans both optimizers' ranges


@pytest.mark.parametrize(
    "config,message",
    [
        ({"lerning_rate": 1e-3}, "unknown key 'lerning_rate' in [space]"),
        ({"learning_rate": 1e-3}, "unknown key 'learning_rate' in [space] (did you mean 'lr'?)"),
        ({"layer_decay": 0.5, "lr": {"low": 1e-2, "high": 1e-3}}, "lr range needs low < high"),
        ({"lr": {"low": 0, "high": 1e-3, "log": True}}, "lr log range needs low > 0"),
        ({"freeze_depth": 9}, "freeze_depth = 9 must be between 0 and 6"),
        ({"head": ["linear", "mpl"]}, "head = 'mpl' must be a registered head (linear, mlp) (did you mean 'mlp'?)"),
        ({"batch_size": 2.5}, "batch_size must be a whole number"),
        ({"lr": {"low": 1e-4, "hi": 1}}, "lr range needs low and high"),
        ({"sgd": {"momentom": 0.9}}, "unknown parameter 'momentom' of sgd in [space.sgd]"),
        ({"layer_decay": [0.5, 0.5]}, "layer_decay lists a value twice"),
    ],
)
def test_config_mistakes(config: dict, message: str) -> None:
    with pytest.raises(UserError) as info:
        space(config)
    assert str(info.value).startswith("--config c.toml: ")
    assert message in str(info.value)


def test_read_config(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[search]\ntrials = 3\nmetric = "macro_f1"\n\n[space]\nhead = ["linear", "mlp"]\n')
    assert read_config(str(path)) == {"search": {"trials": 3, "metric": "macro_f1"}, "space": {"head": ["linear", "mlp"]}}
    path.write_text("[search]\ntrails = 3\n")
    with pytest.raises(UserError, match=r"unknown key 'trails' in \[search\] \(did you mean 'trials'\?\)"):
        read_config(str(path))
    path.write_text("[serch]\n")
    with pytest.raises(UserError, match=r"unknown table or key 'serch' \(did you mean 'search'\?\)"):
        read_config(str(path))
    path.write_text("[search\n")
    with pytest.raises(UserError, match="not valid TOML"):
        read_config(str(path))
    with pytest.raises(UserError, match="no such file"):
        read_config(str(tmp_path / "none.toml"))


def test_parse_override() -> None:
    assert parse_override("lr=3e-4") == ("lr", 3e-4)
    assert parse_override('head=["linear","mlp"]') == ("head", ["linear", "mlp"])
    assert parse_override("lr={low=1e-4,high=1e-2,log=true}") == ("lr", {"low": 1e-4, "high": 1e-2, "log": True})
    assert parse_override("head=mlp") == ("head", "mlp")
    with pytest.raises(UserError, match="expected NAME=VALUE"):
        parse_override("lr")


def test_layer_decay_groups_have_the_right_lr_ratios() -> None:
    import timm
    import torch
    from timm.scheduler import CosineLRScheduler

    from tlengine._model import build_model
    from tlengine._train import param_groups

    backbone = timm.create_model("test_efficientnet", num_classes=0)
    model = build_model(backbone, torch.nn.Linear(backbone.num_features, 3), "classification")
    groups = param_groups(model, 0.01, 0.5)
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    CosineLRScheduler(optimizer, t_initial=100, warmup_t=1, t_in_epochs=False).step_update(1)
    head_lr = optimizer.param_groups[-1]["lr"]
    scales = sorted({round(g["lr"] / head_lr, 8) for g in optimizer.param_groups})
    layers = len(set(timm.models.group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True).values()))
    assert scales == sorted(round(0.5 ** k, 8) for k in range(layers))
    stem = next(g for g in optimizer.param_groups if any(p is backbone.conv_stem.weight for p in g["params"]))
    assert stem["lr"] / head_lr == pytest.approx(0.5 ** (layers - 1))
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups if all(p.ndim <= 1 for p in g["params"]))


def test_head_first_epochs_leave_backbone_untouched_then_train_it(tiny_folder: Path) -> None:
    import timm
    import torch

    from tlengine._model import build_model
    from tlengine._preprocess import Preprocess
    from tlengine._stages import backbone_stages, freeze_stages
    from tlengine._loaders import Augment, image_train_loader
    from tlengine._loaders import eval_tensors, loader
    from tlengine._train import TrainPlan, fit, param_groups
    from tlengine_plugins.datasets import imagefolder
    from tlengine import DatasetOptions

    data = imagefolder(str(tiny_folder), DatasetOptions())
    pre = Preprocess.from_data_config({"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 1.0}, 32)
    backbone = timm.create_model("test_efficientnet", num_classes=0)
    n = len(backbone_stages(backbone))
    model = build_model(backbone, torch.nn.Linear(backbone.num_features, 3), "classification")
    freeze_stages(backbone, 0)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0, 1.0), lr=1e-2)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    snapshots = []
    fit(model, optimizer, image_train_loader(data.train, "classification", pre, Augment(0.5, 0.5, 0), 8, "cpu", shuffle_seed=0, augment_seed=0),
        loader(eval_tensors(data.val, pre, "classification"), 8, False, "cpu"), TrainPlan(2, "classification", "accuracy"),
        device="cpu", on_epoch_start=lambda e: freeze_stages(backbone, n if e < 1 else 0),
        on_epoch=lambda r: snapshots.append({k: v.clone() for k, v in backbone.state_dict().items()}))
    after_head_epoch, after_unfreeze = snapshots
    assert all(torch.equal(before[k], after_head_epoch[k]) for k in before)  # the head-only epoch left the backbone alone
    changed = [k for k in after_head_epoch if not torch.equal(after_head_epoch[k], after_unfreeze[k])]
    assert changed and any(k.startswith("conv_stem") for k in changed)


def run(args: list[str]) -> dict:
    from tlengine._cli import main

    assert main(args) == 0
    out = Path(args[args.index("--out") + 1]) / args[args.index("--study-name") + 1]
    return json.loads((out / "summary.json").read_text())


def test_head_and_plugin_params_reach_the_model(tiny_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config = tmp_path / "s.toml"
    config.write_text('[space]\nhead = "mlp"\noptimizer = "sgd"\n[space.mlp]\nhidden = 48\n[space.sgd]\nmomentum = {low = 0.8, high = 0.95}\n')
    summary = run(["search", "--data", str(tiny_folder), *TINY, "--config", str(config), "--trials", "2", "--epochs", "1",
                   "--out", str(tmp_path), "--study-name", "h"])
    for trial in summary["trials"]:
        assert trial["values"]["head"] == "mlp" and trial["values"]["mlp.hidden"] == 48
        assert 0.8 <= trial["params"]["sgd.momentum"] <= 0.95
    weights = load_file(str(tmp_path / "h" / "best.safetensors"))
    assert weights["head.0.weight"].shape == (48, 256) and weights["head.3.weight"].shape == (3, 48)


def test_linear_probe_trial_keeps_backbone_bit_identical(tiny_folder: Path, tmp_path: Path) -> None:
    import timm
    import torch
    from safetensors.torch import load_file, save_file

    torch.manual_seed(5)
    reference = timm.create_model("test_efficientnet", num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp_path / "w.safetensors"))
    args = ["search", "--data", str(tiny_folder), "--backbone", TINY_BACKBONE, "--weights", str(tmp_path / "w.safetensors"),
            "--image-size", "32", "--trials", "2", "--epochs", "2", "--out", str(tmp_path), "--study-name", "p"]
    summary = run(args)
    assert summary["trials"][0]["recipe"] == "linear probe"
    probe = load_file(str(tmp_path / "p" / "trials" / "0.safetensors"))
    for key, value in reference.items():
        assert torch.equal(probe[f"backbone.{key}"], value), key
    half = load_file(str(tmp_path / "p" / "trials" / "1.safetensors"))  # the top half: the stem frozen, the last stage trained
    assert summary["trials"][1]["recipe"] == "top half"
    assert torch.equal(half["backbone.conv_stem.weight"], reference["conv_stem.weight"])
    assert not torch.equal(half["backbone.conv_head.weight"], reference["conv_head.weight"])


def test_recipes_run_first_in_order(tiny_folder: Path, tmp_path: Path) -> None:
    summary = run(["search", "--data", str(tiny_folder), *TINY, "--trials", "4", "--epochs", "3", "--out", str(tmp_path),
                   "--study-name", "r", "--pruner", "none"])
    trials = summary["trials"]
    assert [t["recipe"] for t in trials] == ["linear probe", "top half", "full fine-tune", None]
    top_half, stages = trials[1], summary["config"]["stages"]
    assert top_half["params"]["freeze_depth"] == stages // 2 > 0 and top_half["params"]["layer_decay"] == 1.0
    assert top_half["values"]["head_epochs"] == 0
    # the rates come from the range test before the first trial: its suggestion, ten times it for the probe, three for the top half
    lr_test, lr = summary["config"]["lr_test"], summary["config"]["space"]["lr"]
    assert lr_test["low"] == lr["low"] and lr_test["high"] == lr["high"] and lr["low"] < lr_test["suggested"] < lr["high"]
    assert trials[2]["params"]["lr"] == pytest.approx(lr_test["suggested"])
    assert trials[0]["params"]["lr"] == pytest.approx(min(lr["high"], 10 * lr_test["suggested"]))
    assert trials[1]["params"]["lr"] == pytest.approx(min(lr["high"], 3 * lr_test["suggested"]))


def test_grid_sweeps_every_freeze_depth(tiny_folder: Path, tmp_path: Path) -> None:
    summary = run(["search", "--data", str(tiny_folder), *TINY, "--sampler", "grid", "--param", "lr=1e-3",
                   "--param", "layer_decay=1.0", "--param", "label_smoothing=0.0", "--trials", "7", "--epochs", "1",
                   "--out", str(tmp_path), "--study-name", "g", "--pruner", "none"])
    assert sorted(t["params"]["freeze_depth"] for t in summary["trials"]) == list(range(7))
    assert summary["searched"] == ["freeze_depth"]


def test_changed_space_refused_on_resume(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tlengine._cli import main

    base = ["search", "--data", str(tiny_folder), *TINY, "--trials", "1", "--epochs", "1", "--out", str(tmp_path), "--study-name", "c"]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base + ["--param", "lr=1e-3"]) == 2
    assert "this study searched another space (lr differ)" in capsys.readouterr().err


def test_augmentation_and_mixup_train(tiny_folder: Path, tmp_path: Path) -> None:
    from tlengine._preprocess import Preprocess
    from tlengine._loaders import Augment, tensor_augment

    pre = Preprocess.from_data_config({"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 1.0}, 32)
    assert "RandAugment" in repr(tensor_augment(pre, Augment(0.5, 0.5, 9))) and "RandAugment" not in repr(tensor_augment(pre, Augment(0.5, 0.5, 0)))
    summary = run(["search", "--data", str(tiny_folder), *TINY, "--param", "augment=randaugment", "--param", "randaugment=9", "--param", "mixup=0.4",
                   "--param", "cutmix=1.0", "--trials", "1", "--epochs", "1", "--out", str(tmp_path), "--study-name", "a",
                   "--metric", "macro_f1", "--class-weights"])
    trial = summary["trials"][0]
    assert trial["state"] == "complete" and trial["values"]["randaugment"] == 9 and trial["values"]["mixup"] == 0.4
    assert summary["metric"] == "macro_f1" and summary["config"]["class_weights"] is True


def test_image_size_searched_and_exported_at_its_size(tiny_folder: Path, tmp_path: Path) -> None:
    import onnx

    summary = run(["search", "--data", str(tiny_folder), "--backbone", TINY_BACKBONE, "--weights", "none",
                   "--param", "image_size=[32, 48]", "--sampler", "grid", "--param", "freeze_depth=3", "--param", "lr=1e-3",
                   "--param", "layer_decay=1.0", "--param", "label_smoothing=0.0", "--trials", "2", "--epochs", "1",
                   "--out", str(tmp_path), "--study-name", "s"])
    assert sorted(t["params"]["image_size"] for t in summary["trials"]) == [32, 48]
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "s" / "best.onnx")).metadata_props}
    assert json.loads(props["preprocess"])["input_size"] == summary["best"]["params"]["image_size"]


def test_multi_objective_pareto_front(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tlengine._cli import main

    args = ["search", "--data", str(tiny_folder), *TINY, "--objectives", "accuracy,params", "--param", 'head=["linear","mlp"]',
            "--param", "mlp.hidden=[8, 512]", "--trials", "5", "--epochs", "1", "--out", str(tmp_path), "--study-name", "m"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Pareto front: accuracy vs params" in out
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["objectives"] == ["accuracy", "params"] and summary["pareto_front"]
    trials = {t["number"]: t for t in summary["trials"] if t["state"] == "complete"}
    assert all(t["cost"] is not None and t["cost"] > 0 and t["epochs"] == 1 for t in trials.values())
    front = [trials[n] for n in summary["pareto_front"]]
    for a in front:  # no trial on the front is dominated by another trial
        assert not any(b["score"] >= a["score"] and b["cost"] < a["cost"] or b["score"] > a["score"] and b["cost"] <= a["cost"] for b in trials.values())
    other = min(front, key=lambda t: t["cost"])["number"]
    assert main(["export", "--storage", f"sqlite:///{tmp_path / 'm' / 'study.db'}", "--study-name", "m", "--trial", str(other),
                 "--out", str(tmp_path / "cheap.onnx")]) == 0


def test_latency_objective(tiny_folder: Path, tmp_path: Path) -> None:
    summary = run(["search", "--data", str(tiny_folder), "--backbone", TINY_BACKBONE, "--weights", "none", "--objectives", "accuracy,latency",
                   "--param", "image_size=[32, 64]", "--trials", "2", "--epochs", "1", "--out", str(tmp_path), "--study-name", "l"])
    costs = [t["cost"] for t in summary["trials"] if t["state"] == "complete"]
    assert len(costs) == 2 and all(0 < c < 1000 for c in costs)


def test_policy_choices_follow_the_parameters_that_rule_policies_out() -> None:
    """``hflip = 0`` leaves no ``flip`` policy, ``randaugment = 0`` no ``randaugment`` one; the recipes take the
    light policy (flips where they may be on, else none) and the grid sampler fixes the default policy at it."""
    from tlengine._space import active, for_grid, light_policy, opening_recipes, policy_dimension

    no_flips = space(overrides={"hflip": (0.0, "--param")})
    assert no_flips["augment"].choices == ("none", "crop", "randaugment") and light_policy(no_flips) == "none"
    assert space(overrides={"randaugment": (0, "--param")})["augment"].choices == ("none", "flip", "crop")
    assert policy_dimension(no_flips) == no_flips["augment"]
    assert light_policy(space()) == "flip"
    assert {r[1]["augment"] for r in opening_recipes(space(), 6, 1e-3)} == {"flip"}
    assert {r[1]["augment"] for r in opening_recipes(no_flips, 6, 1e-3)} == {"none"}
    assert [active({"augment": p}, "crop_scale") for p in ("none", "flip", "crop", "randaugment")] == [False, False, True, True]
    assert [active({"augment": p}, "hflip") for p in ("none", "flip", "crop")] == [False, True, True]
    grid = for_grid(space())
    assert grid["augment"].value == "flip" and not grid["crop_scale"].searched and grid["lr"] == space()["lr"]
    chosen = for_grid(space(overrides={"augment": (["none", "crop"], "--param")}))  # the user's own list is swept
    assert chosen["augment"].choices == ("none", "crop") and chosen["crop_scale"].searched


def test_pruner_waits_for_half_the_schedule_then_stops_only_the_bottom_quarter() -> None:
    """``--pruner median`` with 4 epochs: nothing is judged at epoch 1; at epoch 2 a trial below the 25th
    percentile of the others is stopped, one between the 25th and the 50th goes on."""
    import optuna

    from tlengine._study import make_pruner

    study = optuna.create_study(direction="maximize", pruner=make_pruner("median", epochs=4))
    for finals in ([0.5, 0.6, 0.9, 0.9], [0.6, 0.7, 0.9, 0.9], [0.7, 0.8, 0.9, 0.9], [0.8, 0.9, 0.9, 0.9]):
        trial = study.ask()
        for step, value in enumerate(finals, 1):
            trial.report(value, step)
        study.tell(trial, finals[-1])

    def pruned_at(scores: list[float]) -> int | None:
        trial = study.ask()
        for step, value in enumerate(scores, 1):
            trial.report(value, step)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                return step
        study.tell(trial, scores[-1])
        return None

    assert pruned_at([0.1, 0.9, 0.9, 0.9]) is None  # the worst at epoch 1 is not judged there
    assert pruned_at([0.1, 0.1, 0.1, 0.1]) == 2  # bottom quarter at epoch 2
    assert pruned_at([0.7, 0.75, 0.9, 0.9]) is None  # below the median (0.8) at epoch 2, above the bottom quarter (0.7)
