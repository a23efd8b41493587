//! The claims spendflow reads from a token, and minting development tokens.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{AuthError, Scopes, read_secret};

/// The claims of a spendflow token. Other claims are ignored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user the token speaks for (a decimal user id for `expenses:read:self`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, seconds since the Unix epoch. Required.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Space-separated scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The token's id (per-token limits count by it when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// A development token signed with the HS256 secret in `secret_file` (read as the servers
/// read it): `sub`, `scopes`, valid for `ttl` from now.
///
/// # Errors
///
/// [`AuthError::Key`] if the secret cannot be read; [`AuthError::Unauthenticated`] if signing
/// failed.
pub fn mint_hs256(
    secret_file: &Path,
    sub: Option<&str>,
    scopes: Scopes,
    ttl: Duration,
) -> Result<String, AuthError> {
    let secret = read_secret(secret_file)?;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: sub.map(str::to_string),
        exp: now.saturating_add(ttl.as_secs()),
        iat: Some(now),
        scope: Some(scopes.to_string()),
        jti: None,
    };
    let key = jsonwebtoken::EncodingKey::from_secret(&secret).map_err(|e| AuthError::Key {
        path: secret_file.to_path_buf(),
        message: e.to_string(),
    })?;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &key,
    )
    .map_err(|e| AuthError::Unauthenticated(format!("signing the token failed: {e}")))
}
