//! `spendflow.v1.Personnel` against the real services: MariaDB for the users, HDFS for the
//! images, through the engine's real gRPC server and a tonic client; and the `spendflow
//! images` / `generate --avatars` commands as a user runs them.
//!
//! Needs `SPENDFLOW_MYSQL`, `SPENDFLOW_HDFS` (and `SPENDFLOW_KAFKA` for `generate`); see
//! `docker/native/services env`. Every test uses its own database (`spendflow_...`, which the
//! kit grants) and its own HDFS root.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use ::mysql::prelude::Queryable;
use sha2::{Digest, Sha256};
use spendflow_engine::Engine;
use spendflow_engine::images::{GcOptions, HdfsImageConfig, HdfsImageStore, ImageStore, avatar};
use spendflow_engine::personnel::{Personnel, PersonnelConfig};
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::personnel_client::PersonnelClient;
use spendflow_proto::v1::upload_image_request::Part;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{service_env, unique_name, within};

/// A database with users 1..=3 (and cards), and an HDFS root, both unique to the test.
struct Setup {
    mysql_url: String,
    database: String,
    hdfs_url: String,
    root: String,
}

impl Setup {
    fn new() -> Setup {
        let base = service_env("SPENDFLOW_MYSQL");
        let hdfs = service_env("SPENDFLOW_HDFS");
        let database = unique_name("spendflow_pers");
        let (head, _) = base
            .rsplit_once('/')
            .filter(|(head, _)| head.contains("://") && !head.ends_with('/'))
            .unwrap_or((base.as_str(), ""));
        let mysql_url = format!("{head}/{database}");
        let (mut conn, _) =
            spendflow_engine::generate::mysql::connect(&mysql_url, true).expect("create database");
        spendflow_engine::generate::mysql::migrate(&mut conn).expect("migrate");
        for id in 1..=3u64 {
            conn.exec_drop(
                "INSERT INTO users (user_id, name, email, country, currency, monthly_budget_minor) \
                 VALUES (?, ?, ?, 'DE', 'EUR', 150000)",
                (
                    id,
                    format!("Jürgen Nummer{id}"),
                    format!("j{id}@example.invalid"),
                ),
            )
            .expect("insert user");
            conn.exec_drop(
                "INSERT INTO cards (card_id, user_id) VALUES (?, ?)",
                (format!("c-{id}-1").into_bytes(), id),
            )
            .expect("insert card");
        }
        let root = format!("/spendflow-it/{}", unique_name("images"));
        Setup {
            hdfs_url: format!("{}{root}", hdfs.trim_end_matches('/')),
            mysql_url,
            database,
            root,
        }
    }

    fn config(&self) -> PersonnelConfig {
        PersonnelConfig::new(&self.mysql_url, &self.hdfs_url)
    }

    fn store(&self) -> HdfsImageStore {
        HdfsImageStore::new(HdfsImageConfig::from_url(&self.hdfs_url).unwrap()).unwrap()
    }

    fn image_ref_column(&self, user_id: u64) -> Option<String> {
        let mut conn = mysql::Conn::new(mysql::Opts::from_url(&self.mysql_url).unwrap()).unwrap();
        conn.exec_first("SELECT image_ref FROM users WHERE user_id = ?", (user_id,))
            .unwrap()
            .flatten()
    }

    fn clean_up(&self, runtime: &tokio::runtime::Runtime) {
        if let Ok(mut conn) = mysql::Conn::new(mysql::Opts::from_url(&self.mysql_url).unwrap()) {
            let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.database));
        }
        let store = self.store();
        let _ = runtime.block_on(store.client().delete(&self.root, true));
    }
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A PNG signature followed by `len - 8` pseudo-random bytes: a "PNG" by its magic bytes.
fn fake_png(len: usize, seed: u64) -> Vec<u8> {
    let mut v = avatar::PNG_SIGNATURE.to_vec();
    let mut x = seed | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    v
}

fn upload_messages(user_id: u64, content_type: &str, bytes: &[u8]) -> Vec<pb::UploadImageRequest> {
    let mut messages = vec![pb::UploadImageRequest {
        part: Some(Part::Header(pb::UploadImageHeader {
            user_id,
            content_type: content_type.to_string(),
            size: bytes.len() as u64,
        })),
    }];
    messages.extend(bytes.chunks(64 * 1024).map(|c| pb::UploadImageRequest {
        part: Some(Part::Chunk(c.to_vec())),
    }));
    messages
}

async fn upload(
    client: &mut PersonnelClient<Channel>,
    user_id: u64,
    content_type: &str,
    bytes: &[u8],
) -> Result<pb::ImageRef, tonic::Status> {
    let messages = upload_messages(user_id, content_type, bytes);
    let response = client
        .upload_image(tokio_stream::iter(messages))
        .await?
        .into_inner();
    Ok(response.image.expect("image in the response"))
}

async fn download(
    client: &mut PersonnelClient<Channel>,
    user_id: u64,
) -> Result<(pb::ImageRef, Vec<u8>), tonic::Status> {
    let mut stream = client
        .get_image(pb::GetImageRequest { user_id })
        .await?
        .into_inner();
    let mut image = None;
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        if let Some(i) = chunk.image {
            assert!(image.is_none(), "the reference comes once");
            image = Some(i);
        }
        assert!(chunk.data.len() <= 64 * 1024);
        bytes.extend_from_slice(&chunk.data);
    }
    Ok((image.expect("a reference in the first chunk"), bytes))
}

/// A TCP relay to `target` on a free port; sending on the returned channel cuts every
/// connection through it at once.
async fn relay(
    target: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cut, mut cut_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut pipes = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut cut_rx => break,
                accepted = listener.accept() => {
                    let Ok((mut inbound, _)) = accepted else { break };
                    pipes.spawn(async move {
                        let mut outbound = tokio::net::TcpStream::connect(target).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    });
                }
            }
        }
        // Dropping the set aborts the pipes and closes both ends of every connection.
        pipes.abort_all();
    });
    (addr, cut)
}

async fn files_under(store: &HdfsImageStore, dir: &str) -> Vec<String> {
    match store.client().list_status(dir, true).await {
        Ok(list) => list
            .into_iter()
            .filter(|f| !f.isdir)
            .map(|f| f.path)
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn personnel_over_grpc_with_mysql_and_hdfs() {
    let setup = Setup::new();
    let personnel = Personnel::connect(&setup.config()).expect("personnel");
    let engine = Engine::builder()
        .grpc("127.0.0.1:0".parse().unwrap())
        .personnel(Arc::new(personnel.clone()))
        .start()
        .expect("engine");
    let addr = engine.grpc_addr().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = setup.store();

    runtime.block_on(async {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = PersonnelClient::new(channel);
        let client = &mut client;

        user_details_from_mysql(client).await;
        let image = upload_then_download(&setup, &store, client).await;
        let second = replace_with_a_real_png(&store, client, &image).await;
        too_large_is_refused(&setup, &store, client).await;
        a_damaged_picture_is_refused(&setup, &store, client).await;
        wrong_content_is_refused(client, &second).await;
        unknown_users_are_not_found(client, &second).await;
        an_aborted_upload_leaves_nothing(&setup, &store, addr).await;
        a_short_upload_is_refused(&store, client).await;
        delete_then_gc(&personnel, &setup, &store, client, &image, &second).await;
    });

    engine.shutdown().unwrap();
    setup.clean_up(&runtime);
}

/// User details from MySQL, no picture yet.
async fn user_details_from_mysql(client: &mut PersonnelClient<Channel>) {
    let user = client
        .get_user(pb::GetUserRequest { user_id: 2 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(user.name, "Jürgen Nummer2");
    assert_eq!(user.email, "j2@example.invalid");
    assert_eq!(
        (user.country.as_str(), user.currency.as_str()),
        ("DE", "EUR")
    );
    assert_eq!(user.monthly_budget_minor, 150_000);
    assert_eq!(user.cards.len(), 1);
    assert_eq!(user.cards[0].card_id, "c-2-1");
    assert!(user.cards[0].masked_number.starts_with("•••• "));
    assert!(user.image.is_none());
}

/// Upload (several chunks), download, same SHA-256.
async fn upload_then_download(
    setup: &Setup,
    store: &HdfsImageStore,
    client: &mut PersonnelClient<Channel>,
) -> pb::ImageRef {
    let first = avatar::padded_png(1, 300_000);
    let image = within(60, "upload", upload(client, 2, "image/png", &first))
        .await
        .expect("upload");
    assert_eq!(image.sha256, sha256(&first));
    assert_eq!(
        (image.content_type.as_str(), image.size),
        ("image/png", 300_000)
    );
    let (got, bytes) = within(60, "download", download(client, 2)).await.unwrap();
    assert_eq!(got, image);
    assert_eq!(sha256(&bytes), sha256(&first));
    // On HDFS under its content address, and referenced from MySQL.
    let info = store
        .stat(&image.sha256)
        .await
        .unwrap()
        .expect("blob on HDFS");
    assert_eq!(info.size, 300_000);
    assert!(
        store
            .client()
            .get_file_info(&format!(
                "{}/{}/{}",
                setup.root,
                &image.sha256[..2],
                image.sha256
            ))
            .await
            .is_ok()
    );
    let column = setup.image_ref_column(2).expect("image_ref set");
    assert!(column.contains(&image.sha256), "{column}");
    let user = client
        .get_user(pb::GetUserRequest { user_id: 2 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(user.image, Some(image.clone()));
    image
}

/// Replace with a real PNG (returned).
async fn replace_with_a_real_png(
    store: &HdfsImageStore,
    client: &mut PersonnelClient<Channel>,
    image: &pb::ImageRef,
) -> Vec<u8> {
    let second = avatar::avatar_png(7, 2);
    let replaced = upload(client, 2, "", &second).await.expect("replace");
    assert_eq!(replaced.sha256, sha256(&second));
    let (got, bytes) = download(client, 2).await.unwrap();
    assert_eq!(got, replaced);
    assert_eq!(bytes, second);
    assert!(
        store.stat(&image.sha256).await.unwrap().is_some(),
        "the old blob stays until gc"
    );
    second
}

/// 6 MiB: refused with a message, nothing stored.
async fn too_large_is_refused(
    setup: &Setup,
    store: &HdfsImageStore,
    client: &mut PersonnelClient<Channel>,
) {
    let big = fake_png(6 * 1024 * 1024, 3);
    let status = upload(client, 1, "image/png", &big).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{status:?}"
    );
    assert!(
        status.message().contains("too large"),
        "{}",
        status.message()
    );
    assert!(store.stat(&sha256(&big)).await.unwrap().is_none());
    assert!(setup.image_ref_column(1).is_none());
}

/// A PNG signature and noise, or a real PNG cut short: decoded whole, INVALID_ARGUMENT, and
/// nothing stays on HDFS (no blob, no temporary file) or in MySQL.
async fn a_damaged_picture_is_refused(
    setup: &Setup,
    store: &HdfsImageStore,
    client: &mut PersonnelClient<Channel>,
) {
    let before = setup.image_ref_column(1);
    let noise = fake_png(300_000, 9);
    let whole = avatar::padded_png(9, 300_000);
    let cut = &whole[..whole.len() - 100];
    for (what, bytes) in [("noise", &noise[..]), ("cut short", cut)] {
        let status = upload(client, 1, "image/png", bytes).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains("not a valid image/png"),
            "{what}: {}",
            status.message()
        );
        assert!(
            store.stat(&sha256(bytes)).await.unwrap().is_none(),
            "{what}"
        );
        let left = files_under(store, &store.temp_dir()).await;
        assert!(left.is_empty(), "{what}: temporary files left: {left:?}");
    }
    assert_eq!(setup.image_ref_column(1), before);
}

/// Text named .png (declared image/png): INVALID_ARGUMENT saying what it is.
async fn wrong_content_is_refused(client: &mut PersonnelClient<Channel>, second: &[u8]) {
    let status = upload(client, 1, "image/png", b"hello, I am a text file\n")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("text"), "{}", status.message());
    // A PNG declared as JPEG.
    let status = upload(client, 1, "image/jpeg", second).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("image/png"),
        "{}",
        status.message()
    );
    // No header first.
    let status = client
        .upload_image(tokio_stream::iter(vec![pb::UploadImageRequest {
            part: Some(Part::Chunk(second.to_vec())),
        }]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// Unknown user: NOT_FOUND everywhere.
async fn unknown_users_are_not_found(client: &mut PersonnelClient<Channel>, second: &[u8]) {
    for status in [
        client
            .get_user(pb::GetUserRequest { user_id: 999 })
            .await
            .unwrap_err(),
        upload(client, 999, "image/png", second).await.unwrap_err(),
        download(client, 999).await.unwrap_err(),
        client
            .delete_image(pb::DeleteImageRequest { user_id: 999 })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert!(status.message().contains("999"), "{}", status.message());
    }
    // A user without a picture.
    let status = download(client, 3).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("no image"),
        "{}",
        status.message()
    );
}

/// A client that aborts mid-upload leaves no partial file anywhere.
async fn an_aborted_upload_leaves_nothing(
    setup: &Setup,
    store: &HdfsImageStore,
    addr: std::net::SocketAddr,
) {
    let blobs_before = store.list_blobs().await.unwrap().len();
    let (tx, rx) = mpsc::channel(16);
    // Through a TCP relay that the test cuts, as when the client's process or network dies.
    let (relay_addr, cut) = relay(addr).await;
    let own = Channel::from_shared(format!("http://{relay_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut aborting = PersonnelClient::new(own);
    let call = tokio::spawn(async move { aborting.upload_image(ReceiverStream::new(rx)).await });
    let partial = fake_png(1024 * 1024, 5);
    let mut messages = upload_messages(3, "image/png", &partial).into_iter();
    for message in messages.by_ref().take(4) {
        tx.send(message).await.unwrap();
    }
    let temp_dir = store.temp_dir();
    let deadline = Instant::now() + Duration::from_secs(30);
    while files_under(store, &temp_dir).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the upload never started a temporary file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The stream has not ended (the sender is alive): the client goes away mid-upload.
    cut.send(()).unwrap();
    call.abort();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = files_under(store, &temp_dir).await;
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "temporary files left after an abort: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.list_blobs().await.unwrap().len(), blobs_before);
    assert!(store.stat(&sha256(&partial)).await.unwrap().is_none());
    assert!(setup.image_ref_column(3).is_none());
    drop(tx);
}

/// A stream that ends cleanly but short of the declared size is refused too (nothing is left,
/// as after an abort).
async fn a_short_upload_is_refused(store: &HdfsImageStore, client: &mut PersonnelClient<Channel>) {
    let blobs_before = store.list_blobs().await.unwrap().len();
    let partial = fake_png(1024 * 1024, 5);
    let temp_dir = store.temp_dir();
    let mut messages = upload_messages(3, "image/png", &partial);
    messages.truncate(3);
    let status = client
        .upload_image(tokio_stream::iter(messages))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("ended after"),
        "{}",
        status.message()
    );
    assert!(files_under(store, &temp_dir).await.is_empty());
    assert_eq!(store.list_blobs().await.unwrap().len(), blobs_before);
}

/// Delete, then garbage collection removes the orphans and keeps what is referenced.
async fn delete_then_gc(
    personnel: &Personnel,
    setup: &Setup,
    store: &HdfsImageStore,
    client: &mut PersonnelClient<Channel>,
    image: &pb::ImageRef,
    second: &[u8],
) {
    let user1 = upload(client, 1, "", &avatar::avatar_png(7, 1))
        .await
        .unwrap();
    let removed = client
        .delete_image(pb::DeleteImageRequest { user_id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.removed, Some(user1.clone()));
    assert_eq!(
        download(client, 1).await.unwrap_err().code(),
        Code::NotFound
    );
    assert!(setup.image_ref_column(1).is_none());
    let report = personnel
        .collect_garbage(GcOptions {
            blob_grace: Duration::ZERO,
            temp_age: Duration::from_secs(3600),
            dry_run: false,
        })
        .await
        .unwrap();
    let mut removed = report.removed_blobs.clone();
    removed.sort();
    let mut expected = vec![image.sha256.clone(), user1.sha256.clone()];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(store.stat(&image.sha256).await.unwrap().is_none());
    let (_, bytes) = download(client, 2).await.unwrap();
    assert_eq!(bytes, second, "the referenced picture survives gc");
}

#[test]
fn without_personnel_the_rpcs_say_how_to_enable_it() {
    let engine = Engine::builder()
        .grpc("127.0.0.1:0".parse().unwrap())
        .start()
        .unwrap();
    let addr = engine.grpc_addr().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(async {
        let mut client = PersonnelClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        client
            .get_user(pb::GetUserRequest { user_id: 1 })
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("--mysql"), "{}", status.message());
    engine.shutdown().unwrap();
}

fn spendflow(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spendflow"))
        .args(args)
        .env_remove("SPENDFLOW_MYSQL")
        .env_remove("SPENDFLOW_HDFS")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run spendflow")
}

/// `spendflow images ARGS --mysql ... --hdfs ...` on the setup's database and HDFS root.
fn images(setup: &Setup, args: &[&str]) -> std::process::Output {
    let mut all = vec!["images"];
    all.extend(args);
    all.extend(["--mysql", &setup.mysql_url, "--hdfs", &setup.hdfs_url]);
    spendflow(&all)
}

#[track_caller]
fn assert_succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn images_cli_put_get_refuse_and_generate_avatars() {
    let setup = Setup::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();

    // A text file named .png: refused, non-zero exit, a message that says why.
    let fake = dir.path().join("face.png");
    std::fs::write(&fake, "this is not an image, just text\n").unwrap();
    let out = images(&setup, &["put", "1", fake.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a text file was accepted");
    assert!(
        stderr.contains("refused") && stderr.contains("not an accepted image"),
        "{stderr}"
    );
    assert!(setup.image_ref_column(1).is_none());

    // A real picture: put, then get gives the same bytes.
    let real = dir.path().join("avatar.bin");
    let png = avatar::avatar_png(1, 1);
    std::fs::write(&real, &png).unwrap();
    let out = images(&setup, &["put", "1", real.to_str().unwrap()]);
    assert_succeeded(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&sha256(&png)));
    let back = dir.path().join("back.png");
    let out = images(&setup, &["get", "1", back.to_str().unwrap()]);
    assert_succeeded(&out);
    assert_eq!(std::fs::read(&back).unwrap(), png);

    // Unknown user: non-zero, names the user.
    let out = images(&setup, &["put", "77", real.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("user 77 does not exist"), "{stderr}");

    // Avatars for users without a picture; user 1 keeps the uploaded one.
    let stop = AtomicBool::new(false);
    let summary = spendflow_engine::personnel::avatars::attach_when_ready(
        &setup.config(),
        42,
        3,
        Duration::from_secs(60),
        &stop,
    )
    .expect("avatars");
    assert_eq!((summary.uploaded, summary.skipped), (2, 1), "{summary:?}");
    let personnel = Personnel::connect(&setup.config()).unwrap();
    runtime.block_on(async {
        let (image, bytes) = personnel
            .image(3)
            .await
            .unwrap()
            .expect("avatar for user 3");
        assert_eq!(bytes, avatar::avatar_png(42, 3));
        assert_eq!(image.content_type, "image/png");
        let (_, bytes) = personnel.image(1).await.unwrap().unwrap();
        assert_eq!(
            bytes, png,
            "an uploaded picture is never replaced by an avatar"
        );
    });

    // The gc command: a dry run lists nothing to remove (everything is referenced).
    let out = images(&setup, &["gc", "--grace-minutes", "0", "--dry-run"]);
    assert_succeeded(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 0 orphaned blobs"));

    setup.clean_up(&runtime);
}

#[test]
fn generate_with_avatars_gives_every_user_a_picture() {
    let brokers = service_env("SPENDFLOW_KAFKA");
    let setup = Setup::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A fresh database for generate (the setup's has hand-made users).
    let database = unique_name("spendflow_gen");
    let (head, _) = setup.mysql_url.rsplit_once('/').unwrap();
    let url = format!("{head}/{database}");
    let prefix = format!("{}.user.", unique_name("sfit_avatars"));
    let out = spendflow(&[
        "generate",
        "--mysql",
        &url,
        "--brokers",
        &brokers,
        "--topic-prefix",
        &prefix,
        "--users",
        "4",
        "--events",
        "20",
        "--avatars",
        "--hdfs",
        &setup.hdfs_url,
    ]);
    assert_succeeded(&out);
    let personnel = Personnel::connect(&PersonnelConfig::new(&url, &setup.hdfs_url)).unwrap();
    runtime.block_on(async {
        for user in 1..=4 {
            let (image, bytes) = personnel
                .image(user)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("user {user} has no avatar"));
            assert_eq!(bytes, avatar::avatar_png(42, user));
            assert_eq!(image.sha256, sha256(&bytes));
        }
    });
    if let Ok(mut conn) = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()) {
        let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS `{database}`"));
    }
    setup.clean_up(&runtime);
}
