//! Cassandra (cdrs-tokio) against the real node: create a keyspace and a table, insert, select,
//! drop the keyspace. Needs `SPENDFLOW_CASSANDRA` (see `docker/native/services env`).

use cdrs_tokio::cluster::session::{Session, SessionBuilder, TcpSessionBuilder};
use cdrs_tokio::cluster::{NodeTcpConfigBuilder, TcpConnectionManager};
use cdrs_tokio::load_balancing::RoundRobinLoadBalancingStrategy;
use cdrs_tokio::query_values;
use cdrs_tokio::transport::TransportTcp;
use cdrs_tokio::types::IntoRustByName;

use crate::support::{service_env, unique_name, within};

type CqlSession = Session<
    TransportTcp,
    TcpConnectionManager,
    RoundRobinLoadBalancingStrategy<TransportTcp, TcpConnectionManager>,
>;

#[tokio::test]
async fn cassandra_keyspace_table_insert_select() {
    let contact = service_env("SPENDFLOW_CASSANDRA");
    let keyspace = unique_name("spendflow_it");

    let config = within(
        60,
        "connect to Cassandra",
        NodeTcpConfigBuilder::new()
            .with_contact_point(contact.clone().into())
            .build(),
    )
    .await
    .unwrap_or_else(|e| panic!("node config for {contact}: {e}"));
    let session: CqlSession = within(
        60,
        "build session",
        TcpSessionBuilder::new(RoundRobinLoadBalancingStrategy::new(), config).build(),
    )
    .await
    .unwrap_or_else(|e| panic!("session to {contact}: {e}"));

    let run = |cql: String| {
        let session = &session;
        async move {
            within(60, &cql.clone(), session.query(cql.clone()))
                .await
                .unwrap_or_else(|e| panic!("{cql}: {e}"))
        }
    };

    run(format!(
        "CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
    ))
    .await;
    run(format!(
        "CREATE TABLE {keyspace}.user_totals (user_id bigint PRIMARY KEY, total_minor bigint, expense_count bigint, currency text)"
    ))
    .await;

    let rows_in: [(i64, i64, i64, &str); 3] = [
        (1, 1299, 1, "EUR"),
        (2, -500, 2, "EUR"),
        (42, 123_456, 17, "GBP"),
    ];
    for (user_id, total, count, currency) in rows_in {
        let cql = format!(
            "INSERT INTO {keyspace}.user_totals (user_id, total_minor, expense_count, currency) VALUES (?, ?, ?, ?)"
        );
        within(
            60,
            "insert",
            session.query_with_values(
                cql,
                query_values!(user_id, total, count, currency.to_string()),
            ),
        )
        .await
        .expect("insert");
    }

    let select =
        format!("SELECT user_id, total_minor, expense_count, currency FROM {keyspace}.user_totals");
    let rows = run(select)
        .await
        .response_body()
        .expect("response body")
        .into_rows()
        .expect("rows");
    let mut got: Vec<(i64, i64, i64, String)> = rows
        .iter()
        .map(|row| {
            (
                row.get_r_by_name("user_id").expect("user_id"),
                row.get_r_by_name("total_minor").expect("total_minor"),
                row.get_r_by_name("expense_count").expect("expense_count"),
                row.get_r_by_name("currency").expect("currency"),
            )
        })
        .collect();
    got.sort();
    let want: Vec<(i64, i64, i64, String)> = rows_in
        .iter()
        .map(|&(u, t, c, cur)| (u, t, c, cur.to_string()))
        .collect();
    assert_eq!(got, want);

    // A point read by partition key with a bound value.
    let one = within(
        60,
        "select by key",
        session.query_with_values(
            format!("SELECT total_minor FROM {keyspace}.user_totals WHERE user_id = ?"),
            query_values!(42_i64),
        ),
    )
    .await
    .expect("select by key")
    .response_body()
    .expect("response body")
    .into_rows()
    .expect("rows");
    assert_eq!(one.len(), 1);
    let total: i64 = one[0].get_r_by_name("total_minor").expect("total_minor");
    assert_eq!(total, 123_456);

    run(format!("DROP KEYSPACE {keyspace}")).await;
}

/// `--cassandra-tls-ca`: the engine's Cassandra client speaks TLS to the kit's node (which takes
/// TLS and plain connections on one port) and verifies it against the kit's CA; a CA that did
/// not sign the node's certificate is refused, with the reason.
#[tokio::test]
async fn cassandra_over_tls_verifies_the_node_against_the_given_ca() {
    use spendflow_engine::cassandra::{CassandraClientSecurity, connect_with};

    let contact = service_env("SPENDFLOW_CASSANDRA");
    let security = CassandraClientSecurity {
        tls_ca: Some(service_env("SPENDFLOW_SERVICES_CA").into()),
        ..Default::default()
    };
    let session = within(60, "connect over TLS", connect_with(&contact, &security))
        .await
        .unwrap_or_else(|e| panic!("TLS to {contact}: {e}"));
    let rows = session
        .query("SELECT release_version FROM system.local")
        .await
        .unwrap()
        .response_body()
        .unwrap()
        .into_rows()
        .unwrap();
    let version: String = rows[0].get_r_by_name("release_version").unwrap();
    assert!(version.starts_with('5'), "{version}");
    assert!(
        matches!(*session, spendflow_engine::cassandra::CqlSession::Tls(_)),
        "{session:?}"
    );

    // A CA of our own, which signed nothing the node has.
    let dir = tempfile::tempdir().unwrap();
    let other = crate::support::foreign_ca(dir.path());
    let refused = connect_with(
        &contact,
        &CassandraClientSecurity {
            tls_ca: Some(other),
            ..Default::default()
        },
    )
    .await;
    let error = refused.expect_err("a node the CA did not sign was trusted");
    eprintln!("refused as expected: {error}");
}
