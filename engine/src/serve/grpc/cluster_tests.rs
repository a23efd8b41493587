//! Three gRPC servers on port 0, each over a read model holding the users a 3-process topology
//! gives it, against one server over a model holding every user: every server answers like the
//! single one.

use std::sync::atomic::Ordering;
use std::time::Duration;

use spendflow_operators::{AggKey, CellChange, Name};
use spendflow_proto::v1::admin_client::AdminClient;
use spendflow_proto::v1::alerts_client::AlertsClient;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::*;
use crate::cluster::ProcessAddrs;
use crate::pipeline::{EpochClock, Shared};
use crate::serve::auth::{AuthKey, Authenticator, Scopes, mint_hs256};
use crate::serve::grpc::{GrpcError, cluster_peers, cluster_router, serve_router};
use crate::serve::read_model::{AsOf, EpochDelta, ReadModelWriter};
use crate::serve::status::StatusProbe;
use crate::serve::transport::Transport;
use crate::sink::dead_letter::DeadLetters;

const PROCESSES: usize = 3;
const WORKERS: usize = 2;
const USERS: u64 = 60;

/// The cells of epoch `epoch`: every user gets an expense (totals with ties, two categories,
/// a merchant, a day and a month); epoch 3 changes a few users and removes one.
fn cells(epoch: Epoch) -> Vec<CellChange> {
    let (food, _) = Name::intern("food");
    let (travel, _) = Name::intern("travel");
    let (shop, _) = Name::intern("shop");
    let mut cells = Vec::new();
    let mut expense = |user: UserId, category: Name, sum: i64, day: i32, count: i64| {
        cells.extend([
            CellChange {
                key: AggKey::User(user),
                count,
                sum,
            },
            CellChange {
                key: AggKey::Category(user, category),
                count,
                sum,
            },
            CellChange {
                key: AggKey::Merchant(user, shop),
                count,
                sum,
            },
            CellChange {
                key: AggKey::Day(user, day),
                count,
                sum,
            },
            CellChange {
                key: AggKey::Month(user, day / 31),
                count,
                sum,
            },
        ]);
    };
    match epoch {
        1 => {
            for user in 1..=USERS {
                // Ties: users with the same remainder have the same total.
                expense(user, food, ((user * 37) % 11 + 1) as i64 * 100, 20_000, 1);
            }
        }
        2 => {
            for user in (1..=USERS).step_by(3) {
                expense(user, travel, (user % 7) as i64 * 50 + 5, 20_001, 1);
            }
        }
        _ => {
            for user in [2, 5, 11, 29, 44] {
                expense(user, travel, 10_000 + user as i64, 20_002, 1);
            }
            // User 9's only expense goes away.
            expense(9, food, -(((9 * 37) % 11 + 1) as i64 * 100), 20_000, -1);
        }
    }
    cells
}

fn delta(epoch: Epoch, keep: impl Fn(UserId) -> bool) -> EpochDelta {
    EpochDelta {
        as_of: AsOf {
            epoch,
            ..AsOf::default()
        },
        cells: cells(epoch)
            .into_iter()
            .filter(|c| keep(c.key.user_id()))
            .collect(),
        ..EpochDelta::default()
    }
}

fn topology(process: usize) -> Topology {
    Topology {
        process,
        processes: PROCESSES,
        workers_per_process: WORKERS,
    }
}

struct Server {
    addr: std::net::SocketAddr,
    writer: ReadModelWriter,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Result<(), GrpcError>>>,
}

/// The single engine (index `PROCESSES`) and the cluster's processes (0..PROCESSES), every model
/// at epochs 1 and 2.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    servers: Vec<Server>,
    transport: Transport,
}

fn status(model: &Arc<ReadModel>, topology: Topology, spec: Option<ClusterSpec>) -> StatusProbe {
    let mut shared = Shared::new(
        WORKERS,
        EpochClock::new(Duration::from_millis(10), 1000),
        Arc::new(DeadLetters::default()),
    );
    shared.topology = topology;
    shared.cluster = spec.map(Arc::new);
    for worker in &shared.workers {
        worker.idle.store(true, Ordering::Release);
    }
    StatusProbe {
        shared: Arc::new(shared),
        read_model: Arc::clone(model),
    }
}

impl Fixture {
    fn start() -> Fixture {
        Fixture::start_with(Transport::default(), None)
    }

    /// Every server (and the peers' calls) with `transport`'s TLS, and `auth` if given.
    fn start_with(transport: Transport, auth: Option<Arc<Authenticator>>) -> Fixture {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let incarnation: Arc<str> = Arc::from("test-incarnation");
        let listeners: Vec<TcpListener> = (0..=PROCESSES)
            .map(|_| runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap())
            .collect();
        let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let mut servers = Vec::new();
        for (index, listener) in listeners.into_iter().enumerate() {
            let (model, mut writer) = ReadModel::with_incarnation(Arc::clone(&incarnation));
            let single = index == PROCESSES;
            let (routes, stop) = runtime.block_on(async {
                let (status, peers) = if single {
                    (status(&model, Topology::single(WORKERS), None), None)
                } else {
                    let spec = ClusterSpec {
                        processes: addrs[..PROCESSES]
                            .iter()
                            .map(|a| ProcessAddrs {
                                timely: "127.0.0.1:1".into(),
                                grpc: a.to_string(),
                            })
                            .collect(),
                        process: index,
                        wait: crate::cluster::DEFAULT_WAIT,
                    };
                    let status = status(&model, topology(index), Some(spec));
                    let peers = cluster_peers(&status, &transport).unwrap();
                    assert!(peers.is_some());
                    (status, peers)
                };
                let routes = cluster_router(Arc::clone(&model), status, None, auth.clone(), peers)
                    .await
                    .unwrap();
                (routes, watch::channel(false).0)
            });
            for epoch in [1, 2] {
                writer.apply(delta(epoch, |user| {
                    single || topology(index).owner_process(user) == index
                }));
            }
            let mut stopped = stop.subscribe();
            let task = runtime.spawn(serve_router(
                listener,
                routes,
                transport.clone(),
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            ));
            servers.push(Server {
                addr: addrs[index],
                writer,
                stop,
                task: Some(task),
            });
        }
        // Every process owns some users.
        for process in 0..PROCESSES {
            assert!(
                (1..=USERS).any(|u| topology(0).owner_process(u) == process),
                "process {process} owns no user"
            );
        }
        Fixture {
            runtime,
            servers,
            transport,
        }
    }

    fn single(&self) -> usize {
        PROCESSES
    }

    /// A client of `server` (over TLS, presenting the servers' own certificate for mTLS, when
    /// they serve TLS).
    fn channel(&self, server: usize) -> tonic::transport::Channel {
        let addr = self.servers[server].addr;
        let scheme = self.transport.scheme();
        let mut endpoint =
            tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap();
        if let Some(tls) = &self.transport.tls {
            endpoint = endpoint.tls_config(tls.grpc_client_config()).unwrap();
        }
        self.runtime.block_on(endpoint.connect()).unwrap()
    }

    fn query(&self, server: usize) -> ExpenseQueryClient<tonic::transport::Channel> {
        ExpenseQueryClient::new(self.channel(server))
    }

    fn owner(&self, user: UserId) -> usize {
        topology(0).owner_process(user)
    }

    /// Publishes epoch 3 in the models of the cluster's `processes` (and the single one's).
    fn epoch_3(&mut self, processes: &[usize]) {
        for &index in processes {
            let single = index == PROCESSES;
            self.servers[index].writer.apply(delta(3, |user| {
                single || topology(index).owner_process(user) == index
            }));
        }
    }
}

fn summary(user: UserId) -> pb::GetUserSummaryRequest {
    pb::GetUserSummaryRequest {
        user_id: user,
        consistency: None,
    }
}

#[test]
fn every_process_answers_every_user_like_one_engine() {
    let fixture = Fixture::start();
    let mut single = fixture.query(fixture.single());
    let mut remote_answers = 0;
    for server in 0..PROCESSES {
        let mut client = fixture.query(server);
        for user in 1..=USERS + 1 {
            let want = fixture
                .runtime
                .block_on(single.get_user_summary(summary(user)));
            let got = fixture
                .runtime
                .block_on(client.get_user_summary(summary(user)));
            match (want, got) {
                (Ok(want), Ok(got)) => {
                    let (want, got) = (want.into_inner(), got.into_inner());
                    assert_eq!(want.summary, got.summary, "user {user} on {server}");
                    assert_eq!(got.as_of.unwrap().epoch, 2);
                    if fixture.owner(user) != server {
                        remote_answers += 1;
                    }
                }
                (Err(want), Err(got)) => {
                    // User 61 has no expense: the owner's NOT_FOUND comes back as it is.
                    assert_eq!(want.code(), got.code(), "user {user} on {server}");
                    assert_eq!(want.message(), got.message());
                }
                (want, got) => panic!("user {user} on {server}: {want:?} vs {got:?}"),
            }
            let windows = |user| pb::GetUserWindowsRequest {
                user_id: user,
                granularity: pb::Granularity::Day.into(),
                from: "2024-10-01".into(),
                to: "2024-12-31".into(),
                consistency: None,
            };
            let want = fixture
                .runtime
                .block_on(single.get_user_windows(windows(user)))
                .map(|r| r.into_inner().windows);
            let got = fixture
                .runtime
                .block_on(client.get_user_windows(windows(user)))
                .map(|r| r.into_inner().windows);
            match (want, got) {
                (Ok(want), Ok(got)) => assert_eq!(want, got, "windows of {user} on {server}"),
                (Err(want), Err(got)) => assert_eq!(want.code(), got.code()),
                (want, got) => panic!("windows of {user} on {server}: {want:?} vs {got:?}"),
            }
        }
    }
    assert!(remote_answers > USERS as usize, "{remote_answers}");
    // Bad input is refused as one engine refuses it, not forwarded.
    let mut client = fixture.query(0);
    let status = fixture
        .runtime
        .block_on(client.get_user_summary(summary(0)))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

fn top(limit: u32) -> pb::TopSpendersRequest {
    pb::TopSpendersRequest {
        limit,
        consistency: None,
    }
}

fn all_pages(
    fixture: &Fixture,
    client: &mut ExpenseQueryClient<tonic::transport::Channel>,
    page_size: u32,
) -> Vec<pb::ListUserSummariesResponse> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = fixture
            .runtime
            .block_on(client.list_user_summaries(pb::ListUserSummariesRequest {
                page_size,
                page_token: token.clone(),
                consistency: None,
            }))
            .unwrap()
            .into_inner();
        token = page.next_page_token.clone();
        pages.push(page);
        if token.is_empty() {
            return pages;
        }
        assert!(pages.len() < 100, "paging does not end");
    }
}

#[test]
fn gathered_answers_equal_one_engines_and_pages_work_across_processes() {
    let fixture = Fixture::start();
    let mut single = fixture.query(fixture.single());
    for server in 0..PROCESSES {
        let mut client = fixture.query(server);
        for limit in [1, 5, 13, 1000] {
            let want = fixture
                .runtime
                .block_on(single.top_spenders(top(limit)))
                .unwrap()
                .into_inner();
            let got = fixture
                .runtime
                .block_on(client.top_spenders(top(limit)))
                .unwrap()
                .into_inner();
            assert_eq!(want.spenders, got.spenders, "limit {limit} on {server}");
            assert_eq!(got.as_of.as_ref().unwrap().epoch, 2);
            assert_eq!(got.as_of.unwrap().incarnation, "test-incarnation");
        }
        for page_size in [1, 7, 20, 60, 1000] {
            let want = all_pages(&fixture, &mut single, page_size);
            let got = all_pages(&fixture, &mut client, page_size);
            let strip = |pages: Vec<pb::ListUserSummariesResponse>| {
                pages
                    .into_iter()
                    .map(|p| (p.summaries, p.next_page_token))
                    .collect::<Vec<_>>()
            };
            assert_eq!(strip(want), strip(got), "page size {page_size} on {server}");
        }
    }
}

#[test]
fn a_process_ahead_answers_as_of_the_gathering_epoch() {
    let mut fixture = Fixture::start();
    // Process 1 publishes epoch 3 before the others: asked on process 0 (at epoch 2), the
    // cluster answers as of epoch 2 everywhere, not a mix of 2 and 3.
    fixture.epoch_3(&[1]);
    let mut single = fixture.query(fixture.single());
    let mut client = fixture.query(0);
    let want = fixture
        .runtime
        .block_on(single.top_spenders(top(1000)))
        .unwrap()
        .into_inner();
    let got = fixture
        .runtime
        .block_on(client.top_spenders(top(1000)))
        .unwrap()
        .into_inner();
    assert_eq!(want.spenders, got.spenders);
    assert_eq!(got.as_of.unwrap().epoch, 2);
    let strip = |pages: Vec<pb::ListUserSummariesResponse>| {
        pages
            .into_iter()
            .flat_map(|p| p.summaries)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(all_pages(&fixture, &mut single, 10)),
        strip(all_pages(&fixture, &mut client, 10))
    );
    // Asked on process 1 (at epoch 3), the others are waited for.
    let mut ahead = fixture.query(1);
    let waiting = fixture
        .runtime
        .spawn(async move { ahead.top_spenders(top(1000)).await });
    fixture.epoch_3(&[0, 2, fixture.single()]);
    let got = fixture
        .runtime
        .block_on(waiting)
        .unwrap()
        .unwrap()
        .into_inner();
    let want = fixture
        .runtime
        .block_on(single.top_spenders(top(1000)))
        .unwrap()
        .into_inner();
    assert_eq!(want.as_of.unwrap().epoch, 3);
    assert_eq!(got.as_of.unwrap().epoch, 3);
    assert_eq!(want.spenders, got.spenders);
}

#[test]
fn a_dead_peer_gives_unavailable_naming_it_and_status_lists_every_process() {
    let mut fixture = Fixture::start();
    let mut admin = AdminClient::new(fixture.channel(0));
    let status = fixture
        .runtime
        .block_on(admin.get_status(pb::GetStatusRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(status.processes.len(), PROCESSES);
    assert!(status.caught_up, "{status:?}");
    for (i, process) in status.processes.iter().enumerate() {
        assert_eq!(process.process, i as u32);
        assert_eq!(process.grpc_address, fixture.servers[i].addr.to_string());
        assert!(process.reachable && process.caught_up, "{process:?}");
        assert_eq!(process.published_epoch, 2);
        let workers: Vec<u32> = process.workers.iter().map(|w| w.worker).collect();
        let first = (i * WORKERS) as u32;
        assert_eq!(workers, vec![first, first + 1]);
        let owned = (1..=USERS).filter(|u| fixture.owner(*u) == i).count();
        assert_eq!(process.users, owned as u64);
    }

    // Process 2 stops (its server has ended once the task completes).
    let mut client = fixture.query(0);
    fixture.servers[2].stop.send_replace(true);
    let task = fixture.servers[2].task.take().unwrap();
    fixture
        .runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), task).await })
        .expect("the server did not stop")
        .unwrap()
        .unwrap();
    let dead = fixture.servers[2].addr.to_string();
    let user = (1..=USERS).find(|u| fixture.owner(*u) == 2).unwrap();
    let status = fixture
        .runtime
        .block_on(client.get_user_summary(summary(user)))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&dead), "{status:?}");
    assert!(status.message().contains("process 2"), "{status:?}");
    let status = fixture
        .runtime
        .block_on(client.top_spenders(top(10)))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&dead), "{status:?}");
    // Users the living processes own are still answered.
    let alive = (1..=USERS).find(|u| fixture.owner(*u) == 1).unwrap();
    fixture
        .runtime
        .block_on(client.get_user_summary(summary(alive)))
        .unwrap();

    let status = fixture
        .runtime
        .block_on(admin.get_status(pb::GetStatusRequest {}))
        .unwrap()
        .into_inner();
    assert!(!status.caught_up);
    assert_eq!(status.processes.len(), PROCESSES);
    assert!(!status.processes[2].reachable);
    assert!(status.processes[2].error.contains(&dead), "{status:?}");
    assert!(status.processes[0].reachable && status.processes[1].reachable);
}

/// Cells of a subscription's snapshot, sorted, and its epoch.
fn snapshot_cells(
    runtime: &tokio::runtime::Runtime,
    stream: &mut tonic::Streaming<pb::SubscribeResponse>,
) -> (Vec<pb::Cell>, Epoch) {
    let mut cells = Vec::new();
    loop {
        let message = runtime.block_on(stream.message()).unwrap().unwrap();
        match message.event {
            Some(pb::subscribe_response::Event::Snapshot(s)) => {
                cells.extend(s.cells);
                if s.last {
                    cells.sort_by(|a, b| {
                        (a.user_id, a.kind, &a.key).cmp(&(b.user_id, b.kind, &b.key))
                    });
                    return (cells, s.as_of.unwrap().epoch);
                }
            }
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }
}

/// The next epoch's changes (sorted) and progress mark.
fn next_epoch(
    runtime: &tokio::runtime::Runtime,
    stream: &mut tonic::Streaming<pb::SubscribeResponse>,
) -> (Vec<pb::Cell>, Epoch) {
    let mut cells = Vec::new();
    loop {
        let message = runtime.block_on(stream.message()).unwrap().unwrap();
        match message.event {
            Some(pb::subscribe_response::Event::Changes(c)) => cells.extend(c.cells),
            Some(pb::subscribe_response::Event::Progress(p)) => {
                cells.sort_by(|a, b| (a.user_id, a.kind, &a.key).cmp(&(b.user_id, b.kind, &b.key)));
                return (cells, p.as_of.unwrap().epoch);
            }
            other => panic!("expected changes or progress, got {other:?}"),
        }
    }
}

#[test]
fn subscriptions_work_from_every_process() {
    let mut fixture = Fixture::start();
    let mut single = fixture.query(fixture.single());
    let mut client = fixture.query(0);
    let subscribe = |users: Vec<u64>| pb::SubscribeRequest {
        user_ids: users,
        resume_after_epoch: 0,
        incarnation: String::new(),
    };
    // One user another process owns (relayed), users of every process, and every user
    // (merged).
    let remote = (1..=USERS).find(|u| fixture.owner(*u) == 2).unwrap();
    let spread: Vec<u64> = vec![2, 5, 9, 11, 29, 44, remote];
    let mut streams = Vec::new();
    for users in [vec![remote], spread, Vec::new()] {
        let want = fixture
            .runtime
            .block_on(single.subscribe(subscribe(users.clone())))
            .unwrap()
            .into_inner();
        let got = fixture
            .runtime
            .block_on(client.subscribe(subscribe(users.clone())))
            .unwrap()
            .into_inner();
        streams.push((users, want, got));
    }
    for (users, want, got) in &mut streams {
        let want = snapshot_cells(&fixture.runtime, want);
        let got = snapshot_cells(&fixture.runtime, got);
        assert_eq!(want, got, "snapshot of {users:?}");
        assert_eq!(got.1, 2);
    }
    fixture.epoch_3(&[0, 1, 2, fixture.single()]);
    for (users, want, got) in &mut streams {
        let want = next_epoch(&fixture.runtime, want);
        let got = next_epoch(&fixture.runtime, got);
        assert_eq!(want, got, "epoch 3 of {users:?}");
        assert_eq!(got.1, 3);
    }

    // Alerts: one user another process owns, and every user's (no alerts in this data: a
    // snapshot that is empty and complete, then the progress of epoch 4).
    let mut alerts = AlertsClient::new(fixture.channel(0));
    for user in [remote, 0] {
        let mut stream = fixture
            .runtime
            .block_on(alerts.subscribe(pb::SubscribeAlertsRequest {
                user_id: user,
                resume_after_epoch: 0,
                incarnation: String::new(),
            }))
            .unwrap()
            .into_inner();
        let first = fixture.runtime.block_on(stream.message()).unwrap().unwrap();
        match first.event {
            Some(pb::subscribe_alerts_response::Event::Snapshot(s)) => {
                assert!(s.last && s.alerts.is_empty(), "{s:?}");
                assert_eq!(s.as_of.unwrap().epoch, 3);
            }
            other => panic!("{other:?}"),
        }
        let listed = fixture
            .runtime
            .block_on(alerts.list_alerts(pb::ListAlertsRequest {
                user_id: user,
                ..Default::default()
            }))
            .unwrap()
            .into_inner();
        assert!(listed.alerts.is_empty());
        assert_eq!(listed.as_of.unwrap().epoch, 3);
    }
}

/// A CA and a certificate for 127.0.0.1 usable by a server and as a client (made with openssl
/// in `dir`): a cluster process presents its server certificate to its peers under mTLS.
/// `chain.pem` is the certificate followed by its CA (what a server without a client CA
/// trusts its peers by).
fn certificates(dir: &std::path::Path) {
    let script = r#"set -e
openssl ecparam -name prime256v1 -genkey -noout -out ca-key.pem
openssl req -x509 -new -key ca-key.pem -sha256 -days 2 -subj "/CN=test CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign -out ca.pem
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server-key.pem
openssl req -new -key server-key.pem -subj "/CN=engine" -out server.csr
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -sha256 \
  -days 2 -extfile server.ext -out server.pem
cat server.pem ca.pem > chain.pem
"#;
    let output = std::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn peers_call_each_other_over_tls_and_mtls() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    for client_ca in [None, Some(dir.path().join("ca.pem"))] {
        let mtls = client_ca.is_some();
        let tls = crate::serve::transport::LoadedTls::load(&crate::config::TlsConfig {
            cert: dir.path().join("chain.pem"),
            key: dir.path().join("server-key.pem"),
            client_ca,
        })
        .unwrap();
        let fixture = Fixture::start_with(
            Transport {
                tls: Some(Arc::new(tls)),
                ..Transport::default()
            },
            None,
        );
        let mut single = fixture.query(fixture.single());
        let mut client = fixture.query(0);
        let remote = (1..=USERS).find(|u| fixture.owner(*u) == 1).unwrap();
        let want = fixture
            .runtime
            .block_on(single.get_user_summary(summary(remote)))
            .unwrap()
            .into_inner();
        let got = fixture
            .runtime
            .block_on(client.get_user_summary(summary(remote)))
            .unwrap_or_else(|e| panic!("mtls {mtls}: {e:?}"))
            .into_inner();
        assert_eq!(want.summary, got.summary, "mtls {mtls}");
        let want = fixture
            .runtime
            .block_on(single.top_spenders(top(1000)))
            .unwrap()
            .into_inner();
        let got = fixture
            .runtime
            .block_on(client.top_spenders(top(1000)))
            .unwrap()
            .into_inner();
        assert_eq!(want.spenders, got.spenders, "mtls {mtls}");
    }
}

#[test]
fn a_merged_subscription_starts_from_one_epoch_when_a_process_is_ahead() {
    let mut fixture = Fixture::start();
    // Process 1 has published epoch 3, the others not yet: the merged snapshot is of epoch 3
    // (the others' snapshots of epoch 2 brought forward with their changes of epoch 3), like
    // one engine's snapshot of epoch 3, not a mix of epochs.
    fixture.epoch_3(&[1]);
    let mut client = fixture.query(0);
    let mut got = fixture
        .runtime
        .block_on(client.subscribe(pb::SubscribeRequest::default()))
        .unwrap()
        .into_inner();
    fixture.epoch_3(&[0, 2, fixture.single()]);
    let mut single = fixture.query(fixture.single());
    let mut want = fixture
        .runtime
        .block_on(single.subscribe(pb::SubscribeRequest::default()))
        .unwrap()
        .into_inner();
    let want = snapshot_cells(&fixture.runtime, &mut want);
    let got = snapshot_cells(&fixture.runtime, &mut got);
    assert_eq!(want.1, 3);
    assert_eq!(want, got);
    // User 9's cells went away in epoch 3: none is in the snapshot.
    assert!(!got.0.iter().any(|c| c.user_id == 9));
}

#[test]
fn a_forwarded_call_is_answered_from_the_receivers_own_read_model() {
    let fixture = Fixture::start();
    let remote = (1..=USERS).find(|u| fixture.owner(*u) == 1).unwrap();
    let mut client = fixture.query(0);
    let mut request = tonic::Request::new(summary(remote));
    request
        .metadata_mut()
        .insert(FORWARDED, "1".parse().unwrap());
    // Process 0 does not hold the user and does not forward again.
    let status = fixture
        .runtime
        .block_on(client.get_user_summary(request))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    fixture
        .runtime
        .block_on(client.get_user_summary(summary(remote)))
        .unwrap();
}

#[test]
fn forwarded_and_gathered_calls_carry_the_callers_token() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"0123456789abcdef0123456789abcdef-cluster-secret").unwrap();
    let auth = Arc::new(Authenticator::new(AuthKey::hs256_file(&secret).unwrap()));
    let fixture = Fixture::start_with(Transport::default(), Some(auth));
    let token = |sub: Option<UserId>, scopes: &str| {
        let token = mint_hs256(
            &secret,
            sub.map(|u| u.to_string()).as_deref(),
            Scopes::parse_strict(scopes).unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
        format!("Bearer {token}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .unwrap()
    };
    let remote = (1..=USERS).find(|u| fixture.owner(*u) == 1).unwrap();
    let other = (1..=USERS).find(|u| fixture.owner(*u) == 2).unwrap();
    let own = token(Some(remote), "expenses:read:self");
    let all = token(None, "expenses:read");
    let admin = token(None, "admin");
    let mut client = fixture.query(0);
    let rt = &fixture.runtime;

    // A token of the user another process owns reads that user there.
    let got = rt
        .block_on(client.get_user_summary(with(&own, summary(remote))))
        .unwrap()
        .into_inner();
    assert_eq!(got.summary.unwrap().user_id, remote);
    // ...and nobody else, wherever they are.
    let status = rt
        .block_on(client.get_user_summary(with(&own, summary(other))))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = rt
        .block_on(client.top_spenders(with(&own, top(5))))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // Without a token, nothing.
    let status = rt
        .block_on(client.get_user_summary(summary(remote)))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    // A token that reads everything gathers from every process.
    let got = rt
        .block_on(client.top_spenders(with(&all, top(1000))))
        .unwrap()
        .into_inner();
    assert_eq!(got.spenders.len(), USERS as usize);
    // GetStatus asks the others with the caller's admin token.
    let mut admin_client = AdminClient::new(fixture.channel(0));
    let status = fixture
        .runtime
        .block_on(admin_client.get_status(with(&admin, pb::GetStatusRequest {})))
        .unwrap()
        .into_inner();
    assert_eq!(status.processes.len(), PROCESSES);
    assert!(status.processes.iter().all(|p| p.reachable), "{status:?}");
    let status = fixture
        .runtime
        .block_on(admin_client.get_status(with(&all, pb::GetStatusRequest {})))
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
}

/// `message` with `authorization: token`.
fn with<T>(
    token: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    message: T,
) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", token.clone());
    request
}
