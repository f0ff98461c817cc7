#!/usr/bin/env bash
# Second GPU call of 2026-12-04: the CUDA tests with float32 held to IEEE (TF32 off), the Triton tests other than
# the random sweep, and the CUDA benchmarks the first call had no time for. Extension prebuilt (sm_90) and carried.
set -u
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1
start=$(date +%s); deadline=$((start + ${BUDGET:-185}))
left() { echo $(( deadline - $(date +%s) )); }
python3 -c "import torch, pointins_ops as p; print(torch.__version__, torch.cuda.get_device_name(0), p.available_backends('cuda'))" 2>&1 | tee $OUT/env.txt
timeout -s INT -k 5 60 python3 -m pytest tests/test_cuda.py -q -rfE -p no:cacheprovider -x --maxfail=20 >$OUT/test-cuda.log 2>&1
echo "test_cuda rc=$? $(tail -n 1 $OUT/test-cuda.log)"
t=$(( $(left) - 100 )); (( t > 70 )) && t=70
timeout -s INT -k 5 $t python3 -m pytest tests/test_triton.py tests/test_compat.py -k "not random_cases" -n 8 -q -rfE -p no:cacheprovider >$OUT/test-triton.log 2>&1
echo "triton rc=$? $(tail -n 1 $OUT/test-triton.log)"
for s in solov2 yolact pointins-1x1 pointins-dw; do
  t=$(( $(left) - 3 )); (( t < 15 )) && { echo "no time for $s"; continue; }
  (( t > 30 )) && t=30
  timeout -s INT -k 3 $t python3 -m benchmarks --device cuda --backend cuda --scenario $s --output $OUT/b-$s --no-plot --no-progress >>$OUT/bench.log 2>&1
  echo "bench $s rc=$?"
done
cat $OUT/b-*/results.md > $OUT/bench.md 2>/dev/null; rm -rf $OUT/b-*
echo "done in $(( $(date +%s) - start )) s"
