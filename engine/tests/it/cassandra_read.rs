//! Reading the Cassandra sink's tables, against the real Cassandra (and MariaDB for verify):
//! `spendflow serve --from cassandra` (the query service without an engine) and
//! `spendflow verify --cassandra`.
//!
//! Each test creates its own keyspace (`spendflow_it_read_*`) and writes the rows itself with
//! CQL, exactly as the table contract says the sink writes them (absolute values, day and month
//! keys as text, a committed progress row and an uncommitted newer one), then drops it. Needs
//! `SPENDFLOW_CASSANDRA` and, for verify, `SPENDFLOW_MYSQL` (`docker/native/services up`,
//! `eval "$(docker/native/services env)"`).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{grpc, service_env, unique_name};
use cdrs_tokio::query_values;
use mysql::prelude::Queryable;
use serde_json::{Value, json};
use spendflow_engine::cassandra::{CassandraError, CqlSession, connect, schema};
use spendflow_engine::serve::cassandra::{CassandraServeConfig, CassandraServer, ServeError};
use spendflow_engine::serve::read_model::{format_day, format_month};
use spendflow_engine::verify::cassandra::CassandraServed;
use spendflow_engine::verify::mysql::MySqlTruth;
use spendflow_engine::verify::{self, Aspect, VerifyOptions};
use spendflow_operators::model::{self, AggKey, Record, days_from_civil};
use spendflow_operators::oracle::{self, Aggregates};
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::admin_client::AdminClient;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

/// One live expense, as MySQL holds it and the sink aggregates it.
#[derive(Clone, Debug)]
struct Expense {
    id: String,
    user: u64,
    category: String,
    merchant: String,
    amount: i64,
    event_ms: i64,
}

fn ms(y: i32, m: u32, d: u32, h: i64) -> i64 {
    days_from_civil(y, m, d) as i64 * 86_400_000 + h * 3_600_000
}

fn expense(id: &str, user: u64, category: &str, merchant: &str, amount: i64, at: i64) -> Expense {
    Expense {
        id: id.into(),
        user,
        category: category.into(),
        merchant: merchant.into(),
        amount,
        event_ms: at,
    }
}

/// `(count, sum)` per key.
type Cells = BTreeMap<String, (i64, i64)>;

/// What the sink would have written for a set of live expenses, per user.
#[derive(Clone, Debug, Default)]
struct UserCells {
    count: i64,
    total: i64,
    last_event_ms: i64,
    categories: Cells,
    merchants: Cells,
    days: Cells,
    months: Cells,
}

impl Expense {
    /// The record that makes this expense live.
    fn record(&self) -> Record {
        Record::Upsert(model::Expense {
            expense_id: self.id.parse().expect("a short id"),
            user_id: self.user,
            card_id: None,
            merchant: self.merchant.as_str().into(),
            category: self.category.as_str().into(),
            amount_minor: self.amount,
            currency: *b"EUR",
            event_ms: self.event_ms,
        })
    }
}

/// What the sink would have written for a set of live expenses, per user: the operators'
/// reference aggregates ([`oracle::recompute`]) keyed as the tables key them.
fn aggregate(expenses: &[Expense]) -> BTreeMap<u64, UserCells> {
    let records: Vec<Record> = expenses.iter().map(Expense::record).collect();
    user_cells(&oracle::recompute(&records))
}

/// The oracle's cells as the sink's rows: names as text, days and months formatted as the
/// tables' keys.
fn user_cells(aggregates: &Aggregates) -> BTreeMap<u64, UserCells> {
    let mut users: BTreeMap<u64, UserCells> = BTreeMap::new();
    for (key, &(count, sum)) in &aggregates.cells {
        let u = users.entry(key.user_id()).or_default();
        let (cells, key) = match *key {
            AggKey::User(_) => {
                (u.count, u.total) = (count, sum);
                continue;
            }
            AggKey::Category(_, name) => (&mut u.categories, name.text().to_string()),
            AggKey::Merchant(_, name) => (&mut u.merchants, name.text().to_string()),
            AggKey::Day(_, day) => (&mut u.days, format_day(day)),
            AggKey::Month(_, month) => (&mut u.months, format_month(month)),
        };
        cells.insert(key, (count, sum));
    }
    for (user, &last) in &aggregates.last_seen {
        users.entry(*user).or_default().last_event_ms = last;
    }
    users
}

/// A keyspace of the test's own, with the sink's tables; dropped at the end (also when the
/// test fails).
struct Keyspace {
    runtime: tokio::runtime::Runtime,
    session: Arc<CqlSession>,
    contact: String,
    name: String,
}

impl Keyspace {
    fn create(tag: &str) -> Keyspace {
        let contact = service_env("SPENDFLOW_CASSANDRA");
        let name = unique_name(&format!("spendflow_it_{tag}"));
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let session = runtime
            .block_on(connect(&contact))
            .unwrap_or_else(|e| panic!("{e}"));
        let keyspace = Keyspace {
            runtime,
            session,
            contact,
            name,
        };
        keyspace.cql(
            &schema::create_keyspace(
                &keyspace.name,
                "{'class': 'SimpleStrategy', 'replication_factor': 1}",
            )
            .unwrap(),
        );
        for table in schema::create_tables(&keyspace.name) {
            keyspace.cql(&table);
        }
        keyspace
    }

    fn cql(&self, cql: &str) {
        self.runtime
            .block_on(self.session.query(cql))
            .unwrap_or_else(|e| panic!("{cql}: {e}"));
    }

    fn cql_values(&self, cql: &str, values: cdrs_tokio::query::QueryValues) {
        self.runtime
            .block_on(self.session.query_with_values(cql, values))
            .unwrap_or_else(|e| panic!("{cql}: {e}"));
    }

    /// Writes every row the sink would write for `users`, tagged with `epoch`.
    fn write_users(&self, users: &BTreeMap<u64, UserCells>, epoch: i64) {
        let ks = &self.name;
        for (&user, cells) in users {
            let user = user as i64;
            self.cql_values(
                &format!(
                    "INSERT INTO {ks}.user_totals (user_id, total_minor, expense_count, \
                     last_event_ms, epoch) VALUES (?, ?, ?, ?, ?)"
                ),
                query_values!(user, cells.total, cells.count, cells.last_event_ms, epoch),
            );
            for (table, column, map) in [
                ("user_category_totals", "category", &cells.categories),
                ("user_merchant_totals", "merchant", &cells.merchants),
                ("user_daily_totals", "day", &cells.days),
                ("user_monthly_totals", "month", &cells.months),
            ] {
                for (key, (count, sum)) in map {
                    self.cql_values(
                        &format!(
                            "INSERT INTO {ks}.{table} (user_id, {column}, total_minor, \
                             expense_count, epoch) VALUES (?, ?, ?, ?, ?)"
                        ),
                        query_values!(user, key.clone(), *sum, *count, epoch),
                    );
                }
            }
        }
    }

    /// A `sink_progress` row.
    fn progress(&self, epoch: i64, positions: &str, records: i64, committed: bool) {
        self.share_progress(schema::SINK_NAME, epoch, positions, records, committed);
    }

    /// A `sink_progress` row of the progress partition `sink` (a cluster's share).
    fn share_progress(
        &self,
        sink: &str,
        epoch: i64,
        positions: &str,
        records: i64,
        committed: bool,
    ) {
        self.cql_values(
            &format!(
                "INSERT INTO {}.sink_progress (sink, epoch, positions, records_covered, committed) \
                 VALUES (?, ?, ?, ?, ?)",
                self.name
            ),
            query_values!(
                sink.to_string(),
                epoch,
                positions.to_string(),
                records,
                committed
            ),
        );
    }

    fn serve(&self) -> CassandraServer {
        CassandraServer::start(self.serve_config()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn serve_config(&self) -> CassandraServeConfig {
        let mut config = CassandraServeConfig::new(&self.contact);
        config.keyspace = self.name.clone();
        config.grpc = "127.0.0.1:0".parse().unwrap();
        config.poll_interval_ms = 20;
        config.index_refresh_ms = 200;
        config.quiet_ms = 300;
        config
    }
}

impl Drop for Keyspace {
    fn drop(&mut self) {
        let drop = format!("DROP KEYSPACE IF EXISTS {}", self.name);
        if let Err(e) = self.runtime.block_on(self.session.query(drop)) {
            eprintln!("could not drop keyspace {}: {e}", self.name);
        }
    }
}

/// The workload of the serve test: five users, a correction-free set of live expenses with a
/// refund, two months, ties in the ranking.
fn serve_expenses() -> Vec<Expense> {
    vec![
        expense("a1", 1, "groceries", "Tesco", 1_000, ms(2026, 11, 1, 10)),
        expense("a2", 1, "groceries", "Aldi", 700, ms(2026, 11, 2, 10)),
        expense("a3", 1, "travel", "KLM", 20_000, ms(2026, 10, 15, 8)),
        expense("a4", 1, "travel", "KLM", -5_000, ms(2026, 11, 5, 8)),
        expense("b1", 2, "fuel", "Shell", 7_000, ms(2026, 11, 3, 9)),
        expense("c1", 3, "groceries", "Tesco", 100, ms(2026, 11, 4, 9)),
        expense("e1", 5, "groceries", "Tesco", 100, ms(2026, 11, 4, 9)),
        expense("g1", 7, "electronics", "Apple", 50_000, ms(2026, 9, 30, 23)),
    ]
}

struct Client {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
}

impl Client {
    fn connect(addr: std::net::SocketAddr) -> Client {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let channel = grpc::connect(&runtime, addr);
        Client { runtime, channel }
    }

    fn query(&self) -> ExpenseQueryClient<Channel> {
        ExpenseQueryClient::new(self.channel.clone())
    }

    fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    fn summary(
        &self,
        user_id: u64,
        consistency: Option<pb::Consistency>,
    ) -> Result<pb::GetUserSummaryResponse, tonic::Status> {
        grpc::summary(&self.runtime, &self.channel, user_id, consistency)
    }

    fn windows(
        &self,
        user_id: u64,
        granularity: pb::Granularity,
        from: &str,
        to: &str,
    ) -> Result<pb::GetUserWindowsResponse, tonic::Status> {
        self.runtime
            .block_on(self.query().get_user_windows(pb::GetUserWindowsRequest {
                user_id,
                granularity: granularity.into(),
                from: from.into(),
                to: to.into(),
                consistency: None,
            }))
            .map(tonic::Response::into_inner)
    }

    fn top(
        &self,
        limit: u32,
        consistency: Option<pb::Consistency>,
    ) -> Result<pb::TopSpendersResponse, tonic::Status> {
        self.runtime
            .block_on(
                self.query()
                    .top_spenders(pb::TopSpendersRequest { limit, consistency }),
            )
            .map(tonic::Response::into_inner)
    }

    fn status(&self) -> pb::GetStatusResponse {
        self.runtime
            .block_on(self.admin().get_status(pb::GetStatusRequest {}))
            .unwrap()
            .into_inner()
    }
}

const POSITIONS_5: &str = r#"[{"source":"expenses.user.1","partition":0,"position":4},{"source":"expenses.user.2","partition":0,"position":1}]"#;

fn totals(list: &[pb::Total]) -> Vec<(&str, i64, i64)> {
    list.iter()
        .map(|t| (t.key.as_str(), t.total_minor, t.expense_count))
        .collect()
}

#[test]
fn serves_the_tables_as_of_the_committed_epoch() {
    let ks = Keyspace::create("read_serve");
    ks.write_users(&aggregate(&serve_expenses()), 5);
    ks.progress(4, "[]", 3, true);
    ks.progress(5, POSITIONS_5, 9, true);
    // In flight: the sink has started epoch 6 but not committed it.
    ks.progress(6, "[]", 11, false);

    let server = ks.serve();
    let client = Client::connect(server.addr());

    one_user_as_of_the_committed_epoch(&client);
    unknown_users_and_bad_requests_are_refused(&client);
    paging_visits_every_user_once(&client);
    windows_answer_buckets_in_a_range(&client);
    top_spenders_rank_by_total(&client);
    waiting_for_an_uncommitted_epoch_runs_out(&client);
    status_reports_the_committed_epoch(&client);
    a_waiting_reader_gets_epoch_6_once_committed(&ks, &client);
    caught_up_once_quiet(&client);
    engine_only_calls_are_unimplemented(&client);
    health_and_reflection_as_on_the_engine(&client);
    the_index_follows_the_sink_in_the_background(&ks, &client);
    health_follows_sink_progress(&ks, &client);

    server.shutdown().unwrap();
}

/// Issue 15: a cluster's processes each write their share of the tables and commit their own
/// progress; the server answers as of the slowest share of the newest layout, with every
/// share's positions, and ignores the progress of layouts it replaced.
#[test]
fn serves_a_clusters_tables_as_of_its_slowest_share() {
    let ks = Keyspace::create("read_shares");
    ks.write_users(&aggregate(&serve_expenses()), 5);
    // What the sink's registry says after a rescale to two processes.
    ks.cql(&format!(
        "UPDATE {}.sink_progress SET generation = 2, processes = 2, \
         shares = {{'main', 'main/0-of-3', 'main/1-of-3', 'main/2-of-3', 'main/0-of-2', 'main/1-of-2'}} \
         WHERE sink = '{}'",
        ks.name,
        schema::LAYOUT_PARTITION
    ));
    // An older layout's share got further: it no longer counts.
    ks.share_progress("main/2-of-3", 40, "[]", 100, true);
    ks.share_progress(
        "main/0-of-2",
        6,
        r#"[{"source":"expenses.user.1","partition":0,"position":4}]"#,
        5,
        true,
    );
    ks.share_progress(
        "main/1-of-2",
        5,
        r#"[{"source":"expenses.user.2","partition":0,"position":1}]"#,
        4,
        true,
    );

    let server = ks.serve();
    let client = Client::connect(server.addr());
    let status = client.status();
    assert_eq!(status.as_of.as_ref().unwrap().epoch, 5, "the slowest share");
    assert_eq!(status.records_read, 9, "what both shares cover");
    assert_eq!(status.partitions.len(), 2, "both shares' positions");
    assert!(!status.caught_up, "one share is ahead of the other");
    let answer = client.summary(1, None).unwrap();
    assert_eq!(answer.as_of.as_ref().unwrap().epoch, 5);
    // Waiting for epoch 6 runs out while one share has not committed it...
    let status = client.summary(1, wait_for_epoch_6(200)).unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    // ...and returns once every share has.
    ks.share_progress("main/1-of-2", 6, "[]", 4, true);
    let answer = client.summary(1, wait_for_epoch_6(10_000)).unwrap();
    assert_eq!(answer.as_of.as_ref().unwrap().epoch, 6);

    server.shutdown().unwrap();
}

/// One user: totals, categories and merchants largest first, last event, as_of = the
/// committed epoch with its positions, not the uncommitted one.
fn one_user_as_of_the_committed_epoch(client: &Client) {
    let answer = client.summary(1, None).unwrap();
    let user = answer.summary.unwrap();
    assert_eq!(
        (user.total_minor, user.expense_count),
        (1_000 + 700 + 20_000 - 5_000, 4)
    );
    assert_eq!(user.last_event_time, "2026-11-05T08:00:00Z");
    assert_eq!(user.last_event_ms, ms(2026, 11, 5, 8));
    assert_eq!(
        totals(&user.by_category),
        [("travel", 15_000, 2), ("groceries", 1_700, 2)]
    );
    assert_eq!(
        totals(&user.by_merchant),
        [("KLM", 15_000, 2), ("Tesco", 1_000, 1), ("Aldi", 700, 1)]
    );
    let as_of = answer.as_of.unwrap();
    assert_eq!(as_of.epoch, 5);
    let positions: Vec<(&str, i32, i64)> = as_of
        .positions
        .iter()
        .map(|p| (p.source.as_str(), p.partition, p.offset))
        .collect();
    assert_eq!(
        positions,
        [("expenses.user.1", 0, 4), ("expenses.user.2", 0, 1)]
    );
}

/// Unknown users and bad requests: the same statuses as the engine's own service.
fn unknown_users_and_bad_requests_are_refused(client: &Client) {
    let status = client.summary(999, None).unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("999") && status.message().contains("epoch 5"));
    assert_eq!(
        client.summary(0, None).unwrap_err().code(),
        Code::InvalidArgument
    );
}

/// Paging by user id, two at a time, visits every user once.
fn paging_visits_every_user_once(client: &Client) {
    let mut token = String::new();
    let mut pages = Vec::new();
    loop {
        let page = client
            .runtime
            .block_on(
                client
                    .query()
                    .list_user_summaries(pb::ListUserSummariesRequest {
                        page_size: 2,
                        page_token: token.clone(),
                        consistency: None,
                    }),
            )
            .unwrap()
            .into_inner();
        assert_eq!(page.as_of.unwrap().epoch, 5);
        pages.push(page.summaries.iter().map(|s| s.user_id).collect::<Vec<_>>());
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, [vec![1, 2], vec![3, 5], vec![7]]);
    for (size, token, field) in [(5000, "", "page_size"), (10, "garbage", "page_token")] {
        let status = client
            .runtime
            .block_on(
                client
                    .query()
                    .list_user_summaries(pb::ListUserSummariesRequest {
                        page_size: size,
                        page_token: token.into(),
                        consistency: None,
                    }),
            )
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(field), "{}", status.message());
    }
}

/// Windows: day and month buckets in a range, oldest first.
fn windows_answer_buckets_in_a_range(client: &Client) {
    let days = client
        .windows(1, pb::Granularity::Day, "2026-11-01", "2026-11-30")
        .unwrap();
    assert_eq!(
        totals(&days.windows),
        [
            ("2026-11-01", 1_000, 1),
            ("2026-11-02", 700, 1),
            ("2026-11-05", -5_000, 1)
        ]
    );
    assert_eq!(days.as_of.unwrap().epoch, 5);
    let months = client
        .windows(1, pb::Granularity::Month, "2026-01", "2026-12")
        .unwrap();
    assert_eq!(
        totals(&months.windows),
        [("2026-10", 20_000, 1), ("2026-11", -3_300, 3)]
    );
    let edge = client
        .windows(7, pb::Granularity::Day, "2026-09-30", "2026-09-30")
        .unwrap();
    assert_eq!(totals(&edge.windows), [("2026-09-30", 50_000, 1)]);
    let empty = client
        .windows(7, pb::Granularity::Month, "2027-01", "2027-12")
        .unwrap();
    assert!(empty.windows.is_empty());
    assert_eq!(
        client
            .windows(999, pb::Granularity::Day, "2026-11-01", "2026-11-30")
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    for (granularity, from, to, needle) in [
        (
            pb::Granularity::Unspecified,
            "2026-01",
            "2026-02",
            "granularity",
        ),
        (pb::Granularity::Month, "2026/01", "2026-02", "from"),
        (pb::Granularity::Day, "2026-11-05", "2026-11-01", "after"),
        (
            pb::Granularity::Day,
            "2000-01-01",
            "2026-11-01",
            "at most 3660 days",
        ),
    ] {
        let status = client.windows(1, granularity, from, to).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(needle), "{}", status.message());
    }
}

/// Top spenders: by total, ties by user id.
fn top_spenders_rank_by_total(client: &Client) {
    let top = client.top(4, None).unwrap();
    let ranked: Vec<(u32, u64, i64)> = top
        .spenders
        .iter()
        .map(|s| (s.rank, s.user_id, s.total_minor))
        .collect();
    assert_eq!(
        ranked,
        [(1, 7, 50_000), (2, 1, 16_700), (3, 2, 7_000), (4, 3, 100)]
    );
    assert_eq!(top.as_of.unwrap().epoch, 5);
    assert_eq!(
        client.top(1001, None).unwrap_err().code(),
        Code::InvalidArgument
    );
}

/// Read-your-writes: wait (at most `timeout_ms`) until epoch 6 is committed.
fn wait_for_epoch_6(timeout_ms: u32) -> Option<pb::Consistency> {
    Some(pb::Consistency {
        incarnation: String::new(),
        min_epoch: 6,
        timeout_ms,
    })
}

/// Read-your-writes: epoch 6 is not committed, so waiting for it runs out...
fn waiting_for_an_uncommitted_epoch_runs_out(client: &Client) {
    let status = client.summary(1, wait_for_epoch_6(200)).unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(
        status.message().contains("latest: 5"),
        "{}",
        status.message()
    );
    assert_eq!(
        client
            .summary(
                1,
                Some(pb::Consistency {
                    incarnation: String::new(),
                    min_epoch: 6,
                    timeout_ms: 60_000
                })
            )
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
}

/// ...and Admin/GetStatus reports the committed epoch, not caught up while 6 is in flight.
fn status_reports_the_committed_epoch(client: &Client) {
    let status = client.status();
    assert_eq!(status.as_of.as_ref().unwrap().epoch, 5);
    assert_eq!(status.records_read, 9);
    assert_eq!(status.users, 5);
    assert_eq!(status.live_expenses, 8);
    assert!(!status.caught_up);
    assert_eq!(status.partitions.len(), 2);
    assert!(
        status
            .partitions
            .iter()
            .all(|p| p.lag == -1 && p.high_watermark == -1)
    );
}

/// The sink finishes epoch 6 while a reader waits for it: user 9 arrives, user 5's last
/// expense goes away (its rows are deleted: absent means zero).
fn a_waiting_reader_gets_epoch_6_once_committed(ks: &Keyspace, client: &Client) {
    let waiter = {
        let channel = client.channel.clone();
        client.runtime.spawn(async move {
            ExpenseQueryClient::new(channel)
                .top_spenders(pb::TopSpendersRequest {
                    limit: 2,
                    consistency: Some(pb::Consistency {
                        incarnation: String::new(),
                        min_epoch: 6,
                        timeout_ms: 10_000,
                    }),
                })
                .await
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let newcomer = vec![expense(
        "i1",
        9,
        "travel",
        "KLM",
        90_000,
        ms(2026, 12, 1, 12),
    )];
    ks.write_users(&aggregate(&newcomer), 6);
    for table in [
        "user_totals",
        "user_category_totals",
        "user_merchant_totals",
        "user_daily_totals",
        "user_monthly_totals",
    ] {
        ks.cql(&format!(
            "DELETE FROM {}.{table} WHERE user_id = 5",
            ks.name
        ));
    }
    ks.progress(6, "[]", 11, true);
    let top = client
        .runtime
        .block_on(waiter)
        .unwrap()
        .expect("the wait for epoch 6 ends once the sink commits it")
        .into_inner();
    assert_eq!(top.as_of.unwrap().epoch, 6);
    let ranked: Vec<u64> = top.spenders.iter().map(|s| s.user_id).collect();
    assert_eq!(ranked, [9, 7], "the index was rebuilt for epoch 6");
    let answer = client.summary(9, wait_for_epoch_6(5_000)).unwrap();
    assert_eq!(answer.as_of.unwrap().epoch, 6);
    assert_eq!(answer.summary.unwrap().total_minor, 90_000);
    assert_eq!(client.summary(5, None).unwrap_err().code(), Code::NotFound);
}

/// Quiet now: caught up once nothing has changed for the quiet period.
fn caught_up_once_quiet(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = client.status();
        if status.caught_up {
            assert_eq!(status.as_of.unwrap().epoch, 6);
            assert_eq!(status.records_read, 11);
            break;
        }
        assert!(Instant::now() < deadline, "never caught up: {status:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What only the engine has: UNIMPLEMENTED, saying where to go instead.
fn engine_only_calls_are_unimplemented(client: &Client) {
    let status = client
        .runtime
        .block_on(client.query().subscribe(pb::SubscribeRequest {
            incarnation: String::new(),
            user_ids: vec![1],
            resume_after_epoch: 0,
        }))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("engine"), "{}", status.message());
    let status = client
        .runtime
        .block_on(client.query().subscribe(pb::SubscribeRequest {
            incarnation: String::new(),
            user_ids: (1..=1001).collect(),
            resume_after_epoch: 0,
        }))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "requests are checked first"
    );
    let status = client
        .runtime
        .block_on(
            client
                .admin()
                .list_rejected(pb::ListRejectedRequest { limit: 5 }),
        )
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
}

/// Health and reflection, as on the engine.
fn health_and_reflection_as_on_the_engine(client: &Client) {
    for service in ["spendflow.v1.ExpenseQuery", "spendflow.v1.Admin"] {
        assert_eq!(
            grpc::health(&client.runtime, &client.channel, service),
            ServingStatus::Serving
        );
    }
    grpc::assert_reflection_lists_services(&client.runtime, &client.channel);
    grpc::assert_reflection_v1alpha_answers(&client.runtime, &client.channel);
}

/// Without read-your-writes, the user index follows the sink in the background: a later
/// epoch's newcomer shows up in TopSpenders within the refresh interval.
fn the_index_follows_the_sink_in_the_background(ks: &Keyspace, client: &Client) {
    let newcomer = vec![expense(
        "k1",
        11,
        "travel",
        "KLM",
        95_000,
        ms(2026, 12, 2, 12),
    )];
    ks.write_users(&aggregate(&newcomer), 7);
    ks.progress(7, "[]", 12, true);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let top = client.top(1, None).unwrap();
        if top.spenders[0].user_id == 11 {
            assert_eq!(top.as_of.unwrap().epoch, 7);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the index never caught up: {top:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// While sink_progress cannot be read, health says NOT_SERVING; then SERVING again.
fn health_follows_sink_progress(ks: &Keyspace, client: &Client) {
    let wait_health = |want: ServingStatus| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while grpc::health(
            &client.runtime,
            &client.channel,
            "spendflow.v1.ExpenseQuery",
        ) != want
        {
            assert!(Instant::now() < deadline, "health never became {want:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    ks.cql(&format!("DROP TABLE {}.sink_progress", ks.name));
    wait_health(ServingStatus::NotServing);
    // Answers still come, from the last committed epoch seen.
    assert_eq!(
        client.summary(1, None).unwrap().as_of.unwrap().epoch,
        7,
        "the last committed epoch seen"
    );
    for table in schema::create_tables(&ks.name) {
        ks.cql(&table);
    }
    ks.progress(8, "[]", 12, true);
    wait_health(ServingStatus::Serving);
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.summary(1, None).unwrap().as_of.unwrap().epoch != 8 {
        assert!(Instant::now() < deadline, "epoch 8 never showed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The web report served from Cassandra (`serve --from cassandra --web`): the page's JSON API
/// answers with the keyspace's values, the same as gRPC on the same server, and its event
/// stream says when a newer epoch is committed.
#[test]
fn serves_the_web_report_from_the_tables() {
    let ks = Keyspace::create("read_web");
    let expected = aggregate(&serve_expenses());
    ks.write_users(&expected, 5);
    ks.progress(5, POSITIONS_5, 9, true);
    let mut config = ks.serve_config();
    config.web = Some("127.0.0.1:0".parse().unwrap());
    let server = CassandraServer::start(config).unwrap_or_else(|e| panic!("{e}"));
    let addr = server.web_addr().expect("the web report is served");
    let client = Client::connect(server.addr());

    the_page_is_the_engines_page(addr);
    the_overview_ranks_as_grpc_does(addr, &client, &expected);
    every_users_page_has_the_keyspaces_cells(addr, &client, &expected);
    a_user_without_expenses_is_not_found(addr);
    let events = events_say_when_a_newer_epoch_is_committed(&ks, addr, &expected);

    // Shutting down with the event stream open ends it instead of waiting for the client.
    server.shutdown().unwrap();
    drop(events);
}

/// The page is the engine's page.
fn the_page_is_the_engines_page(addr: std::net::SocketAddr) {
    let page = crate::web::get(addr, "/users/1");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("/assets/app.js"));
}

/// The overview: the index's users, the committed epoch's records, gRPC's ranking.
fn the_overview_ranks_as_grpc_does(
    addr: std::net::SocketAddr,
    client: &Client,
    expected: &BTreeMap<u64, UserCells>,
) {
    let overview = crate::web::get(addr, "/api/overview");
    assert_eq!(overview.status, 200);
    assert_eq!(overview.header("cache-control"), Some("no-store"));
    let overview = overview.json();
    assert_eq!(overview["as_of"]["epoch"], json!(5));
    assert_eq!(overview["users"], json!(expected.len()));
    let live: i64 = expected.values().map(|u| u.count).sum();
    assert_eq!(overview["live_expenses"], json!(live));
    assert_eq!(overview["records_read"], json!(9));
    assert_eq!(overview["details"], json!("not_configured"));
    let shown: Vec<(u64, u64, i64)> = overview["top_spenders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["rank"].as_u64().unwrap(),
                s["user_id"].as_u64().unwrap(),
                s["total_minor"].as_i64().unwrap(),
            )
        })
        .collect();
    let top = client.top(10, None).unwrap();
    let grpc: Vec<(u64, u64, i64)> = top
        .spenders
        .iter()
        .map(|s| (u64::from(s.rank), s.user_id, s.total_minor))
        .collect();
    assert_eq!(shown, grpc, "the page ranks as gRPC does");
    assert_eq!(
        shown,
        [
            (1, 7, 50_000),
            (2, 1, 16_700),
            (3, 2, 7_000),
            (4, 3, 100),
            (5, 5, 100)
        ]
    );
    // Totals by category over all users, from a scan of user_category_totals.
    let categories: Vec<(String, i64, i64, u64)> = overview["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["key"].as_str().unwrap().to_string(),
                c["total_minor"].as_i64().unwrap(),
                c["expense_count"].as_i64().unwrap(),
                c["users"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        categories,
        [
            ("electronics".to_string(), 50_000, 1, 1),
            ("travel".to_string(), 15_000, 2, 1),
            ("fuel".to_string(), 7_000, 1, 1),
            ("groceries".to_string(), 1_900, 4, 3),
        ]
    );
}

/// Every user's page: the keyspace's cells, in gRPC's order.
fn every_users_page_has_the_keyspaces_cells(
    addr: std::net::SocketAddr,
    client: &Client,
    expected: &BTreeMap<u64, UserCells>,
) {
    for (&user, cells) in expected {
        let page = crate::web::get(addr, &format!("/api/users/{user}"));
        assert_eq!(page.status, 200, "user {user}");
        let page = page.json();
        assert_eq!(page["as_of"]["epoch"], json!(5));
        assert_eq!(page["details_state"], json!("not_configured"));
        let aggregates = &page["aggregates"];
        assert_eq!(aggregates["total_minor"], json!(cells.total), "user {user}");
        assert_eq!(aggregates["expense_count"], json!(cells.count));
        assert_eq!(aggregates["last_event_ms"], json!(cells.last_event_ms));
        let summary = client.summary(user, None).unwrap().summary.unwrap();
        let as_json = |list: &[pb::Total]| -> Value {
            json!(
                list.iter()
                    .map(|t| json!({"key": t.key, "total_minor": t.total_minor, "expense_count": t.expense_count}))
                    .collect::<Vec<_>>()
            )
        };
        assert_eq!(aggregates["categories"], as_json(&summary.by_category));
        assert_eq!(aggregates["merchants"], as_json(&summary.by_merchant));
        assert_eq!(aggregates["merchant_count"], json!(cells.merchants.len()));
        let months: Vec<Value> = cells
            .months
            .iter()
            .map(|(key, (count, sum))| json!({"key": key, "total_minor": sum, "expense_count": count}))
            .collect();
        assert_eq!(aggregates["months"], json!(months), "user {user}");
    }
    assert_eq!(
        crate::web::get(addr, "/api/users/1").json()["aggregates"]["months"],
        json!([
            {"key": "2026-10", "total_minor": 20_000, "expense_count": 1},
            {"key": "2026-11", "total_minor": -3_300, "expense_count": 3},
        ])
    );
}

/// No expenses and no personnel store: 404, with the epoch.
fn a_user_without_expenses_is_not_found(addr: std::net::SocketAddr) {
    let missing = crate::web::get(addr, "/api/users/4");
    assert_eq!(missing.status, 404);
    assert!(
        missing.json()["error"]
            .as_str()
            .unwrap()
            .contains("epoch 5")
    );
}

/// Events: hello at the committed epoch, then a reset once a newer one is committed, and
/// the API then answers from it.
fn events_say_when_a_newer_epoch_is_committed(
    ks: &Keyspace,
    addr: std::net::SocketAddr,
    expected: &BTreeMap<u64, UserCells>,
) -> crate::web::EventStream {
    let mut events = crate::web::EventStream::open(addr, "/api/events");
    assert_eq!(events.status, 200);
    let hello = events.next();
    assert_eq!(hello.event, "hello");
    assert_eq!(
        serde_json::from_str::<Value>(&hello.data).unwrap()["epoch"],
        json!(5)
    );
    let mut more = expected.clone();
    let newcomer = aggregate(&[expense("h1", 8, "fuel", "BP", 2_500, ms(2026, 11, 6, 7))]);
    ks.write_users(&newcomer, 6);
    more.extend(newcomer);
    ks.progress(6, POSITIONS_5, 10, true);
    let reset = events.next();
    assert_eq!(reset.event, "reset", "{reset:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&reset.data).unwrap()["epoch"],
        json!(6)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let overview = crate::web::get(addr, "/api/overview").json();
        if overview["as_of"]["epoch"] == json!(6) {
            assert_eq!(overview["users"], json!(more.len()));
            assert_eq!(overview["records_read"], json!(10));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the overview stayed at {overview}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        crate::web::get(addr, "/api/users/8").json()["aggregates"]["total_minor"],
        json!(2_500)
    );

    events
}

#[test]
fn a_keyspace_without_the_tables_is_refused_at_start() {
    let contact = service_env("SPENDFLOW_CASSANDRA");
    let mut config = CassandraServeConfig::new(&contact);
    config.keyspace = unique_name("spendflow_it_read_missing");
    config.grpc = "127.0.0.1:0".parse().unwrap();
    let error = CassandraServer::start(config.clone()).unwrap_err();
    assert!(
        matches!(error, ServeError::Cassandra(CassandraError::Config(_))),
        "{error:?}"
    );
    assert!(!error.is_retriable());
    assert!(error.to_string().contains(&config.keyspace), "{error}");

    config.keyspace = "Not-A-Keyspace".into();
    assert!(matches!(
        CassandraServer::start(config.clone()),
        Err(ServeError::Config(_))
    ));

    // Nothing listens there: retriable.
    let mut config = CassandraServeConfig::new("127.0.0.1:1");
    config.grpc = "127.0.0.1:0".parse().unwrap();
    let error = CassandraServer::start(config).unwrap_err();
    assert!(error.is_retriable(), "{error:?}");
}

#[test]
fn serve_command_answers_until_sigterm() {
    let ks = Keyspace::create("read_cli");
    ks.write_users(&aggregate(&serve_expenses()), 3);
    ks.progress(3, POSITIONS_5, 8, true);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let web_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let web_addr: std::net::SocketAddr = format!("127.0.0.1:{web_port}").parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["serve", "--from", "cassandra", "--cassandra", &ks.contact])
        .args(["--keyspace", &ks.name, "--grpc", &addr.to_string()])
        .args(["--web", &web_addr.to_string()])
        .args(["--log", "warn"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let channel = loop {
        let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
        if let Ok(channel) = runtime.block_on(endpoint.connect()) {
            break channel;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "spendflow serve exited"
        );
        assert!(Instant::now() < deadline, "spendflow serve never listened");
        std::thread::sleep(Duration::from_millis(100));
    };
    let answer = runtime
        .block_on(
            ExpenseQueryClient::new(channel).get_user_summary(pb::GetUserSummaryRequest {
                user_id: 2,
                consistency: None,
            }),
        )
        .unwrap()
        .into_inner();
    assert_eq!(answer.summary.unwrap().total_minor, 7_000);
    assert_eq!(answer.as_of.unwrap().epoch, 3);
    // --web: the page's API answers from the same keyspace.
    let page = crate::web::get(web_addr, "/api/users/2").json();
    assert_eq!(page["aggregates"]["total_minor"], json!(7_000));
    assert_eq!(page["as_of"]["epoch"], json!(3));

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "spendflow serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
}

/// `serve --from cassandra --tls-cert --tls-key`: gRPC (grpcurl with the CA) and the web
/// report (curl with the CA) over TLS; plain text is not answered.
#[test]
fn serve_command_speaks_tls() {
    let ks = Keyspace::create("read_tls");
    ks.write_users(&aggregate(&serve_expenses()), 3);
    ks.progress(3, POSITIONS_5, 8, true);
    let certs = crate::tls::certificates();
    let file = |name: &str| certs.path().join(name).display().to_string();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (addr, web_addr) = (free(), free());
    let mut child = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["serve", "--from", "cassandra", "--cassandra", &ks.contact])
        .args(["--keyspace", &ks.name, "--grpc", &addr.to_string()])
        .args(["--web", &web_addr.to_string(), "--log", "warn"])
        .args([
            "--tls-cert",
            &file("server.pem"),
            "--tls-key",
            &file("server-key.pem"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let grpcurl = crate::tls::grpcurl();
    let request = r#"{"user_id": 2}"#;
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let output = Command::new(&grpcurl)
            .args(["-cacert", &file("ca.pem"), "-d", request, &addr.to_string()])
            .arg("spendflow.v1.ExpenseQuery/GetUserSummary")
            .output()
            .unwrap();
        if output.status.success() {
            break String::from_utf8_lossy(&output.stdout).to_string();
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "spendflow serve exited"
        );
        assert!(
            Instant::now() < deadline,
            "spendflow serve never answered over TLS"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(answer.contains("7000"), "{answer}");
    let (code, body, _) = crate::tls::curl(
        &format!("https://{web_addr}/api/users/2"),
        &["--cacert", &file("ca.pem")],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["aggregates"]["total_minor"],
        json!(7_000)
    );
    let plain = Command::new(&grpcurl)
        .args([
            "-plaintext",
            "-max-time",
            "10",
            "-d",
            request,
            &addr.to_string(),
        ])
        .arg("spendflow.v1.ExpenseQuery/GetUserSummary")
        .output()
        .unwrap();
    assert!(!plain.status.success());
    let _ = child.kill();
    let _ = child.wait();
}

/// Sixty users' worth of live expenses over four months: several categories and merchants,
/// refunds, a user whose expenses cancel out to a zero total.
fn verify_expenses() -> Vec<Expense> {
    let categories = ["groceries", "travel", "fuel", "dining"];
    let merchants = ["Tesco", "Aldi", "KLM", "Shell", "Nando's"];
    let mut out = Vec::new();
    for user in 1..=60u64 {
        for i in 0..(user % 7 + 1) {
            let n = user * 31 + i * 17;
            let amount = if n % 11 == 0 {
                -(n as i64 % 900) - 1
            } else {
                (n as i64 % 9_000) + 1
            };
            let month = 9 + (n % 4) as u32;
            let day = 1 + (n % 28) as u32;
            out.push(expense(
                &format!("e-{user}-{i}"),
                user,
                categories[(n % 4) as usize],
                merchants[(n % 5) as usize],
                amount,
                ms(2026, month, day, (n % 24) as i64),
            ));
        }
    }
    out.push(expense(
        "z-1",
        61,
        "fuel",
        "Shell",
        500,
        ms(2026, 12, 31, 23),
    ));
    out.push(expense("z-2", 61, "fuel", "Shell", -500, ms(2027, 1, 1, 0)));
    out
}

/// A MySQL database of the test's own, with the generator's schema.
struct Database {
    url: String,
    name: String,
}

impl Database {
    fn create(expenses: &[Expense]) -> Database {
        let base = service_env("SPENDFLOW_MYSQL");
        let name = unique_name("spendflow_it_read_verify");
        let (head, _) = base
            .rsplit_once('/')
            .expect("a MySQL URL ending in /DATABASE");
        let url = format!("{head}/{name}");
        let (mut conn, _) = spendflow_engine::generate::mysql::connect(&url, true).unwrap();
        spendflow_engine::generate::mysql::migrate(&mut conn).unwrap();
        for e in expenses {
            conn.exec_drop(
                "INSERT INTO expenses (expense_id, user_id, merchant, category, amount_minor, \
                 currency, event_ms, event_time) VALUES (?, ?, ?, ?, ?, 'EUR', ?, ?)",
                (
                    e.id.as_bytes(),
                    e.user,
                    e.merchant.as_bytes(),
                    e.category.as_bytes(),
                    e.amount,
                    e.event_ms,
                    spendflow_engine::generate::mysql::datetime_value(e.event_ms),
                ),
            )
            .unwrap();
        }
        Database { url, name }
    }

    fn conn(&self) -> mysql::Conn {
        mysql::Conn::new(mysql::Opts::from_url(&self.url).unwrap()).unwrap()
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Ok(mut conn) = mysql::Conn::new(mysql::Opts::from_url(&self.url).unwrap()) {
            let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name));
        }
    }
}

fn verify_cassandra(db: &Database, ks: &Keyspace) -> verify::Report {
    let mut truth = MySqlTruth::connect(&db.url).unwrap();
    let mut served = CassandraServed::connect(&ks.contact, &ks.name)
        .unwrap()
        .with_quiet(Duration::from_millis(300));
    let options = VerifyOptions {
        page_size: 7,
        max_reported: 50,
        wait_ready: Duration::from_secs(30),
    };
    verify::verify(&mut truth, &mut served, &options).unwrap()
}

#[test]
fn verify_cassandra_agrees_and_finds_every_kind_of_mismatch() {
    let expenses = verify_expenses();
    let users = aggregate(&expenses);
    let db = Database::create(&expenses);
    let ks = Keyspace::create("read_verify");
    ks.write_users(&users, 12);
    ks.progress(12, "[]", expenses.len() as i64, true);

    verify_agrees_with_the_tables(&db, &ks, &expenses);
    let dropped = break_the_tables(&db, &ks, &users, &expenses);
    verify_finds_every_mismatch(&db, &ks, &users, &dropped);
    verify_waits_for_an_epoch_in_flight(&db, &ks);
}

/// `spendflow verify --cassandra` on the test's database and keyspace.
fn verify_cli(db: &Database, ks: &Keyspace) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["verify", "--mysql", &db.url, "--cassandra", &ks.contact])
        .args(["--keyspace", &ks.name, "--quiet-ms", "300", "--log", "warn"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The tables as the sink writes them agree with MySQL, in the library and on the command
/// line (which exits 0).
fn verify_agrees_with_the_tables(db: &Database, ks: &Keyspace, expenses: &[Expense]) {
    let report = verify_cassandra(db, ks);
    eprintln!("{report}");
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.users_checked, 61);
    assert_eq!((report.users_truth, report.users_served), (61, 61));
    assert_eq!(report.expenses_truth, expenses.len() as i64);
    assert!(
        report.notes.iter().any(|n| n.contains("epoch was 12")),
        "{:?}",
        report.notes
    );

    // The command line agrees, and exits 0.
    let output = verify_cli(db, ks);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("61 users checked") && stdout.contains("0 mismatches"),
        "{stdout}"
    );
}

/// Now break it: a changed total (user 10), a missing category row (user 20), a user only
/// Cassandra has (99, with cells), and a user only MySQL has (100).
/// Returns the category row deleted (user 20's) with its cells.
fn break_the_tables(
    db: &Database,
    ks: &Keyspace,
    users: &BTreeMap<u64, UserCells>,
    expenses: &[Expense],
) -> (String, (i64, i64)) {
    let ksn = &ks.name;
    let u10 = &users[&10];
    ks.cql(&format!(
        "UPDATE {ksn}.user_totals SET total_minor = {} WHERE user_id = 10",
        u10.total + 1
    ));
    let (dropped, dropped_cell) = users[&20].categories.iter().next().unwrap();
    ks.cql(&format!(
        "DELETE FROM {ksn}.user_category_totals WHERE user_id = 20 AND category = '{dropped}'"
    ));
    let extra = vec![expense(
        "x-1",
        99,
        "dining",
        "Nando's",
        1_234,
        ms(2026, 11, 11, 11),
    )];
    ks.write_users(&aggregate(&extra), 13);
    db.conn()
        .exec_drop(
            "INSERT INTO expenses (expense_id, user_id, merchant, category, amount_minor, \
             currency, event_ms, event_time) VALUES ('y-1', 100, 'Tesco', 'groceries', 100, \
             'EUR', ?, ?)",
            (
                ms(2026, 11, 29, 10),
                spendflow_engine::generate::mysql::datetime_value(ms(2026, 11, 29, 10)),
            ),
        )
        .unwrap();
    ks.progress(13, "[]", expenses.len() as i64 + 1, true);
    (dropped.clone(), *dropped_cell)
}

/// Verify reports each break as what it is, in the library and on the command line (which
/// fails).
fn verify_finds_every_mismatch(
    db: &Database,
    ks: &Keyspace,
    users: &BTreeMap<u64, UserCells>,
    (dropped, dropped_cell): &(String, (i64, i64)),
) {
    let u10 = &users[&10];
    let report = verify_cassandra(db, ks);
    eprintln!("{report}");
    assert!(!report.is_ok());
    assert_eq!(report.users_checked, 63);
    let found = |user: u64, aspect: &Aspect| {
        report
            .mismatches
            .iter()
            .find(|m| m.user_id == user && &m.aspect == aspect)
            .cloned()
    };
    let total = found(10, &Aspect::User).expect("the changed total");
    assert_eq!(total.truth, Some((u10.count, u10.total)));
    assert_eq!(total.served, Some((u10.count, u10.total + 1)));
    let category = found(20, &Aspect::Category(dropped.clone())).expect("the missing category");
    assert_eq!(category.truth, Some(*dropped_cell));
    assert_eq!(category.served, None);
    assert_eq!(
        found(99, &Aspect::MissingTruth)
            .expect("the extra user")
            .served,
        Some((1, 1_234))
    );
    assert_eq!(
        found(100, &Aspect::MissingServed)
            .expect("the user Cassandra lacks")
            .truth,
        Some((1, 100))
    );
    // User 10's months no longer add up to its total either; nothing else differs.
    assert_eq!(report.mismatched_users, 4, "{report}");

    let output = verify_cli(db, ks);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "mismatches must fail: {stdout}");
    assert!(stdout.contains("user 10 total: mysql "), "{stdout}");
    assert!(stdout.contains("user 99 missing in the truth"), "{stdout}");
    assert!(
        stdout.contains("user 100 missing on the served side"),
        "{stdout}"
    );
    assert!(stderr.contains("mismatches in 4 of 63 users"), "{stderr}");
}

/// An epoch in flight that never commits: the sink is not quiet, verify does not start.
fn verify_waits_for_an_epoch_in_flight(db: &Database, ks: &Keyspace) {
    ks.progress(14, "[]", 0, false);
    let mut served = CassandraServed::connect(&ks.contact, &ks.name)
        .unwrap()
        .with_quiet(Duration::from_millis(100));
    let options = VerifyOptions {
        wait_ready: Duration::from_millis(500),
        ..VerifyOptions::default()
    };
    let error = verify::verify(
        &mut MySqlTruth::connect(&db.url).unwrap(),
        &mut served,
        &options,
    )
    .unwrap_err();
    assert!(error.is_retriable());
    assert!(error.to_string().contains("epoch 14 in flight"), "{error}");
}

#[test]
fn serve_command_enforces_token_auth() {
    use crate::auth::{SECRET, free_addr, mint};
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let ks = Keyspace::create("read_auth");
    ks.write_users(&aggregate(&serve_expenses()), 3);
    ks.progress(3, POSITIONS_5, 8, true);

    // Without auth, a non-loopback address is refused before Cassandra is even reached.
    let refused = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["serve", "--from", "cassandra", "--cassandra", &ks.contact])
        .args([
            "--keyspace",
            &ks.name,
            "--grpc",
            "0.0.0.0:0",
            "--log",
            "warn",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("0.0.0.0:0") && stderr.contains("--insecure-no-auth"),
        "{stderr}"
    );

    let (addr, web_addr) = (free_addr(), free_addr());
    let mut child = Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["serve", "--from", "cassandra", "--cassandra", &ks.contact])
        .args(["--keyspace", &ks.name, "--grpc", &addr.to_string()])
        .args(["--web", &web_addr.to_string(), "--log", "warn"])
        .arg("--jwt-secret-file")
        .arg(&secret)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let me = mint(&secret, Some("2"), "expenses:read:self", "1h");
    let admin = mint(&secret, None, "admin", "1h");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let channel = loop {
        let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
        if let Ok(channel) = runtime.block_on(endpoint.connect()) {
            break channel;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "spendflow serve exited"
        );
        assert!(Instant::now() < deadline, "spendflow serve never listened");
        std::thread::sleep(Duration::from_millis(100));
    };
    let with = |user: u64, token: Option<&str>| {
        let mut request = tonic::Request::new(pb::GetUserSummaryRequest {
            user_id: user,
            consistency: None,
        });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    };
    runtime.block_on(async {
        let mut query = ExpenseQueryClient::new(channel.clone());
        let own = query.get_user_summary(with(2, Some(&me))).await.unwrap();
        assert_eq!(own.into_inner().summary.unwrap().total_minor, 7_000);
        let other = query
            .get_user_summary(with(1, Some(&me)))
            .await
            .unwrap_err();
        assert_eq!(other.code(), Code::PermissionDenied, "{other:?}");
        let none = query.get_user_summary(with(2, None)).await.unwrap_err();
        assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
        let mut top = tonic::Request::new(pb::TopSpendersRequest {
            limit: 2,
            consistency: None,
        });
        top.metadata_mut()
            .insert("authorization", format!("Bearer {me}").parse().unwrap());
        let top = query.top_spenders(top).await.unwrap_err();
        assert_eq!(top.code(), Code::PermissionDenied, "{top:?}");
        assert!(top.message().contains("expenses:read"), "{top:?}");

        let mut admin_client = AdminClient::new(channel.clone());
        let mut status = tonic::Request::new(pb::GetStatusRequest {});
        status
            .metadata_mut()
            .insert("authorization", format!("Bearer {me}").parse().unwrap());
        let denied = admin_client.get_status(status).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
        assert!(denied.message().contains("admin"), "{denied:?}");
        let mut status = tonic::Request::new(pb::GetStatusRequest {});
        status
            .metadata_mut()
            .insert("authorization", format!("Bearer {admin}").parse().unwrap());
        assert_eq!(
            admin_client
                .get_status(status)
                .await
                .unwrap()
                .into_inner()
                .as_of
                .unwrap()
                .epoch,
            3
        );
    });
    // Health stays open.
    assert_eq!(
        grpc::health(&runtime, &channel, "spendflow.v1.ExpenseQuery"),
        ServingStatus::Serving
    );
    // The web report of `serve` needs the token too.
    let auth = format!("Bearer {me}");
    let get = |path: &str, headers: &[(&str, &str)]| {
        crate::web::request(web_addr, "GET", path, headers, None)
    };
    assert_eq!(get("/api/users/2", &[]).status, 401);
    assert_eq!(get("/api/users/2", &[("Authorization", &auth)]).status, 200);
    assert_eq!(get("/api/users/1", &[("Authorization", &auth)]).status, 403);
    assert_eq!(
        get("/api/overview", &[("Authorization", &auth)]).status,
        403
    );
    let _ = child.kill();
    let _ = child.wait();
}
