# Sourced at the start of every device call (see benchmarks/device/README.md).
# A warm machine keeps /root/cqp between calls; this script
#  - keeps a copy of the DiT / UNet weights there, and puts them back when a call came without them
#    (calls that carry the Inception parts leave the zoo weights behind to stay under 64 MiB),
#  - installs the carried wheels (.whl/) into /tmp/site,
#  - collects the carried Inception parts (.inc/p1, p2a, p2b) and joins them, SHA-256 checked,
#  - makes the reference statistics of the CIFAR-10 test set once both are there,
#  - imports variants carried from an earlier session (.carry/, benchmarks/device/carry_variant.py),
#  - keeps the committed fp16 exports training starts from (results/training/weights/, train.sh),
#  - gathers training-checkpoint pieces carried in (.ckpt/MODEL/, benchmarks/device/train.sh).
set -u
C=${CQ_DEVICE_DIR:-/root/cqp}; mkdir -p $C
for m in cifar10-dit cifar10-unet cifar10-mmdit; do
  if [ -f cachequant/zoo/weights/$m/config.json ]; then
    [ -d $C/$m ] || cp -r cachequant/zoo/weights/$m $C/
  elif [ -d $C/$m ]; then
    mkdir -p cachequant/zoo/weights && cp -r $C/$m cachequant/zoo/weights/
  fi
done
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
for f in p1 p2a p2b; do if [ -f .inc/$f ]; then cp .inc/$f $C/$f; fi; done
if [ -f .data/test.zip ]; then cp .data/test.zip $C/; fi
INCEPTION_SHA256=7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34
if [ ! -f $C/default_1.pt ] && [ -f $C/p1 ] && [ -f $C/p2a ] && [ -f $C/p2b ]; then
  cat $C/p1 $C/p2a $C/p2b > $C/default_1.pt.tmp \
    && echo "$INCEPTION_SHA256  $C/default_1.pt.tmp" | sha256sum -c \
    && mv $C/default_1.pt.tmp $C/default_1.pt && rm -f $C/p1 $C/p2a $C/p2b
fi
export CACHEQUANT_INCEPTION=$C/default_1.pt
if [ -f $C/default_1.pt ] && [ -f $C/test.zip ] && [ ! -f $C/ref-test.npz ]; then
  python3 -m cachequant ref-stats --data $C/test.zip --device cuda --out $C/ref-test.npz 2>&1 | tail -1
fi
REF=(); if [ -f $C/ref-test.npz ]; then REF=(--ref-stats $C/ref-test.npz); fi
# samples carried from an earlier session (benchmarks/device/carry_variant.py; .carry/ is git-ignored)
if ls .carry/*.manifest.json >/dev/null 2>&1; then
  python3 benchmarks/device/carry_variant.py import --work $C/abl --parts .carry
fi
# committed fp16 exports that training continues from (train.sh --init), kept while the machine is warm
for d in results/training/weights/*/; do
  [ -f "$d/config.json" ] && mkdir -p $C/init && rm -rf $C/init/$(basename $d) && cp -r $d $C/init/
done 2>/dev/null
# training checkpoints carried in pieces, over as many calls as they need (benchmarks/device/train.sh)
for d in .ckpt/*/; do
  [ -f "$d/manifest.json" ] && mkdir -p $C/ckpt-in/$(basename $d) && cp $d/* $C/ckpt-in/$(basename $d)/
done 2>/dev/null
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
ls $C
