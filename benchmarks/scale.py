"""Scale: the same search on 10k to 500k images, time and memory per stage against the number of images.

Builds image folders from the full Fashion-MNIST in ``../shared/data/fashion-mnist/``
(60,000 training and 10,000 test images); sizes above 60,000 add transformed copies of
every image (a horizontal flip and one-pixel shifts, each a new file). Each size runs
one ``tlengine search`` in its own process on a cold cache: one linear-probe trial of
EfficientNet-Lite0 (its ImageNet weights), one epoch at 32 px, then the export and the
report, as the issue that asked for it measured. The search's own stage timings
(``summary.json``'s ``stages``: seconds, peak RSS and peak anonymous memory per stage)
give the split.

Targets: peak memory grows by less than 2 KB per image from the second size to the
largest, and the time per image of the stages that work per image stays within 20 %
across sizes. Both peaks are reported: ``RSS`` is the process's resident set (cache files
are read with ``pread``, so their pages stay in the kernel's page cache and out of it);
``anon`` is what the process allocated itself.

    python benchmarks/scale.py                         # 10k, 60k, 480k training images
    python benchmarks/scale.py --sizes 10000,60000     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, read_idx, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist"
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
#: Stages whose work grows with the number of images (the others are fixed costs: imports, weights, ONNX conversion).
PER_IMAGE = ("listing", "checking images", "decoding", "features", "training", "export scoring", "report predictions")


def idx(name: str):
    """One of the Fashion-MNIST files."""
    return read_idx(FASHION / name)


def variant(image, v: int):
    """Copy ``v`` of an image: v = 0 itself; bit 0 flips it, bits 1 and 2 shift it a pixel right and down."""
    import numpy as np

    out = image[:, ::-1] if v & 1 else image
    return np.roll(out, ((v >> 2) & 1, (v >> 1) & 1), axis=(0, 1))


def build(folder: Path, train: int) -> tuple[int, int, float]:
    """``folder/train/<class>/*.png`` with ``train`` images and ``folder/val/<class>/*.png`` with a sixth as many;
    returns (train, val, seconds to write; 0 when the folder was already there)."""
    from PIL import Image

    marker = folder / "complete.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        return done["train"], done["val"], 0.0
    splits = {"train": (idx("train-images-idx3-ubyte.gz"), idx("train-labels-idx1-ubyte.gz"), train),
              "val": (idx("t10k-images-idx3-ubyte.gz"), idx("t10k-labels-idx1-ubyte.gz"), max(1, train // 6))}
    start = time.perf_counter()
    counts = {}
    for split, (images, labels, wanted) in splits.items():
        for name in CLASSES:
            (folder / split / name).mkdir(parents=True, exist_ok=True)
        jobs = [(i % len(images), i // len(images)) for i in range(wanted)]

        def write(job: tuple[int, int], split: str = split, images=images, labels=labels) -> None:
            i, v = job
            Image.fromarray(variant(images[i], v)).save(folder / split / CLASSES[labels[i]] / f"{v}-{i:05d}.png")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(write, jobs, chunksize=256))
        counts[split] = wanted
    marker.write_text(json.dumps(counts))
    return counts["train"], counts["val"], time.perf_counter() - start


def run(folder: Path, out: Path, size: int) -> dict:
    """One search in its own process on a cold cache; its summary (with ``stages``) and wall time."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "tlengine", "search", "--data", str(folder), "--trials", "1", "--epochs", "1",
               "--image-size", str(size), "--out", str(out), "--study-name", folder.name, "--cache-dir", str(out / "cache"),
               "--json"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"search on {folder} failed:\n{done.stderr[-3000:]}")
    return {"wall": wall, **json.loads(done.stdout)}


def main() -> None:
    global FASHION
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,60000,480000", help="training images per run (validation: a sixth as many)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--root", type=Path, default=Path("/tmp/tlengine-scale"), help="where the image folders and runs go")
    parser.add_argument("--fashion", type=Path, default=FASHION, help=f"the Fashion-MNIST IDX files (default: {FASHION})")
    args = parser.parse_args()
    FASHION = args.fashion
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"{FASHION} not found: this benchmark needs the full Fashion-MNIST (see ../shared/README.md)")
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = []
    for train in sizes:
        folder = args.root / f"fm{train}"
        n_train, n_val, written = build(folder, train)
        out = args.root / f"run{train}-{int(time.time())}"
        print(f"{n_train} + {n_val} images ({'written in %.0f s' % written if written else 'already written'}); searching", file=sys.stderr)
        result = run(folder, out, args.image_size)
        stages = result["stages"]
        runs.append({"train": n_train, "val": n_val, "images": n_train + n_val, "write_s": round(written, 1),
                     "wall_s": round(result["wall"], 1), "score": result["best"]["score"], "stages": stages})
        print(f"  {result['wall']:.0f} s, accuracy {result['best']['score']:.4f}", file=sys.stderr)

    names = list(dict.fromkeys(name for r in runs for name in r["stages"]))
    mem = lambda r, key: max((s[key] or 0.0) for s in r["stages"].values())  # noqa: E731
    per_image = [round(1e3 * sum(r["stages"].get(n, {}).get("seconds", 0.0) for n in PER_IMAGE) / r["images"], 3) for r in runs]
    base, top = runs[min(1, len(runs) - 1)], runs[-1]
    grown = {key: (mem(top, key) - mem(base, key)) * 1024 / max(1, top["images"] - base["images"]) for key in ("peak_rss_mb", "peak_anon_mb")}
    summary = {
        "rss_kb_per_image": round(grown["peak_rss_mb"], 3), "anon_kb_per_image": round(grown["peak_anon_mb"], 3),
        "ms_per_image": per_image, "ms_per_image_spread": round(max(per_image) / min(per_image) - 1, 3),
        "targets": {"kb_per_image_below": 2.0, "ms_per_image_spread_below": 0.2},
    }
    # one row per stage, two columns (seconds, peak RSS in MB) per size: reads in 80 columns
    columns = ["stage", *(f"{label(r)} {unit}" for r in runs for unit in ("s", "MB"))]
    rows = [[name, *(v for r in runs for v in (r["stages"].get(name, {}).get("seconds", ""), r["stages"].get(name, {}).get("peak_rss_mb", "")))]
            for name in names]
    rows.append(["whole search", *(v for r in runs for v in (r["wall_s"], mem(r, "peak_rss_mb")))])
    rows.append(["anonymous peak", *(v for r in runs for v in ("", mem(r, "peak_anon_mb")))])
    rows.append(["ms/image", *(v for r, ms in zip(runs, per_image) for v in (ms, ""))])
    report("scale", f"Seconds and peak RSS (MB) per stage, {args.image_size} px, one linear-probe trial of 1 epoch", columns, rows,
           {"runs": runs, "summary": summary})
    print(json.dumps(summary, indent=2))
    plot(runs, RESULTS / "scale.png")


def label(run: dict) -> str:
    """``70k``: a run's images (train + validation) in thousands."""
    return f"{round(run['images'] / 1000)}k"


def plot(runs: list[dict], path: Path) -> None:
    """Time and memory against the number of images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [r["images"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in PER_IMAGE:
        left.plot(images, [r["stages"].get(name, {}).get("seconds", 0.0) for r in runs], marker="o", label=name)
    left.plot(images, [r["wall_s"] for r in runs], marker="s", color="black", label="whole search")
    left.set(xlabel="images (train + val)", ylabel="seconds", title="Time", xscale="log", yscale="log")
    left.legend(fontsize=7)
    for key, label in (("peak_rss_mb", "peak RSS"), ("peak_anon_mb", "peak anonymous")):
        right.plot(images, [max((s[key] or 0.0) for s in r["stages"].values()) for r in runs], marker="o", label=label)
    right.set(xlabel="images (train + val)", ylabel="MB", title="Peak memory", xscale="log")
    right.set_ylim(bottom=0)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
