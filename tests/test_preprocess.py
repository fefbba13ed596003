"""The numpy/Pillow evaluation transform matches timm's."""

from __future__ import annotations

import numpy as np
import pytest

from tlengine._preprocess import Preprocess, load_image


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape", [(28, 28), (40, 64, 3), (97, 50, 3)])
@pytest.mark.parametrize("size,crop_pct", [(32, 0.875), (64, 1.0), (48, 0.9)])
def test_matches_timm_eval_transform(interpolation: str, shape: tuple, size: int, crop_pct: float) -> None:
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    config = {"crop_pct": crop_pct, "interpolation": interpolation, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    pre = Preprocess.from_data_config(config, size)
    timm_transform = create_transform(size, is_training=False, crop_pct=pre.crop_pct, interpolation=interpolation, mean=pre.mean, std=pre.std)
    expected = timm_transform(load_image(image)).numpy()
    got = pre(image)
    assert got.shape == expected.shape == (3, size, size)
    assert np.abs(got - expected).max() < 1e-5


def test_transparent_image_on_white() -> None:
    from PIL import Image

    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.zeros((4, 4), dtype=np.uint8)).mode == "RGB"


def test_round_trip_dict() -> None:
    pre = Preprocess.from_data_config({"crop_pct": 0.875, "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}, 224)
    assert pre.resize == 256
    assert Preprocess.from_dict(pre.to_dict()) == pre
