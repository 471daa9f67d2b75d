#!/usr/bin/env bash
# A device job longer than one call (≤ 10 minutes): started in its own process session, it outlives
# the call that started it and runs on while the machine stays warm, so later calls only wait for
# it and fetch its files. Chain each call within the machine's idle window (30 s), or the machine
# goes back and the job with it. Used for the torchao rows on SD 1.5, whose warm-up (compilation
# and first run) took 535 s + 362 s over two calls on 2026-12-03, more than one call allows.
# Only the job uses the GPU: the calls that wait on it sleep, so its timings are not disturbed.
#
# usage (on the device, from the repository root; PYTHONPATH as the job needs it):
#   bash benchmarks/device/detached.sh start NAME CMD [ARG ...]
#        CMD runs with $JOB_DIR ($CQ_DETACHED_DIR/NAME, /tmp/cq-detached/NAME by default) for its
#        files; its output goes to $JOB_DIR/log
#   bash benchmarks/device/detached.sh wait NAME SECONDS
#        waits up to SECONDS for the job to end, then copies its files (*.json, *.tgz, the log) to $OUT
#        and says whether it ended (with its exit status) or runs on
set -u
cmd=${1:?usage: detached.sh start NAME CMD [ARG ...] | detached.sh wait NAME SECONDS}
name=${2:?usage: detached.sh start NAME CMD [ARG ...] | detached.sh wait NAME SECONDS}
case $name in *[!A-Za-z0-9._-]*) echo "job name '$name': use letters, digits, '.', '_' and '-'" >&2; exit 2 ;; esac
dir=${CQ_DETACHED_DIR:-/tmp/cq-detached}/$name
case $cmd in
  start)
    shift 2
    [ $# -gt 0 ] || { echo "detached.sh start $name: no command given" >&2; exit 2; }
    if [ -f "$dir/pid" ] && [ ! -f "$dir/rc" ]; then
      echo "job '$name' is already running (pid $(cat "$dir/pid")); wait for it" >&2; exit 2
    fi
    rm -rf "$dir" && mkdir -p "$dir"
    JOB_DIR=$dir PYTHONUNBUFFERED=1 setsid nohup bash -c '"$@"; echo $? > "$JOB_DIR/rc"' job "$@" \
      > "$dir/log" 2>&1 < /dev/null &
    echo $! > "$dir/pid"
    echo "job '$name' started (pid $!): $*" ;;
  wait)
    secs=${3:?usage: detached.sh wait NAME SECONDS}
    [ -f "$dir/pid" ] || { echo "no job '$name' on this machine (a fresh machine has none: start it again)" >&2; exit 2; }
    t0=$SECONDS
    while [ ! -f "$dir/rc" ] && [ $((SECONDS - t0)) -lt "$secs" ]; do sleep 1; done
    : "${OUT:?OUT is not set: where should the files of the job go?}"
    cp "$dir"/*.json "$dir"/*.tgz "$OUT"/ 2>/dev/null
    cp "$dir/log" "$OUT/$name.log"
    grep -v '^{' "$dir/log" | tail -20
    if [ -f "$dir/rc" ]; then
      echo "job '$name' ended with exit status $(cat "$dir/rc")"
    else
      echo "job '$name' runs on after $((SECONDS - t0)) s of waiting: call 'wait' again within the idle window"
    fi ;;
  *) echo "unknown command '$cmd': start or wait" >&2; exit 2 ;;
esac
