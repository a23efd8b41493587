//! The web report with token auth in a real browser (headless Chromium through chromedriver,
//! as `web_browser`): the page sends the browser to the sign-in form, a self-scoped token is
//! signed in through the form (the `HttpOnly; Secure; SameSite=Strict` cookie must be kept by
//! Chromium on `http://127.0.0.1`, a secure context), the overview leads to the user's own
//! page, its data and live events load with the cookie, and another user's page shows the
//! server's denial. Screenshots go to `target/test-output/web_auth_browser/`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::auth::{Engine, SECRET, input_file, mint};
use crate::web::{Browser, output_dir, request};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn a_self_token_signs_in_and_sees_only_its_own_page() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let input = input_file();
    let engine = Engine::start(
        input.path(),
        &["--jwt-secret-file".as_ref(), secret.as_os_str()],
    );
    let me = mint(&secret, Some("2"), "expenses:read:self", "1h");
    let web = engine.web;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::net::TcpStream::connect(web).is_ok() {
            let auth = format!("Bearer {me}");
            let own = request(
                web,
                "GET",
                "/api/users/2",
                &[("Authorization", &auth)],
                None,
            );
            if own.status == 200 && own.json()["aggregates"]["expense_count"] == json!(10) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the web report did not come up with the data"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = output_dir("web_auth_browser");
    let browser = Browser::start();
    let base = format!("http://{web}");

    // Not signed in: the report sends the browser to the sign-in form.
    browser.goto(&format!("{base}/"));
    browser.wait_for(
        "the sign-in form",
        WAIT,
        "return location.pathname === '/signin' && !!document.querySelector('[data-testid=signin-form]');",
        json!([]),
    );
    browser.screenshot(&out.join("signin.png"));

    // Sign in with the token; the server answers with the cookie and the user's own page.
    browser.type_into("[data-testid=signin-token]", &me);
    browser.execute(
        "document.querySelector('[data-testid=signin-form]').submit();",
        json!([]),
    );
    browser.wait_for(
        "the own user page after signing in",
        WAIT,
        "return location.pathname === '/users/2';",
        json!([]),
    );
    let total = browser.wait_for(
        "the own user's total",
        WAIT,
        "const t = document.querySelector('[data-testid=user-total]'); return t && t.textContent.trim();",
        json!([]),
    );
    assert!(total.as_str().is_some_and(|t| !t.is_empty()), "{total:?}");
    // The cookie is HttpOnly: the page's script cannot read the token.
    let cookies = browser.execute("return document.cookie;", json!([]));
    assert_eq!(
        cookies,
        json!(""),
        "the token must not be readable by scripts"
    );
    // Live events for the own user connect with the cookie (EventSource sends it).
    browser.wait_for(
        "the live connection",
        WAIT,
        "return document.getElementById('live').dataset.state === 'live';",
        json!([]),
    );
    browser.screenshot(&out.join("own-page.png"));

    // The overview (every user) leads back to the own page.
    browser.goto(&format!("{base}/"));
    browser.wait_for(
        "the redirect from the overview to the own page",
        WAIT,
        "return location.pathname === '/users/2' && !!document.querySelector('[data-testid=user-total]');",
        json!([]),
    );

    // Another user's page shows the denial, naming the scope needed.
    browser.goto(&format!("{base}/users/3"));
    let error = browser.wait_for(
        "the denial on another user's page",
        WAIT,
        "const e = document.querySelector('[data-testid=error]'); return e && e.textContent;",
        json!([]),
    );
    let error = error.as_str().unwrap_or_default().to_string();
    assert!(error.contains("expenses:read"), "{error}");
    let shown: Value = browser.execute(
        "return !!document.querySelector('[data-testid=user-total]');",
        json!([]),
    );
    assert_eq!(shown, json!(false), "no data of user 3 is shown");
    browser.screenshot(&out.join("other-page-denied.png"));
}
