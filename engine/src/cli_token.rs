//! `spendflow token`: mints a development token (HS256) for the servers' token auth.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use spendflow_engine::serve::auth::{Scope, Scopes, mint_hs256};

/// Mint an HS256 token for `--jwt-secret-file` servers and print it.
#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    /// The secret the servers verify with (their `--jwt-secret-file`).
    #[arg(long, value_name = "FILE")]
    jwt_secret_file: PathBuf,
    /// The token's subject: a user id for `expenses:read:self`.
    #[arg(long)]
    sub: Option<String>,
    /// Space-separated scopes: expenses:read, expenses:read:self, personnel:read,
    /// personnel:write, admin.
    #[arg(long)]
    scope: String,
    /// How long the token is valid (`30m`, `1h`, `7d`).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

/// Prints the token `args` describe.
pub(crate) fn token(args: &TokenArgs) -> Result<()> {
    let scopes = Scopes::parse_strict(&args.scope).map_err(anyhow::Error::msg)?;
    if scopes.is_empty() {
        bail!("--scope names no scope; give at least one");
    }
    if scopes.contains(Scope::ExpensesReadSelf) {
        let valid = args.sub.as_deref().is_some_and(|s| {
            s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u64>().is_ok_and(|u| u > 0)
        });
        if !valid {
            bail!("expenses:read:self needs --sub USER_ID (a user id, 1 or more)");
        }
    }
    if args.ttl < Duration::from_secs(1) {
        bail!("--ttl must be at least 1s");
    }
    let token = mint_hs256(&args.jwt_secret_file, args.sub.as_deref(), scopes, args.ttl)
        .context("could not mint the token")?;
    println!("{token}");
    Ok(())
}

/// What the demo says when token auth is on: how to get a token and use it.
pub(crate) fn auth_note(
    security: &crate::cli_security::SecurityArgs,
    web: std::net::SocketAddr,
) -> Option<String> {
    let scheme = if security.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let mint = match &security.jwt_secret_file {
        Some(secret) => format!(
            "  TOKEN=$(spendflow token --jwt-secret-file {} --scope \"expenses:read admin\" --ttl 1h)",
            secret.display()
        ),
        None if security.jwt_public_key.is_some() => {
            "  TOKEN=<a JWT from your issuer, signed with the key of --jwt-public-key>".to_string()
        }
        None => return None,
    };
    Some(format!(
        "Token auth is on: every call needs a token (health and reflection excepted).\n{mint}\n  \
         grpcurl -H \"authorization: Bearer $TOKEN\" ... (as above)\n  \
         web report: sign in at {scheme}://{web}/signin with the token"
    ))
}
