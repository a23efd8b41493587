//! MySQL/MariaDB (mysql crate) against the real server: create a table, insert, select, drop.
//! Needs `SPENDFLOW_MYSQL` (see `docker/native/services env`).

use mysql::prelude::Queryable;
use mysql::{Conn, Opts, params};

use crate::support::{service_env, unique_name};

#[test]
fn mysql_create_insert_select() {
    let url = service_env("SPENDFLOW_MYSQL");
    let opts =
        Opts::from_url(&url).unwrap_or_else(|e| panic!("bad SPENDFLOW_MYSQL url {url}: {e}"));
    let mut conn = Conn::new(opts).unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    let table = unique_name("it_expenses");

    conn.query_drop(format!(
        "CREATE TABLE {table} (
            expense_id VARCHAR(64) NOT NULL PRIMARY KEY,
            user_id BIGINT NOT NULL,
            amount_minor BIGINT NOT NULL,
            category VARCHAR(64) NOT NULL
        )"
    ))
    .expect("create table");

    let rows_in = [
        ("e-1", 1_i64, 1299_i64, "groceries"),
        ("e-2", 1, -500, "refund"),
        ("e-3", 42, 123_456, "travel"),
    ];
    conn.exec_batch(
        format!(
            "INSERT INTO {table} (expense_id, user_id, amount_minor, category) \
             VALUES (:expense_id, :user_id, :amount_minor, :category)"
        ),
        rows_in
            .iter()
            .map(|&(expense_id, user_id, amount_minor, category)| {
                params! { expense_id, user_id, amount_minor, category }
            }),
    )
    .expect("insert");

    let got: Vec<(String, i64, i64, String)> = conn
        .query(format!(
            "SELECT expense_id, user_id, amount_minor, category FROM {table} ORDER BY expense_id"
        ))
        .expect("select");
    let want: Vec<(String, i64, i64, String)> = rows_in
        .iter()
        .map(|&(e, u, a, c)| (e.to_string(), u, a, c.to_string()))
        .collect();
    assert_eq!(got, want);

    let totals: Vec<(i64, i64)> = conn
        .exec(
            format!("SELECT user_id, CAST(SUM(amount_minor) AS SIGNED) FROM {table} WHERE user_id = ? GROUP BY user_id"),
            (1_i64,),
        )
        .expect("aggregate");
    assert_eq!(totals, vec![(1, 799)]);

    conn.query_drop(format!("DROP TABLE {table}"))
        .expect("drop table");
}

/// `--mysql URL?root_cert_path=CA` (every MySQL client of spendflow takes the URL as it is):
/// the connection is TLS, verified against the kit's CA; a CA that did not sign the server's
/// certificate is refused. (`prefer_socket=false`: for a server on 127.0.0.1 the driver would
/// otherwise move to the server's Unix socket, which is local and not TLS.)
#[test]
fn mysql_over_tls_verifies_the_server_against_the_given_ca() {
    let url = service_env("SPENDFLOW_MYSQL");
    let ca = service_env("SPENDFLOW_SERVICES_CA");
    let (mut conn, _) = spendflow_engine::mysql_client::connect(
        &format!("{url}?root_cert_path={ca}&prefer_socket=false"),
        false,
    )
    .unwrap_or_else(|e| panic!("connect over TLS: {e}"));
    let cipher: Option<(String, String)> = conn
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_version'")
        .unwrap();
    let version = cipher.map(|(_, v)| v).unwrap_or_default();
    assert!(version.starts_with("TLSv1."), "not TLS: {version:?}");

    // A CA of our own, which signed nothing the server has.
    let dir = tempfile::tempdir().unwrap();
    let other = crate::support::foreign_ca(dir.path());
    let refused = spendflow_engine::mysql_client::connect(
        &format!(
            "{url}?root_cert_path={}&prefer_socket=false",
            other.display()
        ),
        false,
    );
    assert!(refused.is_err(), "a server the CA did not sign was trusted");
}
