"""Does a student taught by a larger teacher beat the same student searched alone, at the same budget?

Per dataset (``fashion-mnist-2k`` from ../shared, skipped where absent, and ``digits``,
scikit-learn's 8x8 digits upscaled: both from ``benchmarks/peers.py``), each step in its own
process with cold caches, at the same image size, epochs per trial and CPU threads:

1. **teacher**: ``tlengine.search(..., backbone=tf_efficientnet_lite2, timeout=BUDGET)``;
2. **plain student**: ``tlengine.search(..., backbone=tf_efficientnet_lite0, timeout=BUDGET)``;
3. **distilled student**: ``tlengine.distill(teacher study, "tf_efficientnet_lite0", timeout=BUDGET)``
   (its teacher's best trial; the teacher's outputs computed inside the budget).

The table gives each one's best validation score, parameters and ONNX latency at batch 1
(onnxruntime, the exported ``best.onnx``), and how much of the gap between the plain student
and the teacher the distilled one closes: ``(distilled - plain) / (teacher - plain)``. Target:
at least half, and above the plain student, on every dataset. Writes
``benchmarks/results/distill.json``.

Usage: pip install -e '.[benchmarks]'; python benchmarks/distill.py [--budget 150] [--epochs 3]
[--image-size 64] [--student-size 32 --name distill-32px] [--datasets fashion-mnist-2k,digits] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report  # noqa: E402
from peers import THREADS, available  # noqa: E402

TEACHER, STUDENT = "timm:tf_efficientnet_lite2", "timm:tf_efficientnet_lite0"
STEPS = ("teacher", "plain student", "distilled student")


def step(name: str, data: dict[str, Any], budget: float, epochs: int, size: int, runs: Path, student_size: int | None = None) -> dict[str, Any]:
    """One step in this process: its best score, trials, parameters and ONNX latency at batch 1 (the students at
    ``student_size`` px when given, else at the teacher's ``size``)."""
    import numpy as np
    import onnx

    import tlengine
    from tlengine._export import latency_ms

    started = time.perf_counter()
    size = size if name == "teacher" or student_size is None else student_size
    common = dict(epochs=epochs, image_size=size, trials=500, timeout=budget, cache_dir=runs.parent / f"cache-{name.replace(' ', '-')}",
                  quiet=True)
    if name == "distilled student":
        result = tlengine.distill("teacher", STUDENT, runs=runs, name="distilled", **common)
    else:
        result = tlengine.search(data["path"], backbone=TEACHER if name == "teacher" else STUDENT, task=data["task"], out=runs,
                                 study_name="teacher" if name == "teacher" else "plain", **common)
    seconds = time.perf_counter() - started
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer) / 1e6
    latency = latency_ms(result.onnx_path, np.zeros((1, 3, size, size), dtype=np.float32))
    return {"score": result.best.score, "trials": sum(r.state == "complete" for r in result.rows), "params_m": params,
            "latency_ms": latency, "seconds": seconds, "distillation": result.distillation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=150.0, help="wall seconds per step")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--datasets", default="fashion-mnist-2k,digits")
    parser.add_argument("--student-size", type=int, help="the students' image size (default: --image-size, the teacher's)")
    parser.add_argument("--name", default="distill", help="results/NAME.json")
    parser.add_argument("--smoke", action="store_true", help="the digits set cut small, one epoch, 45 s budgets")
    parser.add_argument("--one", nargs=3, metavar=("STEP", "SPEC_JSON", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(THREADS)
        name, spec, out = args.one
        spec = json.loads(spec)
        found = step(name, spec["data"], spec["budget"], spec["epochs"], spec["size"], Path(spec["runs"]), spec.get("student_size"))
        Path(out).write_text(json.dumps(found))
        return
    budget, epochs = (45.0, 1) if args.smoke else (args.budget, args.epochs)
    rows, record = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in available(args.datasets, Path(tmp) / "data", args.smoke):
            runs = Path(tmp) / name / "runs"
            runs.mkdir(parents=True)
            spec = {"data": data, "budget": budget, "epochs": epochs, "size": args.image_size, "runs": str(runs),
                    "student_size": args.student_size}
            found = {}
            for which in STEPS:
                out = Path(tmp) / name / f"{which.replace(' ', '-')}.json"
                subprocess.run([sys.executable, __file__, "--one", which, json.dumps(spec), str(out)], check=True)
                found[which] = json.loads(out.read_text())
                print(f"{name}: {which}: {found[which]['score']:.4f} in {found[which]['seconds']:.0f} s", file=sys.stderr)
            teacher, plain, taught = (found[s]["score"] for s in STEPS)
            closed = (taught - plain) / (teacher - plain) if teacher > plain else float("nan")  # no gap: the student is as good
            record[name] = {**found, "gap_closed": closed, "beats_plain": taught > plain}
            for which in STEPS:
                f = found[which]
                rows.append([name, which, round(f["score"], 4), round(f["params_m"], 2), round(f["latency_ms"], 2), f["trials"],
                             ("no gap" if closed != closed else f"{closed:.0%}") if which == "distilled student" else ""])
    student_px = args.student_size or args.image_size
    report(f"{args.name}-smoke" if args.smoke else args.name,
           f"best accuracy within {budget:.0f} s per step, {epochs} epochs, {THREADS} threads; teacher lite2 at {args.image_size} px, "
           f"student lite0 at {student_px} px", ["dataset", "model", "best", "params (M)", "ms b=1", "trials", "gap closed"], rows,
           {"budget": budget, "epochs": epochs, "image_size": args.image_size, "student_size": student_px, "record": record})


if __name__ == "__main__":
    main()
