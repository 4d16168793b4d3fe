#!/usr/bin/env bash
# The failover benchmark: two real nodes in network namespaces, a client writing through the
# cluster IP with short timeouts, the primary's power cut N times (default 10), the secondary's
# power cut, a planned switchover and pulled cables. Prints a Markdown table for
# docs/BENCHMARKS.md. Needs root and iproute2.
#
#   bash bench/failover.sh [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "bench/failover.sh needs root (network namespaces)" >&2
    exit 77
fi
command -v ip >/dev/null || { apt-get install -y iproute2 >/dev/null; }
cargo build --release -p tandem -p tandem-tests --bin tandem --bin failover_bench
exec target/x86_64-unknown-linux-gnu/release/failover_bench "$@"
