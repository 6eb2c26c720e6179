#!/usr/bin/env bash
# One command for a lent GPU: CUDA tests, compute-sanitizer, Nsight Compute, the bench suite, the report and
# plot, autotuning and the compile audit. Results land in bench/results/<gpu>-<date>.* (and are copied to $OUT
# when the device tool runs it); tuned configs in kernels/configs/<gpu>.json.
#
# STEPS picks a subset. Everything does not fit one 10-minute device command; split it in two calls:
#   STEPS="tests sanitize ncu" bash bench/run_gpu.sh   # step timeouts 240 + 150 + 90 + 120 s
#   STEPS="bench autotune" bash bench/run_gpu.sh        # step timeouts 300 + 180 s
# (plus ~20 s of start-up each). The compile step needs no GPU (it compiles offline for sm_80/sm_90); run it
# here only with time to spare.
# Each step has its own timeout (*_TIMEOUT, seconds) and a missing tool (compute-sanitizer, ncu) skips its
# step with a note. DRY_RUN=1 prints the commands instead of running them (no GPU needed; its files go to a
# temporary RESULTS directory).
#
#   sanitize: compute-sanitizer memcheck (PyTorch's caching allocator off, so out-of-bounds accesses inside a
#             cached block are caught) and racecheck (shared memory) over the kernel tests, which use small
#             shapes -> <stem>.sanitizer.txt
#   ncu:      Nsight Compute on RoIAlign fwd/bwd, batched NMS and the mask loss at model shapes (bench/ncu_ops.py):
#             achieved DRAM bandwidth as % of peak, DRAM bytes, local-memory (spill) traffic, registers,
#             occupancy -> <stem>.ncu.csv and <stem>.ncu.md
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
STEPS=${STEPS:-"tests sanitize ncu bench autotune compile"}
DRY_RUN=${DRY_RUN:-0}
KERNEL_TESTS=${KERNEL_TESTS:-"tests/test_roi_align.py tests/test_nms.py tests/test_mask_loss.py tests/test_mask_targets.py"}

exec 3>&2
run() {  # echo a command (to the script's stderr, whatever the call redirects); run it unless DRY_RUN=1
  echo "+ $*" >&3
  [ "$DRY_RUN" = 1 ] || "$@"
}
find_tool() {  # PATH, then the usual CUDA install places
  command -v "$1" 2>/dev/null && return
  ls -d /usr/local/cuda/bin/"$1" /usr/local/cuda-*/bin/"$1" /opt/nvidia/nsight-compute/*/"$1" 2>/dev/null | tail -1
}
has() { [[ " $STEPS " == *" $1 "* ]]; }

if [ "$DRY_RUN" = 1 ]; then
  gpu=dry-run
  RESULTS=${RESULTS:-$(mktemp -d)}
else
  gpu=$($PY -c "import torch, re; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
fi
RESULTS=${RESULTS:-bench/results}
stem="${RESULTS}/${gpu}-$(date -u +%Y-%m-%d)"
mkdir -p "$RESULTS"
if [ "$DRY_RUN" != 1 ]; then
  $PY -c "import torch, triton, torchvision; print('torch', torch.__version__, 'triton', triton.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" | tee "${stem}.env.txt"
fi

if has tests; then
  run timeout "${TESTS_TIMEOUT:-240}" $PY -m pytest -q tests -p no:cacheprovider > "${stem}.tests.txt" 2>&1
  tail -40 "${stem}.tests.txt" 2>/dev/null
fi

if has sanitize; then
  san=$(find_tool compute-sanitizer)
  [ -z "$san" ] && [ "$DRY_RUN" = 1 ] && san=compute-sanitizer
  if [ -z "$san" ]; then
    echo "compute-sanitizer not found: sanitize step skipped" | tee "${stem}.sanitizer.txt"
  else
    : > "${stem}.sanitizer.txt"
    for tool in memcheck racecheck; do
      if [ "$tool" = memcheck ]; then t=${MEMCHECK_TIMEOUT:-150}; else t=${RACECHECK_TIMEOUT:-90}; fi
      echo "=== compute-sanitizer --tool $tool ($t s max) ===" >> "${stem}.sanitizer.txt"
      # shellcheck disable=SC2086
      run env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$t" "$san" --tool "$tool" --error-exitcode 9 --print-limit 50 \
        $PY -m pytest -q -x -p no:cacheprovider -m "not slow" $KERNEL_TESTS >> "${stem}.sanitizer.txt" 2>&1
      echo "exit status $? (9: errors found, 124: timed out)" >> "${stem}.sanitizer.txt"
    done
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|exit status|passed|failed" "${stem}.sanitizer.txt" 2>/dev/null | tail -12
  fi
fi

if has ncu; then
  ncu_bin=$(find_tool ncu)
  [ -z "$ncu_bin" ] && [ "$DRY_RUN" = 1 ] && ncu_bin=ncu
  if [ -z "$ncu_bin" ]; then
    echo "ncu not found: ncu step skipped" | tee "${stem}.ncu.md"
  else
    read -r metrics kernels_re < <($PY bench/ncu_ops.py --print-metrics)
    run timeout "${NCU_TIMEOUT:-120}" "$ncu_bin" --profile-from-start off --target-processes all \
      --kernel-name "$kernels_re" --metrics "$metrics" --csv $PY bench/ncu_ops.py > "${stem}.ncu.csv" 2> "${stem}.ncu.err"
    echo "ncu exit status $?" >> "${stem}.ncu.err"
    run $PY bench/ncu_ops.py --summarize "${stem}.ncu.csv" --out "${stem}.ncu.md" || tail -5 "${stem}.ncu.err"
  fi
fi

if has bench; then
  run timeout "${BENCH_TIMEOUT:-300}" $PY -m pytest -q bench -p no:cacheprovider --benchmark-json="${stem}.json" 2>&1 | tail -15
  run $PY bench/report.py "${stem}.json" --out "${stem}.md" --plot "${stem}.png" && cat "${stem}.md" 2>/dev/null
fi
if has autotune; then run timeout "${AUTOTUNE_TIMEOUT:-180}" $PY bench/autotune.py --shapes maskrcnn; fi
if has compile; then
  run timeout "${COMPILE_TIMEOUT:-300}" $PY bench/compile_report.py --json "${stem}.compile.json" > "${stem}.compile.txt"
  tail -3 "${stem}.compile.txt" 2>/dev/null
fi
if [ -n "${OUT:-}" ] && [ "$DRY_RUN" != 1 ]; then cp "${stem}".* "$OUT"/ 2>/dev/null; cp kernels/configs/*.json "$OUT"/ 2>/dev/null; fi
true
