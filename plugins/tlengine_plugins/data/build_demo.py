"""Rebuild ``fashion_mnist_demo.npz`` from the original Fashion-MNIST IDX files.

Usage: ``python build_demo.py FASHION_MNIST_DIR`` (the folder with ``*-idx*-ubyte.gz``).
Takes the first 100 training and the first 30 test images of each class.
"""

import gzip
import sys
from pathlib import Path

import numpy as np

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def first_per_class(images: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(len(CLASSES))])
    keep.sort()
    return images[keep], labels[keep]


def main(folder: str) -> None:
    root = Path(folder)
    train_x, train_y = first_per_class(read_idx(root / "train-images-idx3-ubyte.gz"), read_idx(root / "train-labels-idx1-ubyte.gz"), 100)
    val_x, val_y = first_per_class(read_idx(root / "t10k-images-idx3-ubyte.gz"), read_idx(root / "t10k-labels-idx1-ubyte.gz"), 30)
    out = Path(__file__).with_name("fashion_mnist_demo.npz")
    np.savez_compressed(out, train_images=train_x, train_labels=train_y, val_images=val_x, val_labels=val_y, classes=np.array(CLASSES))
    print(f"wrote {out} ({out.stat().st_size} bytes): {len(train_x)} train, {len(val_x)} val")


if __name__ == "__main__":
    main(sys.argv[1])
