#!/usr/bin/env bash
# The tests N times in a row while a busy loop keeps every core busy (`make test-under-load`):
# the check that no test depends on how fast the machine happens to be today.
#
# Usage: tests/under_load.sh RUNS MAX_SECONDS COMMAND...
#
# One busy process per core spins at normal priority for at most MAX_SECONDS (bounded, so a run
# interrupted in any way cannot leave the machine loaded for long) and is killed when the runs
# end. Stops at the first failed run and says which; exit status 1 then.
set -u
runs=$1
max_seconds=$2
shift 2

busy=()
for _ in $(seq 1 "$(nproc)"); do
    python3 -c "import time
end = time.monotonic() + $max_seconds
while time.monotonic() < end:
    pass" &
    busy+=($!)
done
trap 'kill ${busy[*]} 2>/dev/null' EXIT INT TERM
echo "== busy loop on $(nproc) cores (pids ${busy[*]}, at most ${max_seconds}s)"

started=$SECONDS
for run in $(seq 1 "$runs"); do
    echo "== run $run of $runs under load: $*"
    if ! "$@"; then
        echo "== run $run of $runs FAILED under load (after $(( (SECONDS - started) / 60 )) min)"
        exit 1
    fi
    echo "== run $run of $runs passed under load (after $(( (SECONDS - started) / 60 )) min)"
done
echo "== $runs of $runs runs passed under load"
