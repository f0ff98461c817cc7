#!/usr/bin/env bash
# Where the GPU time goes in the rows the first H200 window (2026-12-04, benchmarks/results/gpu/) measured below
# the best reference: one command for a GPU window after gpu_validate.sh, sized for one 10-minute call.
#
#   benchmarks/gpu_profile.sh              # on the GPU machine: results in $OUT, else benchmarks/results/local/
#
# Steps, each under its own time limit, results written as they go:
#   0. build, only if the extension has no CUDA kernels (as gpu_validate.sh builds; a carried prebuilt
#      pointins_ops/_C.cpython-312-x86_64-linux-gnu.so skips it);
#   1. pointins-1x1 on the CUDA backend through each path (POINTINS_CUDA_PATH=conv, then =pointwise): its 14x14
#      templates are below the 1024 pixels from which the pointwise (grouped-GEMM) path is taken, and the conv
#      path measured 0.36x (float32) and 0.58x (bfloat16) of einsum's speed -> ab-1x1.md;
#   2. torch.profiler on forward calls: pointins-infer with Triton and CUDA (Triton measured 224 us a forward,
#      CUDA 25 us: host time against device time), pointins-train with CUDA (an index: its value check reads
#      the data, one device sync a call, then the bucketing kernel; a tiny call with an index cost 76 us against
#      pointins-infer's 25 us without one) -> torch-profiler.txt;
#   3. Nsight Compute (--clock-control none: the card's clocks stay as they are) on one bfloat16 call of
#      pointins-train (forward+backward) and pointins-1x1 (forward), CUDA backend: per kernel duration, memory and
#      compute throughput, occupancy, registers, shared memory -> ncu.txt;
#   4. the benchmarks no window has run yet: pointins-dw (CUDA, Triton), then pointins-1x1, solov2, yolact on
#      Triton -> benchmarks.md.
# Everything printed also goes to profile.log. At most 5 files. Exit status 0 when every step that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INDEX=1

started=$(date +%s)
deadline=$((started + ${POINTINS_PROFILE_BUDGET_S:-540}))
out_dir="${OUT:-benchmarks/results/local/gpu-profile-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out_dir" && out_dir="$(cd "$out_dir" && pwd)"
log="$out_dir/profile.log"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-profile.XXXXXX")"
status=0

say() { echo "== gpu_profile: $* ($(( $(date +%s) - started )) s)" | tee -a "$log"; }
left() { echo $(( deadline - $(date +%s) )); }
# limit CAP RESERVE: at most CAP seconds, keeping RESERVE for what follows; 0 under 15 s.
limit() {
  local cap=$1 room=$(( $(left) - $2 ))
  (( room < cap )) && cap=$room
  (( cap < 15 )) && cap=0
  echo "$cap"
}
check() {  # NAME RC
  if (( $2 != 0 )); then say "$1: FAILED (rc $2)"; status=1; else say "$1: done"; fi
}

if ! python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  say "torch sees no CUDA device: nothing to profile"
  exit 1
fi

# --- 0. build if needed ----------------------------------------------------------------------------------------
if ! python3 -c 'import pointins_ops as p, sys; sys.exit("cuda" not in p.available_backends("cuda"))' 2>/dev/null; then
  arch="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"
  seconds=$(limit 200 300)
  say "build: TORCH_CUDA_ARCH_LIST=$arch python3 -m pip install --no-build-isolation --no-deps -e . (limit $seconds s)"
  TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS="$(nproc)" timeout -k 10 "$seconds" \
    python3 -m pip install --no-build-isolation --no-deps -e . >>"$log" 2>&1
  check build $?
fi
python3 -c 'import torch, pointins_ops as p, triton
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0), p.available_backends("cuda"))' 2>&1 \
  | tee -a "$log"

bench() {  # OUTPUT-NAME LIMIT ARGS...: one benchmark run, its results.md appended to OUTPUT-NAME
  local name=$1 seconds=$2 rc
  shift 2
  say "python3 -m benchmarks --device cuda --no-plot --no-progress --op-only $* (limit $seconds s)"
  timeout -s INT -k 10 "$seconds" python3 -m benchmarks --device cuda --no-plot --no-progress --op-only "$@" \
    --output "$work/run" >>"$log" 2>&1
  rc=$?
  [[ -f "$work/run/results.md" ]] && { cat "$work/run/results.md"; echo; } >>"$out_dir/$name"
  rm -rf "$work/run"
  return $rc
}

# --- 1. pointins-1x1 through each CUDA path ----------------------------------------------------------------------
for path in conv pointwise; do
  seconds=$(limit 60 330)
  (( seconds == 0 )) && { say "1x1 $path: no time left"; continue; }
  POINTINS_CUDA_PATH=$path bench ab-1x1.md "$seconds" --backend cuda --scenario pointins-1x1
  check "pointins-1x1 with POINTINS_CUDA_PATH=$path" $?
done

# --- 2. host and device time of pointins-infer --------------------------------------------------------------------
for target in "pointins-infer triton" "pointins-infer cuda" "pointins-train cuda"; do
  read -r scenario backend <<<"$target"
  seconds=$(limit 45 250)
  (( seconds == 0 )) && { say "torch.profiler $target: no time left"; continue; }
  say "torch.profiler: $scenario forward, backend $backend"
  { echo "### $scenario, bfloat16 forward, backend $backend"; echo; } >>"$out_dir/torch-profiler.txt"
  timeout -k 5 "$seconds" python3 -m benchmarks.profile_op --scenario "$scenario" --backend "$backend" \
    --mode forward --calls 20 --torch-profiler >>"$out_dir/torch-profiler.txt" 2>&1
  check "torch.profiler $target" $?
done

# --- 3. Nsight Compute ----------------------------------------------------------------------------------------------
ncu="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | tail -n 1)"
if [[ -z "$ncu" ]]; then
  say "ncu: not found"
else
  for target in "pointins-train forward+backward" "pointins-1x1 forward"; do
    read -r scenario mode <<<"$target"
    seconds=$(limit 90 150)
    (( seconds == 0 )) && { say "ncu $scenario: no time left"; continue; }
    say "ncu: $scenario $mode, bfloat16, backend cuda (limit $seconds s)"
    { echo "### ncu: $scenario, bfloat16 $mode, backend cuda"; echo; } >>"$out_dir/ncu.txt"
    timeout -k 5 "$seconds" "$ncu" --clock-control none --profile-from-start off --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      python3 -m benchmarks.profile_op --scenario "$scenario" --backend cuda --dtype bfloat16 --mode "$mode" \
      --calls 1 >>"$out_dir/ncu.txt" 2>&1
    check "ncu $scenario" $?
  done
fi

# --- 4. benchmarks no window has run -------------------------------------------------------------------------------
for run in "cuda pointins-dw" "triton pointins-dw" "triton pointins-1x1" "triton solov2" "triton yolact"; do
  read -r backend scenario <<<"$run"
  seconds=$(limit 60 5)
  (( seconds < 30 )) && { say "benchmark $scenario $backend: no time left"; continue; }
  bench benchmarks.md "$seconds" --backend "$backend" --scenario "$scenario"
  check "benchmark $scenario $backend" $?
done

say "wrote $(ls "$out_dir" | tr '\n' ' ')to $out_dir; exit status $status"
rm -rf "$work"
exit $status
