#!/usr/bin/env bash
# The ONE script a lent GPU machine runs: the fast tests on CUDA, then benchmarks/gpu.py; logs and the
# table go to $OUT (or ./gpu-check). Sized for one 10-minute command on an H100/H200.
#
# That machine has PyTorch with CUDA and most of requirements.txt but no network: the wheels it lacks
# travel in .whl/ (git-ignored; benchmarks/README.md says how to fetch them) and are installed here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name())" | tee "$OUT/device.txt"
timeout 200 python3 -m pytest -m "not slow" -q -p no:cacheprovider -x 2>&1 | tee "$OUT/fast-tests.log" | tail -15
timeout 360 python3 benchmarks/gpu.py --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
