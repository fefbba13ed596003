"""Start-up time of ``tlengine --help``, against bare ``python -c pass``, and proof that it imports no torch.

Usage: python benchmarks/cli_startup.py [--repeats N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median_ms, report  # noqa: E402

HEAVY = ("torch", "timm", "torchvision", "onnx", "onnxruntime", "optuna", "matplotlib", "numpy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    def run(*argv: str) -> None:
        subprocess.run([sys.executable, *argv], check=True, capture_output=True)

    baseline = median_ms(lambda: run("-c", "pass"), args.repeats, warmup=1)
    help_ms = median_ms(lambda: run("-m", "tlengine", "--help"), args.repeats, warmup=1)
    search_help_ms = median_ms(lambda: run("-m", "tlengine", "search", "--help"), args.repeats, warmup=1)
    probe = (
        "import sys, runpy, contextlib, io\n"
        "sys.argv = ['tlengine', '--help']\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: runpy.run_module('tlengine', run_name='__main__')\n"
        "    except SystemExit: pass\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    imported = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.strip()
    rows = [
        ["python -c pass", baseline, 1.0],
        ["tlengine --help", help_ms, help_ms / baseline],
        ["tlengine search --help", search_help_ms, search_help_ms / baseline],
    ]
    report("cli_startup", f"CLI start-up (median of {args.repeats}); heavy modules imported by --help: {imported or 'none'}",
           ["command", "ms", "x python"], rows, {"heavy_modules_imported": imported.split(",") if imported else []})


if __name__ == "__main__":
    main()
