//! Prometheus text exposition (format 0.0.4) of resource status, for
//! `rdbadm status --prometheus` (e.g. written to node_exporter's textfile directory
//! by a cron job or a systemd timer).
//!
//! Owns the metric names and their meaning; the values come from
//! [`ResourceStatus`], exactly what `status --json` prints. Names follow the
//! Prometheus conventions: `rdb_` prefix, base units last (`_bytes`), `_total` for
//! counters; one `rdb_resource_info` series carries the states as labels.

use std::fmt::Write as _;

use super::ResourceStatus;

/// Escapes a label value (backslash, double quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Metric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&ResourceStatus) -> Option<f64>,
}

const METRICS: &[Metric] = &[
    Metric {
        name: "rdb_primary",
        kind: "gauge",
        help: "1 when this node is Primary.",
        value: |r| Some(f64::from(u8::from(r.role == "Primary"))),
    },
    Metric {
        name: "rdb_connected",
        kind: "gauge",
        help: "1 when the replication link is up (Connected, SyncSource, SyncTarget, VerifyS, VerifyT, Ahead, Behind).",
        value: |r| {
            let up = matches!(
                r.connection.as_str(),
                "Connected" | "SyncSource" | "SyncTarget" | "VerifyS" | "VerifyT" | "Ahead" | "Behind"
            );
            Some(f64::from(u8::from(up)))
        },
    },
    Metric {
        name: "rdb_disk_up_to_date",
        kind: "gauge",
        help: "1 when this node's data is UpToDate.",
        value: |r| Some(f64::from(u8::from(r.disk == "UpToDate"))),
    },
    Metric {
        name: "rdb_peer_disk_up_to_date",
        kind: "gauge",
        help: "1 when the peer's data is UpToDate.",
        value: |r| Some(f64::from(u8::from(r.peer_disk == "UpToDate"))),
    },
    Metric {
        name: "rdb_size_bytes",
        kind: "gauge",
        help: "Size of the replicated device.",
        value: |r| Some(r.size_bytes as f64),
    },
    Metric {
        name: "rdb_out_of_sync_bytes",
        kind: "gauge",
        help: "Bytes that may differ from the peer (oos).",
        value: |r| Some(r.out_of_sync_bytes as f64),
    },
    Metric {
        name: "rdb_resync_bytes_total",
        kind: "counter",
        help: "Bytes sent or received by resync since up.",
        value: |r| Some(r.resync_bytes_total as f64),
    },
    Metric {
        name: "rdb_net_sent_bytes_total",
        kind: "counter",
        help: "Bytes of data sent to the peer (ns).",
        value: |r| Some(r.counters.net_sent_bytes as f64),
    },
    Metric {
        name: "rdb_net_received_bytes_total",
        kind: "counter",
        help: "Bytes of data received from the peer (nr).",
        value: |r| Some(r.counters.net_received_bytes as f64),
    },
    Metric {
        name: "rdb_disk_written_bytes_total",
        kind: "counter",
        help: "Bytes written to the local disk (dw).",
        value: |r| Some(r.counters.disk_written_bytes as f64),
    },
    Metric {
        name: "rdb_disk_read_bytes_total",
        kind: "counter",
        help: "Bytes read from the local disk (dr).",
        value: |r| Some(r.counters.disk_read_bytes as f64),
    },
    Metric {
        name: "rdb_al_writes_total",
        kind: "counter",
        help: "Activity-log transactions written (al).",
        value: |r| Some(r.counters.al_writes as f64),
    },
    Metric {
        name: "rdb_bm_writes_total",
        kind: "counter",
        help: "Bitmap pages written (bm).",
        value: |r| Some(r.counters.bm_writes as f64),
    },
    Metric {
        name: "rdb_local_pending",
        kind: "gauge",
        help: "Requests submitted to the local disk and not done (lo).",
        value: |r| Some(r.counters.local_pending as f64),
    },
    Metric {
        name: "rdb_peer_pending",
        kind: "gauge",
        help: "Requests sent to the peer awaiting an answer (pe).",
        value: |r| Some(r.counters.peer_pending as f64),
    },
    Metric {
        name: "rdb_unacked",
        kind: "gauge",
        help: "Requests received from the peer and not yet acknowledged (ua).",
        value: |r| Some(r.counters.unacked as f64),
    },
    Metric {
        name: "rdb_app_pending",
        kind: "gauge",
        help: "Application requests not yet completed (ap).",
        value: |r| Some(r.counters.app_pending as f64),
    },
    Metric {
        name: "rdb_nbd_clients",
        kind: "gauge",
        help: "NBD clients connected.",
        value: |r| Some(r.nbd_clients as f64),
    },
    Metric {
        name: "rdb_resync_remaining_bytes",
        kind: "gauge",
        help: "Bytes the running resync still has to move (absent without a resync).",
        value: |r| r.sync.as_ref().map(|s| s.remaining_bytes as f64),
    },
    Metric {
        name: "rdb_resync_speed_bytes_per_second",
        kind: "gauge",
        help: "Average speed of the running resync.",
        value: |r| r.sync.as_ref().map(|s| s.speed_bytes_per_s as f64),
    },
];

/// The resources as Prometheus text; resources that are down (`Unconfigured`) only
/// appear in `rdb_resource_info`.
pub fn render_prometheus(list: &[ResourceStatus]) -> String {
    let mut s = String::new();
    s.push_str("# HELP rdb_resource_info States of a resource as labels (value 1).\n");
    s.push_str("# TYPE rdb_resource_info gauge\n");
    for r in list {
        let _ = writeln!(
            s,
            "rdb_resource_info{{resource=\"{}\",node=\"{}\",role=\"{}\",disk=\"{}\",connection=\"{}\",peer_role=\"{}\",peer_disk=\"{}\",protocol=\"{}\",frontend=\"{}\"}} 1",
            label(&r.name),
            label(&r.node),
            label(&r.role),
            label(&r.disk),
            label(&r.connection),
            label(&r.peer_role),
            label(&r.peer_disk),
            label(&r.protocol),
            label(&r.frontend),
        );
    }
    let live: Vec<&ResourceStatus> = list.iter().filter(|r| r.role != "Unconfigured").collect();
    for m in METRICS {
        let values: Vec<(&ResourceStatus, f64)> = live
            .iter()
            .filter_map(|r| (m.value)(r).map(|v| (*r, v)))
            .collect();
        if values.is_empty() {
            continue;
        }
        let _ = writeln!(s, "# HELP {} {}", m.name, m.help);
        let _ = writeln!(s, "# TYPE {} {}", m.name, m.kind);
        for (r, v) in values {
            let _ = writeln!(
                s,
                "{}{{resource=\"{}\",node=\"{}\"}} {v}",
                m.name,
                label(&r.name),
                label(&r.node)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(json: serde_json::Value) -> ResourceStatus {
        serde_json::from_value(json).expect("a status from status --json")
    }

    #[test]
    fn renders_states_counters_and_escapes_labels() {
        let mut r = status(serde_json::json!({
            "name": "web\"store", "node": "alpha", "role": "Primary", "disk": "UpToDate",
            "connection": "SyncSource", "peer": "beta", "peer_role": "Secondary",
            "peer_disk": "Inconsistent", "protocol": "C", "size_bytes": 1073741824u64,
            "device": "/dev/rdb0", "minor": 0, "nbd_socket": "/run/rdb/r0.nbd",
            "nbd_tcp": null, "frontend": "fuse+loop", "frontend_reason": "auto",
            "backing_device": null, "disk_path": "/dev/sdb1", "io_engine": "sync",
            "out_of_sync_bytes": 4096, "resync_bytes_total": 8192,
            "uuids": {"current": "0", "bitmap": "0", "history": ["0", "0"]},
            "counters": {"disk_written_bytes": 1, "disk_read_bytes": 2, "net_sent_bytes": 3,
                "net_received_bytes": 4, "al_writes": 5, "bm_writes": 6, "local_pending": 7,
                "app_pending": 8, "peer_pending": 9, "unacked": 10},
            "nbd_clients": 1,
            "sync": {"source": true, "total_bytes": 12288, "remaining_bytes": 4096,
                "done_percent": 66.7, "speed_bytes_per_s": 1000, "eta_s": 4, "elapsed_s": 8.0}
        }));
        let text = render_prometheus(std::slice::from_ref(&r));
        assert!(text.contains(
            "rdb_resource_info{resource=\"web\\\"store\",node=\"alpha\",role=\"Primary\",disk=\"UpToDate\",connection=\"SyncSource\",peer_role=\"Secondary\",peer_disk=\"Inconsistent\",protocol=\"C\",frontend=\"fuse+loop\"} 1\n"
        ), "{text}");
        assert!(text.contains("# TYPE rdb_net_sent_bytes_total counter\n"));
        assert!(
            text.contains("rdb_net_sent_bytes_total{resource=\"web\\\"store\",node=\"alpha\"} 3\n")
        );
        assert!(text.contains("rdb_connected{resource=\"web\\\"store\",node=\"alpha\"} 1\n"));
        assert!(text.contains(
            "rdb_resync_remaining_bytes{resource=\"web\\\"store\",node=\"alpha\"} 4096\n"
        ));
        // Every sample line is `name{labels} value`, every family has HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect("a value");
            assert!(
                series.starts_with("rdb_") && series.ends_with('}'),
                "{line}"
            );
            value.parse::<f64>().expect("a number");
        }
        // A resource that is down only has its info line; no resync, no resync gauges.
        r.role = "Unconfigured".into();
        r.sync = None;
        let text = render_prometheus(&[r]);
        assert_eq!(
            text.lines().filter(|l| !l.starts_with('#')).count(),
            1,
            "{text}"
        );
    }
}
