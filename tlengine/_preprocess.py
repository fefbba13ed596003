"""Image loading and the evaluation preprocessing, in numpy and Pillow only.

``tlengine predict`` must run without PyTorch, so the evaluation transform is
written here in numpy/Pillow instead of taken from timm at inference time. It
reproduces timm's ``transforms_imagenet_eval`` (centre crop mode): resize the
shorter side to ``floor(size / crop_pct)`` with Pillow, centre-crop, scale to
[0, 1], normalise. A test checks it against timm's transform.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Image file extensions read from folders (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def load_image(item: Any) -> Any:
    """Return ``item`` as an RGB ``PIL.Image``.

    Args:
        item: A path, a ``PIL.Image``, or a uint8 array (H, W) or (H, W, C).
            Transparent images are composited over white; 16-bit images are scaled
            to 8 bits; CMYK, palette and greyscale images are converted.

    Raises:
        OSError, ValueError, SyntaxError: The file is not a readable image (as Pillow raises).
    """
    import numpy as np
    from PIL import Image

    if isinstance(item, Image.Image):
        image = item
    elif isinstance(item, np.ndarray):
        image = Image.fromarray(item)
    else:
        with Image.open(item) as opened:
            opened.load()
            image = opened
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit (and 32-bit) greyscale: scale to 8 bits instead of clipping at 255.
        wide = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(wide), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


@dataclass(frozen=True)
class Preprocess:
    """The evaluation preprocessing of a model, as stored in its ONNX metadata.

    Attributes:
        input_size: Side of the square network input, in pixels.
        resize: The shorter image side is resized to this before the centre crop.
        interpolation: Pillow resampling filter name (``bilinear``, ``bicubic``, ...).
        mean: Per-channel mean, RGB, in [0, 1] units.
        std: Per-channel standard deviation, RGB.
        crop: Crop mode; ``"center"``.
        channel_order: Channel order of the input tensor; ``"RGB"``.
        layout: Tensor layout; ``"NCHW"``.
    """

    input_size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: str = "center"
    channel_order: str = "RGB"
    layout: str = "NCHW"

    @classmethod
    def from_data_config(cls, config: Mapping[str, Any], image_size: int) -> "Preprocess":
        """Build it from a timm data config (``resolve_data_config``) at ``image_size``."""
        crop_pct = config.get("crop_pct") or 0.875
        return cls(
            input_size=image_size,
            resize=math.floor(image_size / crop_pct),
            interpolation=config.get("interpolation", "bilinear"),
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
        )

    @property
    def crop_pct(self) -> float:
        """The crop fraction, as timm's transforms take it."""
        return self.input_size / self.resize

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preprocess":
        """Inverse of :meth:`to_dict`."""
        return cls(
            input_size=int(data["input_size"]),
            resize=int(data["resize"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            crop=str(data.get("crop", "center")),
            channel_order=str(data.get("channel_order", "RGB")),
            layout=str(data.get("layout", "NCHW")),
        )

    def __call__(self, item: Any) -> Any:
        """Preprocess one image into a float32 numpy array of shape (3, size, size)."""
        import numpy as np

        array = self.pixels(item).astype(np.float32) / 255.0
        array = (array - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def pixels(self, item: Any) -> Any:
        """Resize and centre-crop one image: a uint8 numpy array of shape (size, size, 3), not yet normalised."""
        import numpy as np
        from PIL import Image

        image = load_image(item)
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        resample = Image.Resampling[self.interpolation.upper()]
        image = image.resize(new_size, resample)
        width, height = image.size
        top = int(round((height - self.input_size) / 2.0))
        left = int(round((width - self.input_size) / 2.0))
        image = image.crop((left, top, left + self.input_size, top + self.input_size))
        return np.asarray(image, dtype=np.uint8)


def list_images(folder: Path) -> list[Path]:
    """All image files below ``folder``, sorted, matched case-insensitively by extension."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
