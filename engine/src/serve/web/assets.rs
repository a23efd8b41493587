//! The page's files, compiled into the binary.
//!
//! They are served with an ETag (a hash of the content) and `Cache-Control: no-cache`: the
//! browser keeps a copy but asks every time whether it is still current, which costs one
//! `304` and means a new binary is never shown with an old script.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const INDEX: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_str!("assets/index.html"),
};

const ASSETS: [Asset; 3] = [
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("assets/app.js"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("assets/style.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_str!("assets/icon.svg"),
    },
];

/// Every file served, `(name, body)`, for tests that check what the page loads.
#[cfg(test)]
pub fn all() -> impl Iterator<Item = (&'static str, &'static str)> {
    std::iter::once(&INDEX)
        .chain(ASSETS.iter())
        .map(|a| (a.name, a.body))
}

/// The ETag of a body: a 64-bit FNV-1a hash, quoted.
fn etag(asset: &Asset) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        std::iter::once(&INDEX)
            .chain(ASSETS.iter())
            .map(|a| {
                let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
                for byte in a.body.bytes() {
                    hash ^= u64::from(byte);
                    hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
                }
                format!("\"{hash:016x}\"")
            })
            .collect()
    });
    let index = std::iter::once(&INDEX)
        .chain(ASSETS.iter())
        .position(|a| a.name == asset.name)
        .unwrap_or(0);
    &tags[index]
}

/// True if the request's `If-None-Match` names `etag`.
pub fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/") == etag
        })
}

fn respond(asset: &Asset, headers: &HeaderMap) -> Response {
    let etag = etag(asset);
    let common = [
        (header::ETAG, etag),
        (header::CACHE_CONTROL, "no-cache"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    if etag_matches(headers, etag) {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    let mut response = (
        [(header::CONTENT_TYPE, asset.content_type)],
        common,
        asset.body,
    )
        .into_response();
    if asset.name == INDEX.name {
        // The page loads nothing from anywhere but this server.
        response.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            header::HeaderValue::from_static(
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                 connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
            ),
        );
    }
    response
}

/// `GET /` and `GET /users/{id}`: the page; its script renders the view the path names.
pub async fn page(headers: HeaderMap) -> Response {
    respond(&INDEX, &headers)
}

/// `GET /assets/{name}`.
pub async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(asset) => respond(asset, &headers),
        None => super::api::not_found(format!("/assets/{name}").parse().unwrap_or_default()).await,
    }
}

/// `GET /favicon.ico`: browsers ask for it whatever the page says; answer with the icon.
pub async fn favicon(headers: HeaderMap) -> Response {
    respond(&ASSETS[2], &headers)
}
