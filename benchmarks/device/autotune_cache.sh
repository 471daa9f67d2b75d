#!/usr/bin/env bash
# Inductor's tuned kernel configs (the *.best_config JSON files of its on-disk cache), packed so that
# they outlive a device machine: a fresh machine seeded with them, with the same torch, Triton and
# cache path, finds its kernels' tuned configs and skips nearly all of the tuning (16 candidates
# timed instead of 3,252 on 2026-12-03), provided that the kernels compile in the process that runs
# them (TORCHINDUCTOR_COMPILE_THREADS=1: from inductor's worker pool a kernel's config comes back
# unpickled without its found-by-coordinate-descent mark) and that no graph is loaded from inductor's
# FX graph cache (with torch 2.11 that re-runs the tuning too, pytorch/pytorch#172819). tuned_cache in
# benchmarks/run_speed_rest.sh sets the first, the part torchao-sd15-b8-float8 the second. With
# torchao's recommended inductor settings (coordinate-descent tuning) that tuning was 777 of the 876 s
# warm-up of SD 1.5's float8 row (results/speed/README.md).
#
# usage:
#   bash benchmarks/device/autotune_cache.sh pack CACHE_DIR TGZ     every *.best_config under CACHE_DIR
#        into TGZ (written whole or not at all); says how many
#   bash benchmarks/device/autotune_cache.sh unpack TGZ CACHE_DIR   the configs back in place
set -u
usage="usage: autotune_cache.sh pack CACHE_DIR TGZ | autotune_cache.sh unpack TGZ CACHE_DIR"
cmd=${1:?$usage}
case $cmd in
  pack)
    dir=${2:?$usage}; tgz=${3:?$usage}
    [ -d "$dir" ] || { echo "pack: no cache directory '$dir'" >&2; exit 2; }
    n=$(find "$dir" -name '*.best_config' | wc -l)
    if ! find "$dir" -name '*.best_config' -printf '%P\0' | tar czf "$tgz.tmp.$$" -C "$dir" --null -T -; then
      rm -f "$tgz.tmp.$$"; echo "pack: could not write '$tgz'" >&2; exit 1
    fi
    mv "$tgz.tmp.$$" "$tgz"  # a pack running at the same time writes its own temporary file
    echo "packed $n tuned kernel configs into $tgz" ;;
  unpack)
    tgz=${2:?$usage}; dir=${3:?$usage}
    [ -f "$tgz" ] || { echo "unpack: no file '$tgz' (pack one on the device with 'autotune_cache.sh pack')" >&2; exit 2; }
    mkdir -p "$dir" && tar xzf "$tgz" -C "$dir" || { echo "unpack: '$tgz' is not a tarball of tuned configs" >&2; exit 2; }
    echo "unpacked $(tar tzf "$tgz" | grep -c '\.best_config$') tuned kernel configs into $dir" ;;
  *) echo "unknown command '$cmd'; $usage" >&2; exit 2 ;;
esac
