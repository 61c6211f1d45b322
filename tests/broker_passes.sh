#!/usr/bin/env bash
# The integration and e2e tiers once per broker (`make test-brokers`), the passes side by side.
#
# Usage: tests/broker_passes.sh PYTHON BROKER... (make passes $(PY) and $(BROKERS))
#
# Most of a pass is spent waiting on child processes, brokers and timeouts, not on the CPU, so
# running the passes at once takes about as long as the longest of them. The Apache Kafka pass
# would be the longest, so its tests of what only Apache Kafka does (fixture apache_kafka_only:
# clusters of their own, a minute's outage, TLS and ACLs) run as a pass of their own,
# `kafka-only`, beside the rest (`kafka`); TEST_KAFKA_SPLIT=0 keeps them in one pass. Each pass writes to .test-logs/<pass>.log; a line every
# minute says how far each has got, and each log is shown whole when its pass ends.
# TEST_PARALLEL=0 runs one pass per broker, one after the other, with live output; TEST_PATHS
# (default: the two tiers) names other test files or folders. Tests that use no broker of the run
# (conftest.BROKER_FIXTURES) run in the first broker's pass only (--broker-bound-only after it).
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

# The side-by-side passes: a label each (its log's name), with the broker it runs on.
labels=()
declare -A broker_of extra_args
for broker in "${brokers[@]}"; do
    if [ "$broker" = kafka ] && [ "${TEST_KAFKA_SPLIT:-1}" = 1 ]; then
        labels+=(kafka kafka-only)
        broker_of[kafka]=kafka extra_args[kafka]="--apache-kafka-tests=without"
        broker_of[kafka-only]=kafka extra_args[kafka-only]="--apache-kafka-tests=only"
    else
        labels+=("$broker")
        broker_of[$broker]=$broker extra_args[$broker]=""
    fi
done

# Each pass picks its servers' ports from a slice of its own of 20000 up to the ephemeral range
# (ORDERPIPE_TEST_PORT_RANGE, services/tools/brokers/probe.py: free_port): two passes picking from
# one range could hand out the same port, still free because neither server had bound it yet.
read -r ephemeral_low _ < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || ephemeral_low=32768
port_slice=$(( (ephemeral_low - 20000) / ${#labels[@]} ))

mkdir -p .test-logs
declare -A pid
slice=0
for label in "${labels[@]}"; do
    broker=${broker_of[$label]}
    mapfile -t args < <(pass_args "$broker")
    [ -n "${extra_args[$label]}" ] && args+=("${extra_args[$label]}")
    ports=""
    if [ "$port_slice" -ge 1000 ]; then
        low=$(( 20000 + slice * port_slice ))
        ports="$low-$(( low + port_slice - 1 ))"
    fi
    slice=$(( slice + 1 ))
    ORDERPIPE_TEST_PORT_RANGE=$ports "$python" -m pytest "${args[@]}" > ".test-logs/$label.log" 2>&1 &
    pid[$label]=$!
    echo "== integration and e2e tiers, pass $label (${args[*]:${#pytest_args[@]}}): started (pid ${pid[$label]}, .test-logs/$label.log${ports:+, ports $ports})"
done
trap 'kill ${pid[*]} 2>/dev/null' INT TERM

progress() {  # the last "[ NN%]" pytest printed in a log
    grep -o '\[ *[0-9]*%\]' ".test-logs/$1.log" 2>/dev/null | tail -1 | tr -d '[] '
}

status=0
started=$SECONDS
last_report=$SECONDS
remaining=("${labels[@]}")
while [ ${#remaining[@]} -gt 0 ]; do
    still=()
    for label in "${remaining[@]}"; do
        if kill -0 "${pid[$label]}" 2>/dev/null; then
            still+=("$label")
            continue
        fi
        wait "${pid[$label]}"
        code=$?
        # 5: pytest collected nothing (TEST_PATHS with no test for this pass)
        [ $code -ne 0 ] && [ $code -ne 5 ] && status=1
        echo "== integration and e2e tiers, pass $label (after $(( (SECONDS - started) / 60 )) min):"
        cat ".test-logs/$label.log"
    done
    remaining=("${still[@]+"${still[@]}"}")
    if [ ${#remaining[@]} -gt 0 ]; then
        sleep 5
        if (( SECONDS - last_report >= 60 )); then
            last_report=$SECONDS
            line="-- $(( (SECONDS - started) / 60 )) min:"
            for label in "${remaining[@]}"; do line+=" $label $(progress "$label")"; done
            echo "$line"
        fi
    fi
done
exit $status
