#!/usr/bin/env bash
# The node's cost per delivered message, as the kernel sees it: runs the load
# generator, attaches `perf stat` to its node child for a window while the
# clients send, and divides the node's syscalls (all, and fsync, fdatasync, futex,
# epoll_wait, the send/recv/write family), context switches and CPU time by
# the messages delivered in that window (the load generator's delivered
# msgs/s times the window). The load generator's own per-message line counts
# the whole run; this one counts only the steady middle of it, by syscall.
#
# Usage: bench/cost.sh LOAD_BIN [load generator arguments...]
# Example:
#   bench/cost.sh target/release/quicnprotochat-load --clients 1 --rate 1000 --duration 10
#
# Environment: WINDOW seconds perf counts (default 4), DELAY seconds before
# it starts, for connecting and sending to begin (default 3), PERF the perf
# binary (default /usr/bin/perf). DELAY + WINDOW must fit in --duration, or
# the window also counts the drain and shutdown. With --runs N, the window
# falls in the first run and is compared with the first run's rate.
# Software and tracepoint events only: they work in VMs without hardware
# counters. Needs root or kernel.perf_event_paranoid <= 1 and tracefs.

set -euo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
    exit 2
fi
load_bin=$1
shift
window=${WINDOW:-4}
delay=${DELAY:-3}
perf=${PERF:-/usr/bin/perf}
events=task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync
events+=,syscalls:sys_enter_futex,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_sendmsg
events+=,syscalls:sys_enter_sendmmsg,syscalls:sys_enter_recvmmsg,syscalls:sys_enter_pwrite64
events+=,syscalls:sys_enter_write

work=$(mktemp -d)
load_out=$work/load.txt
perf_out=$work/perf.txt
load_pid=
node_pid=
finished=
cleanup() {
    # Only after a failure or ^C: the load generator kills its node itself
    # when it ends normally, but not when it is killed.
    if [[ -z $finished ]]; then
        [[ -n $load_pid ]] && kill "$load_pid" 2>/dev/null
        [[ -n $node_pid ]] && kill "$node_pid" 2>/dev/null
    fi
    rm -rf "$work"
}
trap cleanup EXIT

"$load_bin" "$@" >"$load_out" 2>&1 &
load_pid=$!
sleep "$delay"

# The node is the load generator's newest child (a fresh one per run).
node_pid=$(pgrep -n -P "$load_pid" || true)
if [[ -z $node_pid ]] || ! grep -q -- '--listen' "/proc/$node_pid/cmdline" 2>/dev/null; then
    echo "cost.sh: no node child of the load generator (pid $load_pid) after ${delay} s" >&2
    cat "$load_out" >&2
    exit 1
fi

# C locale: plain numbers, no thousands separators, for awk below.
LC_ALL=C "$perf" stat -e "$events" -p "$node_pid" -o "$perf_out" -- sleep "$window"
status=0
wait "$load_pid" || status=$?
finished=1

echo "== perf stat of the node (pid $node_pid), ${window} s from ${delay} s into the run"
cat "$perf_out"
echo "== load generator"
cat "$load_out"
if [[ $status -ne 0 ]]; then
    echo "cost.sh: the load generator failed (exit $status)" >&2
    exit "$status"
fi

echo "== node cost per delivered message, in the perf window"
# The rate is the first run's "delivered ... : R msgs/s"; the window length
# is perf's own "seconds time elapsed".
rate=$(awk '/^delivered / { for (i = 1; i < NF; i++) if ($(i + 1) == "msgs/s,") { print $i; exit } }' "$load_out")
if [[ -z $rate ]]; then
    echo "cost.sh: no delivered msgs/s line in the load generator's output" >&2
    exit 1
fi
awk -v rate="$rate" '
    $2 == "msec" && $3 == "task-clock" { count["task-clock"] = $1; next }
    $1 ~ /^[0-9.]+$/ && $2 ~ /^(context-switches|raw_syscalls:|syscalls:)/ { count[$2] = $1; next }
    $1 == "<not" { missing = missing " " $3 }
    $2 == "seconds" && $3 == "time" && $4 == "elapsed" { elapsed = $1 }
    END {
        if (elapsed == "" || rate <= 0) { print "cost.sh: no perf window or no deliveries"; exit 1 }
        messages = rate * elapsed
        printf "%.0f msgs/s x %.2f s = %.0f messages\n", rate, elapsed, messages
        if (missing != "") printf "not counted:%s\n", missing
        printf "%-22s %10.1f µs\n", "CPU (task-clock)", count["task-clock"] * 1000 / messages
        split("raw_syscalls:sys_enter syscalls:sys_enter_fsync syscalls:sys_enter_fdatasync " \
              "syscalls:sys_enter_futex " \
              "syscalls:sys_enter_epoll_wait context-switches syscalls:sys_enter_sendmsg " \
              "syscalls:sys_enter_sendmmsg syscalls:sys_enter_recvmmsg " \
              "syscalls:sys_enter_pwrite64 syscalls:sys_enter_write", order, " ")
        split("syscalls fsync fdatasync futex epoll_wait context-switches sendmsg sendmmsg recvmmsg " \
              "pwrite64 write", label, " ")
        for (i = 1; i in order; i++)
            printf "%-22s %10.2f\n", label[i], count[order[i]] / messages
    }
' "$perf_out"
