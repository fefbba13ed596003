"""An example third-party tlengine plugin.

- dataset ``idx``: a folder of MNIST-format files (``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-...``), as Fashion-MNIST ships;
- backbone ``minicnn``: a small CNN, not from timm, with timm-style stage metadata.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import tlengine

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@tlengine.hookimpl
def register_datasets(register):
    register(
        tlengine.Dataset(
            "idx",
            idx_dataset,
            "a folder of MNIST-format IDX files (train-* and t10k-*)",
            matches=lambda path: path is not None and (Path(path) / FILES["train"][0]).is_file(),
        )
    )


@tlengine.hookimpl
def register_backbones(register):
    register(tlengine.Backbone("minicnn", minicnn, "a three-stage CNN for small images", default_arch="w16"))


def read_idx(path: Path):
    """Read one IDX file: byte 3 is the number of dimensions, then big-endian uint32 sizes, then uint8 data."""
    import numpy as np

    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def idx_dataset(path, options):
    if path is None:
        raise tlengine.UserError("--data: pass a folder of IDX files for --dataset idx")
    root = Path(path)
    splits = {}
    for split, (images_file, labels_file) in FILES.items():
        if not (root / images_file).is_file() or not (root / labels_file).is_file():
            raise tlengine.UserError(f"--data {path}: missing {images_file} or {labels_file}")
        images, labels = read_idx(root / images_file), read_idx(root / labels_file)
        if len(images) != len(labels):
            raise tlengine.UserError(f"--data {path}: {images_file} and {labels_file} differ in length")
        splits[split] = tlengine.Split(list(images), [int(t) for t in labels])
    classes_file = root / "classes.txt"
    n_classes = max(splits["train"].targets) + 1
    classes = classes_file.read_text().split() if classes_file.is_file() else [str(i) for i in range(n_classes)]
    return tlengine.ImageData(splits["train"], splits["val"], "classification", tuple(classes), name=root.name)


def minicnn(arch, weights):
    import torch
    from torch import nn

    width = int((arch or "w16").lstrip("w"))

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class MiniCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = block(3, width)
            self.stages = nn.Sequential(block(width, 2 * width), block(2 * width, 4 * width))
            self.num_features = 4 * width
            self.pretrained_cfg = {
                "input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0,
                "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            }

        def group_matcher(self, coarse=False):
            return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}

        def forward(self, x):
            return torch.flatten(nn.functional.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1)

    model = MiniCNN()
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_model

        load_model(model, weights)
    return model
