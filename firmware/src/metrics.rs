//! The Prometheus text exposition of a node's state (`[metrics] listen`), rendered from its
//! [`Status`]. Pure: the runtime serves the text over HTTP.

use crate::node::Status;

/// Upper bounds of the latency buckets, in milliseconds (the last bucket is +Inf).
pub const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];

/// A fixed-size latency histogram (Prometheus style: per-bucket counts, sum and count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Requests that took at most `LATENCY_BUCKETS_MS[i]` (not cumulative; +Inf is the last).
    pub buckets: [u64; LATENCY_BUCKETS_MS.len() + 1],
    /// Sum of all latencies, in milliseconds.
    pub sum_ms: u64,
    /// Requests recorded.
    pub count: u64,
}

impl LatencyHistogram {
    /// Records one request that took `ms` milliseconds.
    pub fn record(&mut self, ms: u64) {
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|le| ms <= *le)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.buckets[bucket] += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
        self.count += 1;
    }
}
use std::fmt::Write;

/// Escapes a label value (backslash, quote, newline), as the text format asks.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out {
    text: String,
    node: String,
}

impl Out {
    fn metric(&mut self, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.text, "# HELP tandem_{name} {help}");
        let _ = writeln!(self.text, "# TYPE tandem_{name} {kind}");
        for (labels, value) in samples {
            let sep = if labels.is_empty() { "" } else { "," };
            let _ = writeln!(
                self.text,
                "tandem_{name}{{node=\"{}\"{sep}{labels}}} {value}",
                self.node
            );
        }
    }
}

/// The metrics text for `status`.
pub fn render(status: &Status) -> String {
    let mut out = Out {
        text: String::new(),
        node: label(&status.node),
    };
    let role = format!("role=\"{}\"", status.role.name());
    out.metric(
        "role",
        "gauge",
        "The node's role (1 for the role in the label).",
        &[(&role, 1.0)],
    );
    out.metric(
        "epoch",
        "gauge",
        "The role epoch.",
        &[("", status.epoch as f64)],
    );
    let disk = format!("state=\"{}\"", status.disk.name());
    out.metric(
        "disk_state",
        "gauge",
        "The local disk's state (1 for the state in the label).",
        &[(&disk, 1.0)],
    );
    let peer = format!("state=\"{}\"", status.peer.name());
    out.metric(
        "peer_state",
        "gauge",
        "What the node knows of its peer (1 for the state in the label).",
        &[(&peer, 1.0)],
    );
    let links = [
        format!("link=\"heartbeat\",state=\"{}\"", status.links.heartbeat),
        format!("link=\"lan\",state=\"{}\"", status.links.lan),
    ];
    out.metric(
        "link_state",
        "gauge",
        "Each link to the peer (1 for the state in the label).",
        &[(&links[0], 1.0), (&links[1], 1.0)],
    );
    let uplink = format!("state=\"{}\"", status.uplink);
    out.metric(
        "uplink_state",
        "gauge",
        "The lan port's carrier and gateway probe (1 for the state in the label).",
        &[(&uplink, 1.0)],
    );
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    out.metric(
        "auto_failover",
        "gauge",
        "1 when automatic failover is configured and not suspended.",
        &[("", flag(status.auto_failover))],
    );
    let rtts: Vec<(String, f64)> = [
        ("heartbeat", status.link_rtt_ms.heartbeat),
        ("lan", status.link_rtt_ms.lan),
    ]
    .iter()
    .filter_map(|(link, rtt)| rtt.map(|ms| (format!("link=\"{link}\""), ms as f64 / 1000.0)))
    .collect();
    let rtt_samples: Vec<(&str, f64)> = rtts.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    out.metric(
        "link_rtt_seconds",
        "gauge",
        "The last round-trip time measured on each link that is up.",
        &rtt_samples,
    );
    out.metric(
        "watchdog_armed",
        "gauge",
        "1 once the hardware watchdog is armed.",
        &[("", flag(status.watchdog.armed))],
    );
    out.metric(
        "watchdog_timeout_seconds",
        "gauge",
        "The timeout the watchdog driver applied.",
        &[("", f64::from(status.watchdog.timeout_s))],
    );
    out.metric(
        "watchdog_pets_total",
        "counter",
        "How often the watchdog was petted.",
        &[("", status.watchdog.pets as f64)],
    );
    out.metric(
        "maintenance",
        "gauge",
        "1 while the operator has suspended automatic failover.",
        &[("", flag(status.maintenance))],
    );
    out.metric(
        "ready_for_failover",
        "gauge",
        "1 when a failover could happen now.",
        &[("", flag(status.ready_for_failover))],
    );
    out.metric(
        "not_ready_reasons",
        "gauge",
        "How many reasons stand against a failover now.",
        &[("", status.not_ready_reasons.len() as f64)],
    );
    out.metric(
        "volume_bytes",
        "gauge",
        "Size of the exported volume.",
        &[("", status.volume_bytes as f64)],
    );
    out.metric(
        "sync_done_bytes",
        "gauge",
        "Bytes copied by the current or last resync.",
        &[("", status.sync.done_bytes as f64)],
    );
    out.metric(
        "sync_total_bytes",
        "gauge",
        "Bytes to copy in the current or last resync.",
        &[("", status.sync.total_bytes as f64)],
    );
    out.metric(
        "sync_running",
        "gauge",
        "1 while a resync runs.",
        &[("", f64::from(u8::from(status.sync_running)))],
    );
    out.metric(
        "out_of_sync_bytes",
        "gauge",
        "Bytes this node's dirty bitmap says may differ from the peer.",
        &[("", status.out_of_sync_bytes as f64)],
    );
    out.metric(
        "uptime_seconds",
        "gauge",
        "Seconds since the node started.",
        &[("", status.uptime_s as f64)],
    );
    out.metric(
        "nbd_clients",
        "gauge",
        "NBD clients connected.",
        &[("", status.clients as f64)],
    );
    out.metric(
        "nbd_requests_in_flight",
        "gauge",
        "NBD requests in flight.",
        &[("", status.requests_in_flight as f64)],
    );
    let io = &status.io;
    out.metric(
        "nbd_requests_total",
        "counter",
        "NBD requests completed, by kind.",
        &[
            ("kind=\"read\"", io.reads as f64),
            ("kind=\"write\"", io.writes as f64),
            ("kind=\"flush\"", io.flushes as f64),
        ],
    );
    out.metric(
        "nbd_bytes_total",
        "counter",
        "Bytes moved by NBD clients, by direction.",
        &[
            ("direction=\"read\"", io.read_bytes as f64),
            ("direction=\"write\"", io.written_bytes as f64),
        ],
    );
    out.metric(
        "nbd_errors_total",
        "counter",
        "NBD requests answered with an error.",
        &[("", io.errors as f64)],
    );
    out.metric(
        "nbd_protocol_violations_total",
        "counter",
        "NBD connections closed for breaking the protocol.",
        &[("", io.protocol_violations as f64)],
    );
    out.metric(
        "nbd_connections_total",
        "counter",
        "NBD connections, by outcome.",
        &[
            ("outcome=\"accepted\"", io.connections_accepted as f64),
            ("outcome=\"refused\"", io.connections_refused as f64),
        ],
    );
    let _ = writeln!(out.text, "# HELP tandem_nbd_request_duration_seconds NBD request latency, admission to completion, by kind.");
    let _ = writeln!(
        out.text,
        "# TYPE tandem_nbd_request_duration_seconds histogram"
    );
    for (kind, histogram) in [
        ("read", &io.latency_read),
        ("write", &io.latency_write),
        ("flush", &io.latency_flush),
    ] {
        let mut cumulative = 0;
        for (i, count) in histogram.buckets.iter().enumerate() {
            cumulative += count;
            let le = LATENCY_BUCKETS_MS
                .get(i)
                .map_or("+Inf".to_string(), |ms| format!("{}", *ms as f64 / 1000.0));
            let _ = writeln!(
                out.text,
                "tandem_nbd_request_duration_seconds_bucket{{node=\"{}\",kind=\"{kind}\",le=\"{le}\"}} {cumulative}",
                out.node
            );
        }
        let _ = writeln!(
            out.text,
            "tandem_nbd_request_duration_seconds_sum{{node=\"{}\",kind=\"{kind}\"}} {}",
            out.node,
            histogram.sum_ms as f64 / 1000.0
        );
        let _ = writeln!(
            out.text,
            "tandem_nbd_request_duration_seconds_count{{node=\"{}\",kind=\"{kind}\"}} {}",
            out.node, histogram.count
        );
    }
    out.text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_the_first_bucket_that_holds_them() {
        let mut histogram = LatencyHistogram::default();
        for ms in [0, 1, 2, 3, 7000] {
            histogram.record(ms);
        }
        assert_eq!(histogram.buckets[0], 2); // 0 and 1 ms: le 1 ms
        assert_eq!(histogram.buckets[1], 1); // 2 ms: le 2 ms
        assert_eq!(histogram.buckets[2], 1); // 3 ms: le 5 ms
        assert_eq!(histogram.buckets[LATENCY_BUCKETS_MS.len()], 1); // 7 s: +Inf
        assert_eq!(histogram.count, 5);
        assert_eq!(histogram.sum_ms, 7006);
    }
}
