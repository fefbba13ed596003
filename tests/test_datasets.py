"""Built-in datasets, through the contract classes and on their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_image_folder
from tlengine import DatasetOptions, UserError
from tlengine.testing import DatasetContract
from tlengine_plugins.datasets import csv_dataset, demo, imagefolder, stratified_split


class TestDemo(DatasetContract):
    dataset = "demo"


class TestImageFolder(DatasetContract):
    dataset = "imagefolder"

    @pytest.fixture
    def data_path(self, tiny_folder: Path) -> str:
        return str(tiny_folder)


class TestImageFolderSplit(DatasetContract):
    dataset = "imagefolder"

    @pytest.fixture
    def data_path(self, tmp_path: Path) -> str:
        return str(write_image_folder(tmp_path, per_class=8, val=False) / "train")


class TestCsvClassification(DatasetContract):
    dataset = "csv"

    @pytest.fixture
    def data_path(self, tiny_folder: Path, tmp_path: Path) -> str:
        rows = ["image,label"] + [f"{p},{p.parent.name}" for p in sorted((tiny_folder / "train").rglob("*.png"))]
        (tmp_path / "d.csv").write_text("\n".join(rows))
        return str(tmp_path / "d.csv")


class TestCsvRegression(DatasetContract):
    dataset = "csv"
    task = "regression"

    @pytest.fixture
    def data_path(self, tiny_folder: Path, tmp_path: Path) -> str:
        files = sorted((tiny_folder / "train").rglob("*.png"))
        rows = ["path,target"] + [f"{p},{i * 0.5}" for i, p in enumerate(files)]
        (tmp_path / "r.csv").write_text("\n".join(rows))
        return str(tmp_path / "r.csv")


def test_demo_is_real_fashion_mnist() -> None:
    data = demo(None, DatasetOptions())
    assert (len(data.train), len(data.val)) == (1000, 300)
    assert data.classes[:3] == ("t-shirt", "trouser", "pullover")
    assert data.train.images[0].shape == (28, 28)
    assert sorted(set(data.train.targets)) == list(range(10))


def test_stratified_split_keeps_every_class() -> None:
    targets = [0] * 10 + [1] * 5 + [2] * 2
    train, val = stratified_split(targets, 0.2, seed=3)
    assert sorted(train + val) == list(range(17))
    assert [sum(targets[i] == c for i in val) for c in range(3)] == [2, 1, 1]
    assert stratified_split(targets, 0.2, seed=3) == (train, val)


def test_imagefolder_train_val(tiny_folder: Path) -> None:
    data = imagefolder(str(tiny_folder), DatasetOptions())
    assert data.classes == ("pullover", "t-shirt", "trouser")
    assert (len(data.train), len(data.val)) == (24, 12)


def test_imagefolder_val_class_missing_from_train(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path)
    (root / "val" / "extra").mkdir()
    with pytest.raises(UserError, match="classes extra have no training images"):
        imagefolder(str(root), DatasetOptions())


def test_csv_paths_relative_to_csv_and_split_column(tmp_path: Path, tiny_folder: Path) -> None:
    import shutil

    shutil.copytree(tiny_folder, tmp_path / "imgs")
    rows = ["file,class,split"]
    for p in sorted((tmp_path / "imgs").rglob("*.png")):
        rows.append(f"{p.relative_to(tmp_path)},{p.parent.name},{p.parts[-3]}")
    (tmp_path / "d.csv").write_text("\n".join(rows))
    data = csv_dataset(str(tmp_path / "d.csv"), DatasetOptions())
    assert (len(data.train), len(data.val)) == (24, 12)
    assert all(Path(p).is_file() for p in data.train.images)


def test_csv_regression_text_target(tmp_path: Path, tiny_folder: Path) -> None:
    image = next(tiny_folder.rglob("*.png"))
    (tmp_path / "r.csv").write_text(f"image,target\n{image},1.5\n{image},tall\n")
    with pytest.raises(UserError, match="'tall' is not a number"):
        csv_dataset(str(tmp_path / "r.csv"), DatasetOptions(task="regression"))


def test_csv_missing_images_are_counted_with_the_unreadable_ones(tmp_path: Path, tiny_folder: Path) -> None:
    """A row whose file is missing is listed, then left out and counted in the same line as a broken file."""
    from tlengine._data import drop_unreadable

    images = sorted(tiny_folder.rglob("*.png"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [f"{p},{p.parent.name}" for p in images] + [f"gone.png,{images[0].parent.name}", f"broken.png,{images[-1].parent.name}"]
    (tmp_path / "d.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    data = csv_dataset(str(tmp_path / "d.csv"), DatasetOptions())
    assert len(data.train) + len(data.val) == len(images) + 2  # listed: the dataset does not decode
    said: list[str] = []
    kept = drop_unreadable(data, 2, said.append)
    assert len(kept.train) + len(kept.val) == len(images)
    assert len(said) == 1 and said[0].startswith(f"warning: skipped 2 image(s) of {len(images) + 2} (1 missing, 1 unreadable): ")
    assert f"{tmp_path / 'gone.png'} (missing)" in said[0] and "broken.png (UnidentifiedImageError" in said[0]
    with pytest.raises(UserError, match=r"--max-bad-images 1: 2 of \d+ images cannot be used \(1 missing, 1 unreadable\)"):
        drop_unreadable(data, 1, said.append)


def test_csv_columns_named_by_flags_or_the_only_other_column(tmp_path: Path, tiny_folder: Path) -> None:
    images = sorted(tiny_folder.rglob("*.png"))[:12]
    (tmp_path / "angles.csv").write_text("image,angle\n" + "".join(f"{p},{i * 7.5}\n" for i, p in enumerate(images)))
    data = csv_dataset(str(tmp_path / "angles.csv"), DatasetOptions(task="regression"))
    assert sorted([*data.train.targets, *data.val.targets]) == [i * 7.5 for i in range(12)]
    (tmp_path / "many.csv").write_text("id,picture,angle,weight\n" + "".join(f"{i},{p},{i * 7.5},{i}\n" for i, p in enumerate(images)))
    with pytest.raises(UserError, match="--image-column and --target-column"):
        csv_dataset(str(tmp_path / "many.csv"), DatasetOptions(task="regression"))
    data = csv_dataset(str(tmp_path / "many.csv"), DatasetOptions(task="regression", image_column="picture", target_column="Angle"))
    assert sorted([*data.train.targets, *data.val.targets]) == [i * 7.5 for i in range(12)]
    with pytest.raises(UserError, match="--image-column pic: .* has no such column; its header is id, picture, angle, weight"):
        csv_dataset(str(tmp_path / "many.csv"), DatasetOptions(image_column="pic"))
