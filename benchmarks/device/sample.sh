# usage (on the device, from the repository root):
#   bash benchmarks/device/sample.sh TABLE TIMEOUT_S [kernel-tests] [extra ablation.py sample args]
# Resumes the table's sampling for at most TIMEOUT_S seconds (a killed run loses at most one shard),
# with per-variant metrics as soon as the Inception weights and reference statistics are there.
# Logs go to $OUT; optionally runs the GPU kernel tests alongside.
source benchmarks/device/setup.sh
TABLE=$1; T=$2; shift 2
T0=$(date +%s)
if [ "${1:-}" = kernel-tests ]; then
  shift
  (timeout 420 python3 -m pytest -q tests/test_kernels.py > $OUT/kernel-tests.log 2>&1; echo "rc=$?" >> $OUT/kernel-tests.log) &
fi
timeout $T python3 benchmarks/ablation.py sample --table $TABLE --num-samples 10000 --batch-size 2500 --device cuda \
   --work $C/abl --quiet ${REF[@]+"${REF[@]}"} "$@" >> $OUT/sample-$TABLE.log 2>&1
echo "sample rc=$? after $(( $(date +%s) - T0 )) s"
wait
tail -2 $OUT/kernel-tests.log 2>/dev/null
grep -h "done:\|FAILED\|identical\|metrics:" $OUT/sample-$TABLE.log | tail -40
