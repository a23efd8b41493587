//! The engine under test: `spendflow run` as a child process (so its peak RSS is its own, and
//! it pays its real start-up), watched only through its public gRPC API: `Admin/GetStatus` for
//! catch-up, `ExpenseQuery/Subscribe` for freshness, `ListUserSummaries` to check the answer.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_client::AdminClient;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;
use tonic::transport::{Channel, Endpoint};

use crate::fold::UserTotals;
use crate::util::{ChildGuard, check_stop, peak_rss_kib, wall_ms};

/// How often catch-up is polled: the resolution of the catch-up time.
const POLL: Duration = Duration::from_millis(10);

/// A free local port (bound and released; the engine binds it a moment later).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub struct EngineProcess {
    guard: ChildGuard,
    runtime: tokio::runtime::Runtime,
    channel: Channel,
    /// When the process was started: catch-up is timed from here, start-up included.
    pub started: Instant,
}

impl EngineProcess {
    /// Starts `bin run ARGS --grpc 127.0.0.1:<free port>`, stderr to `log`.
    pub fn start(bin: &Path, args: &[String], log: &Path) -> Result<Self> {
        Self::start_under(&[], bin, args, log)
    }

    /// The same, run by `wrapper` (e.g. `perf record ... --`); then [`EngineProcess::pid`]
    /// is the wrapper's.
    pub fn start_under(
        wrapper: &[String],
        bin: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        command
            .arg("run")
            .args(args)
            .arg("--grpc")
            .arg(addr.to_string())
            .env("RUST_LOG", "warn");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let channel = {
            let _guard = runtime.enter();
            Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect_lazy()
        };
        let started = Instant::now();
        let guard = ChildGuard::spawn("spendflow run", command, log, Stdio::null())?;
        Ok(EngineProcess {
            guard,
            runtime,
            channel,
            started,
        })
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// `Admin/GetStatus`, or `None` while the server is not up yet.
    pub fn status(&mut self) -> Result<Option<pb::GetStatusResponse>> {
        self.guard.check_alive()?;
        let mut admin = AdminClient::new(self.channel.clone());
        match self
            .runtime
            .block_on(admin.get_status(pb::GetStatusRequest {}))
        {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == tonic::Code::Unavailable => Ok(None),
            Err(s) => bail!("GetStatus: {s}"),
        }
    }

    /// Waits until the served state covers at least `records` records and the engine reports
    /// `caught_up`; returns when that was first seen, and the status.
    pub fn wait_caught_up(
        &mut self,
        records: u64,
        timeout: Duration,
    ) -> Result<(Instant, pb::GetStatusResponse)> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            check_stop()?;
            if let Some(status) = self.status()? {
                if status.caught_up && status.records_read >= records {
                    return Ok((Instant::now(), status));
                }
                last = Some(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "the engine did not catch up with {records} records in {timeout:?}; last \
                     status: {last:?}"
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Every user's `(total_minor, expense_count)` as served (`ListUserSummaries`, all pages).
    pub fn user_totals(&mut self) -> Result<UserTotals> {
        let mut query = ExpenseQueryClient::new(self.channel.clone());
        let mut out = UserTotals::default();
        let mut token = String::new();
        loop {
            let page = self
                .runtime
                .block_on(query.list_user_summaries(pb::ListUserSummariesRequest {
                    page_size: 1000,
                    page_token: token.clone(),
                    consistency: None,
                }))
                .context("ListUserSummaries")?
                .into_inner();
            for s in page.summaries {
                out.insert(s.user_id, (s.total_minor, s.expense_count));
            }
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    /// Subscribes to `user`'s cells; every time its per-user cell arrives (snapshot or change),
    /// sends `(expense_count, wall ms when received)`.
    pub fn subscribe(&mut self, user: u64) -> Result<mpsc::Receiver<(u64, i64)>> {
        let (tx, rx) = mpsc::channel();
        let mut query = ExpenseQueryClient::new(self.channel.clone());
        let mut stream = self
            .runtime
            .block_on(query.subscribe(pb::SubscribeRequest {
                incarnation: String::new(),
                user_ids: vec![user],
                resume_after_epoch: 0,
            }))
            .context("Subscribe")?
            .into_inner();
        self.runtime.spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                let received = wall_ms();
                let cells = match message.event {
                    Some(pb::subscribe_response::Event::Snapshot(s)) => s.cells,
                    Some(pb::subscribe_response::Event::Changes(c)) => c.cells,
                    _ => continue,
                };
                for cell in cells {
                    if cell.user_id == user && cell.kind == pb::CellKind::User as i32 {
                        let count = if cell.removed { 0 } else { cell.expense_count };
                        if tx.send((count.max(0) as u64, received)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }

    /// Peak resident set size so far, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        peak_rss_kib(self.pid())
    }

    /// Stops the engine (SIGTERM, which it handles by shutting down cleanly).
    pub fn stop(mut self) {
        self.guard.stop(Duration::from_secs(10));
    }
}
