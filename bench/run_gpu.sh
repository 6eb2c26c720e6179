#!/usr/bin/env bash
# One command for a lent GPU: CUDA tests, the bench suite, the report and plot, then autotuning.
# Everything lands in bench/results/<gpu>-<date>.{json,md,png,tests.txt} and kernels/configs/<gpu>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
gpu=$($PY -c "import torch, re; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
stem="bench/results/${gpu}-$(date -u +%Y-%m-%d)"
$PY -m pytest -q tests -x 2>&1 | tee "${stem}.tests.txt" | tail -5
$PY -m pytest -q bench --benchmark-json="${stem}.json" 2>&1 | tail -3
$PY bench/report.py "${stem}.json" --out "${stem}.md" --plot "${stem}.png" && cat "${stem}.md"
$PY bench/autotune.py --shapes maskrcnn
$PY bench/compile_report.py > "${stem}.compile.txt"; tail -1 "${stem}.compile.txt"
