#!/usr/bin/env bash
# bench/mirror.sh: a replicated pair against a standalone node, in one run, on this machine.
#
# Usage (root: it makes network namespaces):
#          bash bench/mirror.sh              (about 4 minutes)
#          QUICK=1 bash bench/mirror.sh      (smoke run)
#
# Three setups, each on fresh file-backed disks of the same size in OUT:
#   standalone   one node, no peer
#   pair         two nodes, each in its own network namespace, both links on veth pairs
#   pair-2.5g    the same with the heartbeat veth shaped to 2.5 Gbit/s (tc tbf on both ends)
#                and the lan veth shaped to 1 Gbit/s, like the boards' NICs
# Workloads through the primary's unix NBD socket: nbdcopy of a random file in 1 MiB requests,
# fio 4 KiB random writes at queue depth 32 and 1 (p50/p99 completion latency), and, for the
# pairs, a resync: the secondary is stopped, RESYNC_MIB are written, the secondary returns and
# the time until the primary reports no out-of-sync bytes is measured.
# Results: stdout and bench/out/mirror-<date>.md.
set -euo pipefail
{
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/bench/out}
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then SIZE_MIB=${SIZE_MIB:-256} RUNTIME=${RUNTIME:-3} RESYNC_MIB=${RESYNC_MIB:-128}
else SIZE_MIB=${SIZE_MIB:-1024} RUNTIME=${RUNTIME:-10} RESYNC_MIB=${RESYNC_MIB:-512}; fi
FILE_MIB=$((SIZE_MIB + 64))
SETUPS=${SETUPS:-"standalone pair pair-2.5g"}

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
for tool in nbdcopy fio jq ip tc; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
[[ $(id -u) == 0 ]] || die "run as root (network namespaces)"

if [[ -n ${TANDEM_BIN:-} ]]; then BIN=$TANDEM_BIN
else (cd "$ROOT" && cargo build --release -q) && BIN=$ROOT/target/x86_64-unknown-linux-gnu/release/tandem; fi
mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/mirror-XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del tbench-a 2>/dev/null || true
    ip netns del tbench-b 2>/dev/null || true
    [[ ${KEEP:-0} == 1 ]] || rm -rf "$WORK"
}
trap cleanup EXIT

head -c 32 /dev/urandom >"$WORK/key"; chmod 600 "$WORK/key"
SRC=$WORK/source.bin
head -c "$((SIZE_MIB * 1048576))" /dev/urandom >"$SRC"

netns_up() { # netns_up SHAPED
    ip netns del tbench-a 2>/dev/null || true
    ip netns del tbench-b 2>/dev/null || true
    ip netns add tbench-a; ip netns add tbench-b
    ip -n tbench-a link set lo up; ip -n tbench-b link set lo up
    ip link add tb-hb-a netns tbench-a type veth peer name tb-hb-b netns tbench-b
    ip link add tb-lan-a netns tbench-a type veth peer name tb-lan-b netns tbench-b
    ip -n tbench-a addr add 10.77.0.1/24 dev tb-hb-a; ip -n tbench-b addr add 10.77.0.2/24 dev tb-hb-b
    ip -n tbench-a addr add 10.78.0.1/24 dev tb-lan-a; ip -n tbench-b addr add 10.78.0.2/24 dev tb-lan-b
    for dev in hb lan; do
        ip -n tbench-a link set "tb-$dev-a" up; ip -n tbench-b link set "tb-$dev-b" up
    done
    if [[ $1 == 1 ]]; then
        for side in a b; do
            ip netns exec "tbench-$side" tc qdisc add dev "tb-hb-$side" root tbf rate 2500mbit burst 2mbit latency 20ms
            ip netns exec "tbench-$side" tc qdisc add dev "tb-lan-$side" root tbf rate 1000mbit burst 1mbit latency 20ms
        done
    fi
}

config() { # config NAME PEER_SECTION
    cat >"$WORK/$1.toml" <<EOF
[node]
name = "$1"
state_dir = "$WORK/$1-state"
[volume]
backing = "$WORK/$1.img"
nbd_socket = "$WORK/$1.sock"
[console]
control_socket = "$WORK/$1-ctl.sock"
$2
EOF
}

peer_section() { # peer_section ME PEER MY_N PEER_N
    printf '[peer]\nname = "%s"\nkey_file = "%s"\nheartbeat = { local = "10.77.0.%s:7788", remote = "10.77.0.%s:7788" }\nlan = { local = "10.78.0.%s:7788", remote = "10.78.0.%s:7788" }\n[cluster]\npreferred = "nas-a"\n[watchdog]\ndevice = "none"\ntimeout_s = 5\n' \
        "$2" "$WORK/key" "$3" "$4" "$3" "$4"
}

start() { # start NAME [NETNS]
    rm -f "$WORK/$1.sock"
    if [[ -n ${2:-} ]]; then ip netns exec "$2" "$BIN" run --config "$WORK/$1.toml" 2>>"$WORK/$1.log" &
    else "$BIN" run --config "$WORK/$1.toml" 2>>"$WORK/$1.log" & fi
    PIDS+=($!)
    eval "PID_${1//-/_}=$!"
    for _ in $(seq 100); do [[ -S $WORK/$1.sock ]] && return; sleep 0.1; done
    die "$1 did not start: $(tail -3 "$WORK/$1.log")"
}

status() { "$BIN" ctl --socket "$WORK/$1-ctl.sock" --json status; }
wait_for() { # wait_for NAME JQ_EXPR
    for _ in $(seq 3000); do status "$1" | jq -e "$2" >/dev/null 2>&1 && return; sleep 0.02; done
    die "$1: $2 never held: $(status "$1")"
}

fresh_disks() { for n in "$@"; do rm -f "$WORK/$n.img"; truncate -s "${FILE_MIB}M" "$WORK/$n.img"; done; }

measure() { # measure SETUP SOCKET -> appends a row
    local uri="nbd+unix:///?socket=$2" t0 t1 seq_mibs qd32 qd1p50 qd1p99
    t0=$(date +%s.%N)
    nbdcopy --request-size=1048576 "$SRC" "$uri"
    t1=$(date +%s.%N)
    seq_mibs=$(echo "$SIZE_MIB / ($t1 - $t0)" | bc -l)
    fio --name=qd32 --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 --size="${SIZE_MIB}M" \
        --time_based --runtime="$RUNTIME" --output-format=json --output="$WORK/$1-qd32.json" >/dev/null
    fio --name=qd1 --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=1 --size="${SIZE_MIB}M" \
        --time_based --runtime="$RUNTIME" --output-format=json --output="$WORK/$1-qd1.json" >/dev/null
    qd32=$(jq '.jobs[0].write.iops' "$WORK/$1-qd32.json")
    qd1p50=$(jq '.jobs[0].write.clat_ns.percentile["50.000000"] / 1000' "$WORK/$1-qd1.json")
    qd1p99=$(jq '.jobs[0].write.clat_ns.percentile["99.000000"] / 1000' "$WORK/$1-qd1.json")
    printf '| %s | %.0f | %.0f | %.0f | %.0f |' "$1" "$seq_mibs" "$qd32" "$qd1p50" "$qd1p99" >>"$WORK/rows"
}

resync() { # resync SETUP -> appends the resync column
    local t0 t1 bytes
    kill -TERM "$PID_nas_b"; wait "$PID_nas_b" 2>/dev/null || true
    wait_for nas-a '.peer == "lost" and .role == "primary"'
    head -c "$((RESYNC_MIB * 1048576))" /dev/urandom >"$WORK/resync.bin"
    nbdcopy --request-size=1048576 "$WORK/resync.bin" "nbd+unix:///?socket=$WORK/nas-a.sock"
    start nas-b tbench-b
    # From the moment the resync runs (start-up, links and the exchange are not resync time).
    wait_for nas-a '.sync_running == true or (.out_of_sync_bytes == 0 and .sync.done_bytes > 0)'
    t0=$(date +%s.%N)
    wait_for nas-a '.sync_running == false and .out_of_sync_bytes == 0 and .peer == "connected" and .sync.done_bytes > 0'
    t1=$(date +%s.%N)
    bytes=$(status nas-a | jq '.sync.done_bytes')
    printf ' %.0f MiB in %.1f s = %.0f MiB/s |\n' "$(echo "$bytes / 1048576" | bc -l)" "$(echo "$t1 - $t0" | bc -l)" \
        "$(echo "$bytes / 1048576 / ($t1 - $t0)" | bc -l)" >>"$WORK/rows"
}

: >"$WORK/rows"
for setup in $SETUPS; do
    log "setup $setup"
    case $setup in
    standalone)
        fresh_disks solo; config solo ""; start solo
        measure standalone "$WORK/solo.sock"; echo " - |" >>"$WORK/rows"
        kill -TERM "$PID_solo"; wait "$PID_solo" 2>/dev/null || true ;;
    pair|pair-2.5g)
        [[ $setup == pair ]] && netns_up 0 || netns_up 1
        fresh_disks nas-a nas-b
        config nas-a "$(peer_section nas-a nas-b 1 2)"; config nas-b "$(peer_section nas-b nas-a 2 1)"
        start nas-a tbench-a; start nas-b tbench-b
        wait_for nas-a '.role == "primary" and .disk == "uptodate"'
        wait_for nas-b '.role == "secondary" and .disk == "uptodate"'
        measure "$setup" "$WORK/nas-a.sock"
        resync "$setup"
        kill -TERM "$PID_nas_a" "$PID_nas_b"; wait "$PID_nas_a" "$PID_nas_b" 2>/dev/null || true ;;
    esac
done

RESULT=$OUT/mirror-$(date +%Y%m%d-%H%M).md
{
    echo "| setup | nbdcopy 1 MiB seq write, MiB/s | fio 4K randwrite qd32, IOPS | qd1 p50, us | qd1 p99, us | resync |"
    echo "|---|---|---|---|---|---|"
    cat "$WORK/rows"
} | tee "$RESULT"
log "results in $RESULT"
}
