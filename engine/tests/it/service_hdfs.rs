//! HDFS (hdfs-native) against the real NameNode/DataNode: write, read, rename, delete.
//! Needs `SPENDFLOW_HDFS` (see `docker/native/services env`).

use hdfs_native::{ClientBuilder, WriteOptions};

use crate::support::{service_env, unique_name, within};

#[tokio::test]
async fn hdfs_write_read_rename_delete() {
    let url = service_env("SPENDFLOW_HDFS");
    let client = ClientBuilder::new()
        .with_url(url.clone())
        .build()
        .unwrap_or_else(|e| panic!("hdfs client for {url}: {e}"));
    let dir = format!("/spendflow-it/{}", unique_name("hdfs"));
    let path = format!("{dir}/image.bin");
    let renamed = format!("{dir}/image-renamed.bin");

    within(60, "mkdirs", client.mkdirs(&dir, 0o755, true))
        .await
        .expect("mkdirs");

    // A little over one 1 MiB chunk, not a multiple of the packet size.
    let data: Vec<u8> = (0..(1024 * 1024 + 12_345))
        .map(|i: u32| (i % 251) as u8)
        .collect();
    let mut writer = within(60, "create", client.create(&path, WriteOptions::default()))
        .await
        .expect("create");
    let written = within(60, "write", writer.write_bytes(data.clone().into()))
        .await
        .expect("write");
    assert_eq!(written, data.len());
    within(60, "close", writer.close()).await.expect("close");

    let status = within(60, "stat", client.get_file_info(&path))
        .await
        .expect("stat");
    assert_eq!(status.length, data.len());
    assert!(!status.isdir);

    let mut reader = within(60, "open", client.read(&path)).await.expect("open");
    assert_eq!(reader.file_length(), data.len());
    let got = within(60, "read", reader.read_bytes(data.len()))
        .await
        .expect("read");
    assert!(got[..] == data[..], "read back different bytes");

    within(60, "rename", client.rename(&path, &renamed, false))
        .await
        .expect("rename");
    assert!(
        client.get_file_info(&path).await.is_err(),
        "old path still exists after rename"
    );
    let mut reader = within(60, "open renamed", client.read(&renamed))
        .await
        .expect("open renamed");
    let head = within(60, "read renamed", reader.read_bytes(1000))
        .await
        .expect("read renamed");
    assert!(head[..] == data[..1000]);

    let deleted = within(60, "delete", client.delete(&dir, true))
        .await
        .expect("delete");
    assert!(deleted, "delete reported nothing deleted");
    assert!(
        client.get_file_info(&renamed).await.is_err(),
        "file still exists after delete"
    );
}
