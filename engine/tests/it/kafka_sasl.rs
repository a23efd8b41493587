//! Every client of the services secured at once, against the services kit: Kafka through its
//! SASL_SSL listener (`SPENDFLOW_KAFKA_SASL_SSL`: SASL/PLAIN over TLS, a certificate from the
//! kit's own CA) with `--kafka-option` flags and the password in a `--kafka-options-file` (the
//! generator writes, the engine reads and its dead-letter producer writes only through it);
//! MySQL over TLS (`?root_cert_path=CA` in the URL: the generator and verify); Cassandra over TLS
//! (`--cassandra-tls-ca`: the sink and `verify --cassandra`). The answers agree with MySQL, and
//! every malformed record is in the dead-letter topic once.

use std::time::{Duration, Instant};

use spendflow_engine::verify::grpc::GrpcServed;
use spendflow_engine::verify::mysql::MySqlTruth;
use spendflow_engine::verify::{self, VerifyOptions};

use crate::support::stream::{Generation, StreamRun, messages_in, status};
use crate::support::{read_dead_letters, service_env};

const USERS: u64 = 20;
const EVENTS: u64 = 3_000;

/// The `--kafka-option` flags for the kit's SASL_SSL listener, the password in `file`.
fn sasl_args(file: &std::path::Path) -> Vec<String> {
    let user = service_env("SPENDFLOW_KAFKA_SASL_USER");
    let password = service_env("SPENDFLOW_KAFKA_SASL_PASSWORD");
    let ca = service_env("SPENDFLOW_SERVICES_CA");
    std::fs::write(file, format!("# secrets\nsasl.password={password}\n")).unwrap();
    [
        "--kafka-option",
        "security.protocol=SASL_SSL",
        "--kafka-option",
        "sasl.mechanisms=PLAIN",
        "--kafka-option",
        &format!("sasl.username={user}"),
        "--kafka-option",
        &format!("ssl.ca.location={ca}"),
        "--kafka-options-file",
        &file.display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn generator_engine_and_dead_letters_work_through_the_sasl_ssl_listener() {
    let plaintext = service_env("SPENDFLOW_KAFKA");
    let mut run = StreamRun::new("spendflow_it_sasl");
    let secrets = tempfile::tempdir().unwrap();
    let args = sasl_args(&secrets.path().join("kafka.properties"));
    // Both clients connect to the SASL_SSL listener only.
    run.brokers = service_env("SPENDFLOW_KAFKA_SASL_SSL");
    run.generator_args = args.clone();
    run.engine_args = args;
    let ca = service_env("SPENDFLOW_SERVICES_CA");
    run.engine_args
        .extend(["--cassandra-tls-ca".to_string(), ca.clone()]);
    let plain_mysql = run.mysql_url.clone();
    // (prefer_socket=false: on 127.0.0.1 the driver would move to the local Unix socket.)
    run.mysql_url = format!("{plain_mysql}?root_cert_path={ca}&prefer_socket=false");
    let generation = Generation::messy(USERS, EVENTS, 7, 0);
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let generated = run.generator(&generation).wait().unwrap();
    assert!(
        generated.success(),
        "the generator failed through SASL_SSL: {generated}\n{}",
        crate::support::stream::tail(&run.generator_log_path(), 20)
    );
    // Counted on the plaintext listener: the same broker, the same records.
    assert_eq!(messages_in(&plaintext, &run.prefix()), EVENTS);

    let mut engine = crate::support::stream::KillOnDrop(run.engine());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(&runtime, &run.grpc);
        if let Some(s) = &s
            && s.caught_up
            && s.records_read == EVENTS
        {
            break;
        }
        assert!(
            engine.0.try_wait().unwrap().is_none(),
            "the engine exited:\n{}",
            run.log_tail()
        );
        assert!(
            Instant::now() < deadline,
            "not caught up through SASL_SSL: {s:?}\n{}",
            run.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut truth = MySqlTruth::connect(&run.mysql_url).unwrap();
    let mut served = GrpcServed::connect(&run.grpc).unwrap();
    let report = verify::verify(&mut truth, &mut served, &VerifyOptions::default()).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.users_checked, USERS, "{report}");
    drop((truth, served));

    // The dead-letter producer wrote through SASL_SSL as well.
    let malformed = generation.malformed(&run.mysql_url, &plaintext);
    assert!(!malformed.is_empty());
    let letters = read_dead_letters(&plaintext, &run.dead_letter_topic(), malformed.len());
    let mut got: Vec<Vec<u8>> = letters.into_iter().map(|(bytes, _)| bytes).collect();
    got.sort();
    assert!(
        got == malformed,
        "the dead letters are the malformed records"
    );

    // The sink wrote Cassandra over TLS; verify reads it over TLS too.
    run.sigterm(&mut engine.0);
    let verify = std::process::Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["verify", "--mysql", &run.mysql_url])
        .args(["--cassandra", &run.cassandra, "--keyspace", &run.keyspace])
        .args(["--cassandra-tls-ca", &ca, "--log", "warn"])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "verify --cassandra over TLS: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // The password never reached the log.
    let log = std::fs::read_to_string(run.log_path()).unwrap();
    let password = service_env("SPENDFLOW_KAFKA_SASL_PASSWORD");
    assert!(!log.contains(&password), "the SASL password is in the log");
    run.mysql_url = plain_mysql;
    run.clean_up(&runtime);
}

#[test]
fn a_reserved_kafka_option_is_refused_before_anything_starts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(["run", "--input", "kafka:127.0.0.1:1", "--topic", "t"])
        .args(["--grpc", "127.0.0.1:0"])
        .args(["--kafka-option", "enable.auto.commit=true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("enable.auto.commit") && stderr.contains("checkpoints"),
        "{stderr}"
    );
}
