//! The web console in a real headless chromium, as an operator uses it: the overview,
//! dead letters filtered, an event whose payload and error hold markup (shown as text,
//! nothing runs), a replay with the operator token (the event is then handled once), a
//! replay with a wrong token and raw POSTs without the tokens (refused, nothing
//! changed), parking a key. Saves a screenshot of the overview to
//! `target/console-overview.png` (and to `docs/console.png` with
//! `OUTBOX_UPDATE_SCREENSHOT=1`).

use std::time::Duration;

use fantoccini::{Client, Locator};
use outbox_runtime::console::{router, ConsoleOptions};
use outbox_runtime::{
    Admin, DeadFilter, KafkaConfig, Outbox, OutboxRuntime, PublishOptions, Status,
};
use outbox_tests::broker::TestBroker;
use outbox_tests::browser::{skipped, ChromeDriver};
use outbox_tests::db::TestSqlite;
use outbox_tests::e2e::{effects_per_event, eventually, prepare, test_config, TestBackend};
use outbox_tests::services::{Notification, NotificationRequested, Script};
use sqlx::Sqlite;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "op-secret-token";
const WAIT: Duration = Duration::from_secs(30);
/// A key, and so a payload and an error message, that would run script if shown raw.
const EVIL: &str =
    r#"<img src=x onerror="document.title='pwned'"><script>document.title='pwned'</script>"#;

/// A raw HTTP/1.1 POST; returns the status code.
async fn post(addr: std::net::SocketAddr, path: &str, body: &str, cookie: Option<&str>) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\n{cookie}Connection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The text of the first `css` element once `want` holds for it: a click loads the
/// next page while the old one may still answer, so poll with a deadline.
async fn text_when(c: &Client, css: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    loop {
        if let Ok(el) = c.find(Locator::Css(css)).await {
            if let Ok(text) = el.text().await {
                if want(&text) {
                    return text;
                }
                last = text;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "`{css}` never showed what was expected; last: {last:?}; page: {}",
            c.source().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the page's source contains `needle` (after a click, as above).
async fn page_shows(c: &Client, needle: &str) {
    text_when(c, "body", |_| true).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let source = c.source().await.unwrap_or_default();
        if source.contains(needle) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the page never showed {needle:?}: {source}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_uses_the_console_in_a_browser() {
    if skipped() {
        eprintln!("OUTBOX_SKIP_BROWSER=1: the browser test is skipped on purpose");
        return;
    }
    let driver = ChromeDriver::start().await;
    let db = TestSqlite::create().await;
    let pool = db.pool().clone();
    let broker = TestBroker::mock().await;
    let catalog = prepare(&pool, &broker).await;
    {
        let mut conn = pool.acquire().await.unwrap();
        <Sqlite as outbox_runtime::Backend>::execute_portable(
            &mut conn,
            "CREATE TABLE fixes (event_key VARCHAR(255) NOT NULL, hits BIGINT NOT NULL)",
            &[],
        )
        .await
        .unwrap();
    }
    let runtime = OutboxRuntime::new(
        catalog.clone(),
        pool.clone(),
        KafkaConfig::new(broker.bootstrap_servers()),
    )
    .config(test_config())
    .services(["notification"])
    .start()
    .await
    .unwrap();
    let outbox =
        Outbox::<Notification, Sqlite>::with_config(pool.clone(), &catalog, test_config()).unwrap();
    let mut ids = Vec::new();
    for user in [EVIL, "a2", "a3"] {
        let mut tx = outbox.begin().await.unwrap();
        let event = NotificationRequested {
            user_id: user.into(),
            seq: 0,
            script: Script {
                needs_fix: true,
                ..Script::default()
            },
        };
        let options = PublishOptions {
            max_retries: Some(0),
            ..PublishOptions::default()
        };
        ids.push(tx.publish_with(&event, options).await.unwrap());
        tx.commit().await.unwrap();
    }
    let admin = Admin::new(pool.clone(), catalog.clone());
    eventually("three dead letters", WAIT, || async {
        (admin
            .count_dead("notification", &DeadFilter::default())
            .await
            .unwrap()
            == 3)
            .then_some(())
    })
    .await;

    let app = router(
        admin.clone(),
        ConsoleOptions::read_only().operator_token(TOKEN),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let base = format!("http://{addr}");

    let c = driver.session().await;
    // The overview.
    c.goto(&base).await.unwrap();
    let overview = c.source().await.unwrap();
    assert!(overview.contains(">notification</a>"), "{overview}");
    let png = c.screenshot().await.unwrap();
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("console-overview.png"), &png).unwrap();
    if std::env::var("OUTBOX_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1") {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::write(docs.join("console.png"), &png).unwrap();
    }

    // A crafted link cannot make the console say what its author wants.
    c.goto(&format!(
        "{base}/?done=Enter%20your%20token%20at%20evil.example&n=1"
    ))
    .await
    .unwrap();
    let crafted = c.source().await.unwrap();
    assert!(!crafted.contains("evil.example"), "{crafted}");
    c.goto(&base).await.unwrap();

    // Dead letters, filtered by key through the form.
    c.find(Locator::LinkText("notification"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_when(&c, "#count", |t| t == "3 dead letters match.").await;
    c.find(Locator::Css("input[name=key]"))
        .await
        .unwrap()
        .send_keys("a2")
        .await
        .unwrap();
    c.find(Locator::Css("select[name=reason] option[value=permanent]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.find(Locator::Css("form[method=get] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_when(&c, "#count", |t| t == "1 dead letters match.").await;
    assert!(c.current_url().await.unwrap().as_str().contains("key=a2"));

    // The event holding markup: shown as text, nothing runs.
    c.goto(&format!("{base}/services/notification/events/{}", ids[0]))
        .await
        .unwrap();
    assert_ne!(c.title().await.unwrap(), "pwned");
    text_when(&c, "#payload", |t| {
        t.contains("<script>document.title='pwned'</script>")
    })
    .await;
    text_when(&c, "#last-error", |t| t.contains(r#"<img src=x onerror="#)).await;
    assert_ne!(c.title().await.unwrap(), "pwned");
    let imgs = c.find_all(Locator::Css("img")).await.unwrap();
    assert!(imgs.is_empty(), "markup from the payload became elements");

    // A wrong token is refused, and nothing changes.
    let a2 = format!("{base}/services/notification/events/{}", ids[1]);
    c.goto(&a2).await.unwrap();
    let replay_form = "form[action$='/replay']";
    c.find(Locator::Css(&format!("{replay_form} input[name=token]")))
        .await
        .unwrap()
        .send_keys("wrong")
        .await
        .unwrap();
    c.find(Locator::Css(&format!("{replay_form} input[name=confirm]")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.find(Locator::Css(&format!("{replay_form} button")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    page_shows(&c, "operator token is missing or wrong").await;
    let row = |i: usize| {
        let pool = pool.clone();
        let id = ids[i];
        async move {
            <Sqlite as outbox_runtime::Backend>::fetch(
                &pool,
                &"notification_outbox".parse().unwrap(),
                id.0,
            )
            .await
            .unwrap()
            .unwrap()
        }
    };
    assert_eq!(row(1).await.status, Status::Dead);

    // Raw POSTs without the tokens are refused too.
    let path = format!("/services/notification/events/{}/replay", ids[1]);
    assert_eq!(post(addr, &path, "confirm=yes", None).await, 403);
    assert_eq!(
        post(addr, &path, &format!("confirm=yes&token={TOKEN}"), None).await,
        403
    );
    let forged = "0123456789abcdef0123456789abcdef";
    assert_eq!(
        post(
            addr,
            &path,
            &format!("confirm=yes&token={TOKEN}&csrf={forged}"),
            None
        )
        .await,
        403
    );
    assert_eq!(
        post(
            addr,
            &path,
            &format!("confirm=yes&token=wrong&csrf={forged}"),
            Some(&format!("outbox_console_csrf={forged}"))
        )
        .await,
        403
    );
    assert_eq!(row(1).await.status, Status::Dead);
    assert!(admin.audit_log(None, 10).await.unwrap().is_empty());

    // The operator fixes the cause and replays with the token: handled once.
    {
        let mut conn = pool.acquire().await.unwrap();
        <Sqlite as outbox_runtime::Backend>::execute_portable(
            &mut conn,
            "INSERT INTO fixes (event_key, hits) VALUES ('a2', 0)",
            &[],
        )
        .await
        .unwrap();
    }
    c.goto(&a2).await.unwrap();
    c.find(Locator::Css(&format!("{replay_form} input[name=token]")))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    c.find(Locator::Css(&format!("{replay_form} input[name=confirm]")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.find(Locator::Css(&format!("{replay_form} button")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    page_shows(&c, "replayed.").await;
    eventually("the replayed event to be consumed", WAIT, || async {
        (row(1).await.status == Status::Consumed).then_some(())
    })
    .await;
    let effects = effects_per_event(&<Sqlite as TestBackend>::effects(&pool).await);
    assert_eq!(effects.get(&ids[1].to_string()), Some(&1));

    // A filtered replay shows its dry run first.
    c.goto(&format!("{base}/services/notification/dead?key=a3"))
        .await
        .unwrap();
    c.find(Locator::Css("form[method=post] input[name=token]"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    c.find(Locator::Css("form[method=post] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_when(&c, "#dry-run", |t| t.contains("1 dead letters")).await;
    assert_eq!(row(2).await.status, Status::Dead);

    let audit = admin.audit_log(None, 10).await.unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (audit[0].actor.as_str(), audit[0].action.as_str()),
        ("console", "replay")
    );
    c.goto(&format!("{base}/audit")).await.unwrap();
    assert!(c.source().await.unwrap().contains(">console<"));

    // A read-only console shows no actions and refuses every POST.
    let ro = router(admin.clone(), ConsoleOptions::read_only());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ro_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, ro).await });
    c.goto(&format!(
        "http://{ro_addr}/services/notification/events/{}",
        ids[2]
    ))
    .await
    .unwrap();
    assert!(c
        .find_all(Locator::Css("form[method=post]"))
        .await
        .unwrap()
        .is_empty());
    let path = format!("/services/notification/events/{}/replay", ids[2]);
    assert_eq!(
        post(
            ro_addr,
            &path,
            &format!("confirm=yes&token=x&csrf={forged}"),
            Some(&format!("outbox_console_csrf={forged}"))
        )
        .await,
        403
    );

    c.close().await.unwrap();
    runtime.shutdown().await.unwrap();
    db.cleanup().await;
}
