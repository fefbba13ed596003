"""How fast is decode-once on photo-sized JPEGs, on one thread and on all of them?

Writes N synthetic photos (640x480 JPEG, quality 90: smooth gradients plus noise, so
the decoder does real work) to a temporary folder, then times what the image cache
does the first time it sees a split (tlengine._cache.decode_into: decode, resize the
shorter side to 256 with bicubic, centre-crop 224, write into a memory-mapped array)
on 1 thread and on every CPU this process may use. Checks that both give the same
bytes. Prints a table and writes benchmarks/results/decode_speed.json.

Usage: python benchmarks/decode_speed.py [--images 400]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report  # noqa: E402


def photos(folder: Path, n: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0.005, 0.03, 3)
        base = np.stack([np.sin(a * x + i), np.cos(b * y - i), np.sin(c * (x + y))], axis=-1) * 90 + 128
        image = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    import numpy as np

    from tlengine._store import NpyFile, decode_into, decode_threads
    from tlengine._preprocess import Preprocess

    crop = Preprocess(224, 256, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    threads = decode_threads()
    with tempfile.TemporaryDirectory() as tmp:
        items = photos(Path(tmp), args.images)
        results = {}
        for label, n in (("1 thread", 1), (f"{threads} threads", threads)):
            out = NpyFile.create(Path(tmp) / f"{n}.npy", (len(items), 224, 224, 3), "uint8")  # as the cache writes
            start = time.perf_counter()
            decode_into(out, items, crop, threads=n)
            results[label] = (time.perf_counter() - start, np.array(out))
    (one_s, one), (many_s, many) = results.values()
    same = bool(np.array_equal(one, many))
    rows = [[label, round(seconds, 2), round(len(items) / seconds, 1), f"{one_s / seconds:.2f}x"]
            for label, (seconds, _) in results.items()]
    report("decode_speed", f"decode once: {len(items)} JPEGs 640x480 -> 224 px, bicubic",
           ["run", "seconds", "images/s", "speed-up"], rows,
           {"images": len(items), "threads": threads, "identical bytes": same, "speedup": one_s / many_s})
    if not same:
        sys.exit("error: the threaded decode differs from the serial one")


if __name__ == "__main__":
    main()
