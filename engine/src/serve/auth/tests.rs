use std::time::Duration;

use super::*;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";

fn secret_file(dir: &tempfile::TempDir, secret: &[u8]) -> PathBuf {
    let path = dir.path().join("secret");
    std::fs::write(&path, secret).unwrap();
    path
}

fn sign(claims: &serde_json::Value, secret: &[u8], alg: jsonwebtoken::Algorithm) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn authenticator(dir: &tempfile::TempDir) -> Authenticator {
    Authenticator::new(AuthKey::hs256_file(&secret_file(dir, SECRET)).unwrap())
}

fn unauthenticated(result: Result<Principal, AuthError>) -> String {
    match result {
        Err(AuthError::Unauthenticated(m)) => m,
        other => panic!("expected unauthenticated, got {other:?}"),
    }
}

#[test]
fn scopes_parse_from_claims_and_flags() {
    let scopes = Scopes::from_claim("openid expenses:read:self  personnel:read profile");
    assert!(scopes.contains(Scope::ExpensesReadSelf));
    assert!(scopes.contains(Scope::PersonnelRead));
    assert!(!scopes.contains(Scope::ExpensesRead));
    assert!(!scopes.contains(Scope::Admin));
    assert_eq!(scopes.to_string(), "expenses:read:self personnel:read");
    // `expenses:read:self` is not `expenses:read`, nor the other way round.
    assert!(!Scopes::from_claim("expenses:read").contains(Scope::ExpensesReadSelf));
    assert!(Scopes::from_claim("").is_empty());
    for scope in Scope::ALL {
        assert_eq!(Scope::parse(scope.as_str()), Some(scope));
    }
    let all = Scopes::parse_strict("admin expenses:read personnel:write").unwrap();
    assert!(all.contains(Scope::Admin) && all.contains(Scope::PersonnelWrite));
    let err = Scopes::parse_strict("expenses:read expenses:write").unwrap_err();
    assert!(err.contains("\"expenses:write\" is not a scope"), "{err}");
}

#[test]
fn a_valid_token_gives_its_principal() {
    let dir = tempfile::tempdir().unwrap();
    let auth = authenticator(&dir);
    let token = sign(
        &serde_json::json!({"sub": "42", "exp": now() + 600, "scope": "expenses:read:self personnel:read"}),
        SECRET,
        jsonwebtoken::Algorithm::HS256,
    );
    let principal = auth
        .authenticate_header(Some(&format!("Bearer {token}")))
        .unwrap();
    assert_eq!(principal.sub, Some(42));
    assert!(principal.self_only());
    assert_eq!(principal.own_user(), Some(42));
    principal.read_user(42).unwrap();
    principal.personnel(42, false).unwrap();
}

#[test]
fn missing_expired_and_forged_tokens_are_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let auth = authenticator(&dir);
    let claims = |exp: u64| serde_json::json!({"sub": "1", "exp": exp, "scope": "expenses:read"});
    let hs256 = jsonwebtoken::Algorithm::HS256;

    assert!(unauthenticated(auth.authenticate_header(None)).contains("no token"));
    assert!(unauthenticated(auth.authenticate_header(Some("Basic abc"))).contains("Bearer"));
    let expired = sign(&claims(now() - 3600), SECRET, hs256);
    assert!(unauthenticated(auth.authenticate(&expired)).contains("expired"));
    let forged = sign(
        &claims(now() + 600),
        b"another-secret-another-secret-another",
        hs256,
    );
    assert!(unauthenticated(auth.authenticate(&forged)).contains("signature"));
    // The algorithm is pinned to the key's kind: the same secret with HS512 is refused.
    let other_alg = sign(&claims(now() + 600), SECRET, jsonwebtoken::Algorithm::HS512);
    assert!(unauthenticated(auth.authenticate(&other_alg)).contains("HS256"));
    // `exp` is required.
    let no_exp = sign(&serde_json::json!({"scope": "admin"}), SECRET, hs256);
    assert!(unauthenticated(auth.authenticate(&no_exp)).contains("exp"));
    // A self token needs a decimal user id as `sub`.
    for sub in [
        serde_json::json!("alice"),
        serde_json::json!("0"),
        serde_json::json!("+7"),
    ] {
        let token = sign(
            &serde_json::json!({"sub": sub, "exp": now() + 600, "scope": "expenses:read:self"}),
            SECRET,
            hs256,
        );
        assert!(
            unauthenticated(auth.authenticate(&token)).contains("sub"),
            "{sub}"
        );
    }
    assert!(unauthenticated(auth.authenticate("not.a.jwt")).contains("not a valid JWT"));
    // An unsigned token (`alg: none`) is refused.
    let unsigned = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        token_payload(&claims(now() + 600))
    );
    unauthenticated(auth.authenticate(&unsigned));
}

fn token_payload(claims: &serde_json::Value) -> String {
    let token = sign(claims, SECRET, jsonwebtoken::Algorithm::HS256);
    token.split('.').nth(1).unwrap().to_string()
}

#[test]
fn scopes_decide_what_a_principal_may_read_and_change() {
    let principal = |scope: &str, sub: Option<UserId>| Principal {
        sub,
        scopes: Scopes::from_claim(scope),
        token_id: Arc::from("t"),
        expires_at: 0,
    };
    let denied = |result: Result<(), AuthError>| match result {
        Err(AuthError::Denied(m)) => m,
        other => panic!("expected denied, got {other:?}"),
    };
    let me = principal("expenses:read:self personnel:read personnel:write", Some(7));
    me.read_user(7).unwrap();
    assert!(denied(me.read_user(8)).contains("expenses:read"));
    assert!(
        denied(me.read_all("TopSpenders")).contains("TopSpenders needs the scope expenses:read")
    );
    me.personnel(7, true).unwrap();
    assert!(denied(me.personnel(8, true)).contains("only for its own user (7)"));
    assert!(denied(me.personnel(8, false)).contains("personnel:read"));
    assert!(denied(me.require(Scope::Admin)).contains("the scope admin"));

    let reader = principal("expenses:read", None);
    reader.read_user(8).unwrap();
    reader.read_all("TopSpenders").unwrap();
    assert!(denied(reader.personnel(8, false)).contains("personnel:read"));

    // Personnel scopes without any expenses scope are not limited to one user.
    let staff = principal("personnel:write", Some(1));
    staff.personnel(9, true).unwrap();
    assert!(denied(staff.read_user(1)).contains("expenses:read"));
}

#[test]
fn streams_per_token_are_capped_and_released() {
    let dir = tempfile::tempdir().unwrap();
    let auth = authenticator(&dir).with_max_streams(2);
    let principal = |id: &str| Principal {
        sub: None,
        scopes: Scopes::from_claim("expenses:read"),
        token_id: Arc::from(id),
        expires_at: 0,
    };
    let first = auth.open_stream(&principal("a")).unwrap();
    let _second = auth.open_stream(&principal("a")).unwrap();
    match auth.open_stream(&principal("a")) {
        Err(AuthError::TooMany(m)) => assert!(m.contains("2 streams"), "{m}"),
        other => panic!("expected too many, got {other:?}"),
    }
    // Another token is counted apart.
    let _other = auth.open_stream(&principal("b")).unwrap();
    drop(first);
    auth.open_stream(&principal("a")).unwrap();
}

#[test]
fn keys_are_checked_when_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let short = secret_file(&dir, b"too short\n");
    let err = AuthKey::hs256_file(&short).unwrap_err().to_string();
    assert!(err.contains("at least 32"), "{err}");
    let err = AuthKey::hs256_file(&dir.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot read"), "{err}");
    let not_pem = dir.path().join("key.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let err = AuthKey::public_pem_file(&not_pem).unwrap_err().to_string();
    assert!(err.contains("RS256") && err.contains("ES256"), "{err}");
    let both = SecurityConfig {
        jwt_secret_file: Some(short.clone()),
        jwt_public_key: Some(not_pem),
        ..SecurityConfig::default()
    };
    assert!(
        Authenticator::from_config(&both)
            .unwrap_err()
            .to_string()
            .contains("not both")
    );
    assert!(
        Authenticator::from_config(&SecurityConfig::default())
            .unwrap()
            .is_none()
    );
}

#[test]
fn minted_tokens_validate_with_the_same_secret_file() {
    let dir = tempfile::tempdir().unwrap();
    // Trailing white space in the file is not part of the secret, on both sides.
    let mut with_newline = SECRET.to_vec();
    with_newline.push(b'\n');
    let path = secret_file(&dir, &with_newline);
    let token = mint_hs256(
        &path,
        Some("5"),
        Scopes::parse_strict("expenses:read:self").unwrap(),
        Duration::from_secs(60),
    )
    .unwrap();
    let auth = Authenticator::new(AuthKey::hs256_file(&path).unwrap());
    let principal = auth.authenticate(&token).unwrap();
    assert_eq!(principal.sub, Some(5));
    assert!(principal.expires_at > now() && principal.expires_at <= now() + 60);
    let plain = authenticator(&tempfile::tempdir().unwrap());
    plain.authenticate(&token).unwrap();
}

/// Makes a private key with the `openssl` command (`genpkey` arguments) and its public PEM.
fn openssl_key_pair(dir: &tempfile::TempDir, name: &str, genpkey: &[&str]) -> (Vec<u8>, PathBuf) {
    let private = dir.path().join(format!("{name}.key"));
    let public = dir.path().join(format!("{name}.pub.pem"));
    let made = std::process::Command::new("openssl")
        .args(["genpkey", "-quiet"])
        .args(genpkey)
        .arg("-out")
        .arg(&private)
        .status()
        .expect("the openssl command (Debian's openssl package)");
    assert!(made.success());
    let public_made = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap();
    assert!(public_made.success());
    (std::fs::read(&private).unwrap(), public)
}

#[test]
fn public_keys_pin_rs256_and_es256() {
    let dir = tempfile::tempdir().unwrap();
    let claims = serde_json::json!({"sub": "3", "exp": now() + 600, "scope": "expenses:read:self"});
    for (name, genpkey, algorithm) in [
        (
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..],
            jsonwebtoken::Algorithm::RS256,
        ),
        (
            "ec",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
            jsonwebtoken::Algorithm::ES256,
        ),
    ] {
        let (private, public) = openssl_key_pair(&dir, name, genpkey);
        let key = AuthKey::public_pem_file(&public).unwrap();
        assert_eq!(key.algorithm(), algorithm, "{name}");
        let auth = Authenticator::new(key);
        let signing = match algorithm {
            jsonwebtoken::Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(&private),
            _ => jsonwebtoken::EncodingKey::from_ec_pem(&private),
        }
        .unwrap();
        let token =
            jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), &claims, &signing).unwrap();
        assert_eq!(auth.authenticate(&token).unwrap().sub, Some(3), "{name}");
        // The classic confusion: HS256 "signed" with the public key's bytes is refused.
        let public_bytes = std::fs::read(&public).unwrap();
        let confused = sign(&claims, &public_bytes, jsonwebtoken::Algorithm::HS256);
        let why = unauthenticated(auth.authenticate(&confused));
        assert!(why.contains(&format!("{algorithm:?}")), "{name}: {why}");
        // A token of the other key is not valid.
        let (other_private, _) = openssl_key_pair(&dir, &format!("{name}-other"), genpkey);
        let other = match algorithm {
            jsonwebtoken::Algorithm::RS256 => {
                jsonwebtoken::EncodingKey::from_rsa_pem(&other_private)
            }
            _ => jsonwebtoken::EncodingKey::from_ec_pem(&other_private),
        }
        .unwrap();
        let forged =
            jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), &claims, &other).unwrap();
        assert!(
            unauthenticated(auth.authenticate(&forged)).contains("signature"),
            "{name}"
        );
    }
}
