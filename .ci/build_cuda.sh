#!/usr/bin/env bash
# CI step for the CUDA kernels, on a machine without a GPU: compile them (ptxas verbose) into a temporary
# folder, so the in-place CPU build the tests use is left alone; fail if ptxas reports a register spill; report
# each kernel's hot-loop instruction mix from its SASS and fail when a kernel that should multiply on tensor
# cores (or stage through cp.async) does not (.ci/sass_mix.py); load the built library in a fresh Python process
# and check that both ops have a CUDA kernel.
#
#   .ci/build_cuda.sh                      # sm_80 and sm_90
#   POINTINS_CUDA_ARCHS="9.0" .ci/build_cuda.sh   # sm_90 only (the H100 / H200 the project targets)
#
# Needs nvcc on PATH (or CUDA_HOME) and torch with CUDA headers (a +cuXXX wheel). Installs the SASS tools it
# needs (pip packages nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm) when they are missing. About 18 minutes for
# sm_80 and sm_90 with MAX_JOBS=2 on a busy 2-core machine (measured 2026-12-03), about half that for one.
set -euo pipefail
cd "$(dirname "$0")/.."

archs="${POINTINS_CUDA_ARCHS:-8.0;9.0}"
work="$(mktemp -d "${TMPDIR:-/tmp}/pointins-cuda-build.XXXXXX")"
if [[ -z "${POINTINS_KEEP_CUDA_BUILD:-}" ]]; then trap 'rm -rf "$work"' EXIT; fi
log="$work/build.log"
start=$(date +%s)

# --- the SASS tools: cuobjdump (and the nvdisasm it calls) from the CUDA toolkit's pip packages ---
find_cuobjdump() {
  python - <<'EOF'
import glob, os, site, sys
roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if p] + sys.path
for root in dict.fromkeys(roots):
    for path in sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "bin", "cuobjdump"))):
        if os.access(path, os.X_OK):
            print(path)
            raise SystemExit
EOF
}
cuobjdump="$(find_cuobjdump || true)"
if [[ -z "$cuobjdump" ]]; then
  cuda_major="$(python -c 'import torch; print((torch.version.cuda or "13").split(".")[0])')"
  echo "== build_cuda: installing nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm (CUDA $cuda_major)"
  python -m pip install --quiet "nvidia-cuda-cuobjdump>=${cuda_major},<$((cuda_major + 1))" \
    "nvidia-cuda-nvdisasm>=${cuda_major},<$((cuda_major + 1))"
  cuobjdump="$(find_cuobjdump)"
fi
echo "== build_cuda: SASS from $cuobjdump"

echo "== build_cuda: compiling for TORCH_CUDA_ARCH_LIST='$archs' into $work"
if ! FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$archs" POINTINS_PTXAS_VERBOSE=1 MAX_JOBS="${MAX_JOBS:-2}" \
    python setup.py build_ext --build-lib "$work/lib" --build-temp "$work/temp" >"$log" 2>&1; then
  echo "build_cuda: FAILED to compile; the compiler's errors, then the end of the log:" >&2
  grep -E -A3 "error|FAILED:" "$log" | grep -v "^ptxas info" | head -n 60 >&2 || true
  tail -n 20 "$log" >&2
  exit 1
fi
echo "== build_cuda: compiled in $(( $(date +%s) - start )) s"

# ptxas -v: one report per kernel and architecture. Any spill in our kernels fails the step.
python - "$log" <<'EOF'
import re
import subprocess
import sys

text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
entries = re.findall(
    r"Compiling entry function '(\S+)' for '(sm_\d+a?)'.*?"
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
    r"Used (\d+) registers", text, re.DOTALL)
if not entries:
    sys.exit("build_cuda: no ptxas report found in the build log (was -Xptxas=-v passed?)")
names = [name for name, *_ in entries]
try:
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                               check=True).stdout.splitlines()
except (OSError, subprocess.CalledProcessError):
    demangled = names
spilled = []
print(f"{'kernel':<64} {'arch':<7} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}")
for (name, arch, stack, stores, loads, registers), pretty in zip(entries, demangled):
    kernel = re.search(r"(\w+<[^()]*>)\(", pretty)  # "void ns::name<args>(params)" -> "name<args>"
    short = kernel.group(1) if kernel else pretty
    short = re.sub(r"pointins_ops::cuda::(\(anonymous namespace\)::)?", "", short).replace("c10::", "")
    print(f"{short[:64]:<64} {arch:<7} {registers:>4} {stack:>5} {stores:>8} {loads:>8}")
    if int(stores) or int(loads):
        spilled.append(f"{short} on {arch}: {stores} bytes spill stores, {loads} bytes spill loads")
if spilled:
    sys.exit("build_cuda: ptxas spilled registers:\n  " + "\n  ".join(spilled))
print(f"build_cuda: {len(entries)} kernel builds, no spills")
EOF

library="$(ls "$work"/lib/pointins_ops/_C*.so)"
echo "== build_cuda: hot loops of each kernel (SASS)"
python .ci/sass_mix.py "$library" --cuobjdump "$cuobjdump"

# A fresh process that loads only the built library (not the in-place package, which registers the same
# op names): both ops must have CPU and CUDA kernels.
python - "$library" <<'EOF'
import sys

import torch

torch.ops.load_library(sys.argv[1])
missing = [f"{op} [{key}]"
           for op in ("pointins_ops::instance_aware_conv", "pointins_ops::instance_aware_conv_backward")
           for key in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
if missing:
    sys.exit("build_cuda: kernels not registered: " + ", ".join(missing))
print("build_cuda: CPU and CUDA kernels registered for both ops")
EOF
echo "== build_cuda: passed in $(( $(date +%s) - start )) s"
