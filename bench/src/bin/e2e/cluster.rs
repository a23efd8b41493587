//! Cluster mode on one host (issue 15): the same keyed input caught up by 1, 2 and 3
//! `spendflow run` processes of one worker each, and what the exchange between them costs.
//!
//! One process is a plain `spendflow run -w 1` (what a single engine is today); 2 and 3 are
//! `spendflow run -w 1 --cluster FILE --process I`, one hostfile on 127.0.0.1 with free ports.
//! Per run: the time from starting the first process until every process's `Admin/GetStatus`
//! says `caught_up` with all records read (the throughput is records / that time, start-up and
//! joining included), and the bytes timely sent between the processes, the sum over processes
//! of `spendflow_cluster_sent_bytes_total` scraped from each one's `--metrics` address at that
//! moment, per record. The section goes into the results file between two markers, so
//! `--cluster-only` can measure it again without touching the rest.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use spendflow_engine::generate::Layout;
use spendflow_engine::source::generator::{GeneratorConfig, Simulator};
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_client::AdminClient;

use crate::Settings;
use crate::kafka;
use crate::util::{ChildGuard, Spread, check_stop, peak_rss_kib, scrape_counter};

/// The counter the engine exports: bytes timely sent to other processes.
pub const SENT_BYTES: &str = "spendflow_cluster_sent_bytes_total";

/// Partitions of the input topic: divisible by 1, 2 and 3, so every process gets as many.
const PARTITIONS: i32 = 6;

/// The markers around the section in the results file.
const BEGIN: &str = "<!-- cluster-mode: begin (written by e2e --cluster-only or a full run) -->";
const END: &str = "<!-- cluster-mode: end -->";

/// One catch-up of `processes` processes.
#[derive(Clone, Debug)]
pub struct ClusterRun {
    pub secs: f64,
    pub rate: f64,
    /// Bytes sent between processes (all processes together) per record read.
    pub sent_per_record: f64,
    /// Sum of the processes' peak RSS, MiB.
    pub rss_mib: f64,
}

/// Every run of one process count.
#[derive(Clone, Debug)]
pub struct ClusterPoint {
    pub processes: usize,
    pub runs: Vec<ClusterRun>,
}

/// Free local ports, all bound at once so they differ (released before the engines bind them).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Whether the statuses account for at least `records` records read: every process reports
/// the cluster's total, or its own share (then they add up).
fn read_all(statuses: &[pb::GetStatusResponse], records: u64) -> bool {
    statuses.iter().all(|s| s.records_read >= records)
        || statuses.iter().map(|s| s.records_read).sum::<u64>() >= records
}

/// One started process: its guard, gRPC and metrics addresses.
struct Node {
    guard: ChildGuard,
    grpc: SocketAddr,
    metrics: SocketAddr,
}

/// Loads `records` records into a fresh keyed topic and measures 1, 2 and 3 processes on it,
/// `s.runs` times each; the topic is deleted afterwards.
pub fn measure(
    s: &Settings,
    prefix: &str,
    work: &Path,
    spendflow: &Path,
    extra_engine_args: &[String],
    records: u64,
    timeout: Duration,
) -> Result<Vec<ClusterPoint>> {
    let topic = format!("{prefix}cluster");
    let layout = Layout::Keyed {
        topic: topic.clone(),
        partitions: PARTITIONS,
    };
    crate::say(format!(
        "[cluster] loading {records} records of {} users into {topic} ({PARTITIONS} partitions)",
        s.users
    ));
    kafka::create_topics(&s.brokers, &[(topic.clone(), PARTITIONS)])?;
    let result = (|| -> Result<Vec<ClusterPoint>> {
        let config = GeneratorConfig {
            seed: s.seed,
            ..spendflow_bench::config(s.users, 0.0)
        };
        let mut sim = Simulator::new(config)?;
        kafka::load(&s.brokers, &layout, &mut sim, records)?;
        drop(sim);
        let mut points = Vec::new();
        for processes in 1..=3 {
            let mut point = ClusterPoint {
                processes,
                runs: Vec::new(),
            };
            for run in 0..s.runs {
                check_stop()?;
                let r = catch_up(
                    s,
                    prefix,
                    &topic,
                    work,
                    spendflow,
                    extra_engine_args,
                    processes,
                    run,
                    records,
                    timeout,
                )?;
                crate::say(format!(
                    "[cluster] {processes} process(es) run {}/{}: {records} records in {:.2} s = \
                     {:.0}/s, {:.1} bytes sent between processes per record, peak RSS {:.0} MiB",
                    run + 1,
                    s.runs,
                    r.secs,
                    r.rate,
                    r.sent_per_record,
                    r.rss_mib
                ));
                point.runs.push(r);
            }
            points.push(point);
        }
        Ok(points)
    })();
    if let Err(e) = kafka::delete_topics_with_prefix(&s.brokers, &topic) {
        crate::say(format!("could not delete {topic}: {e:#}"));
    }
    result
}

/// One catch-up of `processes` fresh processes.
#[allow(clippy::too_many_arguments)]
fn catch_up(
    s: &Settings,
    prefix: &str,
    topic: &str,
    work: &Path,
    spendflow: &Path,
    extra_engine_args: &[String],
    processes: usize,
    run: usize,
    records: u64,
    timeout: Duration,
) -> Result<ClusterRun> {
    let ports = free_ports(3 * processes)?;
    let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let hostfile = work.join(format!("cluster-{processes}-{run}.hosts"));
    if processes > 1 {
        let mut text = String::from("# TIMELY_ADDR GRPC_ADDR\n");
        for i in 0..processes {
            let _ = writeln!(text, "{} {}", local(ports[i]), local(ports[processes + i]));
        }
        std::fs::write(&hostfile, text)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let mut nodes = Vec::new();
    for i in 0..processes {
        let grpc = local(ports[processes + i]);
        let metrics = local(ports[2 * processes + i]);
        let mut command = Command::new(spendflow);
        command
            .arg("run")
            .args(["-w", "1", "--input", &format!("kafka:{}", s.brokers)])
            .args(["--topic", topic])
            .args(["--dead-letter-topic", &format!("{prefix}dead-letter")])
            .args(["--metrics", &metrics.to_string()]);
        if processes > 1 {
            command
                .arg("--cluster")
                .arg(&hostfile)
                .args(["--process", &i.to_string()]);
        } else {
            command.args(["--grpc", &grpc.to_string()]);
        }
        command.args(extra_engine_args).env("RUST_LOG", "warn");
        let log = work.join(format!("engine-cluster-{processes}-{run}-p{i}.log"));
        let guard = ChildGuard::spawn("spendflow run (cluster)", command, &log, Stdio::null())
            .with_context(|| format!("log: {}", log.display()))?;
        nodes.push(Node {
            guard,
            grpc,
            metrics,
        });
    }
    let deadline = started + timeout;
    // Each process must have said `caught_up` since the records read added up (not all at one
    // poll: in cluster mode the gathered flag flickers between polls while nothing is left).
    let mut said = vec![false; processes];
    let caught = loop {
        check_stop()?;
        let mut statuses = Vec::new();
        for node in nodes.iter_mut() {
            node.guard.check_alive()?;
            let addr = format!("http://{}", node.grpc);
            let status = runtime.block_on(async {
                let mut admin = AdminClient::connect(addr).await.ok()?;
                admin
                    .get_status(pb::GetStatusRequest {})
                    .await
                    .ok()
                    .map(tonic::Response::into_inner)
            });
            statuses.extend(status);
        }
        if statuses.len() == processes && read_all(&statuses, records) {
            for (said, status) in said.iter_mut().zip(&statuses) {
                *said |= status.caught_up;
            }
            if said.iter().all(|s| *s) {
                break started.elapsed();
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{processes} process(es) did not catch up with {records} records in {timeout:?}; \
                 logs in {}",
                work.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut sent = 0.0;
    let mut rss_kib = 0;
    for node in &nodes {
        if processes > 1 {
            sent += scrape_counter(&node.metrics.to_string(), SENT_BYTES)?;
        }
        rss_kib += peak_rss_kib(node.guard.pid()).unwrap_or(0);
    }
    for node in nodes.iter_mut() {
        node.guard.stop(Duration::from_secs(10));
    }
    let secs = caught.as_secs_f64();
    Ok(ClusterRun {
        secs,
        rate: records as f64 / secs,
        sent_per_record: sent / records as f64,
        rss_mib: rss_kib as f64 / 1024.0,
    })
}

/// The results section (with its markers).
pub fn render(points: &[ClusterPoint], s: &Settings, records: u64, load: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{BEGIN}");
    let _ = writeln!(out, "## Cluster mode on one host (issue 15)\n");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "**On {cores} cores this shows what the exchange between processes costs, not a \
         speed-up.** All processes run on this one machine, beside Kafka (and the other \
         services), so 2 or 3 processes only share the same cores among more threads; what \
         they add is the serialisation and the TCP exchange of every record between \
         processes. Scaling out pays off when the processes get cores (hosts) of their own.\n"
    );
    let _ = writeln!(
        out,
        "Input: {records} simulator records of {} users (seed {}) in one keyed topic with \
         {PARTITIONS} partitions, no durable sink; each process `-w 1`. 1 process is a plain \
         `spendflow run -w 1`; 2 and 3 are `spendflow run -w 1 --cluster FILE --process I` on \
         127.0.0.1. Time: from starting the first process until all records are read and \
         every process's `Admin/GetStatus` has said `caught_up` (start-up and joining \
         included; polled every 20 ms). Bytes sent: the sum over the processes of `{SENT_BYTES}` (scraped from \
         `--metrics`) at that moment, per record. {} run(s) each: min / median / max. Load \
         average (1, 5, 15 min) {load}.\n",
        s.users, s.seed, s.runs
    );
    let _ = writeln!(
        out,
        "| processes × workers | catch-up records/s | vs 1 process (median) | bytes sent between processes per record (median) | peak RSS, all processes (median, MiB) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    let base = points
        .first()
        .and_then(|p| Spread::of(&p.runs.iter().map(|r| r.rate).collect::<Vec<_>>()))
        .map(|s| s.median);
    for p in points {
        let rates = Spread::of(&p.runs.iter().map(|r| r.rate).collect::<Vec<_>>());
        let sent = Spread::of(&p.runs.iter().map(|r| r.sent_per_record).collect::<Vec<_>>());
        let rss = Spread::of(&p.runs.iter().map(|r| r.rss_mib).collect::<Vec<_>>());
        let rate_text = rates.map_or("n/a".into(), |r| {
            format!("{:.0} / {:.0} / {:.0}", r.min, r.median, r.max)
        });
        let ratio = match (rates, base) {
            (Some(r), Some(b)) if b > 0.0 => format!("{:.2}×", r.median / b),
            _ => "n/a".into(),
        };
        let sent_text = if p.processes == 1 {
            "0 (nothing to exchange)".to_string()
        } else {
            sent.map_or("n/a".into(), |s| format!("{:.1}", s.median))
        };
        let _ = writeln!(
            out,
            "| {} × 1 | {rate_text} | {ratio} | {sent_text} | {} |",
            p.processes,
            rss.map_or("n/a".into(), |r| format!("{:.0}", r.median))
        );
    }
    let _ = writeln!(out, "{END}");
    out
}

/// Puts `section` into the file at `path`: in place of an earlier one between the markers, or
/// appended.
pub fn splice(path: &Path, section: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => {
            let after = &old[e + END.len()..];
            format!("{}{}{}", &old[..b], section.trim_end_matches('\n'), after)
        }
        _ if old.is_empty() => section.to_string(),
        _ => format!("{}\n\n{section}", old.trim_end_matches('\n')),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, new).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_the_section_or_appends_it() {
        let dir = std::env::temp_dir().join(format!("e2e-splice-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("RESULTS.md");
        std::fs::write(&path, "# results\n\nbody\n").unwrap();
        splice(&path, &format!("{BEGIN}\none\n{END}\n")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("# results\n\nbody\n\n{BEGIN}\none\n{END}\n"));
        std::fs::write(&path, format!("# r\n{BEGIN}\nold\n{END}\ntail\n")).unwrap();
        splice(&path, &format!("{BEGIN}\nnew\n{END}\n")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("# r\n{BEGIN}\nnew\n{END}\ntail\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn read_all_takes_the_cluster_total_or_the_sum_of_shares() {
        let status = |read| pb::GetStatusResponse {
            records_read: read,
            ..Default::default()
        };
        assert!(read_all(&[status(10), status(10)], 10));
        assert!(read_all(&[status(4), status(6)], 10));
        assert!(read_all(&[status(5), status(5)], 10));
        assert!(!read_all(&[status(4), status(5)], 10));
    }
}
