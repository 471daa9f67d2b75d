# usage: bash benchmarks/device/report.sh TABLE [TABLE ...]
# Metrics of whatever is sampled and not yet measured, then the markdown report, the plot and the
# tables' JSON into $OUT (small files only: samples and features stay on the device).
source benchmarks/device/setup.sh
for t in "$@"; do
  python3 benchmarks/ablation.py metrics --table $t --work $C/abl --ref-stats $C/ref-test.npz --device cuda --quiet \
    >> $OUT/metrics-$t.log 2>&1
  echo "metrics $t rc=$?"; tail -3 $OUT/metrics-$t.log
done
python3 benchmarks/ablation.py report --work $C/abl --out $OUT/results 2>&1 | tail -3
cd $C/abl && tar czf $OUT/ablation-work.tgz --exclude='*.npz' --exclude='*.cqplan' --exclude=shards . && ls -la $OUT
