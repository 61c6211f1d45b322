#!/usr/bin/env bash
# The integration and e2e tiers once per broker (`make test-brokers`), the passes side by side.
#
# Usage: tests/broker_passes.sh PYTHON BROKER... (make passes $(PY) and $(BROKERS))
#
# Most of a pass is spent waiting on child processes, brokers and timeouts, not on the CPU, so
# running the passes at once takes about as long as the longest of them. Each pass writes to
# .test-logs/<broker>.log; a line every minute says how far each has got, and each log is shown
# whole when its pass ends. TEST_PARALLEL=0 runs them one after the other with live output;
# TEST_PATHS (default: the two tiers) names other test files or folders. Tests that use no broker
# of the run (conftest.BROKER_FIXTURES) run in the first pass only (--broker-bound-only after it).
set -u
python=$1
shift
brokers=("$@")
read -r -a test_paths <<< "${TEST_PATHS:-tests/integration tests/e2e}"
pytest_args=("${test_paths[@]}" --durations=15)

pass_args() {  # pytest's arguments for the pass on broker $1
    local args=("${pytest_args[@]}" --broker "$1")
    [ "$1" != "${brokers[0]}" ] && args+=(--broker-bound-only)
    printf '%s\n' "${args[@]}"
}

if [ "${TEST_PARALLEL:-1}" = 0 ] || [ ${#brokers[@]} -lt 2 ]; then
    status=0
    for broker in "${brokers[@]}"; do
        echo "== integration and e2e tiers on the $broker broker"
        mapfile -t args < <(pass_args "$broker")
        "$python" -m pytest "${args[@]}" || status=1
    done
    exit $status
fi

mkdir -p .test-logs
declare -A pid
for broker in "${brokers[@]}"; do
    mapfile -t args < <(pass_args "$broker")
    "$python" -m pytest "${args[@]}" > ".test-logs/$broker.log" 2>&1 &
    pid[$broker]=$!
    echo "== integration and e2e tiers on the $broker broker: started (pid ${pid[$broker]}, .test-logs/$broker.log)"
done
trap 'kill ${pid[*]} 2>/dev/null' INT TERM

progress() {  # the last "[ NN%]" pytest printed in a log
    grep -o '\[ *[0-9]*%\]' ".test-logs/$1.log" 2>/dev/null | tail -1 | tr -d '[] '
}

status=0
started=$SECONDS
last_report=$SECONDS
remaining=("${brokers[@]}")
while [ ${#remaining[@]} -gt 0 ]; do
    still=()
    for broker in "${remaining[@]}"; do
        if kill -0 "${pid[$broker]}" 2>/dev/null; then
            still+=("$broker")
            continue
        fi
        wait "${pid[$broker]}" || status=1
        echo "== integration and e2e tiers on the $broker broker (after $(( (SECONDS - started) / 60 )) min):"
        cat ".test-logs/$broker.log"
    done
    remaining=("${still[@]+"${still[@]}"}")
    if [ ${#remaining[@]} -gt 0 ]; then
        sleep 5
        if (( SECONDS - last_report >= 60 )); then
            last_report=$SECONDS
            line="-- $(( (SECONDS - started) / 60 )) min:"
            for broker in "${remaining[@]}"; do line+=" $broker $(progress "$broker")"; done
            echo "$line"
        fi
    fi
done
exit $status
