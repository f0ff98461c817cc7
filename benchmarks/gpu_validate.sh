#!/usr/bin/env bash
# One command that validates the package on a GPU machine, sized for one 10-minute command of the device tool
# (its image: python3 3.12 in its own venv, torch 2.11, triton 3.6, no network, no faster-coco-eval):
#
#   benchmarks/gpu_validate.sh               # on the GPU machine: results in $OUT, else benchmarks/results/local/
#   benchmarks/gpu_validate.sh --rehearse    # on a machine without a GPU, in a venv of the GPU machine's stack
#
# Steps, each under its own time limit, each writing its results as it goes (a step that is killed still leaves
# what it did, and a step that finds no time left is recorded as skipped):
#   1. environment, then build for the card: python3 -m pip install --no-build-isolation --no-deps -e .
#      with TORCH_CUDA_ARCH_LIST set to the card's compute capability (ptxas report kept);
#   2. CUDA op tests (tests/test_cuda.py);
#   3. Triton op tests (tests/test_triton.py, tests/test_compat.py), in parallel when pytest-xdist is there:
#      the targeted tests first, then the random sweep (each new shape is a Triton compile there);
#   4. model and training tests (tests/test_model.py, tests/test_train_eval.py; training runs on the GPU);
#   5. the benchmarks, one backend and one scenario per process (python3 -m benchmarks --device cuda
#      --backend B --scenario S), most important first, until the time is spent; the model-level and fixed-cost
#      rows (the same in every run) only in each backend's first run, --op-only after it.
#      POINTINS_VALIDATE_SCENARIOS="s1 s2 ..." sets the scenarios and their order (default: all, pointins-train
#      first), e.g. to measure first what the last window had no time for.
# The whole run stays under POINTINS_VALIDATE_BUDGET_S seconds (default 540: a 600 s command, less a margin).
#
# Results: at most 8 files (all the device tool returns), rewritten after every step:
#   summary.md (versions, card, step table, test counts, every benchmark table), build.log, test-cuda.log,
#   test-triton.log, test-triton-sweep.log, test-model.log, benchmarks.log, results.tar.gz (environment.json,
#   ptxas.txt, the JUnit XML of each test step, each benchmark run's results.md/csv/json).
#
# Python packages the image lacks travel as wheels: wheels in ${POINTINS_WHEELS:-.whl}/ are installed (into a
# temporary folder on PYTHONPATH) before anything else. Without faster-coco-eval, tests/test_train_eval.py is
# skipped; and pyproject.toml's metadata needs setuptools >= 77 (torch 2.11 wants < 82), which the image's own
# setuptools was never checked against. So fetch both here first and name .whl in the device tool's carry (2 MB):
#   echo /.whl/ >>.git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl faster-coco-eval==1.8.0 setuptools==81.0.0
#
# POINTINS_VALIDATE_PREBUILT=1 skips the build (~110 s of a window) when a carried extension built from this tree for
# the image's stack loads with its CUDA kernels; see step 1 below for how it is used.
#
# --rehearse (or POINTINS_VALIDATE_REHEARSE=1) runs every step on the CPU, with the same commands, skipping only
# what needs a GPU: the build still compiles the CUDA kernels for sm_90 (when nvcc is there), the tests run
# (the CUDA ones skip themselves), and the benchmark loop runs --quick on the CPU backend. CI runs it.
#
# Exit status: 0 when every step passed; 1 otherwise (every step still runs if it can).
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INDEX=1 PYTHONUNBUFFERED=1

rehearse="${POINTINS_VALIDATE_REHEARSE:-0}"
for arg in "$@"; do
  case "$arg" in
    --rehearse) rehearse=1 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_validate: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

started=$(date +%s)
if [[ "$rehearse" == 1 ]]; then
  # The CPU is far slower than the GPU machine's 16 cores: the limits only guard the GPU window.
  budget="${POINTINS_VALIDATE_BUDGET_S:-3000}" scale=5
else
  budget="${POINTINS_VALIDATE_BUDGET_S:-540}" scale=1
fi
deadline=$((started + budget))

out_dir="${OUT:-benchmarks/results/local/gpu-validate-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out_dir" && out_dir="$(cd "$out_dir" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-validate.XXXXXX")"  # what goes into results.tar.gz
steps="$work/steps.md"
: >"$steps"
status=0
bench_runs=()

# --- bookkeeping -------------------------------------------------------------------------------------------------
pack() {  # results.tar.gz, replaced whole so that a kill never leaves half an archive behind
  tar -czf "$work.tar.gz" -C "$work" --exclude steps.md . 2>/dev/null && mv -f "$work.tar.gz" "$out_dir/results.tar.gz"
}

summarize() {  # summary.md, rewritten after every step
  {
    local title="gpu_validate"
    [[ "$rehearse" == 1 ]] && title+=" (CPU rehearsal)"
    echo "# $title: ${card:-?}, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Budget $budget s; $(( $(date +%s) - started )) s so far."
    echo
    echo "| step | result | time | detail |"
    echo "|---|---|---|---|"
    cat "$steps"
    echo
    echo '```json'
    cat "$work/environment.json" 2>/dev/null
    echo '```'
    local run
    for run in "${bench_runs[@]}"; do  # in the order they ran
      [[ -f "$work/bench/$run/results.md" ]] || continue
      echo
      echo "## Benchmark: $run"
      echo
      cat "$work/bench/$run/results.md"
    done
  } >"$work/summary.tmp" && mv -f "$work/summary.tmp" "$out_dir/summary.md"
  pack
}

record() {  # name, seconds, rc, detail
  local verdict="passed"
  if [[ $3 == skip ]]; then verdict="skipped"
  elif [[ $3 -eq 124 || $3 -eq 137 ]]; then verdict="TIMED OUT"; status=1
  elif [[ $3 -ne 0 ]]; then verdict="FAILED (rc $3)"; status=1
  fi
  echo "| $1 | $verdict | $2 s | ${4:-} |" >>"$steps"
  echo "== $1: $verdict in $2 s ${4:-}"
  summarize
}

# limit CAP RESERVE: seconds for a step, at most CAP (times the rehearsal's scale), keeping RESERVE seconds for
# the steps after it; 0 when fewer than 15 seconds are left.
limit() {
  local cap=$(( $1 * scale )) left=$(( deadline - $(date +%s) - $2 ))
  (( left < cap )) && cap=$left
  (( cap < 15 )) && cap=0
  echo "$cap"
}

# pytest_step NAME LOG CAP RESERVE WORKERS DIST FILES...: WORKERS processes (pytest-xdist's --dist DIST) when
# pytest-xdist is installed; SIGINT at the limit, so that pytest still prints its summary.
pytest_step() {
  local name=$1 log=$2 cap=$3 reserve=$4 workers=$5 dist=$6 seconds rc t0
  shift 6
  seconds=$(limit "$cap" "$reserve")
  if (( seconds == 0 )); then record "$name" 0 skip "no time left"; return; fi
  local parallel=()
  if (( workers > 1 )) && python3 -c "import xdist" 2>/dev/null; then parallel=(-n "$workers" --dist "$dist"); fi
  echo "== $name: python3 -m pytest $* ${parallel[*]} (limit $seconds s)"
  t0=$(date +%s)
  timeout -s INT -k 20 "$seconds" python3 -m pytest "$@" "${parallel[@]}" -v -rfEs -p no:cacheprovider \
    --durations=10 --junitxml="$work/$(basename "$log" .log).xml" >"$out_dir/$log" 2>&1
  rc=$?
  record "$name" $(( $(date +%s) - t0 )) "$rc" "$(grep -E '^=+ .*[0-9]+ (passed|failed|skipped|errors?|deselected)' \
    "$out_dir/$log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')"
}

# --- 0. wheels the image lacks -----------------------------------------------------------------------------------
wheels="${POINTINS_WHEELS:-.whl}"
if compgen -G "$wheels/*.whl" >/dev/null; then
  site="$work-site"
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_validate: installed $(cd "$wheels" && ls ./*.whl | tr '\n' ' ')into $site"
  else
    echo "gpu_validate: could not install the wheels in $wheels" >&2
  fi
fi

# --- 1. environment and build ------------------------------------------------------------------------------------
python3 - >"$work/environment.json" <<'EOF'
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

cuda = torch.cuda.is_available()
info = {
    "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "host": platform.node(), "cpus": __import__("os").cpu_count(), "python": platform.python_version(),
    "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": version("triton"),
    "torchvision": version("torchvision"), "numpy": version("numpy"), "faster_coco_eval": version("faster_coco_eval"),
    "cuda_available": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "capability": "%d.%d" % torch.cuda.get_device_capability(0) if cuda else None,
    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
    "driver": run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") if shutil.which("nvidia-smi")
    else None,
    "nvcc": (run("nvcc", "--version") or "").splitlines()[-1:] if shutil.which("nvcc") else None,
    "git_commit": run("git", "rev-parse", "HEAD"), "git_dirty": bool(run("git", "status", "--porcelain")),
}
print(json.dumps(info, indent=2))
EOF
environment() {  # a field of environment.json, or $2 when it is empty or python3 with torch failed
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]] or sys.argv[3])' \
    "$work/environment.json" "$1" "$2" 2>/dev/null || echo "$2"
}
card="$(environment gpu "no GPU")"
arch="$(environment capability "")"
echo "gpu_validate: $card; python3 is $(command -v python3)"
if [[ -z "$arch" ]]; then
  if [[ "$rehearse" != 1 ]]; then
    echo "gpu_validate: torch sees no CUDA device: nothing to validate (--rehearse runs the CPU rehearsal)" \
      | tee "$out_dir/build.log"
    record "environment" 0 1 "no CUDA device"
    exit 1
  fi
  arch=9.0  # the H200's: the rehearsal compiles what the window will
fi

export TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" POINTINS_PTXAS_VERBOSE=1
if ! command -v nvcc >/dev/null && [[ -z "${CUDA_HOME:-}" && ! -x /usr/local/cuda/bin/nvcc ]]; then
  # Without a CUDA compiler the extension has only its CPU kernels: on a GPU, test_cuda_kernel_is_built fails.
  echo "gpu_validate: no nvcc on PATH, CUDA_HOME unset and no /usr/local/cuda: building without CUDA kernels" \
    | tee -a "$out_dir/build.log"
  export FORCE_CUDA=0
else
  export FORCE_CUDA=1
fi
seconds=$(limit 200 360)
t0=$(date +%s)
# POINTINS_VALIDATE_PREBUILT=1: the extension was built elsewhere for this image's Python and torch and carried
# (pointins_ops/_C.cpython-312-x86_64-linux-gnu.so, built from this very tree): no build here, the package is
# imported from the tree (PYTHONPATH, for the subprocesses too). Without CUDA kernels in it (or on the CPU
# rehearsal, without an importable one) it is built as usual.
prebuilt=0
if [[ "${POINTINS_VALIDATE_PREBUILT:-0}" == 1 ]] && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 -c '
import sys, pointins_ops as p
sys.exit(0 if "cuda" in p.available_backends("cuda") or (sys.argv[1] == "1" and p._C is not None) else 1)' \
    "$rehearse" >>"$out_dir/build.log" 2>&1; then
  prebuilt=1
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "== build: skipped, POINTINS_VALIDATE_PREBUILT=1 and the carried extension loads:" \
    "$(ls -l "$(python3 -c 'import pointins_ops._C as c; print(c.__file__)' 2>&1)" 2>&1)" | tee -a "$out_dir/build.log"
  rc=0
else
  echo "== build: TORCH_CUDA_ARCH_LIST=$arch FORCE_CUDA=$FORCE_CUDA python3 -m pip install --no-build-isolation" \
    "--no-deps -e . (limit $seconds s)"
  timeout -k 10 "$seconds" python3 -m pip install --no-build-isolation --no-deps -v -e . >>"$out_dir/build.log" 2>&1
  rc=$?
fi
grep -E "ptxas info|spill stores|Used [0-9]+ registers" "$out_dir/build.log" >"$work/ptxas.txt"
spills="$(grep -Ec '[1-9][0-9]* bytes spill (stores|loads)' "$work/ptxas.txt")"
backends="$(python3 -c 'import pointins_ops as p, pointins_ops.triton as t
print("cuda:", p.available_backends("cuda"), "cpu:", p.available_backends("cpu"),
      "" if t.AVAILABLE else f"(triton: {t.IMPORT_ERROR})")' 2>&1 | tail -n 1)"
echo "$backends" | tee -a "$out_dir/build.log"
if (( prebuilt )); then
  record "build (prebuilt, carried)" $(( $(date +%s) - t0 )) $rc "backends $backends"
else
  record "build (sm_${arch/./}, FORCE_CUDA=$FORCE_CUDA)" $(( $(date +%s) - t0 )) $rc \
    "backends $backends; ptxas lines with spills: $spills"
fi

# --- 2-4. tests ----------------------------------------------------------------------------------------------------
workers=$(( $(nproc) < 8 ? $(nproc) : 8 ))
# test_cuda.py runs alone: one of its tests sizes its tensors from the free GPU memory.
pytest_step "CUDA op tests" test-cuda.log 90 280 1 - tests/test_cuda.py
# The Triton tests compile a kernel for each new shape: the targeted ones first, then the random sweep.
pytest_step "Triton op tests" test-triton.log 150 200 "$workers" load tests/test_triton.py tests/test_compat.py \
  -k "not test_random_cases"
pytest_step "Triton random sweep" test-triton-sweep.log 90 130 "$workers" load tests/test_triton.py \
  -k "test_random_cases"
pytest_step "model and training tests" test-model.log 90 60 2 loadfile tests/test_model.py tests/test_train_eval.py

# --- 5. benchmarks -------------------------------------------------------------------------------------------------
if [[ "$rehearse" == 1 ]]; then
  bench_backends=(cpu) bench_options=(--device cpu --quick)
else
  bench_backends=(cuda triton) bench_options=(--device cuda)
fi
t0=$(date +%s)
ran=0 failed=0 left_out=()
declare -A extras_done=()  # the model-level and fixed-cost rows, the same in every run: once per backend
all_scenarios="pointins-train pointins-infer condinst solov2 yolact pointins-1x1 pointins-dw"  # most important first
read -r -a scenarios <<<"${POINTINS_VALIDATE_SCENARIOS:-$all_scenarios}"
for scenario in "${scenarios[@]}"; do
  for backend in "${bench_backends[@]}"; do
    seconds=$(limit 75 10)
    if (( seconds < 30 * scale )); then left_out+=("$scenario/$backend"); continue; fi
    op_only=()
    [[ -n "${extras_done[$backend]:-}" ]] && op_only=(--op-only)
    extras_done[$backend]=1
    echo "== benchmark $scenario, backend $backend (limit $seconds s) ${op_only[*]}" | tee -a "$out_dir/benchmarks.log"
    timeout -s INT -k 10 "$seconds" python3 -m benchmarks "${bench_options[@]}" --backend "$backend" \
      --scenario "$scenario" --output "$work/bench/$scenario-$backend" --no-plot --no-progress "${op_only[@]}" \
      >>"$out_dir/benchmarks.log" 2>&1
    rc=$?
    ran=$((ran + 1))
    bench_runs+=("$scenario-$backend")
    if (( rc != 0 )); then
      failed=$((failed + 1))
      echo "== benchmark $scenario, backend $backend: rc $rc" | tee -a "$out_dir/benchmarks.log"
    fi
    summarize
  done
done
detail="$ran runs, $failed failed"
(( ${#left_out[@]} )) && detail+="; no time left for ${left_out[*]}"
record "benchmarks (${bench_backends[*]})" $(( $(date +%s) - t0 )) "$(( failed > 0 ))" "$detail"
(( ran == 0 )) && status=1

echo "gpu_validate: wrote $(ls "$out_dir" | tr '\n' ' ')to $out_dir in $(( $(date +%s) - started )) s;" \
  "exit status $status"
rm -rf "$work" "$work-site"
exit $status
