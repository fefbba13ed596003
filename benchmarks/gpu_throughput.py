"""Training and inference throughput (images/s) on a CUDA GPU at 224 px, bf16 autocast + channels_last.

For resnet50, convnext_tiny and tf_efficientnet_lite0 (random weights; throughput
does not depend on them): a training step (forward, cross-entropy, backward, AdamW)
and an inference forward pass, each timed over ``--steps`` batches after warm-up,
optionally after ``torch.compile`` (--compile). Prints a table and writes
benchmarks/results/gpu_throughput.json.

Without a CUDA device it prints "no CUDA device: skipped" and exits 0; with
--cpu-smoke it instead runs the same code on the CPU at a tiny size and batch, to
check that the script works, and writes gpu_throughput-cpu-smoke.json: those are
not GPU figures.

Usage: python benchmarks/gpu_throughput.py [--batch-size 128] [--steps 30] [--compile] [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report  # noqa: E402

MODELS = ("resnet50", "convnext_tiny", "tf_efficientnet_lite0")


def throughput(arch: str, device: str, size: int, batch: int, steps: int, warmup: int, compile_model: bool) -> tuple[float, float]:
    """(training images/s, inference images/s) of ``arch``."""
    import timm
    import torch

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else None
    model = timm.create_model(arch, num_classes=1000).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    run = torch.compile(model) if compile_model else model
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(1000, (batch,), device=device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def train_step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(run(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step() -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            run(x)

    rates = []
    for step, train in ((train_step, True), (infer_step, False)):
        model.train(train)
        for _ in range(warmup):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(batch * steps / (time.perf_counter() - start))
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--cpu-smoke", action="store_true", help="without CUDA: run tiny sizes on the CPU (not GPU figures)")
    args = parser.parse_args()

    import torch

    if torch.cuda.is_available():
        device, size, batch, steps, warmup, name = "cuda", args.image_size, args.batch_size, args.steps, args.warmup, "gpu_throughput"
        title = f"{torch.cuda.get_device_name()}: images/s at {size}px, batch {batch}, bf16 autocast + channels_last"
    elif args.cpu_smoke:
        device, size, batch, steps, warmup, name = "cpu", 64, 4, 2, 1, "gpu_throughput-cpu-smoke"
        title = f"CPU SMOKE TEST, NOT GPU FIGURES: images/s at {size}px, batch {batch}, fp32"
    else:
        print("no CUDA device: skipped (pass --cpu-smoke to check the script on the CPU)")
        return
    rows = []
    for arch in MODELS:
        for compiled in (False, True) if args.compile else (False,):
            train, infer = throughput(arch, device, size, batch, steps, warmup, compiled)
            rows.append([arch, "torch.compile" if compiled else "eager", round(train, 1), round(infer, 1)])
            print(f"{arch} {'compiled' if compiled else 'eager'}: train {train:.0f}/s, inference {infer:.0f}/s", file=sys.stderr)
    report(name, title, ["model", "mode", "train images/s", "inference images/s"], rows,
           {"device": device, "image_size": size, "batch_size": batch, "steps": steps,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None})


if __name__ == "__main__":
    main()
