#!/usr/bin/env bash
# One command for a lent GPU, sized for one device call inside a 15-minute lease (the machine's start is
# counted too, and no second machine starts with under 4 minutes left): the steps run in order of what
# matters most, each under its own cap, and all of them under DEADLINE seconds of wall time; a step that
# no longer fits is skipped with a note. pytest steps are stopped with SIGINT (then KILL 15 s later), so
# pytest still writes its summary and pytest-benchmark its JSON for what finished. After every step the results so far are packed into
# $OUT/results.tgz, so a call stopped at its limit still brings back what finished.
#
#   device run:  bash bench/run_gpu.sh         with timeout_s = DEADLINE + 60 (default DEADLINE 520)
#
# Steps (STEPS picks a subset; the default is the first seven, in this order):
#   warm          fills Triton's on-disk cache in parallel on every CPU core: the compile audit
#                 (bench/compile_report.py) compiles, for this GPU's compute capability, every kernel variant the
#                 ops launch at Mask R-CNN shapes and a small model step launches (80 + 22 at 2026-12-06), with the
#                 JIT's own specialization and cache key, so later steps load them instead of compiling one
#                 at a time (~1.1 s each); timing.txt counts the compiles each step still made
#   gpu           the @pytest.mark.gpu tests: CUDA-graph capture = eager, channels-last training, ...
#   bench-kernels every kernel vs torchvision at Mask R-CNN shapes (+ bytes moved: % of HBM roofline)
#   bench-model   training step and inference img/s: ours eager, CUDA graphs, torchvision (batch 8, 800x1216)
#   memcheck      compute-sanitizer memcheck (PyTorch's caching allocator off, so an out-of-bounds access
#                 inside a cached block is caught) over the kernel tests' small shapes
#   ncu           Nsight Compute on RoIAlign fwd/bwd, batched NMS and the mask loss at model shapes
#                 (bench/ncu_ops.py): DRAM % of peak, DRAM bytes, local-memory traffic, registers, occupancy
#   tests         the rest of the test suite on CUDA (kernel files first), pytest-xdist when installed
# and, only when named: racecheck (compute-sanitizer, shared memory), bench-compiled (the inductor-compiled
# model entries: several minutes of compilation at 800x1216), autotune (kernels/configs/<gpu>.json),
# compile (the offline audit; needs no GPU).
#
# Packages the GPU image lacks (pycocotools) travel as wheels: `make gpu-wheels` here fills .whl/, the
# device call carries it (carry: [".whl"]) and this script installs them into /tmp/site first.
# DRY_RUN=1 prints the commands instead of running them (no GPU needed; files go to a temporary RESULTS).
# Results: bench/results/<gpu>-<date>.* (bench .json/.md/.png, gpu/tests/sanitizer .txt, ncu .csv/.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
STEPS=${STEPS:-"warm gpu bench-kernels bench-model memcheck ncu tests"}
DEADLINE=${DEADLINE:-520}
DRY_RUN=${DRY_RUN:-0}
KERNEL_TESTS=${KERNEL_TESTS:-"tests/test_roi_align.py tests/test_nms.py tests/test_mask_loss.py tests/test_mask_targets.py"}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bench/*.py scripts import kernels from the checkout
export PYTHONUNBUFFERED=1  # a step killed at its cap still leaves every line it printed in its .txt
# a test still running after 90 s gets every thread's stack dumped into the step's .txt (and keeps running):
# a hang inside C++ (a collective, a driver call) then says where it is even though SIGINT cannot stop it
export PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} -o faulthandler_timeout=90"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}  # Triton's default, named so steps can count it
mkdir -p "$TRITON_CACHE_DIR" 2>/dev/null

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
# The time plan. Each step's cap includes compiling its kernels from a cold cache, measured offline
# (bench/compile_report.py --scope gates --targets 90 --jobs 1, empty TRITON_CACHE_DIR, 2026-12-06, quiet 2-core CPU:
# 1.06 s median per kernel variant, 1.69 s max, 44 variants in 46.5 s; 1.1 s used below). COMPILES is how many variants a step
# launches that the warm step does not cover, or all of them if the warm step misses (cache key mismatch).
S_PER_COMPILE=1.1
cap_of() {
  case $1 in
    warm) echo 60 ;;            # capture ~25 s + 102 variants x 1.1 s / 16 cores
    gpu) echo 135 ;;            # ~100 s of tests + ~30 variants (tiny models fp32/bf16, box-head RoIAlign) cold
    bench-kernels) echo 120 ;;  # ~30 s of timing + 80 variants cold (0 when warm)
    bench-model) echo 150 ;;    # ~125 s (3 models, CUDA graphs) + 22 variants cold
    bench-compiled) echo 400 ;;
    memcheck | racecheck) echo 70 ;;
    ncu) echo 60 ;;
    tests) echo 600 ;;
    autotune) echo 180 ;;
    compile) echo 300 ;;
    *) echo 0 ;;
  esac
}
compiles_of() {  # kernel variants a step compiles from a cold cache (see cap_of)
  case $1 in
    warm) echo 102 ;; gpu) echo 30 ;; bench-kernels) echo 80 ;; bench-model) echo 22 ;; *) echo "?" ;;
  esac
}
print_plan() {  # the time plan: cap per step, what compiling costs cold, where DEADLINE cuts
  local at=0 cap c
  echo "time plan (DEADLINE ${DEADLINE} s; a cap includes compilation; ${S_PER_COMPILE} s per cold compile):" >&3
  for s in $STEPS; do
    cap=$(cap_of "$s")
    c=$(compiles_of "$s")
    local cores=1
    [ "$s" = warm ] && cores=$(nproc)  # the warm step compiles on every core at once
    if [ "$c" = "?" ]; then c="n/a"; else
      c="$c variants ~$(awk "BEGIN{printf \"%d\", $c*$S_PER_COMPILE/$cores}") s cold on $cores core(s)"; fi
    at=$((at + cap))
    printf '  %-14s cap %4d s  ends by %4d s%s  compile: %s\n' "$s" "$cap" "$at" \
      "$([ "$at" -gt "$DEADLINE" ] && echo " (cut to what is left)")" "$c" >&3
  done
}
begin() {  # begin NAME CAP: sets T, the step's timeout (its cap, cut to what DEADLINE leaves); false = skip
  local left=$((DEADLINE - SECONDS - 30))  # room for a step's own 15 s of grace after its timeout
  T=$(($2 < left ? $2 : left))
  if [ "$T" -lt 20 ]; then
    echo "$1: skipped, ${left} s of DEADLINE=${DEADLINE} left" | tee -a "${stem}.skipped.txt" >&3
    return 1
  fi
  echo "=== $1 (${T} s max, $((SECONDS)) s elapsed) ===" >&3
  STEP=$1 STEP_T0=$SECONDS STEP_C0=$(cache_entries)
}
cache_entries() { find "${TRITON_CACHE_DIR}" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l; }
save() {  # everything so far into $OUT (device tool), newest bench table beside it for a quick look
  if [ -n "${STEP:-}" ] && [ "$DRY_RUN" != 1 ]; then  # what the step took, and how many kernels it compiled
    echo "$STEP: $((SECONDS - STEP_T0)) s of cap $(cap_of "$STEP") s, $(($(cache_entries) - STEP_C0)) new Triton cache entries" \
      | tee -a "${stem}.timing.txt" >&3
  fi
  STEP=""
  [ -n "${OUT:-}" ] && [ "$DRY_RUN" != 1 ] || return 0
  tar czf "$OUT/results.tgz" "${stem}".* kernels/configs/*.json 2>/dev/null
  [ -f "${stem}.md" ] && cp "${stem}.md" "$OUT/bench.md"
  return 0
}

if [ "$DRY_RUN" = 1 ]; then
  gpu=dry-run
  RESULTS=${RESULTS:-$(mktemp -d)}
else
  if compgen -G ".whl/*.whl" > /dev/null && ! $PY -c "import pycocotools" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  gpu=$($PY -c "import torch, re; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
fi
RESULTS=${RESULTS:-bench/results}
stem="${RESULTS}/${gpu}-$(date -u +%Y-%m-%d)"
mkdir -p "$RESULTS"
if [ "$DRY_RUN" != 1 ]; then
  $PY -c "import torch, triton, torchvision; print('torch', torch.__version__, 'triton', triton.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" | tee "${stem}.env.txt"
  $PY -c "import pycocotools" 2>/dev/null || echo "pycocotools missing: tests that evaluate COCO AP fail (make gpu-wheels, carry .whl)" | tee -a "${stem}.env.txt"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv >> "${stem}.env.txt" 2>&1
fi
XDIST=""
[ "$DRY_RUN" = 1 ] || ! $PY -c "import xdist" 2>/dev/null || XDIST="-n ${XDIST_WORKERS:-8}"

bench_report() {
  local files=()
  for f in "${stem}".kernels.json "${stem}".model.json "${stem}".compiled.json; do [ -f "$f" ] && files+=("$f"); done
  [ "$DRY_RUN" = 1 ] && files=("${stem}.kernels.json")
  [ "${#files[@]}" -gt 0 ] && run $PY bench/report.py "${files[@]}" --out "${stem}.md" --plot "${stem}.png"
}
bench_step() {  # bench_step NAME CAP JSON_SUFFIX PYTEST_ARGS...
  local name=$1 cap=$2 suffix=$3
  shift 3
  begin "$name" "$cap" || return 0
  run timeout -s INT -k 15 "$T" $PY -m pytest -q -p no:cacheprovider "$@" --benchmark-json="${stem}.${suffix}.json" \
    > "${stem}.${name}.txt" 2>&1
  tail -15 "${stem}.${name}.txt" 2>/dev/null
  bench_report && [ "$DRY_RUN" != 1 ] && cat "${stem}.md"
  save
}
sanitizer() {  # sanitizer TOOL CAP
  begin "$1" "$2" || return 0
  local san
  san=$(find_tool compute-sanitizer)
  [ -z "$san" ] && [ "$DRY_RUN" = 1 ] && san=compute-sanitizer
  if [ -z "$san" ]; then
    echo "compute-sanitizer not found: $1 skipped" | tee -a "${stem}.sanitizer.txt"
    return 0
  fi
  echo "=== compute-sanitizer --tool $1 ($T s max) ===" >> "${stem}.sanitizer.txt"
  # shellcheck disable=SC2086
  run env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 15 "$T" "$san" --tool "$1" --error-exitcode 9 --print-limit 50 \
    $PY -m pytest -q -x -p no:cacheprovider -m "triton and not slow" $KERNEL_TESTS >> "${stem}.sanitizer.txt" 2>&1
  echo "exit status $? (9: errors found, 124: timed out; errors found before a time-out are listed above)" \
    >> "${stem}.sanitizer.txt"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|exit status|passed|failed" "${stem}.sanitizer.txt" 2>/dev/null | tail -6
  save
}

print_plan
for step in $STEPS; do
  case $step in
    warm)
      begin warm "$(cap_of warm)" || continue
      cc=90
      [ "$DRY_RUN" = 1 ] || cc=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)")
      run timeout -s INT -k 15 "$T" env -u TRITON_INTERPRET $PY bench/compile_report.py --model small --targets "$cc" \
        --jobs "$(nproc)" --json "${stem}.warm.json" > "${stem}.warm.txt" 2>&1
      tail -3 "${stem}.warm.txt" 2>/dev/null
      save ;;
    gpu)
      begin gpu "$(cap_of gpu)" || continue
      run timeout -s INT -k 15 "$T" $PY -m pytest -q -p no:cacheprovider -m gpu -rs tests > "${stem}.gpu.txt" 2>&1
      tail -25 "${stem}.gpu.txt" 2>/dev/null
      save ;;
    bench-kernels) bench_step bench-kernels "$(cap_of bench-kernels)" kernels bench/test_bench_kernels.py ;;
    bench-model) bench_step bench-model "$(cap_of bench-model)" model bench/test_bench_model.py -k "not ours_compiled" ;;
    bench-compiled) bench_step bench-compiled "$(cap_of bench-compiled)" compiled bench/test_bench_model.py -k ours_compiled ;;
    memcheck | racecheck) sanitizer "$step" "$(cap_of "$step")" ;;
    ncu)
      begin ncu "$(cap_of ncu)" || continue
      ncu_bin=$(find_tool ncu)
      [ -z "$ncu_bin" ] && [ "$DRY_RUN" = 1 ] && ncu_bin=ncu
      if [ -z "$ncu_bin" ]; then
        echo "ncu not found: ncu step skipped" | tee "${stem}.ncu.md"
        continue
      fi
      read -r metrics kernels_re < <($PY bench/ncu_ops.py --print-metrics)
      run timeout -k 15 "$T" "$ncu_bin" --profile-from-start off --target-processes all \
        --kernel-name "$kernels_re" --metrics "$metrics" --csv $PY bench/ncu_ops.py > "${stem}.ncu.csv" 2> "${stem}.ncu.err"
      echo "ncu exit status $?" >> "${stem}.ncu.err"
      run $PY bench/ncu_ops.py --summarize "${stem}.ncu.csv" --out "${stem}.ncu.md" || tail -5 "${stem}.ncu.err"
      save ;;
    tests)
      begin tests "$(cap_of tests)" || continue
      # shellcheck disable=SC2086
      run timeout -s INT -k 15 "$T" $PY -m pytest -q -p no:cacheprovider $XDIST -m "not gpu" $KERNEL_TESTS tests \
        > "${stem}.tests.txt" 2>&1
      tail -30 "${stem}.tests.txt" 2>/dev/null
      save ;;
    autotune)
      begin autotune "$(cap_of autotune)" || continue
      run timeout -k 15 "$T" $PY bench/autotune.py --shapes maskrcnn
      save ;;
    compile)
      begin compile "$(cap_of compile)" || continue
      run timeout -k 15 "$T" $PY bench/compile_report.py --json "${stem}.compile.json" > "${stem}.compile.txt"
      tail -3 "${stem}.compile.txt" 2>/dev/null
      save ;;
    *) echo "unknown step $step (known: warm gpu bench-kernels bench-model bench-compiled memcheck racecheck ncu tests autotune compile)" >&3 ;;
  esac
done
echo "done in ${SECONDS} s (DEADLINE ${DEADLINE})" >&3
save
true
