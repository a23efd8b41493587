//! The web report in a real browser: headless Chromium driven through chromedriver (Debian's
//! `chromium` and `chromium-driver`) over the W3C WebDriver protocol.
//!
//! A demo-like engine runs in process (the generator at a modest rate, gRPC and web on free
//! ports, in-memory personnel with generated avatars). The test watches the overview tick while
//! records arrive; once the generator has produced everything and the engine has caught up, the
//! served state stands still, so the totals the page shows can be compared *exactly* with the
//! gRPC answers at the same epoch (the page says which epoch it shows). It then opens a user's
//! page with the keyboard, compares its total and categories with `GetUserSummary`, pushes new
//! expenses for that user and waits for the page to show the new gRPC total without a reload.
//! Screenshots go to `target/test-output/web_browser/`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::web::{Browser, output_dir};
use serde_json::{Value, json};
use spendflow_engine::personnel::Personnel;
use spendflow_engine::source::generator::{GeneratorConfig, GeneratorSourceConfig};
use spendflow_engine::{Engine, SourceConfig};
use spendflow_proto::v1 as pb;
use spendflow_proto::v1::expense_query_client::ExpenseQueryClient;
use tonic::transport::Channel;

const USERS: u64 = 60;
const SEED: u64 = 2026;
const EVENTS: u64 = 1_500;
const RATE: u64 = 500;
const WAIT: Duration = Duration::from_secs(20);

struct Grpc {
    runtime: tokio::runtime::Runtime,
    client: ExpenseQueryClient<Channel>,
}

impl Grpc {
    fn connect(engine: &Engine) -> Grpc {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let url = format!("http://{}", engine.grpc_addr().unwrap());
        let channel = runtime
            .block_on(Channel::from_shared(url).unwrap().connect())
            .unwrap();
        Grpc {
            runtime,
            client: ExpenseQueryClient::new(channel),
        }
    }

    fn consistency(epoch: u64) -> Option<pb::Consistency> {
        Some(pb::Consistency {
            incarnation: String::new(),
            min_epoch: epoch,
            timeout_ms: 10_000,
        })
    }

    fn top_spenders(&mut self, limit: u32, epoch: u64) -> pb::TopSpendersResponse {
        self.runtime
            .block_on(self.client.top_spenders(pb::TopSpendersRequest {
                limit,
                consistency: Self::consistency(epoch),
            }))
            .unwrap()
            .into_inner()
    }

    fn summary(&mut self, user: u64, epoch: u64) -> pb::GetUserSummaryResponse {
        self.runtime
            .block_on(self.client.get_user_summary(pb::GetUserSummaryRequest {
                user_id: user,
                consistency: Self::consistency(epoch),
            }))
            .unwrap()
            .into_inner()
    }
}

/// Waits until every generated record (and the tick record) is in the served state, and
/// returns its epoch.
fn wait_settled(engine: &Engine) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = engine.status();
        // The generated records and the one tick record.
        if status.caught_up && status.records_read == EVENTS + 1 && engine.input().pending() == 0 {
            return status.as_of.epoch;
        }
        assert!(
            Instant::now() < deadline,
            "the engine did not settle: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the page shows data of `epoch` (`[data-testid=as-of-epoch]`).
fn wait_page_epoch(browser: &Browser, epoch: u64, what: &str) {
    browser.wait_for(
        what,
        WAIT,
        "const e = document.querySelector('[data-testid=as-of-epoch]');
         return e && e.dataset.epoch === String(arguments[0]);",
        json!([epoch]),
    );
}

fn user_page_state(browser: &Browser) -> Value {
    browser.execute(
        "const total = document.querySelector('[data-testid=user-total]');
         const epoch = document.querySelector('[data-testid=as-of-epoch]');
         const rows = [...document.querySelectorAll('[data-testid=user-categories] tbody tr[data-key]')];
         const photo = document.querySelector('[data-testid=user-photo]');
         return {
           total: total ? Number(total.dataset.totalMinor) : null,
           total_text: total ? total.textContent : null,
           epoch: epoch ? Number(epoch.dataset.epoch) : null,
           name: (document.querySelector('[data-testid=user-name]') || {}).textContent,
           categories: rows.map(r => [r.dataset.key, Number(r.dataset.totalMinor), Number(r.dataset.count)]),
           photo_loaded: !!(photo && photo.complete && photo.naturalWidth > 0),
           bars: document.querySelectorAll('[data-testid=month-chart] rect[data-month]').length,
           changes: [...document.querySelectorAll('[data-testid=user-changes] li[data-epoch]')]
             .map(li => Number(li.dataset.totalMinor)),
           marker: window.__sameDocument === true,
         };",
        json!([]),
    )
}

fn categories_of(summary: &pb::UserSummary) -> Value {
    json!(
        summary
            .by_category
            .iter()
            .map(|t| json!([t.key, t.total_minor, t.expense_count]))
            .collect::<Vec<_>>()
    )
}

#[test]
fn overview_and_user_page_show_the_grpc_answers_and_update_live() {
    let personnel = Arc::new(Personnel::demo(USERS, SEED));
    let source = SourceConfig::Generator(GeneratorSourceConfig {
        simulator: GeneratorConfig {
            seed: SEED,
            users: USERS,
            bad_rate: 0.0,
            ..GeneratorConfig::default()
        },
        rate: Some(RATE),
        events: Some(EVENTS),
        ..GeneratorSourceConfig::default()
    });
    let engine = Engine::builder()
        .epoch_interval(Duration::from_millis(20))
        .source(source)
        .grpc("127.0.0.1:0".parse().unwrap())
        .web("127.0.0.1:0".parse().unwrap())
        .personnel(Arc::clone(&personnel))
        .start()
        .unwrap();
    let base = format!("http://{}", engine.web_addr().unwrap());
    let out = output_dir("web_browser");
    let browser = Browser::start();
    let mut grpc = Grpc::connect(&engine);

    // The overview, while the generator still runs: the live indicator ticks and the feed fills.
    browser.goto(&format!("{base}/"));
    let first = browser.wait_for(
        "the live epoch indicator",
        WAIT,
        "const e = document.querySelector('[data-testid=live-epoch]');
         return e && e.dataset.epoch ? Number(e.dataset.epoch) : null;",
        json!([]),
    );
    // One record of our own, so an epoch follows the one the page shows even when the page
    // loaded after the generator had finished (a busy machine: chromium starting takes longer
    // than the generator's 3 seconds).
    engine
        .input()
        .push_json(
            r#"{"expense_id":"web-browser-tick","user_id":1,"merchant":"Tick Shop","category":"groceries","amount_minor":100,"currency":"EUR","event_time":"2026-12-01T12:00:00Z"}"#,
        )
        .unwrap();
    browser.wait_for(
        "the live epoch indicator to tick",
        WAIT,
        "const e = document.querySelector('[data-testid=live-epoch]');
         return Number(e.dataset.epoch) > arguments[0];",
        json!([first]),
    );
    browser.wait_for(
        "an entry in the live feed",
        WAIT,
        "return document.querySelectorAll('[data-testid=feed] li[data-user-id]').length > 0;",
        json!([]),
    );

    // Once the stream has stopped, the page settles on the final epoch; compare exactly.
    let epoch = wait_settled(&engine);
    wait_page_epoch(&browser, epoch, "the overview to show the settled epoch");
    let shown = browser.execute(
        "return [...document.querySelectorAll('[data-testid=top-spenders] tbody tr[data-user-id]')]
           .map(r => [Number(r.dataset.rank), Number(r.dataset.userId), Number(r.dataset.totalMinor),
                      (r.querySelector('[data-testid=spender-name]') || {}).textContent || null]);",
        json!([]),
    );
    let top = grpc.top_spenders(10, epoch);
    assert_eq!(
        top.as_of.as_ref().unwrap().epoch,
        epoch,
        "gRPC at the page's epoch"
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let expected: Vec<Value> = top
        .spenders
        .iter()
        .map(|s| {
            let details = runtime
                .block_on(personnel.user(s.user_id))
                .unwrap()
                .expect("every simulated user has details");
            json!([s.rank, s.user_id, s.total_minor, details.name])
        })
        .collect();
    assert_eq!(expected.len(), 10);
    assert_eq!(
        shown,
        json!(expected),
        "the top spenders shown are gRPC's TopSpenders"
    );
    // The budget alerts panel and the badge are drawn from the same answer; without a
    // reporting currency the totals by category say they mix currencies.
    let api = crate::web::get(engine.web_addr().unwrap(), "/api/overview").json();
    let over_budget = api["alerts"]["over_budget_users"].as_u64().unwrap();
    browser.wait_for(
        "the over-budget panel and badge",
        WAIT,
        "const rows = document.querySelectorAll('[data-testid=over-budget] tbody tr').length;
         const badge = document.querySelector('[data-testid=over-budget-badge]');
         const note = document.querySelector('[data-testid=categories-note]').textContent;
         return rows > 0 && note.includes('mixed currencies') && note.includes('--reporting-currency')
           && (arguments[0] === 0 ? badge.hidden : Number(badge.dataset.count) === arguments[0]);",
        json!([over_budget]),
    );
    let overview_png = browser.screenshot(&out.join("overview.png"));

    // To the first spender's page with the keyboard: the "go to user id" box and Enter.
    let user = top.spenders[0].user_id;
    browser.type_into("[data-testid=goto-input]", &format!("{user}\u{E007}"));
    browser.wait_for(
        "the user page",
        WAIT,
        "return location.pathname === arguments[0] &&
                !!document.querySelector('[data-testid=user-total]');",
        json!([format!("/users/{user}")]),
    );
    wait_page_epoch(&browser, epoch, "the user page at the settled epoch");
    let page = user_page_state(&browser);
    let summary = grpc.summary(user, epoch);
    assert_eq!(summary.as_of.as_ref().unwrap().epoch, epoch);
    let expected = summary.summary.unwrap();
    assert_eq!(page["total"], json!(expected.total_minor), "{page}");
    assert_eq!(page["categories"], categories_of(&expected), "{page}");
    let details = runtime.block_on(personnel.user(user)).unwrap().unwrap();
    assert_eq!(page["name"], json!(details.name));
    browser.wait_for(
        "the photo to load",
        WAIT,
        "const p = document.querySelector('[data-testid=user-photo]');
         return !!(p && p.complete && p.naturalWidth > 0);",
        json!([]),
    );
    assert!(
        page["bars"].as_u64().unwrap() >= 1,
        "the monthly chart has bars: {page}"
    );
    // The budget alerts and, where the reference data gives a budget, the meter with its
    // 80 % and 100 % marks.
    let api = crate::web::get(engine.web_addr().unwrap(), &format!("/api/users/{user}")).json();
    let drawn = browser.execute(
        "const meter = document.querySelector('[data-testid=budget-meter]');
         return [!!document.querySelector('[data-testid=user-alerts]'),
                 meter ? Number(meter.dataset.percent) : null,
                 meter ? meter.querySelectorAll('.mark').length : 0];",
        json!([]),
    );
    assert_eq!(
        drawn,
        json!([
            true,
            api["budget"]["percent"].as_i64(),
            if api["budget"].is_null() { 0 } else { 2 }
        ]),
        "{api}"
    );

    // New expenses for this user: the page follows without a reload.
    browser.execute("window.__sameDocument = true; return null;", json!([]));
    let input = engine.input();
    for (i, (category, amount)) in [("groceries", 4_321), ("web-test", 999)].iter().enumerate() {
        input
            .push_json(format!(
                r#"{{"expense_id":"web-browser-{i}","user_id":{user},"merchant":"Test Shop","category":"{category}","amount_minor":{amount},"currency":"{currency}","event_time":"2026-12-01T12:00:00Z"}}"#,
                currency = details.currency
            ))
            .unwrap();
    }
    assert!(engine.wait_caught_up(Duration::from_secs(10)));
    let after = engine.read_model().snapshot().as_of().epoch;
    assert!(after > epoch);
    let summary = grpc.summary(user, after);
    let new_total = summary.summary.as_ref().unwrap().total_minor;
    assert_eq!(new_total, expected.total_minor + 4_321 + 999);
    browser.wait_for(
        "the page to show the new total",
        WAIT,
        "const t = document.querySelector('[data-testid=user-total]');
         const e = document.querySelector('[data-testid=as-of-epoch]');
         return t && Number(t.dataset.totalMinor) === arguments[0] && Number(e.dataset.epoch) === arguments[1];",
        json!([new_total, after]),
    );
    browser.wait_for(
        "the change in the recent changes list",
        WAIT,
        "return [...document.querySelectorAll('[data-testid=user-changes] li[data-epoch]')]
           .some(li => Number(li.dataset.totalMinor) === arguments[0]);",
        json!([new_total]),
    );
    let page = user_page_state(&browser);
    assert_eq!(
        page["marker"],
        json!(true),
        "the page was not reloaded: {page}"
    );
    assert_eq!(page["total"], json!(new_total));
    assert_eq!(
        page["categories"],
        categories_of(summary.summary.as_ref().unwrap()),
        "{page}"
    );
    assert!(page["photo_loaded"].as_bool().unwrap());
    let user_png = browser.screenshot(&out.join("user.png"));

    println!(
        "screenshots: {} and {}",
        overview_png.display(),
        user_png.display()
    );
    drop(browser);
    engine.shutdown().unwrap();
}
