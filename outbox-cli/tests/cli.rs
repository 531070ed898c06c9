//! The built `outbox` binary against real databases, as an operator runs it: migrate,
//! status, dead letters listed and filtered, a dry run that changes nothing, a filtered
//! replay, discard, park/unpark, the audit log, and exit codes (0 done, 1 nothing to act
//! on or an error, 2 usage).

use std::process::{Command, Output};

use outbox_runtime::backend::{AttemptsFence, Backend, NewRow};
use outbox_runtime::{DeadReason, ServiceName, Status, TableName};
use outbox_tests::db::{TestDatabase, TestMySql, TestPg, TestSqlite};
use uuid::Uuid;

const SERVICE: &str = "notification";
const TABLE: &str = "notification_outbox";

/// Runs `outbox` with `args` against `url`.
fn outbox(url: &str, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .env("DATABASE_URL", url)
        .env("OUTBOX_ACTOR", "ops-test")
        .env_remove("OUTBOX_CATALOG")
        .args(["--route", &format!("{SERVICE}={TABLE}")])
        .args(args)
        .output()
        .expect("running the outbox binary");
    eprintln!(
        "$ outbox {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    assert_eq!(code(out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// Publishes an event on `key` and, if `dead`, makes it dead with `class`.
async fn event<DB: Backend>(pool: &sqlx::Pool<DB>, key: &str, dead: Option<DeadReason>) -> Uuid {
    let table = TableName::new(TABLE).unwrap();
    let service = ServiceName::new(SERVICE).unwrap();
    let id = Uuid::now_v7();
    let mut conn = pool.acquire().await.unwrap();
    let row = NewRow {
        event_id: id,
        service: &service,
        event_type: "notification.NotificationRequested",
        version: 1,
        key: Some(key),
        payload: r#"{"user_id":"secret-looking","seq":1}"#,
        max_retries: 3,
        trace_context: None,
    };
    DB::insert(&mut conn, &table, &row).await.unwrap();
    drop(conn);
    if let Some(class) = dead {
        let row = DB::fetch(pool, &table, id).await.unwrap().unwrap();
        let reason = format!("handler said no for {key}");
        assert!(
            DB::mark_dead(pool, &table, row.id, AttemptsFence(0), &reason, class)
                .await
                .unwrap()
        );
    }
    id
}

async fn status<DB: Backend>(pool: &sqlx::Pool<DB>, id: Uuid) -> Status {
    let table = TableName::new(TABLE).unwrap();
    DB::fetch(pool, &table, id).await.unwrap().unwrap().status
}

async fn operate<T: TestDatabase>() {
    let db = T::create().await;
    let (url, pool) = (db.url(), db.pool().clone());

    let out = outbox(&url, &["migrate"]);
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).contains("migrated notification_outbox"));
    let print = outbox(&url, &["migrate", "--print"]);
    assert!(stdout(&print).contains("CREATE TABLE IF NOT EXISTS notification_outbox_audit"));

    let p1 = event(&pool, "k1", Some(DeadReason::Permanent)).await;
    let p2 = event(&pool, "k2", Some(DeadReason::Permanent)).await;
    let x1 = event(&pool, "k3", Some(DeadReason::Exhausted)).await;
    let held = [event(&pool, "h", None).await, event(&pool, "h", None).await];

    let s = json(&outbox(&url, &["status", "--json"]));
    assert_eq!(s[0]["service"], SERVICE);
    assert_eq!(s[0]["counts"]["dead"], 3);
    assert_eq!(s[0]["counts"]["pending"], 2);
    let table = stdout(&outbox(&url, &["status"]));
    assert!(table.starts_with("SERVICE"), "{table}");

    // Listing with filters, as a table and as JSON.
    let list = outbox(
        &url,
        &["dead", "list", "-s", SERVICE, "--reason", "exhausted"],
    );
    assert_eq!(code(&list), 0);
    assert!(stdout(&list).contains(&x1.to_string()));
    assert!(!stdout(&list).contains(&p1.to_string()));
    let page = json(&outbox(
        &url,
        &[
            "dead", "list", "-s", SERVICE, "--error", "SAID NO", "--limit", "2", "--json",
        ],
    ));
    assert_eq!(page["rows"].as_array().unwrap().len(), 2);
    let next = page["next"].as_i64().expect("a cursor");
    let rest = json(&outbox(
        &url,
        &[
            "dead",
            "list",
            "-s",
            SERVICE,
            "--error",
            "said no",
            "--after",
            &next.to_string(),
            "--json",
        ],
    ));
    assert_eq!(rest["rows"].as_array().unwrap().len(), 1);
    let show = outbox(&url, &["dead", "show", "-s", SERVICE, &p1.to_string()]);
    assert!(stdout(&show).contains("handler said no for k1"));
    assert!(stdout(&show).contains("secret-looking"));
    assert_eq!(
        code(&outbox(
            &url,
            &["dead", "show", "-s", SERVICE, &Uuid::now_v7().to_string()]
        )),
        1
    );

    // A dry run changes nothing; the replay replays the permanent ones only.
    let dry = json(&outbox(
        &url,
        &[
            "dead",
            "replay",
            "-s",
            SERVICE,
            "--reason",
            "permanent",
            "--dry-run",
            "--json",
        ],
    ));
    assert_eq!(dry["matched"], 2);
    assert_eq!(dry["replayed"], 0);
    assert_eq!(status(&pool, p1).await, Status::Dead);
    let replay = outbox(
        &url,
        &[
            "dead",
            "replay",
            "-s",
            SERVICE,
            "--reason",
            "permanent",
            "--rate",
            "100",
        ],
    );
    assert_eq!(code(&replay), 0);
    assert!(stdout(&replay).contains("replayed 2 of 2"));
    assert_eq!(status(&pool, p1).await, Status::Pending);
    assert_eq!(status(&pool, p2).await, Status::Pending);
    assert_eq!(status(&pool, x1).await, Status::Dead);
    // Usage errors: no filter, an id and a filter, an unknown reason.
    assert_eq!(code(&outbox(&url, &["dead", "replay", "-s", SERVICE])), 2);
    assert_eq!(
        code(&outbox(
            &url,
            &[
                "dead",
                "replay",
                "-s",
                SERVICE,
                &x1.to_string(),
                "--key",
                "k3"
            ]
        )),
        2
    );
    assert_eq!(
        code(&outbox(
            &url,
            &["dead", "list", "-s", SERVICE, "--reason", "bogus"]
        )),
        2
    );
    assert_eq!(code(&outbox(&url, &["dead", "list", "-s", "nosuch"])), 1);

    // Discard: once.
    assert_eq!(
        code(&outbox(
            &url,
            &["dead", "discard", "-s", SERVICE, &x1.to_string()]
        )),
        0
    );
    assert_eq!(
        code(&outbox(
            &url,
            &["dead", "discard", "-s", SERVICE, &x1.to_string()]
        )),
        1
    );
    assert_eq!(status(&pool, x1).await, Status::Discarded);
    assert_eq!(
        code(&outbox(
            &url,
            &["dead", "replay", "-s", SERVICE, &x1.to_string()]
        )),
        1
    );

    // Park and unpark.
    assert_eq!(
        code(&outbox(&url, &["keys", "park", "-s", SERVICE, "h"])),
        0
    );
    let parked = json(&outbox(&url, &["keys", "parked", "-s", SERVICE, "--json"]));
    assert_eq!(parked[0]["key"], "h");
    assert_eq!(parked[0]["pending"], 2);
    assert_eq!(
        code(&outbox(&url, &["keys", "park", "-s", SERVICE, "empty"])),
        1
    );
    assert_eq!(
        code(&outbox(&url, &["keys", "unpark", "-s", SERVICE, "h"])),
        0
    );
    assert_eq!(
        code(&outbox(&url, &["keys", "unpark", "-s", SERVICE, "h"])),
        1
    );
    for id in held {
        assert_eq!(status(&pool, id).await, Status::Pending);
    }

    // The audit log names the actor and counts.
    let audit = json(&outbox(&url, &["audit", "--json"]));
    let actions: Vec<(String, u64)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["action"].as_str().unwrap().to_owned(),
                a["affected"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("unpark".to_owned(), 0),
            ("unpark".to_owned(), 2),
            ("park".to_owned(), 0),
            ("park".to_owned(), 2),
            ("replay".to_owned(), 0),
            ("discard".to_owned(), 0),
            ("discard".to_owned(), 1),
            ("replay_matching".to_owned(), 2),
        ]
    );
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["actor"] == "ops-test"));

    // A catalog export works as well as --route; a bad URL never echoes the URL.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("catalog.json");
    let export = serde_json::json!({"services": [{"service": SERVICE, "table": TABLE, "topic": "notification", "group": "notification"}]});
    std::fs::write(&file, export.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .env("DATABASE_URL", &url)
        .args(["--catalog", file.to_str().unwrap(), "status", "--json"])
        .output()
        .unwrap();
    assert_eq!(json(&out)[0]["counts"]["discarded"], 1);

    // A subscriber's inbox, named by the export's subscriptions: `--inbox memory` lists
    // and replays `notification`'s events dead in `memory_inbox`.
    let inbox = TableName::new("memory_inbox").unwrap();
    T::DB::migrate_inbox(&pool, &inbox).await.unwrap();
    let service = ServiceName::new(SERVICE).unwrap();
    let dead_id = Uuid::now_v7();
    let mut conn = pool.acquire().await.unwrap();
    let rows = [outbox_runtime::backend::NewInboxRow {
        row: NewRow {
            event_id: dead_id,
            service: &service,
            event_type: "",
            version: 0,
            key: None,
            payload: "",
            max_retries: 0,
            trace_context: None,
        },
        dead: Some((
            "record at t[0]@7 is not an outbox envelope",
            DeadReason::Undecodable,
        )),
    }];
    assert_eq!(
        T::DB::insert_inbox(&mut conn, &inbox, &rows).await.unwrap(),
        1
    );
    drop(conn);
    let export = serde_json::json!({
        "services": [{"service": SERVICE, "table": TABLE, "topic": "notification", "group": "notification"}],
        "subscriptions": [{"subscriber": "memory", "publisher": SERVICE, "topic": "notification",
            "group": "outbox.notification.subscriber.memory", "inbox": "memory_inbox"}],
    });
    std::fs::write(&file, export.to_string()).unwrap();
    let inbox_cmd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .env("DATABASE_URL", &url)
            .env("OUTBOX_ACTOR", "ops-test")
            .args(["--catalog", file.to_str().unwrap(), "--inbox", "memory"])
            .args(args)
            .output()
            .unwrap()
    };
    let listed = json(&inbox_cmd(&["dead", "list", "-s", SERVICE, "--json"]));
    let listed = listed.to_string();
    assert!(listed.contains(&dead_id.to_string()), "{listed}");
    assert!(listed.contains("not an outbox envelope"), "{listed}");
    let replayed = inbox_cmd(&["dead", "replay", "-s", SERVICE, &dead_id.to_string()]);
    assert_eq!(
        code(&replayed),
        0,
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    let row = T::DB::fetch(&pool, &inbox, dead_id).await.unwrap().unwrap();
    assert_eq!(row.status, Status::Pending);
    assert_eq!(code(&inbox_cmd(&["--inbox", "nobody", "status"])), 2);

    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .env("DATABASE_URL", "postgres://someone:hunter2@127.0.0.1:1/x")
        .args(["--route", "a=a_outbox", "status"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 1);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
    assert_eq!(
        code(
            &Command::new(env!("CARGO_BIN_EXE_outbox"))
                .arg("frobnicate")
                .output()
                .unwrap()
        ),
        2
    );

    pool.close().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cli() {
    operate::<TestPg>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_cli() {
    operate::<TestMySql>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_cli() {
    operate::<TestSqlite>().await;
}
