//! Unit tests of the image rules with the in-memory store.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::*;

/// A valid PNG of `len` bytes (uploads are decoded whole).
fn png_bytes(len: usize) -> Vec<u8> {
    avatar::padded_png(len as u64, len)
}

fn chunks_of(bytes: &[u8], size: usize) -> Vec<Result<Bytes, ImageError>> {
    bytes
        .chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect()
}

async fn store(
    store: &MemoryImageStore,
    declared: &str,
    max: u64,
    bytes: &[u8],
) -> Result<ImageRef, ImageError> {
    store_stream(
        store,
        declared,
        max,
        futures::stream::iter(chunks_of(bytes, 1000)),
    )
    .await
}

#[test]
fn magic_bytes_decide_the_kind() {
    assert_eq!(
        ImageKind::detect(&avatar::PNG_SIGNATURE),
        Some(ImageKind::Png)
    );
    assert_eq!(
        ImageKind::detect(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10]),
        Some(ImageKind::Jpeg)
    );
    assert_eq!(
        ImageKind::detect(b"RIFF\x24\0\0\0WEBPVP8 "),
        Some(ImageKind::WebP)
    );
    assert_eq!(ImageKind::detect(b"RIFF\x24\0\0\0WAVEfmt "), None);
    assert_eq!(ImageKind::detect(b"hello, this is text"), None);
    assert_eq!(ImageKind::detect(b"GIF89a......"), None);
    assert_eq!(ImageKind::detect(&[]), None);
    assert_eq!(
        ImageKind::from_content_type("IMAGE/PNG; q=1"),
        Some(ImageKind::Png)
    );
    assert_eq!(ImageKind::from_content_type("image/gif"), None);
}

#[tokio::test]
async fn text_named_png_is_refused_and_nothing_stays() {
    let s = MemoryImageStore::new();
    let err = store(
        &s,
        "image/png",
        DEFAULT_MAX_BYTES,
        b"just some text, not a picture\n",
    )
    .await
    .unwrap_err();
    match &err {
        ImageError::Invalid { message } => {
            assert!(message.contains("looks like text"), "{message}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(s.list_blobs().await.unwrap().is_empty());
    assert!(s.list_temp().await.unwrap().is_empty());
}

#[tokio::test]
async fn declared_type_must_match_the_bytes() {
    let s = MemoryImageStore::new();
    let err = store(&s, "image/jpeg", DEFAULT_MAX_BYTES, &png_bytes(1000))
        .await
        .unwrap_err();
    let ImageError::Invalid { message } = err else {
        panic!("expected Invalid");
    };
    assert!(message.contains("which is image/png"), "{message}");
    let err = store(&s, "image/gif", DEFAULT_MAX_BYTES, &png_bytes(1000))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Invalid { .. }));
    // Empty: the bytes decide.
    let image = store(&s, "", DEFAULT_MAX_BYTES, &png_bytes(1000))
        .await
        .unwrap();
    assert_eq!(image.content_type, "image/png");
    assert!(s.list_temp().await.unwrap().is_empty());
}

#[tokio::test]
async fn size_limit_is_enforced_while_streaming() {
    let s = MemoryImageStore::new();
    let max = 10_000u64;
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    // An endless stream: only the limit can stop it.
    let endless = futures::stream::iter(
        std::iter::once(png_bytes(1000)).chain(std::iter::repeat(vec![7u8; 1000])),
    )
    .map(move |c| {
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(Bytes::from(c))
    });
    let err = store_stream(&s, "", max, endless).await.unwrap_err();
    assert!(
        matches!(err, ImageError::TooLarge { limit } if limit == max),
        "{err:?}"
    );
    assert_eq!(pulled.load(Ordering::Relaxed), 11, "read past the limit");
    assert!(s.list_temp().await.unwrap().is_empty());
    assert!(s.list_blobs().await.unwrap().is_empty());
    // Exactly at the limit is fine.
    let image = store(&s, "", max, &png_bytes(max as usize)).await.unwrap();
    assert_eq!(image.size, max);
}

#[tokio::test]
async fn an_aborted_stream_leaves_nothing() {
    let s = MemoryImageStore::new();
    let items = vec![
        Ok(Bytes::from(png_bytes(5000))),
        Ok(Bytes::from(vec![1u8; 5000])),
        Err(ImageError::Aborted {
            message: "client went away".into(),
        }),
    ];
    let err = store_stream(
        &s,
        "image/png",
        DEFAULT_MAX_BYTES,
        futures::stream::iter(items),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ImageError::Aborted { .. }));
    assert!(s.list_temp().await.unwrap().is_empty());
    assert!(s.list_blobs().await.unwrap().is_empty());

    // A pending upload dropped half-way (the request future cancelled) removes its file too.
    let mut pending = s.begin().await.unwrap();
    pending.write(Bytes::from(png_bytes(1000))).await.unwrap();
    assert_eq!(s.list_temp().await.unwrap().len(), 1);
    drop(pending);
    assert!(s.list_temp().await.unwrap().is_empty());
}

#[tokio::test]
async fn content_addressed_and_deduplicated() {
    let s = MemoryImageStore::new();
    let bytes = png_bytes(3000);
    let a = store(&s, "", DEFAULT_MAX_BYTES, &bytes).await.unwrap();
    let b = store(&s, "image/png", DEFAULT_MAX_BYTES, &bytes)
        .await
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(a.sha256, sha256_hex(&bytes));
    assert!(is_sha256_hex(&a.sha256));
    assert_eq!(
        blob_path(&a.sha256),
        format!("{}/{}", &a.sha256[..2], a.sha256)
    );
    assert_eq!(s.list_blobs().await.unwrap().len(), 1);
    assert_eq!(s.read(&a.sha256).await.unwrap(), Some(bytes));
    assert_eq!(
        ImageRef::from_json(&a.to_json()).unwrap(),
        a,
        "the MySQL form round-trips"
    );
    assert!(
        ImageRef::from_json("{\"sha256\":\"x\",\"content_type\":\"image/png\",\"size\":1}")
            .is_err()
    );
}

#[tokio::test]
async fn garbage_collection_keeps_referenced_and_young_blobs() {
    let s = MemoryImageStore::new();
    let kept = store(&s, "", DEFAULT_MAX_BYTES, &png_bytes(1000))
        .await
        .unwrap();
    let orphan = store(&s, "", DEFAULT_MAX_BYTES, &png_bytes(2000))
        .await
        .unwrap();
    let young = store(&s, "", DEFAULT_MAX_BYTES, &png_bytes(3000))
        .await
        .unwrap();
    let hour_ago = now_ms() - 3_600_000;
    s.set_modified(&kept.sha256, hour_ago);
    s.set_modified(&orphan.sha256, hour_ago);
    let stale = s.begin().await.unwrap();
    let stale_name = stale.temp_name().to_string();
    std::mem::forget(stale); // a crashed upload: nobody removes it
    s.set_temp_modified(&stale_name, hour_ago);
    let _fresh = s.begin().await.unwrap();

    let referenced: HashSet<String> = [kept.sha256.clone()].into();
    let options = GcOptions {
        blob_grace: Duration::from_secs(600),
        temp_age: Duration::from_secs(600),
        dry_run: true,
    };
    let dry = collect_garbage(&s, &referenced, options).await.unwrap();
    assert_eq!(dry.removed_blobs, vec![orphan.sha256.clone()]);
    assert_eq!(
        s.list_blobs().await.unwrap().len(),
        3,
        "a dry run removes nothing"
    );

    let report = collect_garbage(
        &s,
        &referenced,
        GcOptions {
            dry_run: false,
            ..options
        },
    )
    .await
    .unwrap();
    assert_eq!(report.blobs, 3);
    assert_eq!(report.referenced, 1);
    assert_eq!(report.removed_blobs, vec![orphan.sha256.clone()]);
    assert_eq!(report.young_orphans, 1);
    assert_eq!(report.removed_temp, vec![stale_name]);
    assert_eq!(report.young_temp, 1);
    let left: HashSet<String> = s
        .list_blobs()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.sha256)
        .collect();
    assert_eq!(left, [kept.sha256, young.sha256].into());
}

#[tokio::test]
async fn reusing_a_blob_refreshes_its_time() {
    let s = MemoryImageStore::new();
    let bytes = png_bytes(1000);
    let image = store(&s, "", DEFAULT_MAX_BYTES, &bytes).await.unwrap();
    s.set_modified(&image.sha256, 1);
    store(&s, "", DEFAULT_MAX_BYTES, &bytes).await.unwrap();
    let info = s.stat(&image.sha256).await.unwrap().unwrap();
    assert!(
        info.modified_ms > 1,
        "an upload of existing bytes must refresh the blob for gc"
    );
}

/// The chunk types of a PNG, in order (the decoder below checks their CRCs).
fn png_chunk_kinds(png: &[u8]) -> Vec<[u8; 4]> {
    assert_eq!(&png[..8], &avatar::PNG_SIGNATURE);
    let mut out = Vec::new();
    let mut at = 8;
    while at < png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        out.push(png[at + 4..at + 8].try_into().unwrap());
        at += 12 + len;
    }
    assert_eq!(at, png.len());
    out
}

/// Decodes an indexed PNG with the `png` crate, untransformed: its info (palette included) and
/// one palette index per pixel, row by row.
fn decode_indexed(png: &[u8]) -> (png::Info<'static>, Vec<u8>) {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    pixels.truncate(frame.buffer_size());
    let info = reader.info().clone();
    (info, pixels)
}

#[test]
fn avatars_are_valid_deterministic_symmetric_pngs() {
    let png = avatar::avatar_png(42, 7);
    assert_eq!(png, avatar::avatar_png(42, 7));
    assert_ne!(png, avatar::avatar_png(42, 8));
    assert_ne!(png, avatar::avatar_png(43, 7));
    assert_eq!(ImageKind::detect(&png), Some(ImageKind::Png));

    let mut kinds = png_chunk_kinds(&png);
    kinds.dedup();
    assert_eq!(kinds, [*b"IHDR", *b"PLTE", *b"IDAT", *b"IEND"]);
    let (info, pixels) = decode_indexed(&png);
    let (w, h) = (info.width, info.height);
    assert_eq!((w, h), (avatar::SIZE_PX, avatar::SIZE_PX));
    assert_eq!(
        (info.bit_depth, info.color_type, info.interlaced),
        (png::BitDepth::Eight, png::ColorType::Indexed, false)
    );
    assert_eq!(
        info.palette.as_deref().map(<[u8]>::len),
        Some(6),
        "two palette entries"
    );

    assert_eq!(pixels.len(), (h * w) as usize);
    let mut coloured = 0;
    for px in pixels.chunks(w as usize) {
        assert!(px.iter().all(|&p| p <= 1), "index within the palette");
        let mirrored: Vec<u8> = px.iter().rev().copied().collect();
        assert_eq!(px, &mirrored[..], "left-right symmetric");
        coloured += px.iter().filter(|&&p| p == 1).count();
    }
    assert!(coloured > 0, "never an empty pattern");
}

/// The avatars show what they showed before the encoder became the `png` crate: the SHA-256 of
/// palette and pixel indices, decoded, for a few seeds and users, as the hand-written encoder
/// wrote them (the bytes may differ: another zlib; the picture may not).
#[test]
fn avatars_keep_their_pictures() {
    use sha2::{Digest, Sha256};
    let picture = |seed: u64, user: u64| {
        let (info, pixels) = decode_indexed(&avatar::avatar_png(seed, user));
        let mut hash = Sha256::new();
        hash.update(info.palette.as_deref().unwrap());
        hash.update(&pixels);
        format!("{:x}", hash.finalize())
    };
    let seen: Vec<String> = [(42, 7), (42, 8), (43, 7), (0, 1), (7, 1_000_000)]
        .into_iter()
        .map(|(seed, user)| picture(seed, user))
        .collect();
    assert_eq!(seen, GOLDEN_PICTURES);
}

const GOLDEN_PICTURES: [&str; 5] = [
    "3e7092568f1a5d25f30e00aea099f7c63b1c58e7308cbe3862e278943393bb52",
    "1a1e41820d503073541250593b8669d9a37a00ca2e49ca79272eb5e23e827d48",
    "901a17593c37587ae8a426a975a9c4442724f0f5a5c5da362678ba76ce9a635e",
    "16250088f1805042dba31db9ca0a65bf023f624d036220881a19388aa8b346bd",
    "cf0fc93b649f501b5ef754c699f9bd4522500659521f720a4ad655e7b59eeeb6",
];

#[test]
fn hdfs_urls_parse_with_a_root() {
    let c = HdfsImageConfig::from_url("hdfs://127.0.0.1:9000").unwrap();
    assert_eq!(
        (c.url.as_str(), c.root.as_str()),
        ("hdfs://127.0.0.1:9000", config::DEFAULT_ROOT)
    );
    let c = HdfsImageConfig::from_url("hdfs://nn:9000/a/b/").unwrap();
    assert_eq!(
        (c.url.as_str(), c.root.as_str()),
        ("hdfs://nn:9000", "/a/b")
    );
    assert!(HdfsImageConfig::from_url("http://nn:9000").is_err());
    assert!(HdfsImageConfig::from_url("hdfs://nn:9000/a/../b").is_err());
    assert!(HdfsImageConfig::from_url("hdfs:///x").is_err());
}

#[tokio::test]
async fn a_damaged_or_truncated_picture_is_refused_and_nothing_stays() {
    let s = MemoryImageStore::new();
    let whole = png_bytes(2000);
    let cases: [(&str, Vec<u8>); 3] = [
        ("truncated", whole[..whole.len() - 30].to_vec()),
        ("a PNG signature and noise", {
            let mut v = avatar::PNG_SIGNATURE.to_vec();
            v.extend((0..2000).map(|i| (i % 251) as u8));
            v
        }),
        ("a JPEG signature and noise", {
            let mut v = vec![0xFF, 0xD8, 0xFF, 0xE0];
            v.extend((0..2000).map(|i| (i % 251) as u8));
            v
        }),
    ];
    for (what, bytes) in cases {
        let err = store(&s, "", DEFAULT_MAX_BYTES, &bytes).await.unwrap_err();
        match &err {
            ImageError::Invalid { message } => {
                assert!(message.contains("not a valid image/"), "{what}: {message}")
            }
            other => panic!("{what}: expected Invalid, got {other:?}"),
        }
        assert!(s.list_blobs().await.unwrap().is_empty(), "{what}");
        assert!(s.list_temp().await.unwrap().is_empty(), "{what}");
    }
    // The whole file is fine.
    store(&s, "image/png", DEFAULT_MAX_BYTES, &whole)
        .await
        .unwrap();
}

/// A black PNG of `width` × `height` at one bit a pixel: a few KiB for millions of pixels.
fn huge_png(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::One);
    let mut writer = encoder.write_header().unwrap();
    let row = (width as usize).div_ceil(8);
    writer
        .write_image_data(&vec![0u8; row * height as usize])
        .unwrap();
    writer.finish().unwrap();
    out
}

#[tokio::test]
async fn a_small_file_of_too_many_pixels_is_refused() {
    let s = MemoryImageStore::new();
    for (width, height) in [
        (MAX_DIMENSION + 1, 16),
        (16, MAX_DIMENSION + 1),
        (4096, 4097),
    ] {
        let bytes = huge_png(width, height);
        assert!(bytes.len() < 100_000, "{} bytes", bytes.len());
        let err = store(&s, "", DEFAULT_MAX_BYTES, &bytes).await.unwrap_err();
        match &err {
            ImageError::Invalid { message } => {
                assert!(
                    message.contains("over the limits"),
                    "{width}×{height}: {message}"
                )
            }
            other => panic!("{width}×{height}: expected Invalid, got {other:?}"),
        }
    }
    assert!(s.list_blobs().await.unwrap().is_empty());
    assert!(s.list_temp().await.unwrap().is_empty());
    // At the limits it is accepted.
    let image = store(
        &s,
        "",
        DEFAULT_MAX_BYTES,
        &huge_png(MAX_DIMENSION, MAX_DIMENSION),
    )
    .await
    .unwrap();
    assert_eq!(image.content_type, "image/png");
}

#[tokio::test]
async fn a_bounded_store_refuses_uploads_past_its_bytes_or_images_naming_the_limit() {
    let s = MemoryImageStore::bounded(5_000, 100);
    let first = store(&s, "", DEFAULT_MAX_BYTES, &png_bytes(3000))
        .await
        .unwrap();
    let err = store(&s, "", DEFAULT_MAX_BYTES, &png_bytes(3001))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Full { .. }), "{err:?}");
    assert!(err.to_string().contains("at most 5000 bytes"), "{err}");
    assert!(
        s.list_temp().await.unwrap().is_empty(),
        "the refused upload's file goes"
    );
    assert_eq!(s.usage(), (3000, 1));
    // Space comes back when a blob goes (the garbage collector removes orphans so).
    s.remove_blob(&first.sha256).await.unwrap();
    store(&s, "", DEFAULT_MAX_BYTES, &png_bytes(3001))
        .await
        .unwrap();

    let s = MemoryImageStore::bounded(u64::MAX, 2);
    s.insert("a".repeat(64).as_str(), Bytes::from_static(b"avatar"));
    store(&s, "", DEFAULT_MAX_BYTES, &png_bytes(1000))
        .await
        .unwrap();
    let err = store(&s, "", DEFAULT_MAX_BYTES, &png_bytes(1001))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("at most 2 images"), "{err}");
    assert_eq!(s.usage(), (1006, 2), "the avatar and the upload");
}
