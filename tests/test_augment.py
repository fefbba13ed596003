"""tlengine._augment: horizontal flips left out where they change what the images show, kept elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY_BACKBONE


def features(n: int, classes: int, d: int = 16, seed: int = 0, swap: bool = False):
    """Class-mean features and their 'mirror images': the same class (kept) or the paired class (swap 0<->1, 2<->3).
    The class means are the same for every ``seed`` (the same classes, other images)."""
    import torch

    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(123)) * 2
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = centres[y] + 0.5 * torch.randn(n, d, generator=g)
    mirror = centres[y ^ 1] if swap else centres[y]
    return x, mirror + 0.5 * torch.randn(n, d, generator=g), y


def test_flips_that_swap_labels_are_left_out() -> None:
    """Mirrored 'b' looks like 'd': a probe fitted on the images as they are misreads their mirror images."""
    from tlengine._augment import flip_check

    x, _, y = features(400, 4, swap=True)
    vx, mirrored, vy = features(200, 4, seed=1, swap=True)
    check = flip_check(x, y, vx, mirrored, vy, task="classification", metric="accuracy", outputs=4)
    assert not check.keep and check.drop > 0.5 and check.drop > check.noise
    assert check.score > 0.9 and check.images == 200
    assert check.line("accuracy").startswith("augmentation: horizontal flips left out")


def test_flips_that_keep_labels_stay() -> None:
    from tlengine._augment import flip_check

    x, _, y = features(400, 4)
    vx, mirrored, vy = features(200, 4, seed=1)
    check = flip_check(x, y, vx, mirrored, vy, task="classification", metric="accuracy", outputs=4)
    assert check.keep and abs(check.drop) < 0.05
    assert check.line("accuracy").startswith("augmentation: horizontal flips kept: a linear probe scores accuracy")


def test_flips_that_negate_a_regression_target_are_left_out() -> None:
    """A rotation angle: the mirror image of an object turned by +a is turned by -a."""
    import torch

    from tlengine._augment import flip_check

    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    angle, val_angle = torch.rand(300, generator=g) * 60 - 30, torch.rand(100, generator=g) * 60 - 30
    x = angle[:, None] * direction + 0.3 * torch.randn(300, 16, generator=g)
    vx = val_angle[:, None] * direction + 0.3 * torch.randn(100, 16, generator=g)
    mirrored = -val_angle[:, None] * direction + 0.3 * torch.randn(100, 16, generator=g)
    check = flip_check(x, angle, vx, mirrored, val_angle, task="regression", metric="rmse", outputs=1)
    assert not check.keep and check.flipped > 5 * check.score


def test_search_records_the_decision_and_hflip_on_the_command_line_skips_it(tmp_path: Path, tiny_folder: Path) -> None:
    import tlengine

    result = tlengine.search(tiny_folder, TINY_BACKBONE, trials=1, epochs=1, weights="none", image_size=32, out=tmp_path,
                             study_name="f", cache_dir=tmp_path / "cache", quiet=True)
    flips = result.record.flips
    assert flips is not None and set(flips) == {"score", "flipped", "drop", "noise", "keep", "images", "seconds"}
    hflip = json.loads((result.run_dir / "summary.json").read_text())["config"]["space"]["hflip"]["value"]
    assert hflip == (0.5 if flips["keep"] else 0.0)
    fixed = tlengine.search(tiny_folder, TINY_BACKBONE, trials=1, epochs=1, weights="none", image_size=32, out=tmp_path,
                            study_name="g", cache_dir=tmp_path / "cache", param={"hflip": 0.5}, quiet=True)
    assert fixed.record.flips is None and fixed.record.space["hflip"]["value"] == 0.5


def test_crop_check_prefers_the_view_that_keeps_the_signal() -> None:
    """Where the class shows only near the border (the centre crop cuts it), the whole image wins; where
    both views carry it equally, the whole image wins the tie; where the centre is cleaner, the centre wins."""
    import torch

    from tlengine._augment import crop_check

    strong, _, y = features(400, 4)
    strong_val, _, vy = features(200, 4, seed=1)
    weak = torch.randn(400, 16, generator=torch.Generator().manual_seed(2))  # no signal left
    weak_val = torch.randn(200, 16, generator=torch.Generator().manual_seed(3))
    kw = dict(crop_pct=0.875, task="classification", metric="accuracy", outputs=4)
    check = crop_check((weak, weak_val), (strong, strong_val), y, vy, **kw)
    assert check.chosen == "whole" and check.whole > 0.9 > 0.5 > check.center
    assert check.line("accuracy").startswith("evaluation crop: the whole image, resized")
    assert crop_check((strong, strong_val), (strong, strong_val), y, vy, **kw).chosen == "whole"
    centre = crop_check((strong, strong_val), (weak, weak_val), y, vy, **kw)
    assert centre.chosen == "center" and centre.line("accuracy").startswith("evaluation crop: timm's centre crop (0.875")
    regression = crop_check((weak, weak_val), (strong, strong_val), y.float(), vy.float(), crop_pct=0.875, task="regression",
                            metric="rmse", outputs=1)
    assert regression.chosen == "whole" and regression.whole < regression.center


def test_eval_crop_decided_recorded_and_exported(tmp_path: Path, tiny_folder: Path) -> None:
    """The check's choice is the study's preprocessing (the exported model's too); ``eval_crop`` decides instead."""
    import onnx

    import tlengine

    common = dict(data=tiny_folder, backbone=TINY_BACKBONE, trials=1, epochs=1, weights="none", image_size=32, out=tmp_path,
                  cache_dir=tmp_path / "cache", quiet=True, param={"lr": 1e-3})
    auto = tlengine.search(study_name="a", **common)
    crop = auto.record.crop
    assert crop is not None and crop["chosen"] in ("center", "whole") and crop["images"] == 12
    assert auto.record.data_config["crop_pct"] == (1.0 if crop["chosen"] == "whole" else crop["crop_pct"])

    def resize(result):  # the exported model's preprocessing: resize to this, then centre-crop to 32
        return json.loads({p.key: p.value for p in onnx.load(str(result.run_dir / "best.onnx")).metadata_props}["preprocess"])["resize"]

    assert (resize(auto) == 32) == (crop["chosen"] == "whole")
    whole = tlengine.search(study_name="w", eval_crop="whole", **common)
    assert whole.record.crop is None and whole.record.data_config["crop_pct"] == 1.0 and resize(whole) == 32
    center = tlengine.search(study_name="c", eval_crop="center", **common)
    assert center.record.crop is None and center.record.data_config["crop_pct"] < 1.0 and resize(center) > 32
