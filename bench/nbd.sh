#!/usr/bin/env bash
# bench/nbd.sh: compare tandem's NBD server with qemu-nbd and nbdkit, in one run, on this machine.
#
# Usage:   bash bench/nbd.sh               (full run, about 12 minutes on a 2-core machine)
#          QUICK=1 bash bench/nbd.sh       (smoke run, about 3 minutes, smaller sizes and runtimes)
#
# Every server serves its own fresh backing file of the same size, created the same way (zeros
# written through dd, see docs/BENCHMARKS.md for why not fallocate), on the same filesystem.
# Page-cache servers are compared with page-cache servers, O_DIRECT with O_DIRECT. Each server is
# warmed up before measuring, the order of servers is rotated between repetitions, and the table
# reports the median per cell. Results go to stdout and to bench/out/results-<date>.{md,json}.
#
# Environment (all optional):
#   QUICK=1              smaller sizes and runtimes (smoke run)
#   SERVERS="..."        subset of "tandem qemu-nbd nbdkit" (default: all three)
#   MODES="..."          subset of "pagecache odirect nbdkit-nocache" (default: all)
#   REPS=N               repetitions, order rotated between them (default 3, QUICK 2)
#   SIZE_MIB=N           test size: nbdcopy source size and fio --size (default 1024, QUICK 256)
#   SLACK_MIB=N          backing file = SIZE_MIB + SLACK_MIB (tandem keeps metadata at the end)
#   RUNTIME=S            seconds per measured fio run (default 10, QUICK 3)
#   WARMUP=S             seconds of the fio part of the warm-up (default 2, QUICK 1)
#   CONNS=N              nbdcopy connections (-C N -T N) for every server (default 2 = cores)
#   QEMU_AIO_ODIRECT="threads io_uring"   qemu-nbd --aio variants tried in the O_DIRECT mode;
#                        the better one is reported per row, with its name
#   TANDEM_BIN=PATH      use this binary instead of building with cargo build --release
#   OUT=DIR              where results and scratch files go (default bench/out; must be a real
#                        disk, not tmpfs, because O_DIRECT is measured)
#   KEEP=1               keep the scratch directory (server logs, raw fio JSON)
set -euo pipefail

# The whole script is one brace group, so bash parses it completely before running it and an edit
# of this file during a run cannot change what the run does.
{

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/bench/out}
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    REPS=${REPS:-2} SIZE_MIB=${SIZE_MIB:-256} RUNTIME=${RUNTIME:-3} WARMUP=${WARMUP:-1}
else
    REPS=${REPS:-3} SIZE_MIB=${SIZE_MIB:-1024} RUNTIME=${RUNTIME:-10} WARMUP=${WARMUP:-2}
fi
SLACK_MIB=${SLACK_MIB:-64}
FILE_MIB=$((SIZE_MIB + SLACK_MIB))
CONNS=${CONNS:-2}
SERVERS=${SERVERS:-"tandem qemu-nbd nbdkit"}
MODES=${MODES:-"pagecache odirect nbdkit-nocache"}
QEMU_AIO_ODIRECT=${QEMU_AIO_ODIRECT:-"threads io_uring"}
KEEP=${KEEP:-0}
REQ=1048576 # nbdcopy --request-size: 1 MiB

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in qemu-nbd nbdkit nbdcopy nbdinfo fio jq python3 dd file; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done

mkdir -p "$OUT"
case $(stat -f -c %T "$OUT") in
    tmpfs | ramfs) die "$OUT is on $(stat -f -c %T "$OUT"), which has no O_DIRECT; set OUT to a directory on a real disk" ;;
esac
STAMP=$(date +%Y-%m-%dT%H%M%S)
WORK=$(mktemp -d "$OUT/work.XXXXXX")
RAW=$WORK/raw.jsonl
: >"$RAW"
SERVER_PID="" CLIENT_PID="" REC=""

# run CMD...: runs a client command in the background and waits for it. A foreground child that
# catches SIGINT itself (fio does) would make bash ignore Ctrl-C; the wait builtin instead returns
# at once when a trapped signal arrives, so the trap runs and cleanup() stops the client.
run() {
    "$@" &
    CLIENT_PID=$!
    local rc=0
    wait "$CLIENT_PID" || rc=$?
    CLIENT_PID=""
    return "$rc"
}

stop_server() {
    local pid=${SERVER_PID:-}
    SERVER_PID=""
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        local i
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "server $pid ignored SIGTERM for 10 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $CLIENT_PID ]]; then
        kill -TERM "$CLIENT_PID" 2>/dev/null || true
        wait "$CLIENT_PID" 2>/dev/null || true
    fi
    stop_server
    if [[ $KEEP == 1 ]]; then
        log "scratch kept in $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ---------------------------------------------------------------------------------------------
# tandem binary (the commit is taken before the build: a dirty tree means uncommitted changes)
COMMIT=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)
TANDEM_SIZE="" TANDEM_FILE=""
if [[ " $SERVERS " == *" tandem "* ]]; then
    if [[ -z ${TANDEM_BIN:-} ]]; then
        log "building tandem (cargo build --release -p tandem)"
        (cd "$ROOT" && cargo build --release -p tandem) >&2
        TANDEM_BIN=$ROOT/target/x86_64-unknown-linux-gnu/release/tandem
    fi
    [[ -x $TANDEM_BIN ]] || die "tandem binary $TANDEM_BIN not found"
    TANDEM_SIZE=$(stat -c %s "$TANDEM_BIN")
    TANDEM_FILE=$(file -b "$TANDEM_BIN")
    # run a private copy, so that a rebuild during the run cannot swap the binary between servers
    cp "$TANDEM_BIN" "$WORK/tandem"
    TANDEM_RUN=$WORK/tandem
fi

# ---------------------------------------------------------------------------------------------
# Variants: "variant server mode". A variant is one server configuration; the server is the
# table column; the mode is the table row group (page cache vs O_DIRECT are never compared).
VARIANTS=()
want_server() { [[ " $SERVERS " == *" $1 "* ]]; }
want_mode() { [[ " $MODES " == *" $1 "* ]]; }
if want_mode pagecache; then
    want_server tandem && VARIANTS+=("tandem-pc tandem pagecache")
    want_server qemu-nbd && VARIANTS+=("qemu-nbd-pc qemu-nbd pagecache")
    want_server nbdkit && VARIANTS+=("nbdkit-pc nbdkit pagecache")
fi
if want_mode odirect; then
    want_server tandem && VARIANTS+=("tandem-direct tandem odirect")
    if want_server qemu-nbd; then
        for aio in $QEMU_AIO_ODIRECT; do VARIANTS+=("qemu-nbd-direct-$aio qemu-nbd odirect"); done
    fi
fi
if want_mode nbdkit-nocache && want_server nbdkit; then
    VARIANTS+=("nbdkit-nocache nbdkit nbdkit-nocache")
fi
((${#VARIANTS[@]} > 0)) || die "nothing to run: SERVERS='$SERVERS' MODES='$MODES'"

sock_of() { echo "$WORK/$1.sock"; }
uri_of() { echo "nbd+unix:///?socket=$(sock_of "$1")"; }

# start_server VARIANT IMAGE: starts it in the background, sets SERVER_PID, waits until it answers
# an NBD handshake. Returns 1 (with the log shown) if it fails to come up.
start_server() {
    local v=$1 img=$2 sock
    sock=$(sock_of "$v")
    rm -f "$sock"
    local logf=$WORK/$v.log
    case $v in
    tandem-pc | tandem-direct)
        local d=$WORK/$v.d direct=false
        [[ $v == tandem-direct ]] && direct=true
        rm -rf "$d" && mkdir -p "$d/state"
        cat >"$d/config.toml" <<EOF
[node]
name = "bench"
state_dir = "$d/state"

[volume]
backing = "$img"
nbd_socket = "$sock"
direct_io = $direct

[console]
control_socket = "$d/ctl.sock"
EOF
        "$TANDEM_RUN" run --config "$d/config.toml" >"$logf" 2>&1 &
        ;;
    qemu-nbd-pc)
        # -t: stay up after the last client disconnects; -e 0: unlimited connections (multi-conn)
        qemu-nbd -f raw -k "$sock" -e 0 -t --cache=writeback --aio=threads "$img" >"$logf" 2>&1 &
        ;;
    qemu-nbd-direct-*)
        qemu-nbd -f raw -k "$sock" -e 0 -t --cache=none --aio="${v#qemu-nbd-direct-}" "$img" >"$logf" 2>&1 &
        ;;
    nbdkit-pc)
        nbdkit -U "$sock" -f file "$img" >"$logf" 2>&1 &
        ;;
    nbdkit-nocache)
        nbdkit -U "$sock" -f file "$img" cache=none >"$logf" 2>&1 &
        ;;
    *) die "unknown variant $v" ;;
    esac
    SERVER_PID=$!
    local i
    for ((i = 0; i < 300; i++)); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            local rc=0
            wait "$SERVER_PID" || rc=$?
            SERVER_PID=""
            log "$v exited (status $rc) before serving; its log:"
            sed 's/^/    /' "$logf" >&2
            return 1
        fi
        if [[ -S $sock ]] && nbdinfo --size "$(uri_of "$v")" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    log "$v did not answer on $sock within 30 s; its log:"
    sed 's/^/    /' "$logf" >&2
    stop_server
    return 1
}

# make_image PATH: a fresh, fully written (zeros) backing file of FILE_MIB MiB, durable on disk
# and in the page cache (clean) afterwards -- the same starting state for every server.
make_image() {
    rm -f "$1"
    run dd if=/dev/zero of="$1" bs=1M count="$FILE_MIB" conv=fsync status=none
}

status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || true; }

now_ns() { date +%s%N; }

# record KEY=VALUE... as one JSON object per line in $RAW (values are numbers or strings)
record() {
    local args=() kv k v
    for kv in "$@"; do
        k=${kv%%=*} v=${kv#*=}
        if [[ $v =~ ^-?[0-9]+(\.[0-9]+)?$ ]]; then args+=(--argjson "$k" "$v"); else args+=(--arg "$k" "$v"); fi
    done
    jq -cn "${args[@]}" '$ARGS.named' >>"${REC:-$RAW}"
}

fio_run() { # fio_run VARIANT RW BS IODEPTH SIZE RUNTIME OUTFILE
    run fio --name="$2" --ioengine=nbd --uri="$(uri_of "$1")" --rw="$2" --bs="$3" --iodepth="$4" \
        --size="$5" --time_based --runtime="$6" --output-format=json --output="$7" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# Source data for the write test: random, created once, kept in the page cache.
SRC=$WORK/source.bin
log "creating ${SIZE_MIB} MiB random source $SRC"
run head -c "$((SIZE_MIB * 1048576))" /dev/urandom >"$SRC"
cat "$SRC" >/dev/null

# ---------------------------------------------------------------------------------------------
# Probe: every variant must start and serve; nbdcopy uses multi-conn only where the server
# advertises it, so the connection count is fixed to the same number for every server.
declare -A MULTI EXPORT
PROBE_IMG=$WORK/probe.img
OK_VARIANTS=()
for entry in "${VARIANTS[@]}"; do
    read -r v server mode <<<"$entry"
    make_image "$PROBE_IMG"
    if start_server "$v" "$PROBE_IMG"; then
        info=$(nbdinfo --json "$(uri_of "$v")")
        MULTI[$v]=$(jq -r '.exports[0].can_multi_conn' <<<"$info")
        EXPORT[$v]=$(jq -r '.exports[0]["export-size"]' <<<"$info")
        stop_server
        if ((EXPORT[$v] < SIZE_MIB * 1048576)); then
            log "skipping $v: export size ${EXPORT[$v]} < test size $((SIZE_MIB * 1048576))"
            continue
        fi
        OK_VARIANTS+=("$entry")
        log "probe $v: export ${EXPORT[$v]} bytes, multi-conn ${MULTI[$v]}"
    else
        log "skipping $v: it does not serve"
    fi
done
rm -f "$PROBE_IMG"
((${#OK_VARIANTS[@]} > 0)) || die "no server could be started"
NC=$CONNS
for entry in "${OK_VARIANTS[@]}"; do
    read -r v _ <<<"$entry"
    if [[ ${MULTI[$v]} != true && $NC != 1 ]]; then
        log "warning: $v does not advertise multi-conn; nbdcopy would use 1 connection for it, so every server gets 1"
        NC=1
    fi
done

# ---------------------------------------------------------------------------------------------
# One measured run of one variant.
run_one() { # run_one VARIANT SERVER MODE REP POSITION
    # (called in an || list, where set -e does not apply: every step checks its own status)
    local v=$1 server=$2 mode=$3 rep=$4 pos=$5
    local img=$WORK/$v.img uri t0 t1 size ms hwm_seq hwm_fio rss_end pid f
    REC=$WORK/run.jsonl # this run's records; appended to $RAW only if the whole run succeeds
    : >"$REC"
    uri=$(uri_of "$v")
    make_image "$img" || return 1
    cat "$SRC" >/dev/null
    start_server "$v" "$img" || return 1
    pid=$SERVER_PID
    size=$(nbdinfo --size "$uri") || { stop_server; return 1; }
    local common=(variant="$v" server="$server" mode="$mode" rep="$rep" position="$pos")
    fail() {
        local keep=$OUT/failed-$STAMP-$v-rep$((rep + 1)).log
        log "  $v: $1 failed (server log in $keep; its tail:)"
        stop_server
        cp "$WORK/$v.log" "$keep"
        tail -5 "$keep" | sed 's/^/    /' >&2
        rm -f "$img"
        REC=""
    }

    # Phase 1, sequential (nbdcopy). Warm-up: 1 MiB sequential writes and reads over a quarter.
    run fio --name=warmseq --ioengine=nbd --uri="$uri" --rw=rw --bs=1M --iodepth=8 \
        --size="$((SIZE_MIB / 4))M" --output-format=json --output="$WORK/warmseq.json" >/dev/null ||
        { fail warm-up; return 1; }
    sync

    # 1. sequential 1 MiB writes of the random source, flushed at the end
    t0=$(now_ns)
    run nbdcopy --request-size=$REQ -C "$NC" -T "$NC" --flush "$SRC" "$uri" || { fail "nbdcopy write"; return 1; }
    t1=$(now_ns)
    ms=$(((t1 - t0) / 1000000))
    record "${common[@]}" workload=seqwrite unit=MiB/s ms="$ms" bytes="$((SIZE_MIB * 1048576))" \
        value="$(jq -n "$SIZE_MIB * 1000 / $ms")"
    sync

    # 2. sequential 1 MiB reads of the whole export (no extent queries, so every byte is read)
    t0=$(now_ns)
    run nbdcopy --request-size=$REQ -C "$NC" -T "$NC" --no-extents "$uri" null: || { fail "nbdcopy read"; return 1; }
    t1=$(now_ns)
    ms=$(((t1 - t0) / 1000000))
    record "${common[@]}" workload=seqread unit=MiB/s ms="$ms" bytes="$size" \
        value="$(jq -n "$size / 1048576 * 1000 / $ms")"
    sync

    # peak memory of the sequential phase (start-up, warm-up, nbdcopy with 1 MiB requests)
    hwm_seq=$(status_kib "$pid" VmHWM)
    stop_server

    # Phase 2, random (fio), on a freshly started server over the same file, so that its VmHWM
    # is the peak of start-up + warm-up + the fio runs only. Warm-up: mixed 4 KiB random I/O.
    start_server "$v" "$img" || { fail "restart"; return 1; }
    pid=$SERVER_PID
    fio_run "$v" randrw 4k 32 "${SIZE_MIB}M" "$WARMUP" "$WORK/warmrand.json" || { fail warm-up; return 1; }
    sync

    # 3. 4 KiB random writes, qd32
    f=$WORK/$v-$rep-randwrite.json
    fio_run "$v" randwrite 4k 32 "${SIZE_MIB}M" "$RUNTIME" "$f" || { fail "fio randwrite"; return 1; }
    record "${common[@]}" workload=randwrite unit=IOPS value="$(jq '.jobs[0].write.iops' "$f")" \
        lat_p99_us="$(jq '.jobs[0].write.clat_ns.percentile["99.000000"] / 1000' "$f")"
    sync

    # 4. 4 KiB random reads, qd32, over data laid down by steps 1 and 3
    f=$WORK/$v-$rep-randread.json
    fio_run "$v" randread 4k 32 "${SIZE_MIB}M" "$RUNTIME" "$f" || { fail "fio randread"; return 1; }
    record "${common[@]}" workload=randread unit=IOPS value="$(jq '.jobs[0].read.iops' "$f")" \
        lat_p99_us="$(jq '.jobs[0].read.clat_ns.percentile["99.000000"] / 1000' "$f")"

    hwm_fio=$(status_kib "$pid" VmHWM)
    rss_end=$(status_kib "$pid" VmRSS)
    record "${common[@]}" workload=memory vmhwm_seq_kib="${hwm_seq:-0}" vmhwm_fio_kib="${hwm_fio:-0}" \
        vmrss_end_kib="${rss_end:-0}" export_bytes="$size"
    stop_server
    rm -f "$img"
    log "  $v rep $((rep + 1)): $(jq -r 'select(.workload != "memory") | "\(.workload) \(.value | floor) \(.unit)"' \
        "$REC" | paste -sd, | sed 's/,/, /g'); VmHWM seq ${hwm_seq:-?} KiB, fio ${hwm_fio:-?} KiB"
    cat "$REC" >>"$RAW"
    REC=""
}

# ---------------------------------------------------------------------------------------------
T_START=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "variants: $(for e in "${OK_VARIANTS[@]}"; do printf '%s ' "${e%% *}"; done)"
log "size ${SIZE_MIB} MiB, backing files ${FILE_MIB} MiB, $REPS reps, fio ${RUNTIME}s, nbdcopy -C $NC -T $NC"
for mode in pagecache odirect nbdkit-nocache; do
    group=()
    for entry in "${OK_VARIANTS[@]}"; do
        read -r v server m <<<"$entry"
        [[ $m == "$mode" ]] && group+=("$entry")
    done
    n=${#group[@]}
    ((n > 0)) || continue
    for ((rep = 0; rep < REPS; rep++)); do
        for ((i = 0; i < n; i++)); do
            # rotate: repetition r starts with the r-th variant of the group
            read -r v server m <<<"${group[$(((i + rep) % n))]}"
            log "mode $mode rep $((rep + 1))/$REPS: $v"
            # one retry of a failed run (fresh file, fresh server); both outcomes are recorded
            if ! run_one "$v" "$server" "$mode" "$rep" "$i"; then
                REC="" && stop_server
                record kind=failure variant="$v" rep="$rep" attempt=1
                log "  $v rep $((rep + 1)) failed; retrying once"
                if ! run_one "$v" "$server" "$mode" "$rep" "$i"; then
                    REC="" && stop_server
                    record kind=failure variant="$v" rep="$rep" attempt=2
                    log "  $v rep $((rep + 1)) failed again; its cells have one sample fewer"
                fi
            fi
        done
    done
done
T_END=$(date +%s)

# ---------------------------------------------------------------------------------------------
# Aggregate: medians, table, JSON.
MD=$OUT/results-$STAMP.md
JSON=$OUT/results-$STAMP.json
META=$WORK/meta.json
jq -n \
    --arg date "$(date -Iseconds)" \
    --arg host "$(hostname)" \
    --arg cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
    --argjson cores "$(nproc)" \
    --arg mem "$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)" \
    --arg kernel "$(uname -r)" \
    --arg os "$(. /etc/os-release && echo "$PRETTY_NAME")" \
    --arg fs "$(findmnt -n -o FSTYPE -T "$OUT") on $(df --output=source "$OUT" | tail -1)" \
    --arg qemu "$(qemu-nbd --version | head -1)" \
    --arg nbdkit "$(nbdkit --version)" \
    --arg nbdcopy "$(nbdcopy --version | head -1)" \
    --arg fio "$(fio --version)" \
    --arg commit "$COMMIT" \
    --arg tandem_bin "${TANDEM_BIN:-}" --arg tandem_size "$TANDEM_SIZE" --arg tandem_file "$TANDEM_FILE" \
    --argjson quick "$QUICK" --argjson reps "$REPS" --argjson size_mib "$SIZE_MIB" \
    --argjson file_mib "$FILE_MIB" --argjson runtime "$RUNTIME" --argjson warmup "$WARMUP" \
    --argjson conns "$NC" --argjson elapsed "$((T_END - T_START))" \
    --arg load_start "$LOAD_START" --arg load_end "$(cut -d' ' -f1-3 /proc/loadavg)" \
    --arg command "$( [[ $QUICK == 1 ]] && echo "QUICK=1 bash bench/nbd.sh" || echo "bash bench/nbd.sh")" \
    --arg env "$(env | grep -E '^(SERVERS|MODES|REPS|SIZE_MIB|SLACK_MIB|RUNTIME|WARMUP|CONNS|QEMU_AIO_ODIRECT|TANDEM_BIN)=' | paste -sd' ' || true)" \
    '$ARGS.named' >"$META"
for entry in "${OK_VARIANTS[@]}"; do
    read -r v _ <<<"$entry"
    record kind=probe variant="$v" multi_conn="${MULTI[$v]}" export_bytes="${EXPORT[$v]}"
done

python3 - "$META" "$RAW" "$MD" "$JSON" <<'PY'
import json, statistics, sys

meta_path, raw_path, md_path, json_path = sys.argv[1:]
meta = json.load(open(meta_path))
raw = [json.loads(l) for l in open(raw_path) if l.strip()]
probes = {r["variant"]: r for r in raw if r.get("kind") == "probe"}
failures = [r for r in raw if r.get("kind") == "failure"]
samples = [r for r in raw if r.get("kind") is None]

WORKLOADS = [
    ("seqwrite", "seq write 1 MiB (nbdcopy, --flush)", "MiB/s"),
    ("seqread", "seq read 1 MiB (nbdcopy → null:)", "MiB/s"),
    ("randwrite", "4 KiB rand write qd32 (fio nbd)", "IOPS"),
    ("randread", "4 KiB rand read qd32 (fio nbd)", "IOPS"),
]
MODES = [
    ("pagecache", "page cache"),
    ("odirect", "O_DIRECT"),
    ("nbdkit-nocache", "nbdkit cache=none (not O_DIRECT; informational, not compared)"),
]
SERVERS = ["tandem", "qemu-nbd", "nbdkit"]
VARIANT_LABEL = {
    "tandem-pc": "direct_io = false",
    "tandem-direct": "direct_io = true",
    "qemu-nbd-pc": "--cache=writeback --aio=threads",
    "qemu-nbd-direct-threads": "--cache=none --aio=threads",
    "qemu-nbd-direct-io_uring": "--cache=none --aio=io_uring",
    "qemu-nbd-direct-native": "--cache=none --aio=native",
    "nbdkit-pc": "file plugin, default (16 threads/connection)",
    "nbdkit-nocache": "file plugin cache=none",
}

def fmt(v, unit):
    if v is None:
        return "—"
    if unit == "IOPS":
        return f"{v / 1000:.1f}k IOPS"
    return f"{v:.0f} MiB/s"

cells = {}  # (workload, mode) -> {server: {...}}
for wl, _, unit in WORKLOADS:
    for mode, _ in MODES:
        per_server = {}
        for server in SERVERS:
            variants = sorted({s["variant"] for s in samples
                               if s["workload"] == wl and s["mode"] == mode and s["server"] == server})
            cands = []
            for v in variants:
                vals = [s["value"] for s in samples if s["workload"] == wl and s["variant"] == v]
                cands.append({"variant": v, "config": VARIANT_LABEL.get(v, v),
                              "median": statistics.median(vals), "samples": vals, "unit": unit})
            best = max(cands, key=lambda c: c["median"]) if cands else None
            if best is not None:
                best = dict(best, alternatives={c["variant"]: c["median"] for c in cands if c is not best})
            if best is not None:
                per_server[server] = best
        if not per_server:
            continue
        row = {"workload": wl, "mode": mode, "unit": unit, "servers": per_server}
        others = [c["median"] for s, c in per_server.items() if s != "tandem"]
        if "tandem" in per_server and others and mode != "nbdkit-nocache":
            row["best_other"] = max(others)
            row["ratio"] = per_server["tandem"]["median"] / max(others)
        cells[(wl, mode)] = row

mem = {}
for s in samples:
    if s["workload"] != "memory":
        continue
    m = mem.setdefault(s["variant"], {"server": s["server"], "mode": s["mode"], "vmhwm_fio_kib": [], "vmhwm_seq_kib": []})
    m["vmhwm_fio_kib"].append(s["vmhwm_fio_kib"])
    m["vmhwm_seq_kib"].append(s["vmhwm_seq_kib"])

rows = [cells[(wl, mode)] for mode, _ in MODES for wl, _, _ in WORKLOADS if (wl, mode) in cells]
wl_label = {w: l for w, l, _ in WORKLOADS}
mode_label = dict(MODES)

out = []
p = out.append
p(f"# NBD server benchmark, {meta['date']}")
p("")
p(f"Command: `{meta['command']}`" + (f" (environment: `{meta['env']}`)" if meta["env"] else "") +
  f"; tandem `{meta['commit']}`; elapsed {meta['elapsed'] // 60} min {meta['elapsed'] % 60} s.")
p("")
p(f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['mem']}, {meta['os']}, kernel {meta['kernel']}; "
  f"backing files on {meta['fs']}; load average at start {meta['load_start']}, at end {meta['load_end']}. "
  f"{meta['qemu']}; {meta['nbdkit']}; {meta['nbdcopy']}; {meta['fio']}.")
p("")
p(f"Each cell: median of {meta['reps']} repetitions (server order rotated), after a warm-up; "
  f"test size {meta['size_mib']} MiB, backing files {meta['file_mib']} MiB of written zeros, "
  f"nbdcopy `--request-size=1M -C {meta['conns']} -T {meta['conns']}`, fio {meta['runtime']} s per run, "
  f"one fio connection at iodepth 32, unix sockets.")
p("")
p("| workload | mode | tandem | qemu-nbd | nbdkit | tandem ÷ best other |")
p("|---|---|---|---|---|---|")
for r in rows:
    cols = []
    for s in SERVERS:
        c = r["servers"].get(s)
        if c is None:
            cols.append("n/a")
            continue
        t = fmt(c["median"], r["unit"])
        if s == "qemu-nbd" and r["mode"] == "odirect":
            t += f" ({c['variant'].rsplit('-', 1)[1]})"
        cols.append(t)
    ratio = r.get("ratio")
    rt = "—" if ratio is None else f"**{ratio:.2f}**" + (" ✓" if ratio >= 0.9 else " ✗ (< 0.9)")
    p(f"| {wl_label[r['workload']]} | {mode_label[r['mode']]} | {' | '.join(cols)} | {rt} |")
p("")
mem_lines = []
for v in ("tandem-pc", "tandem-direct"):
    if v in mem:
        m = mem[v]
        mem_lines.append(f"{mode_label[m['mode']]} {max(m['vmhwm_fio_kib']) / 1024:.1f} MiB "
                         f"(nbdcopy phase {max(m['vmhwm_seq_kib']) / 1024:.1f} MiB)")
if mem_lines:
    verdict = all(max(mem[v]["vmhwm_fio_kib"]) < 32 * 1024 for v in ("tandem-pc", "tandem-direct") if v in mem)
    p(f"tandem peak memory (VmHWM) during the fio runs, max over repetitions: {'; '.join(mem_lines)}. "
      f"Target < 32 MiB during the fio runs: **{'met' if verdict else 'NOT met'}**.")
if meta["tandem_size"]:
    p(f"tandem binary: {int(meta['tandem_size']):,} bytes ({int(meta['tandem_size']) / 1048576:.2f} MiB); "
      f"`file`: {meta['tandem_file']}")
p("")
p("Peak memory of every server (VmHWM, max over repetitions). Each run starts the server twice on the same "
  "file: once for the sequential nbdcopy phase (1 MiB requests, 2 connections) and once for the fio phase "
  "(4 KiB, qd32, one connection); each column is the peak of that server process over its whole life.")
p("")
p("| server | configuration | VmHWM nbdcopy phase | VmHWM fio phase | multi-conn |")
p("|---|---|---|---|---|")
for v, m in mem.items():
    p(f"| {m['server']} | {VARIANT_LABEL.get(v, v)} | {max(m['vmhwm_seq_kib']) / 1024:.1f} MiB | "
      f"{max(m['vmhwm_fio_kib']) / 1024:.1f} MiB | {probes.get(v, {}).get('multi_conn', '?')} |")
p("")
if failures:
    p("Failed runs (retried once with a fresh file and server; server logs in bench/out/failed-*.log): " +
      ", ".join(f"{f['variant']} rep {f['rep'] + 1} attempt {f['attempt']}" for f in failures) + ".")
    p("")
p("All samples (by repetition):")
p("")
p("| workload | mode | server | configuration | samples | median |")
p("|---|---|---|---|---|---|")
for mode, _ in MODES:
    for wl, _, unit in WORKLOADS:
        vs = sorted({s["variant"] for s in samples if s["workload"] == wl and s["mode"] == mode})
        for v in vs:
            ss = sorted((s for s in samples if s["workload"] == wl and s["variant"] == v), key=lambda s: s["rep"])
            vals = [s["value"] for s in ss]
            p(f"| {wl_label[wl]} | {mode_label[mode]} | {ss[0]['server']} | {VARIANT_LABEL.get(v, v)} | "
              f"{', '.join(fmt(x, unit) for x in vals)} | {fmt(statistics.median(vals), unit)} |")
md = "\n".join(out) + "\n"
open(md_path, "w").write(md)
sys.stdout.write(md)

result = {
    "meta": meta,
    "rows": [{**r, "servers": r["servers"]} for r in rows],
    "memory": mem,
    "probes": probes,
    "samples": samples,
    "failures": failures,
}
json.dump(result, open(json_path, "w"), indent=2)
PY
log "wrote $MD and $JSON"
exit 0
}
