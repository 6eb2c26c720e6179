#!/usr/bin/env bash
# One command for a lent GPU: CUDA tests, the bench suite, the report and plot, then autotuning.
# Everything lands in bench/results/<gpu>-<date>.{json,md,png,tests.txt} and kernels/configs/<gpu>.json
# (and is copied to $OUT when the device tool runs it). STEPS picks a subset, e.g. STEPS="tests bench".
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
STEPS=${STEPS:-"tests bench autotune compile"}
gpu=$($PY -c "import torch, re; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
stem="bench/results/${gpu}-$(date -u +%Y-%m-%d)"
mkdir -p bench/results
$PY -c "import torch, triton, torchvision; print('torch', torch.__version__, 'triton', triton.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" | tee "${stem}.env.txt"
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has tests; then
  timeout ${TESTS_TIMEOUT:-300} $PY -m pytest -q tests -p no:cacheprovider 2>&1 | tee "${stem}.tests.txt" | tail -40
fi
if has bench; then
  timeout ${BENCH_TIMEOUT:-300} $PY -m pytest -q bench -p no:cacheprovider --benchmark-json="${stem}.json" 2>&1 | tail -15
  $PY bench/report.py "${stem}.json" --out "${stem}.md" --plot "${stem}.png" && cat "${stem}.md"
fi
if has autotune; then $PY bench/autotune.py --shapes maskrcnn; fi
if has compile; then $PY bench/compile_report.py > "${stem}.compile.txt"; tail -1 "${stem}.compile.txt"; fi
if [ -n "${OUT:-}" ]; then cp "${stem}".* "$OUT"/ 2>/dev/null; cp kernels/configs/*.json "$OUT"/ 2>/dev/null; fi
true
