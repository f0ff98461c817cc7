#!/usr/bin/env bash
# One command to validate the package on a fresh GPU machine (torch preinstalled, no network):
#   1. build the extension in place for this card (pip install --no-build-isolation --no-deps -e .),
#   2. run the whole test suite on it (python -m pytest tests),
#   3. run the op benchmarks (python -m benchmarks --device cuda),
# writing every log, the benchmark tables and a summary (card, versions, date, step results) to $OUT when it
# is set, else to benchmarks/results/<date>-<card>/. Each step has a timeout; the whole run stays under
# POINTINS_VALIDATE_BUDGET_S seconds (default 570, for a 10-minute slot on an H100).
#
#   benchmarks/gpu_validate.sh                 # everything
#   OUT=/some/folder benchmarks/gpu_validate.sh
#
# Exit status: 0 when the build, the tests and the benchmarks all passed; 1 otherwise (every step still runs
# if it can, so one failure does not hide the others).
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INDEX=1 PYTHONUNBUFFERED=1

started=$(date +%s)
budget="${POINTINS_VALIDATE_BUDGET_S:-570}"
deadline=$((started + budget))
remaining() { echo $((deadline - $(date +%s))); }
# timeout for a step: its cap, or what is left before the deadline less a reserve for the steps after it
step_limit() {
  local cap=$1 reserve=$2 left
  left=$(( $(remaining) - reserve ))
  (( left < cap )) && cap=$left
  (( cap < 10 )) && cap=10
  echo "$cap"
}

card="$(python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu")' \
  2>/dev/null || echo unknown)"
card_slug="$(echo "$card" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9\n' '-' | sed -E 's/-+/-/g; s/^-|-$//g')"
out_dir="${OUT:-benchmarks/results/$(date -u +%Y-%m-%d)-${card_slug}}"
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
summary="$out_dir/summary.md"
status=0

log_step() {  # name, seconds, rc
  local verdict="passed"
  if [[ $3 -eq 124 || $3 -eq 137 ]]; then verdict="TIMED OUT"; elif [[ $3 -ne 0 ]]; then verdict="FAILED (rc $3)"; fi
  echo "| $1 | $verdict | $2 s |" >>"$summary.steps"
  echo "== $1: $verdict in $2 s"
  [[ $3 -ne 0 ]] && status=1
  return 0
}

# --- environment -----------------------------------------------------------------------------------------
python - >"$out_dir/environment.json" <<'EOF'
import datetime, json, platform, shutil, subprocess
import torch
def version(module):
    try:
        return __import__(module).__version__
    except Exception as error:  # noqa: BLE001 (reported, not fatal)
        return f"unavailable ({type(error).__name__})"
def run(*command):
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001
        return None
info = {
    "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
    "torch_cuda": torch.version.cuda, "triton": version("triton"), "numpy": version("numpy"),
    "cuda_available": torch.cuda.is_available(),
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if torch.cuda.is_available() else None,
    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    if torch.cuda.is_available() else None,
    "driver": run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
    "nvcc": shutil.which("nvcc") and run("nvcc", "--version"),
    "git_commit": run("git", "rev-parse", "HEAD"), "git_dirty": bool(run("git", "status", "--porcelain")),
}
print(json.dumps(info, indent=2))
EOF
cat "$out_dir/environment.json"
: >"$summary.steps"

# --- 1. build ----------------------------------------------------------------------------------------------
arch="$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null || true)"
if [[ -z "$arch" ]]; then
  echo "gpu_validate: torch sees no CUDA device; nothing to validate" | tee "$out_dir/build.log"
  exit 1
fi
export TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if ! command -v nvcc >/dev/null && [[ -z "${CUDA_HOME:-}" && ! -x /usr/local/cuda/bin/nvcc ]]; then
  # Without a CUDA compiler the extension can only be built for the CPU: the CUDA tests then fail loudly
  # (test_cuda_kernel_is_built) and the rest still runs.
  echo "gpu_validate: no nvcc on PATH, CUDA_HOME unset and no /usr/local/cuda: building without CUDA kernels" \
    | tee -a "$out_dir/build.log"
  export FORCE_CUDA=0
fi
t0=$(date +%s)
echo "== build: TORCH_CUDA_ARCH_LIST=$arch (pip install --no-build-isolation --no-deps -e .)"
POINTINS_PTXAS_VERBOSE=1 timeout "$(step_limit 300 330)" \
  pip install --no-build-isolation --no-deps -v -e . >>"$out_dir/build.log" 2>&1
rc=$?
if [[ $rc -ne 0 && $rc -ne 124 ]]; then  # e.g. a pip without editable-wheel support: build in place instead
  echo "gpu_validate: pip install failed (rc $rc); trying python setup.py build_ext --inplace" \
    | tee -a "$out_dir/build.log"
  POINTINS_PTXAS_VERBOSE=1 timeout "$(step_limit 300 330)" \
    python setup.py build_ext --inplace >>"$out_dir/build.log" 2>&1
  rc=$?
fi
log_step "build (sm_${arch/./})" $(( $(date +%s) - t0 )) $rc
grep -E "spill stores|Used [0-9]+ registers" "$out_dir/build.log" >"$out_dir/ptxas.txt" || true
python -c 'import pointins_ops as p; print("available backends on cuda:", p.available_backends("cuda"))' \
  2>&1 | tee -a "$out_dir/build.log"

# --- 2. tests ----------------------------------------------------------------------------------------------
t0=$(date +%s)
echo "== tests: python -m pytest tests"
timeout "$(step_limit 300 150)" python -m pytest tests -q -rfEs -p no:cacheprovider --durations=15 \
  --junitxml="$out_dir/tests.xml" >"$out_dir/tests.log" 2>&1
rc=$?
log_step "tests" $(( $(date +%s) - t0 )) $rc
tail -n 5 "$out_dir/tests.log"

# --- 3. benchmarks -----------------------------------------------------------------------------------------
t0=$(date +%s)
echo "== benchmarks: python -m benchmarks --device cuda --out $out_dir"
timeout "$(step_limit 600 20)" python -m benchmarks --device cuda --out "$out_dir" --no-progress \
  >"$out_dir/benchmarks.log" 2>&1
rc=$?
log_step "benchmarks" $(( $(date +%s) - t0 )) $rc

# --- summary -----------------------------------------------------------------------------------------------
{
  echo "# gpu_validate: $card, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo '```json'
  cat "$out_dir/environment.json"
  echo '```'
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  cat "$summary.steps"
  echo
  echo "Tests: \`$(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$out_dir/tests.log" | tail -n 1)\`"
  echo
  if [[ -f "$out_dir/results.md" ]]; then cat "$out_dir/results.md"; else echo "No benchmark table (see benchmarks.log)."; fi
  echo
  echo "Total: $(( $(date +%s) - started )) s. Logs: build.log, ptxas.txt, tests.log, tests.xml, benchmarks.log."
} >"$summary"
rm -f "$summary.steps"
echo "gpu_validate: wrote $out_dir (summary.md); exit status $status"
exit $status
