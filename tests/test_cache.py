"""The caches: exact prefix splits, decode-once keys, LRU eviction, concurrent writers, cached vs uncached searches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, TINY_BACKBONE
from tlengine._loaders import Augment

TINY_MODELS = {"test_efficientnet": 6, "resnet10t": 5, "test_vit": 7}  # stages of each


def tiny_data(folder: Path) -> Any:
    from tlengine._records import DatasetOptions
    from tlengine_plugins.datasets import imagefolder

    return imagefolder(str(folder), DatasetOptions())


def backbone(arch: str) -> Any:
    from tlengine_plugins.timm_backbone import create

    return create(arch, "none")


def search_caches(data: Any, base: Any, root: Path, **options: Any) -> Any:
    from tlengine._cache import CacheOptions, SearchCaches
    from tlengine._stages import backbone_stages

    return SearchCaches(CacheOptions(True, str(root), **options), data, base, "timm:x", backbone_stages(base), "cpu", print)


def preprocess_for(base: Any, size: int = 32) -> Any:
    from timm.data import resolve_data_config

    from tlengine._preprocess import Preprocess

    return Preprocess.from_data_config(resolve_data_config(model=base), size)


@pytest.mark.parametrize("arch", list(TINY_MODELS))
def test_prefix_split_is_exact(arch: str, tiny_folder: Path, tmp_path: Path) -> None:
    """Cached fp16 prefix features through the suffix give the eager backbone's output, eval and train mode."""
    import copy

    import torch

    from tlengine._stages import freeze_stages, train_mode
    from tlengine._loaders import eval_tensors

    torch.manual_seed(0)
    base = backbone(arch)
    n = TINY_MODELS[arch]
    data = tiny_data(tiny_folder)
    caches = search_caches(data, base, tmp_path)
    preprocess = preprocess_for(base)
    x = eval_tensors(data.val, preprocess, "classification").tensors[0]
    for depth in sorted({1, n // 2, n - 1, n}):
        split = caches.splitter.split(depth, 32)
        assert split is not None, (depth, caches.splitter.reasons)
        features = torch.from_numpy(caches.features(split, "val", preprocess, None, (0, 0.5)).astype("float32"))
        eager, trial = copy.deepcopy(base), copy.deepcopy(base)
        for m in (eager, trial):
            freeze_stages(m, depth)
        suffix = split.suffix(trial)
        with torch.no_grad():
            for mode in ("eval", "train"):
                for m in (eager, suffix):
                    m.eval() if mode == "eval" else train_mode(m)
                expected, got = eager(x), suffix(features)
                scale = expected.abs().max().item()
                torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * scale, msg=f"{arch} depth {depth} {mode}")
    if arch != "test_vit":  # a linear probe caches pooled features
        assert len(caches.splitter.split(n, 32).feature_shape) == 1


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("augment", [Augment(0.5, 0.0, 0), Augment(0.5, 0.5, 9)], ids=["crop", "crop+flip+randaugment"])
def test_cached_training_equals_uncached(augment: Augment, dtype: str, tiny_folder: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``fit`` on cached features (suffix + head) follows ``fit`` on images decoded and augmented every epoch,
    for a linear probe and a partial freeze: the cached views are the uncached epochs' augmented images.

    With features stored in fp32 the two runs agree to float32 rounding: same images, order and
    augmentation. In fp16 (the default) losses and scores agree to fp16 precision, and so do the
    linear probe's weights; a partial freeze's weights are not compared there, because BatchNorm
    statistics over 8 images amplify fp16 rounding of the inputs to several percent in 6 steps.
    """
    import copy

    import torch

    from timm.data import resolve_data_config

    import tlengine._cache
    from tlengine._inputs import InputRequest, InputSource
    from tlengine._loaders import image_train_loader
    from tlengine._model import build_model
    from tlengine._stages import freeze_stages
    from tlengine._loaders import eval_tensors, loader
    from tlengine._train import TrainPlan, fit, param_groups

    monkeypatch.setattr(tlengine._cache, "FEATURE_DTYPE", dtype)
    data = tiny_data(tiny_folder)
    torch.manual_seed(0)
    base = backbone("resnet10t")
    caches = search_caches(data, base, tmp_path)
    preprocess = preprocess_for(base)
    val = loader(eval_tensors(data.val, preprocess, "classification"), 64, False, "cpu")
    plan = TrainPlan(epochs=2, task="classification", metric="accuracy", num_classes=3)
    for depth in (5, 3):
        runs = []
        for cached in (False, True):
            torch.manual_seed(0)
            net = copy.deepcopy(base)
            freeze_stages(net, depth)
            model = build_model(net, torch.nn.Linear(net.num_features, 3), "classification")
            # SGD: Adam's normalised steps would turn fp16-sized gradient differences into full-size weight differences
            optimizer = torch.optim.SGD(param_groups(model, 0.01, 1.0), lr=0.05, momentum=0.9)
            if cached:
                source = InputSource(data, resolve_data_config(model=base), "cpu", 7, caches)
                inputs = source.inputs(model, net, InputRequest(depth, 32, augment, False, 8, plan.epochs, 0))
                assert inputs.on_features
                assert inputs.model.state_dict().keys() == model.state_dict().keys()  # checkpoints see the full model
                history = fit(inputs.model, optimizer, inputs.train_loader, inputs.val_loader, plan, device="cpu")
            else:
                images = image_train_loader(data.train, "classification", preprocess, augment, 8, "cpu", shuffle_seed=0, augment_seed=7)
                history = fit(model, optimizer, images, val, plan, device="cpu")
            runs.append((history, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
        (plain, plain_state), (cached_history, cached_state) = runs
        if dtype == "float32":  # equal up to float32 rounding (the prefix runs at another batch size when cached)
            assert [r.score for r in cached_history] == [r.score for r in plain]
            assert [r.train_loss for r in cached_history] == pytest.approx([r.train_loss for r in plain], rel=1e-6)
            for name, weight in plain_state.items():
                torch.testing.assert_close(cached_state[name], weight, rtol=1e-4, atol=1e-6, msg=name)
        for a, b in zip(plain, cached_history):
            assert b.train_loss == pytest.approx(a.train_loss, rel=1e-2, abs=1e-3)
            assert b.score == pytest.approx(a.score, abs=1 / 12 + 1e-9)  # at most one of 12 validation images differs
        # the full model holds what the suffix learnt (shared modules): its trainable weights moved as the plain run's did
        assert cached_state.keys() == plain_state.keys() and "head.weight" in plain_state
        for name, weight in plain_state.items() if depth == 5 or dtype == "float32" else ():
            torch.testing.assert_close(cached_state[name], weight, rtol=2e-2, atol=2e-3, msg=name)


def test_eval_pixels_match_timm_eval_transform(tiny_folder: Path, tmp_path: Path) -> None:
    import torch

    from tlengine._loaders import normalize
    from tlengine._loaders import eval_tensors

    data = tiny_data(tiny_folder)
    base = backbone(TINY_BACKBONE.split(":")[1])
    caches = search_caches(data, base, tmp_path)
    for size in (32, 45):
        preprocess = preprocess_for(base, size)
        pixels = caches.pixels("val", preprocess, "eval")
        ours = normalize(torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2), preprocess)
        torch.testing.assert_close(ours, eval_tensors(data.val, preprocess, "classification").tensors[0], rtol=0, atol=1e-5)


def test_decode_key_changes_with_files_and_preprocessing(tiny_folder: Path, tmp_path: Path) -> None:
    import dataclasses
    import shutil

    import numpy as np
    from PIL import Image

    folder = tmp_path / "data"
    shutil.copytree(tiny_folder, folder)
    base = backbone(TINY_BACKBONE.split(":")[1])
    preprocess = preprocess_for(base)

    def decode(pre: Any = preprocess) -> tuple[Any, int]:
        caches = search_caches(tiny_data(folder), base, tmp_path / "cache")
        pixels = caches.pixels("train", pre, "eval")
        return np.array(pixels), caches.store.misses.get("images", 0)

    first, missed = decode()
    assert missed == 1
    assert decode()[1] == 0  # same files, same preprocessing: read back
    image = sorted((folder / "train").rglob("*.png"))[0]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # touched
    assert decode()[1] == 1
    Image.new("RGB", (28, 28), (255, 0, 0)).save(image)  # changed
    changed, missed = decode()
    assert missed == 1 and not np.array_equal(changed, first)
    assert (changed[0] == [255, 0, 0]).all()
    assert decode(dataclasses.replace(preprocess, interpolation="nearest"))[1] == 1
    assert decode(dataclasses.replace(preprocess, resize=preprocess.resize + 4))[1] == 1
    assert decode()[1] == 0


def test_lru_eviction_under_cap(tmp_path: Path) -> None:
    import numpy as np

    from tlengine._store import Store

    store = Store(tmp_path, cap_bytes=3 * (1000 + 128))
    fill = lambda value: lambda out: out.fill(value)  # noqa: E731
    for i, key in enumerate("abc"):
        store.get_or_make("features", key, (1000,), "uint8", fill(i))
        os.utime(store.path("features", key), (1_000_000 + i, 1_000_000 + i))  # a, b, c from oldest to newest
    assert store.get("features", "a") is not None  # using a makes b the least recently used
    store.get_or_make("features", "d", (1000,), "uint8", fill(3))
    left = sorted(p.stem for p in (tmp_path / "features").glob("*.npy"))
    assert left == ["a", "c", "d"] and store.evicted == 1
    assert store.size_bytes() <= store.cap_bytes
    assert (np.asarray(store.get("features", "a")) == 0).all() and (np.asarray(store.get("features", "d")) == 3).all()
    # larger than the whole cap: not cached, nothing evicted
    assert store.get_or_make("features", "huge", (10_000,), "uint8", fill(1)) is None
    assert sorted(p.stem for p in (tmp_path / "features").glob("*.npy")) == ["a", "c", "d"]


WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from tlengine._store import Store
store = Store(Path(sys.argv[1]), 10**9)
def fill(out):
    for i in range(len(out)):
        out[i] = int(sys.argv[2])
        time.sleep(0.002)
array = np.asarray(store.get_or_make("features", "same-key", (200, 64), "int32", fill))
assert (array == array[0, 0]).all()
"""


def test_concurrent_writers_leave_a_whole_file(tmp_path: Path) -> None:
    """Two processes writing the same key at once: the file is one writer's whole output, no temporary file stays."""
    import numpy as np

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(v)], env=env) for v in (1, 2)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    array = np.load(tmp_path / "features" / "same-key.npy")
    assert array.shape == (200, 64) and len(np.unique(array)) == 1 and array[0, 0] in (1, 2)
    assert [p.name for p in (tmp_path / "features").iterdir()] == ["same-key.npy"]


def search(folder: Path, out: Path, cache_dir: Path, *extra: str) -> dict[str, Any]:
    from tlengine._cli import main

    args = ["search", "--data", str(folder), "--backbone", TINY_BACKBONE, "--weights", "none", "--trials", "1", "--epochs", "2",
            "--image-size", "32", "--batch-size", "8", "--out", str(out), "--study-name", "s", "--cache-dir", str(cache_dir), *extra]
    assert main(args) == 0
    import optuna

    trial = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 's' / 'study.db'}").trials[0]
    return {"value": trial.value, "history": [{k: v for k, v in h.items() if k != "seconds"} for h in trial.user_attrs["history"]]}


@pytest.mark.parametrize("depth", [6, 3, 0])
def test_search_cached_equals_uncached(depth: int, tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A trial gives the same result with and without caches, augmentation on: the same images in the same
    order with the same augmentation, on fp16 features (frozen stages) or decoded pixels (identical)."""
    # trained by epochs (probe=sgd: the exact probe has its own test) with flips on (no flip check): the augmented path
    fixed = ["--param", f"freeze_depth={depth}", "--param", "lr=0.01", "--param", "label_smoothing=0.0", "--param", "layer_decay=1.0",
             "--param", "augment=randaugment", "--param", "randaugment=9", "--param", "crop_scale=0.5",
             "--param", "probe=sgd", "--param", "hflip=0.5", "--eval-crop", "center", "--param", "head_init=random"]
    cached = search(tiny_folder, tmp_path / "a", tmp_path / "cache", *fixed)
    features = 3 if depth else 0  # validation, and one augmented view per epoch
    err = capsys.readouterr().err
    assert f"features 0 hits, {features} computed" in err and f"; {1 if depth else 0} of 1 trials on cached features" in err
    again = search(tiny_folder, tmp_path / "b", tmp_path / "cache", *fixed)
    assert f"caches: images {0 if depth else 2} hits, 0 computed; features {features} hits, 0 computed" in capsys.readouterr().err
    plain = search(tiny_folder, tmp_path / "c", tmp_path / "cache", "--no-cache", *fixed)
    assert "caches:" not in capsys.readouterr().err
    assert cached == again
    if depth == 0:  # decoded once or every epoch, the same pixels
        assert cached == plain
    assert cached["value"] == pytest.approx(plain["value"], abs=1 / 12 + 1e-9)
    for a, b in zip(plain["history"], cached["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-2, abs=1e-3)


def test_one_pass_stores_features_for_fewer_frozen_stages(tiny_folder: Path, tmp_path: Path) -> None:
    """Computing a linear probe's features also stores, into free space, those after fewer stages: the same
    bytes a direct computation gives. Under a tight cap they are left out, and nothing is evicted for them."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    base = backbone("test_efficientnet")
    n = TINY_MODELS["test_efficientnet"]
    data = tiny_data(tiny_folder)
    preprocess = preprocess_for(base)
    caches = search_caches(data, base, tmp_path / "a")
    probe = caches.features(caches.splitter.split(n, 32), "train", preprocess, 1, Augment(0.5, 0.5, 9), 3)
    made = caches.store.made_extra["features"]
    assert probe is not None and made == sum(caches.splitter.split(d, 32) is not None for d in range(1, n)) >= 3
    for depth in range(1, n):
        split = caches.splitter.split(depth, 32)
        if split is None:
            continue
        on_the_way = caches.features(split, "train", preprocess, 1, Augment(0.5, 0.5, 9), 3)
        direct = search_caches(data, base, tmp_path / f"direct{depth}")
        alone = direct.features(direct.splitter.split(depth, 32), "train", preprocess, 1, Augment(0.5, 0.5, 9), 3)
        assert np.array_equal(np.asarray(on_the_way), np.asarray(alone)), depth
    assert caches.store.misses["features"] == 1 and caches.store.hits["features"] == made
    # a cap with room for the decoded images and the probe's own features only
    needed = sum(p.stat().st_size for p in (tmp_path / "a" / "images").glob("*.npy")) + probe.nbytes + 128
    tight = search_caches(data, base, tmp_path / "tight", size_gb=needed / 1e9)
    again = tight.features(tight.splitter.split(n, 32), "train", preprocess, 1, Augment(0.5, 0.5, 9), 3)
    assert np.array_equal(np.asarray(again), np.asarray(probe))
    assert tight.store.made_extra.get("features", 0) == 0 and tight.store.evicted == 0


def test_fewer_views_reuse_them_in_turn(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--cache-views 1`` computes one augmented view and trains every epoch on it."""
    fixed = ["--param", "freeze_depth=6", "--param", "lr=0.01", "--epochs", "3", "--param", "probe=sgd", "--param", "hflip=0.5"]  # views: SGD
    one = search(tiny_folder, tmp_path / "a", tmp_path / "cache", "--cache-views", "1", *fixed)
    assert "features 1 hit, 1 computed" in capsys.readouterr().err  # the validation set's, made by the crop check; view 0
    every = search(tiny_folder, tmp_path / "b", tmp_path / "cache", *fixed)
    assert "features 2 hits, 2 computed" in capsys.readouterr().err  # views 1 and 2 are new
    assert len(one["history"]) == len(every["history"]) == 3
    assert one["history"][0]["train_loss"] == every["history"][0]["train_loss"]  # epoch 1: the same view, the same batches
    assert one["history"][1]["train_loss"] != every["history"][1]["train_loss"]  # epoch 2: view 0 again vs view 1


def test_no_cache_writes_nothing(tiny_folder: Path, tmp_path: Path) -> None:
    search(tiny_folder, tmp_path / "a", tmp_path / "cache", "--no-cache")
    assert not (tmp_path / "cache").exists()


def test_threaded_decode_equals_serial(tiny_folder: Path, tmp_path: Path) -> None:
    """Decode-once on several threads writes the same bytes as on one, and a broken file still raises."""
    import numpy as np

    from tlengine._store import decode_into
    from tlengine._preprocess import Preprocess

    items = sorted((tiny_folder / "train").rglob("*.png"))
    crop = Preprocess(24, 28, "bicubic", (0.5,) * 3, (0.5,) * 3)
    serial, threaded = (np.zeros((len(items), 24, 24, 3), np.uint8) for _ in range(2))
    decode_into(serial, items, crop, threads=1)
    decode_into(threaded, items, crop, threads=4)
    assert serial.any() and np.array_equal(serial, threaded)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(OSError):
        decode_into(np.zeros((3, 24, 24, 3), np.uint8), [items[0], broken, items[1]], crop, threads=2)


@pytest.mark.parametrize("depth", [3, 0])
def test_early_epochs_at_a_lower_resolution(depth: int, tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--early-size 16``: epoch 1 trains at 16 px, epoch 2 at 32 px, cached (each size's own features, only the
    views its epochs use) or not, with the same result."""
    import optuna

    fixed = ["--param", f"freeze_depth={depth}", "--param", "lr=0.01", "--param", "label_smoothing=0.0", "--param", "probe=sgd",
             "--param", "hflip=0.5", "--eval-crop", "center", "--param", "head_init=random", "--early-size", "16"]
    cached = search(tiny_folder, tmp_path / "a", tmp_path / "cache", *fixed)
    err = capsys.readouterr().err
    # per size: validation and the view of its one epoch
    assert f"features 0 hits, {4 if depth else 0} computed" in err and f"{1 if depth else 0} of 1 trials on cached features" in err
    plain = search(tiny_folder, tmp_path / "b", tmp_path / "cache", "--no-cache", *fixed)
    full = search(tiny_folder, tmp_path / "c", tmp_path / "cache", *fixed[:-2])
    trial = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'a' / 's' / 'study.db'}").trials[0]
    assert trial.user_attrs["early"] == {"image_size": 16, "epochs": 1}
    if depth == 0:
        assert cached == plain
    for a, b in zip(plain["history"], cached["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-2, abs=1e-3)
    assert cached["history"][0]["train_loss"] != full["history"][0]["train_loss"]  # epoch 1 really ran at 16 px


def test_features_that_cannot_be_cached_say_why_once(tiny_folder: Path, tmp_path: Path) -> None:
    """Features beyond float16's range, or larger than the cap, each give their own reason, and a trial whose
    validation features cannot be cached computes no training view before running on images."""
    import torch
    from timm.data import resolve_data_config

    from tlengine._inputs import InputRequest, InputSource
    from tlengine._model import build_model

    data = tiny_data(tiny_folder)
    base = backbone("test_efficientnet")
    with torch.no_grad():
        base.conv_stem.weight.mul_(1e6)  # activations far beyond float16's 65504
    said: list[str] = []
    caches = search_caches(data, base, tmp_path / "a")
    caches._log = said.append
    preprocess, depth = preprocess_for(base), 6
    model = build_model(base, torch.nn.Linear(base.num_features, 3), "classification")
    source = InputSource(data, resolve_data_config(model=base), "cpu", 0, caches)
    inputs = source.inputs(model, base, InputRequest(depth, 32, Augment(0.5, 0.5, 0), False, 8, 3, 0))
    assert not inputs.on_features and len(inputs.train_loader) == 3  # the trial runs on decoded images instead
    assert caches.store.misses["features"] == 1  # validation only: no training view was computed for nothing
    assert [s for s in said if "features after" in s] == [f"caches: features after {depth} stages: prefix outputs exceed the float16 range; "
                                                         "such trials run on images"]
    tiny = search_caches(data, backbone("test_efficientnet"), tmp_path / "b", size_gb=1e-6)
    tiny._log = said.append
    assert tiny.features(tiny.splitter.split(depth, 32), "val", preprocess, None, (0, 0.5)) is None
    assert said[-1] == f"caches: features after {depth} stages do not fit under --cache-size-gb 1e-06; such trials run on images"


def test_decoded_images_over_the_cap_say_how_much_they_need(tmp_path: Path, tiny_folder: Path) -> None:
    """Over the cap, the trial decodes every epoch and the line says the gigabytes needed and the flag to raise."""
    import torch
    from timm.data import resolve_data_config

    from tlengine._inputs import InputRequest, InputSource
    from tlengine._model import build_model

    data = tiny_data(tiny_folder)
    base = backbone("test_efficientnet")
    said: list[str] = []
    caches = search_caches(data, base, tmp_path, size_gb=1e-6)
    caches._log = said.append
    model = build_model(base, torch.nn.Linear(base.num_features, 3), "classification")
    source = InputSource(data, resolve_data_config(model=base), "cpu", 0, caches)
    inputs = source.inputs(model, base, InputRequest(0, 32, Augment(0.5, 0.5, 0), False, 8, 1, 0))
    assert not inputs.on_features and len(inputs.train_loader) >= 1
    need = (len(data.val) * 32 * 32 + len(data.train) * 36 * 36) * 3 / 1e6  # eval crop 32, training square at the resize side 36
    assert said == [f"caches: the decoded images at 32px need {max(1, round(need))} MB, over --cache-size-gb 1e-06; decoding every image every "
                    "epoch (pass --cache-size-gb 1 with that much free disk to decode them once)"]
