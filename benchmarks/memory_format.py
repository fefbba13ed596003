"""tlengine's training and inference speed with channels_last (its default) vs contiguous NCHW tensors.

For each model, ``fit`` trains a timm backbone with a linear head (AdamW, the
step ``tlengine search`` runs) on the same batches of random images twice, once
with ``channels_last=True`` and once with ``channels_last=False``, alternating for
``--rounds`` rounds; training speed is the batch size over the median gap between
``on_step`` calls. Inference is ``evaluate`` over the same images in both layouts.
The ratio (channels_last / contiguous) is what the default gains on this machine's
device.

Usage: python benchmarks/memory_format.py [--models tf_efficientnet_lite0:64,...] [--batch-size 32] [--steps 8] [--rounds 2] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fit_step_seconds, report, tlengine_model  # noqa: E402

DEFAULT_MODELS = "tf_efficientnet_lite0:64,tf_efficientnet_lite0:128,resnet18:96,resnet50:96,mobilenetv3_large_100:96,convnext_atto:96,vit_tiny_patch16_224:96"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated ARCH:PX pairs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per run (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: every usable CPU, as tlengine search)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from tlengine._loaders import loader
    from tlengine._train import evaluate, resolve_device

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    classes, rows, ratios = 10, [], {}
    for spec in args.models.split(","):
        arch, px = spec.split(":")
        size = int(px)
        n = args.batch_size * (args.steps + 2)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(n, 3, size, size, generator=generator)
        targets = torch.randint(classes, (n,), generator=generator)
        train = loader(torch.utils.data.TensorDataset(images, targets), args.batch_size, True, device)
        val = loader(torch.utils.data.TensorDataset(images[:2], targets[:2]), 2, False, device)
        infer = loader(torch.utils.data.TensorDataset(images, targets), args.batch_size, False, device)
        kwargs = {"img_size": size} if "vit" in arch else {}

        def train_rate(channels_last: bool) -> float:
            steps = fit_step_seconds(tlengine_model(arch, classes, **kwargs), classes, train, val, device, channels_last=channels_last)
            return args.batch_size / statistics.median(steps)

        def infer_rate(channels_last: bool) -> float:
            model = tlengine_model(arch, classes, **kwargs).to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            evaluate(model, val, "accuracy", device, channels_last=channels_last)  # warm-up
            start = time.perf_counter()
            evaluate(model, infer, "accuracy", device, channels_last=channels_last)
            if cuda:
                torch.cuda.synchronize()
            return n / (time.perf_counter() - start)

        rates: dict[tuple[str, bool], list[float]] = {}
        for _ in range(args.rounds):
            for channels_last in (False, True):
                rates.setdefault(("train", channels_last), []).append(train_rate(channels_last))
                rates.setdefault(("infer", channels_last), []).append(infer_rate(channels_last))
        med = {k: statistics.median(v) for k, v in rates.items()}
        train_ratio, infer_ratio = med["train", True] / med["train", False], med["infer", True] / med["infer", False]
        ratios[spec] = {"train": train_ratio, "infer": infer_ratio}
        rows.append([arch, size, round(med["train", False], 1), round(med["train", True], 1), f"{train_ratio:.2f}x",
                     round(med["infer", False], 1), round(med["infer", True], 1), f"{infer_ratio:.2f}x"])
        print(f"{arch} {size}px: train {train_ratio:.2f}x, inference {infer_ratio:.2f}x", flush=True)
    threads = torch.get_num_threads()
    report("memory_format", f"images/s on {device} ({threads} threads, batch {args.batch_size}, fp32 on CPU): contiguous vs channels_last",
           ["model", "px", "train NCHW", "train channels_last", "ratio", "infer NCHW", "infer channels_last", "ratio"], rows,
           {"device": device, "threads": threads, "ratios": ratios})


if __name__ == "__main__":
    main()
