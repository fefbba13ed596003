"""Overhead of tlengine's training step over a bare timm training loop (same model, batch, precision).

Both loops train the same timm model (tlengine: the backbone without classifier plus a
linear head; bare: ``timm.create_model`` with its classifier) with AdamW on the same
batches from the same ``DataLoader`` of random images. tlengine's step is ``fit``
(cosine schedule with per-group learning-rate scales, loss check, autocast on CUDA,
channels_last); its step time is the gap between ``on_step`` calls. The bare loop is
forward, cross-entropy, backward, step, zero_grad, in the same precision and memory
format (channels_last: ``benchmarks/memory_format.py`` measures what that layout gains). The two alternate for
``--rounds`` rounds; the table gives the median step time of each and the overhead.

Usage: python benchmarks/step_overhead.py [--arch tf_efficientnet_lite0] [--image-size 96] [--batch-size 32] [--steps 20] [--rounds 3] [--device auto] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fit_step_seconds, report, tlengine_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on CPUs shared with other jobs, more threads oversubscribe and run slower)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    import timm

    from tlengine._loaders import loader
    from tlengine._train import amp_dtype, resolve_device

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    classes = 10
    n = args.batch_size * (args.steps + 1)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, args.image_size, args.image_size, generator=generator)
    targets = torch.randint(classes, (n,), generator=generator)
    train = loader(torch.utils.data.TensorDataset(images, targets), args.batch_size, True, device)
    val = loader(torch.utils.data.TensorDataset(images[:2], targets[:2]), 2, False, device)

    def tlengine_steps() -> list[float]:
        return fit_step_seconds(tlengine_model(args.arch, classes), classes, train, val, device)

    def bare_steps() -> list[float]:
        torch.manual_seed(0)
        model = timm.create_model(args.arch, num_classes=classes).to(device, memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        loss_fn = torch.nn.CrossEntropyLoss()
        dtype = amp_dtype(device)
        model.train()
        stamps = []
        for x, y in train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
        return [b - a for a, b in zip(stamps[1:], stamps[2:])]

    ours, bare = [], []
    for _ in range(args.rounds):
        bare += bare_steps()
        ours += tlengine_steps()
    ms_ours, ms_bare = statistics.median(ours) * 1000, statistics.median(bare) * 1000
    overhead = (ms_ours / ms_bare - 1) * 100
    precision = {None: "fp32"}.get(amp_dtype(device), str(amp_dtype(device)).removeprefix("torch."))
    rows = [[args.arch, args.image_size, args.batch_size, precision, device, len(bare), round(ms_bare, 1), round(ms_ours, 1), f"{overhead:+.1f}%"]]
    report("step_overhead", "tlengine fit step vs bare timm loop (median step time)",
           ["model", "px", "batch", "precision", "device", "steps each", "bare ms", "tlengine ms", "overhead"], rows,
           {"overhead_pct": overhead, "target_pct": 3.0, "met": overhead <= 3.0})


if __name__ == "__main__":
    main()
