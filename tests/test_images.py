"""Unusual and broken image files: read where possible, skipped with one warning otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_BACKBONE, demo_arrays, run_cli
from tlengine._preprocess import load_image


def real_image(index: int) -> np.ndarray:
    return demo_arrays()[0][index]


def write_unusual(folder: Path, index: int) -> list[Path]:
    """One real image saved in every unusual way; returns the paths."""
    from PIL import Image

    grey = real_image(index)
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(name: str, image: Image.Image, **kwargs) -> None:
        image.save(folder / name, **kwargs)
        paths.append(folder / name)

    save("grey.png", Image.fromarray(grey))
    save("UPPER.PNG", Image.fromarray(rgb))
    save("photo.JPG", Image.fromarray(rgb))
    save("rgba.png", Image.fromarray(np.dstack([rgb, np.full_like(grey, 128)])))
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
    save("palette-transparent.png", palette, transparency=0)
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))
    save("sixteen.png", Image.fromarray(grey.astype(np.uint16) * 257))
    save("ünïcødé-名前.png", Image.fromarray(grey))
    return paths


def test_unusual_modes_load_as_rgb(tmp_path: Path) -> None:
    paths = write_unusual(tmp_path, 0)
    grey = real_image(0)
    for path in paths:
        image = load_image(path)
        assert image.mode == "RGB" and image.size == (28, 28), path
    sixteen = np.asarray(load_image(tmp_path / "sixteen.png"))[..., 0]
    assert np.array_equal(sixteen, grey)  # scaled from 16 bits, not clipped at 255
    rgba = np.asarray(load_image(tmp_path / "rgba.png")).astype(int)
    assert rgba.min() >= 127  # half-transparent over white


def write_broken(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good-source.png"
    from PIL import Image

    Image.fromarray(real_image(1)).save(good)
    data = good.read_bytes()
    good.unlink()
    broken = {"empty.png": b"", "truncated.png": data[: len(data) // 2], "notes.jpg": b"not an image at all\n"}
    for name, content in broken.items():
        (folder / name).write_bytes(content)
    return [folder / n for n in broken]


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    x, y = demo_arrays()[:2]
    for c in range(2):
        indices = [i for i, t in enumerate(y) if t == c]
        for split, chosen in (("train", indices[:6]), ("val", indices[6:9])):
            from PIL import Image

            for k, i in enumerate(chosen):
                folder = tmp_path / split / f"class{c}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(x[i]).save(folder / f"{k}.png")
    write_unusual(tmp_path / "train" / "class0", 2)
    write_broken(tmp_path / "train" / "class1")
    return tmp_path


ARGS = ["--backbone", TINY_BACKBONE, "--weights", "none", "--trials", "1", "--epochs", "1", "--image-size", "32"]


def test_bad_images_skipped_with_one_warning(messy_folder: Path, tmp_path: Path) -> None:
    result = run_cli("search", "--data", str(messy_folder), *ARGS, "--max-bad-images", "3", "--out", str(tmp_path / "o"), "--json")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "skipped 3 image(s) of 29 (3 unreadable)" in warnings[0]
    assert "empty.png" in warnings[0] or "notes.jpg" in warnings[0]
    assert json.loads(result.stdout)["best"] is not None


def test_too_many_bad_images_is_an_error(messy_folder: Path, tmp_path: Path) -> None:
    result = run_cli("search", "--data", str(messy_folder), *ARGS, "--max-bad-images", "0.05", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --max-bad-images 0.05: 3 of 29 images cannot be used (3 unreadable)")
