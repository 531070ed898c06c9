//! Upgrading a running database: a table made by the previous release's DDL
//! (`tests/fixtures/ddl-0.1/<backend>.sql`, copied from 0.1 as it shipped), with rows in
//! it, is brought up to date by `migrate`: the columns added since (`waiting_since`,
//! `trace_context`) are added, no row is lost or changed, the status view is replaced, the new statements
//! work on the old rows, and a second `migrate` changes nothing. On every backend.

use std::time::Duration;

use outbox_runtime::backend::NewRow;
use outbox_runtime::{Backend, Catalog, EventId, Status};
use outbox_tests::db::TestDatabase;

const TABLE: &str = "upgraded_outbox";

/// The 0.1 DDL of `DB`, for `TABLE`, one statement per element (comments dropped).
fn old_ddl<DB: Backend>() -> Vec<String> {
    let script = match DB::BACKEND_NAME {
        "postgres" => include_str!("../fixtures/ddl-0.1/postgres.sql"),
        "mysql" => include_str!("../fixtures/ddl-0.1/mysql.sql"),
        _ => include_str!("../fixtures/ddl-0.1/sqlite.sql"),
    };
    let code: String = script
        .lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';')
        .map(|s| s.trim().replace("{table}", TABLE))
        .filter(|s| !s.is_empty())
        .collect()
}

async fn an_old_table_is_upgraded_in_place<T: TestDatabase>() {
    let db = T::create().await;
    let pool = db.pool();
    let table = TABLE.parse().unwrap();
    let service = "task".parse().unwrap();
    let mut conn = pool.acquire().await.unwrap();
    for statement in old_ddl::<T::DB>() {
        T::DB::execute_portable(&mut conn, &statement, &[])
            .await
            .unwrap_or_else(|e| panic!("0.1 DDL `{statement}`: {e}"));
    }
    // Rows as 0.1 wrote them: the insert names no new column.
    let mut ids = Vec::new();
    for (n, key) in ["a", "b", "a"].into_iter().enumerate() {
        let id = EventId::new();
        T::DB::insert(
            &mut conn,
            &table,
            &NewRow {
                event_id: id.0,
                service: &service,
                event_type: "TaskCreated",
                version: 1,
                key: Some(key),
                payload: &format!(r#"{{"task_id":"{key}","seq":{n}}}"#),
                max_retries: 20,
                trace_context: None,
            },
        )
        .await
        .unwrap();
        ids.push(id);
    }
    // One of them dead, one published, as a running 0.1 system leaves them.
    T::DB::execute_portable(
        &mut conn,
        &format!("UPDATE {TABLE} SET status = 3, last_error = 'old reason' WHERE event_key = 'b'"),
        &[],
    )
    .await
    .unwrap();
    drop(conn);

    let catalog = Catalog::builder()
        .table("task", TABLE)
        .build()
        .expect("catalog");
    outbox_runtime::migrate(pool, &catalog, ["task"])
        .await
        .expect("migrate upgrades the 0.1 table");
    let rows = T::DB::fetch_all(pool, &table, &service)
        .await
        .expect("the upgraded table reads with the new columns");
    assert_eq!(rows.len(), 3);
    for (row, id) in rows.iter().zip(&ids) {
        assert_eq!(row.event_id, id.0);
        assert!(row.waiting_since.is_none(), "{row:?}");
        assert!(row.trace_context.is_none(), "{row:?}");
    }
    assert_eq!(rows[1].status, Status::Dead);
    assert_eq!(rows[1].last_error.as_deref(), Some("old reason"));
    assert!(rows[0].payload.contains(r#""task_id":"a""#));

    // The new statements run on old rows: the first one waits (in a transaction).
    let mut tx = T::DB::begin(pool).await.unwrap();
    assert!(T::DB::wait(
        &mut tx,
        &table,
        rows[0].id,
        Duration::from_secs(5),
        Duration::from_secs(60),
        "unknown event type `x`",
    )
    .await
    .unwrap());
    tx.commit().await.unwrap();
    let waiting = T::DB::waiting(pool, &table, &service).await.unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].count, 1);

    // The view was replaced and shows the new state.
    let mut conn = pool.acquire().await.unwrap();
    T::DB::execute_portable(&mut conn, "CREATE TABLE view_probe (id BIGINT)", &[])
        .await
        .unwrap();
    let in_view = T::DB::execute_portable(
        &mut conn,
        &format!(
            "INSERT INTO view_probe (id) SELECT id FROM {TABLE}_view \
             WHERE status = 'waiting' AND waiting_since IS NOT NULL"
        ),
        &[],
    )
    .await
    .unwrap();
    drop(conn);
    assert_eq!(in_view, 1, "the replaced view shows the waiting row");

    // The trace context column is written by the insert and read by the relay's claim.
    let traced = EventId::new();
    let context = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01;rojo=00f067aa0ba902b7";
    let mut conn = pool.acquire().await.unwrap();
    T::DB::insert(
        &mut conn,
        &table,
        &NewRow {
            event_id: traced.0,
            service: &service,
            event_type: "TaskCreated",
            version: 1,
            key: Some("traced"),
            payload: r#"{"task_id":"traced"}"#,
            max_retries: 20,
            trace_context: Some(context),
        },
    )
    .await
    .unwrap();
    drop(conn);
    let claimed = T::DB::claim(pool, &table, &service, 10, Duration::from_secs(30), 7)
        .await
        .unwrap();
    let row = claimed
        .iter()
        .find(|r| r.event_id == traced.0)
        .expect("the new row is claimed");
    assert_eq!(row.trace_context.as_deref(), Some(context));
    let before = T::DB::fetch_all(pool, &table, &service).await.unwrap();
    assert_eq!(before.len(), 4);
    assert_eq!(before[3].trace_context.as_deref(), Some(context));

    // Again: nothing changes.
    outbox_runtime::migrate(pool, &catalog, ["task"])
        .await
        .expect("a second migrate");
    let again = T::DB::fetch_all(pool, &table, &service).await.unwrap();
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        serde_json::to_value(&before).unwrap(),
        "a second migrate changed rows"
    );
    assert!(again[0].waiting_since.is_some());
    db.cleanup().await;
}

outbox_tests::every_backend!(an_old_table_is_upgraded_in_place);
