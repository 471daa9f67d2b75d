#!/usr/bin/env bash
# Trains one zoo model on the leased device for MINUTES (continuing from the newest checkpoint it
# finds), then measures it: 10k-sample FID against the CIFAR-10 test set (in the tables' resize
# convention and, on the same samples, in TF's), a sample grid and, once, the data floor. Longer
# than one call: run it detached and wait on it (benchmarks/device/README.md).
#
#   bash benchmarks/device/detached.sh start train-unet bash benchmarks/device/train.sh unet 18
#
# Resumes from, in this order: this machine's own checkpoint ($C/train/MODEL/ckpt), pieces
# carried in from an earlier lease (.ckpt/MODEL/, gathered into $C/ckpt-in/MODEL by setup.sh over
# as many calls as they need), or else starts from an fp16 export: CQ_INIT if set, otherwise the
# committed one (results/training/weights/cifar10-MODEL, kept in $C/init by setup.sh). Needs $C/train.zip (carry .data/train.zip once); the FID needs the
# Inception network and $C/ref-test.npz (setup.sh makes them from the carried .inc parts and
# .data/test.zip) and waits up to CQ_WAIT_REF_S (300) for them. The model's evaluate arguments
# come from CQ_EVAL_ARGS (default: the UNet's DDIM 100; the DiT's tables use "--scheduler ddpm
# --steps 250 --guidance-scale 1.5 --matmul-tf32"); CQ_FID_CONVS picks the resize conventions
# scored (default "torch tf"; each one samples the 10k images again); CQ_FID_FLOOR=0 skips the data
# floor. If the compiled run fails, the rest of the time trains without torch.compile.
set -u
model=${1:?usage: train.sh MODEL MINUTES [train_cifar.py args]} minutes=${2:?usage: train.sh MODEL MINUTES}
shift 2
C=${CQ_DEVICE_DIR:-/root/cqp}
W=$C/train/$model R=$C/train/repo J=${JOB_DIR:-$W}
[ -f $C/train.zip ] || { echo "no $C/train.zip: carry .data/train.zip in this call" >&2; exit 2; }
mkdir -p $W && rm -rf $R && mkdir -p $R && cp -r cachequant scripts benchmarks $R/
export PYTHONPATH=/tmp/site:$R

resume_args() {
  if [ -f $W/ckpt/manifest.json ]; then echo --resume $W/ckpt
  elif [ -f $C/ckpt-in/$model/manifest.json ]; then echo --resume $C/ckpt-in/$model
  elif [ -n "${CQ_INIT:-}" ]; then echo --init $CQ_INIT
  elif [ -f $C/init/cifar10-$model/config.json ]; then echo --init $C/init/cifar10-$model; fi
}
train() {
  python3 $R/scripts/train_cifar.py --model $model --data $C/train.zip --out $W --batch 512 --lr 3e-4 \
    --warmup 1000 --ema 0.9999 --export $R/cachequant/zoo/weights/cifar10-$model $(resume_args) "$@"
}
t0=$SECONDS
if ! train --compile --time-limit-min $minutes "$@"; then
  left=$(python3 -c "print(max(0.5, $minutes - ($SECONDS - $t0) / 60))")
  echo "compiled training failed; training on without torch.compile for $left min"
  train --time-limit-min $left "$@" || exit 1
fi
cp $W/train_info.json $J/train_info-$model.json
# the fp16 EMA export (13–16 MB) comes back with the job's files: commit it to results/training/weights/
cp $R/cachequant/zoo/weights/cifar10-$model/diffusion_pytorch_model.safetensors $J/weights-$model.safetensors
cp $R/cachequant/zoo/weights/cifar10-$model/config.json $J/config-$model.json

for _ in $(seq $(( ${CQ_WAIT_REF_S:-300} / 5 ))); do [ -f $C/ref-test.npz ] && break; sleep 5; done
cd $R
python3 scripts/sample_grid.py --model cifar10-$model --steps 100 --out $J/samples-cifar10-$model.png
if [ -f $C/ref-test.npz ]; then
  export CACHEQUANT_INCEPTION=$C/default_1.pt
  # the same samples against TF-resized reference statistics too: the cross-check of the FID convention
  convs=${CQ_FID_CONVS:-torch tf}
  [[ " $convs " != *" tf "* ]] || [ -f $C/ref-test-tf.npz ] \
    || python3 -m cachequant ref-stats --data $C/test.zip --device cuda --fid-resize tf --out $C/ref-test-tf.npz
  for conv in $convs; do
    conv=${conv/torch/}; conv=${conv:+-$conv}
    python3 -m cachequant evaluate --model cifar10-$model ${CQ_EVAL_ARGS:---steps 100} --device cuda \
      --num-samples 10000 --batch-size 2500 --ref-stats $C/ref-test$conv.npz --out-dir $W/eval --quiet \
      && cp $W/eval/metrics.json $J/fid-$model$conv.json
  done
  [ "${CQ_FID_FLOOR:-1}" = 0 ] || [ -f $C/fid-floor.json ] \
    || python3 benchmarks/fid_floor.py --train $C/train.zip --test $C/test.zip --device cuda --out $C/fid-floor.json
  if [ -f $C/fid-floor.json ]; then cp $C/fid-floor.json $J/; fi
else
  echo "no reference statistics after ${CQ_WAIT_REF_S:-300} s: no FID this time"
fi
