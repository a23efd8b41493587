//! Token auth of the gRPC and web servers: JSON Web Tokens whose `scope` says what the bearer
//! may read or change, down to one user's own rows.
//!
//! Auth is on when the servers are given a key ([`AuthKey`]): an HS256 secret
//! (`--jwt-secret-file`) or an RS256/ES256 public key (`--jwt-public-key`). The algorithm is
//! pinned to the key's kind (a token signed with another algorithm is refused), `exp` is
//! required, and `scope` is a space-separated list of [`Scope`]s (others are ignored, so tokens
//! of an identity provider that carry more scopes work). With `expenses:read:self` the token's
//! `sub` must be a user id written in decimal.
//!
//! * [`Authenticator::authenticate`] turns a bearer token into a [`Principal`], or an
//!   [`AuthError::Unauthenticated`] (missing, expired, badly signed: gRPC `UNAUTHENTICATED`,
//!   HTTP 401).
//! * The [`Principal`]'s checks ([`Principal::read_user`], [`Principal::require`], ...) answer
//!   [`AuthError::Denied`] naming the scope needed (gRPC `PERMISSION_DENIED`, HTTP 403).
//! * gRPC: [`grpc::Authenticate`], a tonic interceptor on `ExpenseQuery`, `Alerts`, `Admin` and
//!   `Personnel` (health and reflection stay open), puts the [`Principal`] into the request's
//!   extensions; every handler checks it. Without auth configured no principal is there and
//!   every handler answers as before.

pub mod grpc;
mod token;
#[cfg(feature = "web")]
pub mod web;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use spendflow_operators::UserId;

use crate::config::SecurityConfig;

pub use token::{Claims, mint_hs256};

/// Subscription streams one token may hold open at once; more get `RESOURCE_EXHAUSTED`.
pub const MAX_STREAMS_PER_TOKEN: usize = 16;

/// Shortest HS256 secret accepted, in bytes (RFC 7518 §3.2: at least the hash's size).
pub const MIN_SECRET_BYTES: usize = 32;

/// What a token may do. Written in a token's `scope` claim by [`Scope::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every user's aggregates, top spenders, listing, subscriptions to any user or all.
    ExpensesRead,
    /// Only the aggregates of the user whose id is the token's `sub`.
    ExpensesReadSelf,
    /// Users' details and pictures (only the token's own user with a self-only token).
    PersonnelRead,
    /// Uploading and deleting pictures (only the token's own user with a self-only token).
    PersonnelWrite,
    /// `Admin/*` and `/metrics`.
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 5] = [
        Scope::ExpensesRead,
        Scope::ExpensesReadSelf,
        Scope::PersonnelRead,
        Scope::PersonnelWrite,
        Scope::Admin,
    ];

    /// The scope as tokens write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::ExpensesRead => "expenses:read",
            Scope::ExpensesReadSelf => "expenses:read:self",
            Scope::PersonnelRead => "personnel:read",
            Scope::PersonnelWrite => "personnel:write",
            Scope::Admin => "admin",
        }
    }

    /// The scope written `text`, if it is one of ours.
    pub fn parse(text: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == text)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`Scope`]s.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    /// The scopes of a `scope` claim (space-separated); words that are not ours are ignored.
    pub fn from_claim(claim: &str) -> Scopes {
        Scopes(
            claim
                .split_ascii_whitespace()
                .filter_map(Scope::parse)
                .fold(0, |bits, s| bits | s.bit()),
        )
    }

    /// The scopes of a space-separated list, every word one of ours.
    ///
    /// # Errors
    ///
    /// The first word that is not a scope, with the list of scopes.
    pub fn parse_strict(list: &str) -> Result<Scopes, String> {
        let mut scopes = Scopes::default();
        for word in list.split_ascii_whitespace() {
            let scope = Scope::parse(word).ok_or_else(|| {
                format!(
                    "{word:?} is not a scope; scopes are {}",
                    Scope::ALL.map(Scope::as_str).join(", ")
                )
            })?;
            scopes = scopes.with(scope);
        }
        Ok(scopes)
    }

    /// These and `scope`.
    #[must_use]
    pub fn with(self, scope: Scope) -> Scopes {
        Scopes(self.0 | scope.bit())
    }

    /// True if `scope` is in the set.
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// True if no scope is in the set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words: Vec<&str> = Scope::ALL
            .into_iter()
            .filter(|s| self.contains(*s))
            .map(Scope::as_str)
            .collect();
        f.write_str(&words.join(" "))
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scopes({self})")
    }
}

/// Who made a request, from a valid token.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The token's `sub` as a user id, if it is one (required with `expenses:read:self`).
    pub sub: Option<UserId>,
    /// What the token may do.
    pub scopes: Scopes,
    /// Identifies the token for per-token limits (its `jti`, else its signature).
    pub token_id: Arc<str>,
    /// Seconds since the Unix epoch at which the token expires.
    pub expires_at: u64,
}

impl Principal {
    /// True when the token reads only its own user's expenses: `expenses:read:self` without
    /// `expenses:read`. Its personnel scopes then apply to that user only.
    pub fn self_only(&self) -> bool {
        !self.scopes.contains(Scope::ExpensesRead) && self.scopes.contains(Scope::ExpensesReadSelf)
    }

    /// The token's own user, if it is limited to it.
    pub fn own_user(&self) -> Option<UserId> {
        if self.self_only() { self.sub } else { None }
    }

    /// Requires `scope`.
    ///
    /// # Errors
    ///
    /// [`AuthError::Denied`] naming it.
    pub fn require(&self, scope: Scope) -> Result<(), AuthError> {
        if self.scopes.contains(scope) {
            Ok(())
        } else {
            Err(AuthError::Denied(format!(
                "this needs the scope {scope}; the token has {:?}",
                self.scopes.to_string()
            )))
        }
    }

    /// Reading `user`'s aggregates: `expenses:read`, or `expenses:read:self` with `sub` = `user`.
    ///
    /// # Errors
    ///
    /// [`AuthError::Denied`] naming the scope needed.
    pub fn read_user(&self, user: UserId) -> Result<(), AuthError> {
        if self.scopes.contains(Scope::ExpensesRead) {
            return Ok(());
        }
        match (self.scopes.contains(Scope::ExpensesReadSelf), self.sub) {
            (true, Some(sub)) if sub == user => Ok(()),
            (true, Some(sub)) => Err(AuthError::Denied(format!(
                "user {user} is not this token's user ({sub}): reading other users needs the \
                 scope expenses:read"
            ))),
            _ => Err(AuthError::Denied(format!(
                "reading user {user} needs the scope expenses:read (or expenses:read:self in a \
                 token whose sub is {user})"
            ))),
        }
    }

    /// Reading across users (top spenders, listings, all-user subscriptions): `expenses:read`.
    ///
    /// # Errors
    ///
    /// [`AuthError::Denied`] naming it.
    pub fn read_all(&self, what: &str) -> Result<(), AuthError> {
        if self.scopes.contains(Scope::ExpensesRead) {
            Ok(())
        } else {
            Err(AuthError::Denied(format!(
                "{what} needs the scope expenses:read (the token has {:?})",
                self.scopes.to_string()
            )))
        }
    }

    /// Reading (`write` false) or changing `user`'s details or picture: `personnel:read` or
    /// `personnel:write`, for `user` only when the token is [`Principal::self_only`].
    ///
    /// # Errors
    ///
    /// [`AuthError::Denied`] naming the scope needed.
    pub fn personnel(&self, user: UserId, write: bool) -> Result<(), AuthError> {
        let scope = if write {
            Scope::PersonnelWrite
        } else {
            Scope::PersonnelRead
        };
        self.require(scope)?;
        if self.self_only() && self.sub != Some(user) {
            return Err(AuthError::Denied(format!(
                "this token may use {scope} only for its own user ({}), not user {user}; other \
                 users need the scope expenses:read as well",
                self.sub
                    .map_or_else(|| "none".to_string(), |s| s.to_string())
            )));
        }
        Ok(())
    }
}

/// Why a request was refused, or a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token, or one that is expired, malformed or badly signed (gRPC `UNAUTHENTICATED`,
    /// HTTP 401).
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token without the scope needed (gRPC `PERMISSION_DENIED`, HTTP 403).
    #[error("{0}")]
    Denied(String),
    /// Too many streams open with one token (gRPC `RESOURCE_EXHAUSTED`, HTTP 429).
    #[error("{0}")]
    TooMany(String),
    /// The key could not be read or is not a key of a supported kind (fatal at start).
    #[error("{path}: {message}")]
    Key {
        /// The key's file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// The key tokens are verified with, and the one algorithm it allows.
#[derive(Clone)]
pub struct AuthKey {
    key: jsonwebtoken::DecodingKey,
    algorithm: jsonwebtoken::Algorithm,
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Reads an HS256 secret file: its bytes without leading or trailing white space (a
/// trailing newline from `echo` or an editor is not part of the secret).
///
/// # Errors
///
/// [`AuthError::Key`] if it cannot be read or is shorter than [`MIN_SECRET_BYTES`].
pub fn read_secret(path: &Path) -> Result<Vec<u8>, AuthError> {
    let error = |message: String| AuthError::Key {
        path: path.to_path_buf(),
        message,
    };
    let bytes =
        std::fs::read(path).map_err(|e| error(format!("cannot read the JWT secret: {e}")))?;
    let secret = bytes.trim_ascii();
    if secret.len() < MIN_SECRET_BYTES {
        return Err(error(format!(
            "the JWT secret is {} bytes; HS256 needs at least {MIN_SECRET_BYTES} (e.g. `head -c 48 \
             /dev/urandom | base64 > FILE`)",
            secret.len()
        )));
    }
    Ok(secret.to_vec())
}

impl AuthKey {
    /// An HS256 key from a secret file ([`read_secret`]).
    ///
    /// # Errors
    ///
    /// [`AuthError::Key`] if it cannot be read or is too short.
    pub fn hs256_file(path: &Path) -> Result<AuthKey, AuthError> {
        let secret = read_secret(path)?;
        let key = jsonwebtoken::DecodingKey::from_secret(&secret).map_err(|e| AuthError::Key {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(AuthKey {
            key,
            algorithm: jsonwebtoken::Algorithm::HS256,
        })
    }

    /// An RS256 (RSA) or ES256 (EC P-256) key from a PEM public key file.
    ///
    /// # Errors
    ///
    /// [`AuthError::Key`] if it cannot be read or holds neither kind of public key.
    pub fn public_pem_file(path: &Path) -> Result<AuthKey, AuthError> {
        let error = |message: String| AuthError::Key {
            path: path.to_path_buf(),
            message,
        };
        let pem = std::fs::read(path)
            .map_err(|e| error(format!("cannot read the JWT public key: {e}")))?;
        if let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_pem(&pem) {
            return Ok(AuthKey {
                key,
                algorithm: jsonwebtoken::Algorithm::RS256,
            });
        }
        if let Ok(key) = jsonwebtoken::DecodingKey::from_ec_pem(&pem) {
            return Ok(AuthKey {
                key,
                algorithm: jsonwebtoken::Algorithm::ES256,
            });
        }
        Err(error(
            "not a PEM public key of RSA (RS256) or EC P-256 (ES256) kind (`-----BEGIN PUBLIC \
             KEY-----`, e.g. from `openssl pkey -pubout`)"
                .into(),
        ))
    }

    /// The algorithm tokens must be signed with.
    pub fn algorithm(&self) -> jsonwebtoken::Algorithm {
        self.algorithm
    }
}

/// Validates bearer tokens and keeps the per-token stream counts.
#[derive(Debug)]
pub struct Authenticator {
    key: AuthKey,
    validation: jsonwebtoken::Validation,
    streams: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    max_streams: usize,
}

impl Authenticator {
    /// An authenticator verifying with `key`.
    pub fn new(key: AuthKey) -> Self {
        let mut validation = jsonwebtoken::Validation::new(key.algorithm);
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // Tokens for this service carry no audience convention; an `aud` is not checked.
        validation.validate_aud = false;
        validation.leeway = 30;
        Authenticator {
            key,
            validation,
            streams: Arc::default(),
            max_streams: MAX_STREAMS_PER_TOKEN,
        }
    }

    /// The authenticator `security` configures, `None` when auth is off. Reads and checks
    /// the key file, so a bad key fails at start.
    ///
    /// # Errors
    ///
    /// [`AuthError::Key`] for an unreadable or unsuitable key; both kinds of key given.
    pub fn from_config(security: &SecurityConfig) -> Result<Option<Arc<Authenticator>>, AuthError> {
        let key = match (&security.jwt_secret_file, &security.jwt_public_key) {
            (None, None) => return Ok(None),
            (Some(secret), Some(_)) => {
                return Err(AuthError::Key {
                    path: secret.clone(),
                    message:
                        "give either a JWT secret file (HS256) or a public key (RS256/ES256), \
                              not both"
                            .into(),
                });
            }
            (Some(secret), None) => AuthKey::hs256_file(secret)?,
            (None, Some(public)) => AuthKey::public_pem_file(public)?,
        };
        tracing::info!(algorithm = ?key.algorithm, "Token auth is on.");
        Ok(Some(Arc::new(Authenticator::new(key))))
    }

    /// With at most `max` streams per token (tests).
    #[must_use]
    pub fn with_max_streams(mut self, max: usize) -> Self {
        self.max_streams = max;
        self
    }

    /// The principal of a valid `token` (the JWT, without `Bearer `).
    ///
    /// # Errors
    ///
    /// [`AuthError::Unauthenticated`] saying why the token is not valid.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key.key, &self.validation).map_err(
            |e| {
                let why = match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired".to_string(),
                    ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".to_string(),
                    ErrorKind::InvalidSignature => "the token's signature is not valid".to_string(),
                    ErrorKind::InvalidAlgorithm => {
                        format!("the token must be signed with {:?}", self.key.algorithm)
                    }
                    ErrorKind::MissingRequiredClaim(claim) => {
                        format!("the token has no `{claim}` claim (it is required)")
                    }
                    _ => format!("the token is not a valid JWT: {e}"),
                };
                AuthError::Unauthenticated(why)
            },
        )?;
        let claims = data.claims;
        let scopes = Scopes::from_claim(claims.scope.as_deref().unwrap_or_default());
        let sub = match claims.sub.as_deref() {
            Some(text) => parse_user(text),
            None => None,
        };
        if scopes.contains(Scope::ExpensesReadSelf) && sub.is_none() {
            return Err(AuthError::Unauthenticated(format!(
                "a token with expenses:read:self needs `sub` to be its user id in decimal (1 or \
                 more), got {:?}",
                claims.sub.unwrap_or_default()
            )));
        }
        let token_id: Arc<str> = match claims.jti {
            Some(jti) if !jti.is_empty() => Arc::from(format!("jti:{jti}")),
            _ => Arc::from(token.rsplit('.').next().unwrap_or(token)),
        };
        Ok(Principal {
            sub,
            scopes,
            token_id,
            expires_at: claims.exp,
        })
    }

    /// The principal of an `authorization` header value (`Bearer <JWT>`).
    ///
    /// # Errors
    ///
    /// [`AuthError::Unauthenticated`] if it is missing, not a bearer token, or not valid.
    pub fn authenticate_header(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.ok_or_else(|| {
            AuthError::Unauthenticated(
                "no token: send `authorization: Bearer <JWT>` (see `spendflow token`)".into(),
            )
        })?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                AuthError::Unauthenticated("the authorization must be `Bearer <JWT>`".into())
            })?;
        self.authenticate(token.trim())
    }

    /// Counts a stream opened with `principal`'s token until the guard is dropped.
    ///
    /// # Errors
    ///
    /// [`AuthError::TooMany`] naming the cap if the token has that many open already.
    pub fn open_stream(&self, principal: &Principal) -> Result<StreamGuard, AuthError> {
        let mut streams = self.streams.lock();
        let open = streams.entry(Arc::clone(&principal.token_id)).or_insert(0);
        if *open >= self.max_streams {
            return Err(AuthError::TooMany(format!(
                "this token has {} streams open already, the most one token may hold; close one \
                 and retry",
                self.max_streams
            )));
        }
        *open += 1;
        Ok(StreamGuard {
            streams: Arc::clone(&self.streams),
            token_id: Arc::clone(&principal.token_id),
        })
    }
}

/// A user id in decimal, 1 or more.
fn parse_user(text: &str) -> Option<UserId> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<UserId>().ok().filter(|u| *u > 0)
}

/// One open stream of a token; released on drop.
#[derive(Debug)]
pub struct StreamGuard {
    streams: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    token_id: Arc<str>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = self.streams.lock();
        if let Some(open) = streams.get_mut(&self.token_id) {
            *open -= 1;
            if *open == 0 {
                streams.remove(&self.token_id);
            }
        }
    }
}

#[cfg(test)]
mod tests;
