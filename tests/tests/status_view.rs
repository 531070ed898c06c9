//! The status view `<table>_view` that the migration creates, on PostgreSQL,
//! MySQL/MariaDB and SQLite (one generic body each): every status of a row reads as
//! the text name of [`Status`], rows written before the view existed read through it,
//! and migrating again keeps it.

use std::future::Future;

use outbox_runtime::{Backend, Catalog, Outbox, Status};
use outbox_tests::db::TestDatabase;
use outbox_tests::every_backend;
use outbox_tests::services::{Script, Task, TaskCreated};
use sqlx::{MySql, Pool, Postgres, Sqlite};

/// `Task`'s table (the default, `<service>_outbox`).
const TABLE: &str = "task_outbox";

/// The raw SQL the test needs, written per backend (sqlx's generic bounds for a plain
/// string query are longer than the three copies).
trait ViewSql: Backend {
    /// Sets the status column of every row to `code`.
    fn set_status(pool: &Pool<Self>, code: i16) -> impl Future<Output = ()> + Send;
    /// The status of every row, through the view.
    fn view_statuses(pool: &Pool<Self>) -> impl Future<Output = Vec<String>> + Send;
    /// Drops the view, as in a database migrated before the view existed.
    fn drop_view(pool: &Pool<Self>) -> impl Future<Output = ()> + Send;
}

macro_rules! view_sql {
    ($db:ty) => {
        impl ViewSql for $db {
            async fn set_status(pool: &Pool<Self>, code: i16) {
                sqlx::query(&format!("UPDATE {TABLE} SET status = {code}"))
                    .execute(pool)
                    .await
                    .expect("setting the status");
            }

            async fn view_statuses(pool: &Pool<Self>) -> Vec<String> {
                sqlx::query_scalar(&format!("SELECT status FROM {TABLE}_view ORDER BY id"))
                    .fetch_all(pool)
                    .await
                    .expect("reading the view")
            }

            async fn drop_view(pool: &Pool<Self>) {
                sqlx::query(&format!("DROP VIEW {TABLE}_view"))
                    .execute(pool)
                    .await
                    .expect("dropping the view");
            }
        }
    };
}
view_sql!(Postgres);
view_sql!(MySql);
view_sql!(Sqlite);

/// `Status`'s own name for it (its serde name), so the view cannot drift from the enum.
fn name(status: Status) -> String {
    serde_json::to_value(status)
        .expect("serialize")
        .as_str()
        .expect("a string")
        .to_owned()
}

async fn status_reads_as_text<T: TestDatabase>()
where
    T::DB: ViewSql,
{
    let db = T::create().await;
    let catalog = Catalog::builder().build().expect("catalog");
    let outbox = Outbox::<Task, T::DB>::new(db.pool().clone(), &catalog).expect("outbox");
    outbox.migrate().await.expect("migrate");

    let mut tx = outbox.begin().await.expect("begin");
    tx.publish(&TaskCreated {
        task_id: "t-1".into(),
        seq: 1,
        script: Script::default(),
    })
    .await
    .expect("publish");
    tx.commit().await.expect("commit");
    assert_eq!(T::DB::view_statuses(db.pool()).await, ["pending"]);

    for status in [
        Status::Pending,
        Status::Published,
        Status::Consumed,
        Status::Dead,
    ] {
        T::DB::set_status(db.pool(), status.as_i16()).await;
        assert_eq!(
            T::DB::view_statuses(db.pool()).await,
            [name(status)],
            "{} {status:?}",
            T::LABEL
        );
    }
    // A number no `Status` has still shows, as itself.
    T::DB::set_status(db.pool(), 9).await;
    assert_eq!(T::DB::view_statuses(db.pool()).await, ["9"]);

    // A table migrated before the view existed: migrating creates it over the old rows.
    T::DB::set_status(db.pool(), Status::Dead.as_i16()).await;
    T::DB::drop_view(db.pool()).await;
    outbox
        .migrate()
        .await
        .expect("migrate over an existing table");
    assert_eq!(T::DB::view_statuses(db.pool()).await, ["dead"]);
    // And again: migrate stays idempotent with the view in place.
    outbox.migrate().await.expect("migrate again");
    assert_eq!(T::DB::view_statuses(db.pool()).await, ["dead"]);

    db.cleanup().await;
}

every_backend!(status_reads_as_text);
