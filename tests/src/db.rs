//! Fresh databases for tests, one per test, on every backend.
//!
//! * [`TestPg`]: a new database `outbox_t_<random>` on the PostgreSQL server at
//!   [`PG_URL_ENV`] (default `postgres://postgres@127.0.0.1:5432/test`).
//! * [`TestMySql`]: a new database `outbox_t_<random>` on the MySQL/MariaDB server at
//!   [`MYSQL_URL_ENV`] (default `mysql://root@127.0.0.1:3306/test`).
//! * [`TestSqlite`]: a file in a new temporary directory, opened with
//!   [`sqlite_connect_options`] (WAL, busy timeout).
//!
//! All three implement [`TestDatabase`], so one generic test body runs on every backend.
//! Names are random (64 bits plus the process id), so parallel tests and parallel runs
//! never collide. Call [`TestDatabase::cleanup`] at the end of a test; if a test panics
//! first, `Drop` drops the server-side database on a best-effort basis.
//!
//! The helpers panic on set-up failures: they are for tests only.

use std::future::Future;
use std::str::FromStr;
use std::sync::mpsc;
use std::time::Duration;

use outbox_runtime::sqlite::sqlite_connect_options;
use outbox_runtime::Backend;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{
    Connection, Database, Executor, MySql, MySqlPool, PgPool, Pool, Postgres, Sqlite, SqlitePool,
};

/// Environment variable overriding the PostgreSQL server URL (any database on it; the
/// tests create their own).
pub const PG_URL_ENV: &str = "OUTBOX_TEST_PG_URL";
/// Environment variable overriding the MySQL/MariaDB server URL.
pub const MYSQL_URL_ENV: &str = "OUTBOX_TEST_MYSQL_URL";

/// The PostgreSQL server used when [`PG_URL_ENV`] is unset.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The MySQL/MariaDB server used when [`MYSQL_URL_ENV`] is unset.
pub const DEFAULT_MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

/// Connections per test pool: enough for the concurrency tests (20 writers and a few
/// claimers) without exhausting the servers when many tests run at once.
pub const POOL_SIZE: u32 = 24;

/// How long a pool waits for a free connection before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `Drop` waits for its best-effort `DROP DATABASE`.
const DROP_WAIT: Duration = Duration::from_secs(15);

/// A fresh name `outbox_t_<pid>_<random>`, valid as a database and table name.
pub fn unique_db_name() -> String {
    format!(
        "outbox_t_{}_{:016x}",
        std::process::id(),
        rand::random::<u64>()
    )
}

/// A database created for one test.
pub trait TestDatabase: Sized + Send + Sync + 'static {
    /// The backend under test.
    type DB: Backend;

    /// Short label for messages: `"postgres"`, `"mysql"` or `"sqlite"`.
    const LABEL: &'static str;

    /// Creates a fresh, empty database and a pool to it. Panics if the server is
    /// unreachable.
    fn create() -> impl Future<Output = Self> + Send;

    /// The pool to the fresh database.
    fn pool(&self) -> &Pool<Self::DB>;

    /// A URL of the fresh database, for a process of its own (`DATABASE_URL`).
    fn url(&self) -> String;

    /// Closes the pool and drops the database.
    fn cleanup(self) -> impl Future<Output = ()> + Send;
}

/// `url` with its database (the path) replaced by `name`, its query kept.
fn url_of_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[authority_end..]
        .find('/')
        .map_or(base.len(), |i| authority_end + i);
    let mut out = format!("{}/{name}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn env_url(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// Runs `fut` to completion on a fresh thread and runtime, waiting at most
/// [`DROP_WAIT`]; for `Drop`, which cannot await.
fn block_in_thread<F>(fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let (done_tx, done_rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("test-db-drop".into())
        .spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(fut);
            }
            let _ = done_tx.send(());
        });
    if spawned.is_ok() {
        let _ = done_rx.recv_timeout(DROP_WAIT);
    }
}

/// The connect options of database `DB`.
type AdminOptions<DB> = <<DB as Database>::Connection as Connection>::Options;

/// Connects to the server at `admin` and runs `sql` (text protocol, so several
/// statements are fine), ignoring failures: clean-up is best effort.
async fn admin_exec<DB: Database>(admin: AdminOptions<DB>, sql: String)
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    if let Ok(mut conn) = DB::Connection::connect_with(&admin).await {
        let _ = conn.execute(sql.as_str()).await;
        let _ = conn.close().await;
    }
}

/// Runs `sql` (a `CREATE DATABASE`) on the server at `admin`, retrying briefly
/// (PostgreSQL refuses concurrent copies of `template1` now and then); panics when it
/// keeps failing.
async fn create_database<DB: Database>(admin: &AdminOptions<DB>, url: &str, sql: String)
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    let mut last = None;
    for attempt in 0..5u64 {
        match DB::Connection::connect_with(admin).await {
            Ok(mut conn) => {
                let res = conn.execute(sql.as_str()).await;
                let _ = conn.close().await;
                match res {
                    Ok(_) => return,
                    Err(e) => last = Some(e.to_string()),
                }
            }
            Err(e) => last = Some(format!("cannot connect to `{url}`: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
    }
    panic!("{sql}: {}", last.unwrap_or_default());
}

/// A fresh PostgreSQL database.
pub struct TestPg {
    pool: PgPool,
    admin: PgConnectOptions,
    name: String,
    dropped: bool,
}

impl TestPg {
    /// Creates database `outbox_t_<random>` on the server at [`PG_URL_ENV`].
    pub async fn create() -> Self {
        let url = env_url(PG_URL_ENV, DEFAULT_PG_URL);
        let admin = PgConnectOptions::from_str(&url)
            .unwrap_or_else(|e| panic!("bad {PG_URL_ENV} `{url}`: {e}"));
        let name = unique_db_name();
        create_database::<Postgres>(&admin, &url, format!("CREATE DATABASE {name}")).await;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(admin.clone().database(&name))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to new database {name}: {e}"));
        TestPg {
            pool,
            admin,
            name,
            dropped: false,
        }
    }

    /// The pool to the fresh database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the pool and drops the database.
    pub async fn cleanup(mut self) {
        self.pool.close().await;
        self.dropped = true;
        admin_exec::<Postgres>(
            self.admin.clone(),
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        )
        .await;
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        if !self.dropped {
            // WITH (FORCE) ends the pool's sessions, which cannot be closed from here.
            block_in_thread(admin_exec::<Postgres>(
                self.admin.clone(),
                format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ));
        }
    }
}

impl TestDatabase for TestPg {
    type DB = Postgres;
    const LABEL: &'static str = "postgres";

    fn create() -> impl Future<Output = Self> + Send {
        TestPg::create()
    }

    fn pool(&self) -> &Pool<Postgres> {
        &self.pool
    }

    fn url(&self) -> String {
        url_of_database(&env_url(PG_URL_ENV, DEFAULT_PG_URL), &self.name)
    }

    fn cleanup(self) -> impl Future<Output = ()> + Send {
        TestPg::cleanup(self)
    }
}

/// A fresh MySQL/MariaDB database.
pub struct TestMySql {
    pool: MySqlPool,
    admin: MySqlConnectOptions,
    name: String,
    dropped: bool,
}

impl TestMySql {
    /// Creates database `outbox_t_<random>` on the server at [`MYSQL_URL_ENV`].
    pub async fn create() -> Self {
        let url = env_url(MYSQL_URL_ENV, DEFAULT_MYSQL_URL);
        let admin = MySqlConnectOptions::from_str(&url)
            .unwrap_or_else(|e| panic!("bad {MYSQL_URL_ENV} `{url}`: {e}"));
        let name = unique_db_name();
        create_database::<MySql>(
            &admin,
            &url,
            format!("CREATE DATABASE {name} CHARACTER SET utf8mb4"),
        )
        .await;
        let pool = MySqlPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(admin.clone().database(&name))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to new database {name}: {e}"));
        TestMySql {
            pool,
            admin,
            name,
            dropped: false,
        }
    }

    /// The pool to the fresh database.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the pool and drops the database.
    pub async fn cleanup(mut self) {
        self.pool.close().await;
        self.dropped = true;
        admin_exec::<MySql>(
            self.admin.clone(),
            format!("DROP DATABASE IF EXISTS {}", self.name),
        )
        .await;
    }
}

impl Drop for TestMySql {
    fn drop(&mut self) {
        if !self.dropped {
            // The pool may still hold a transaction open on a table: bound the wait for
            // its metadata lock instead of the server's default of a year.
            block_in_thread(admin_exec::<MySql>(
                self.admin.clone(),
                format!(
                    "SET SESSION lock_wait_timeout = 10; DROP DATABASE IF EXISTS {}",
                    self.name
                ),
            ));
        }
    }
}

impl TestDatabase for TestMySql {
    type DB = MySql;
    const LABEL: &'static str = "mysql";

    fn create() -> impl Future<Output = Self> + Send {
        TestMySql::create()
    }

    fn pool(&self) -> &Pool<MySql> {
        &self.pool
    }

    fn url(&self) -> String {
        url_of_database(&env_url(MYSQL_URL_ENV, DEFAULT_MYSQL_URL), &self.name)
    }

    fn cleanup(self) -> impl Future<Output = ()> + Send {
        TestMySql::cleanup(self)
    }
}

/// A fresh SQLite database file in a temporary directory (deleted with it).
pub struct TestSqlite {
    pool: SqlitePool,
    dir: tempfile::TempDir,
}

impl TestSqlite {
    /// Creates `outbox.db` in a new temporary directory, with the outbox's connect
    /// options.
    pub async fn create() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("outbox_t_")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let path = dir.path().join("outbox.db");
        let path_str = path
            .to_str()
            .unwrap_or_else(|| panic!("non-UTF-8 temp path {path:?}"));
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(sqlite_connect_options(path_str))
            .await
            .unwrap_or_else(|e| panic!("cannot open SQLite database {path:?}: {e}"));
        TestSqlite { pool, dir }
    }

    /// The pool to the fresh database.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The database file's directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Closes the pool and deletes the file.
    pub async fn cleanup(self) {
        self.pool.close().await;
        drop(self.dir);
    }
}

impl TestDatabase for TestSqlite {
    type DB = Sqlite;
    const LABEL: &'static str = "sqlite";

    fn create() -> impl Future<Output = Self> + Send {
        TestSqlite::create()
    }

    fn pool(&self) -> &Pool<Sqlite> {
        &self.pool
    }

    fn url(&self) -> String {
        format!("sqlite:{}", self.dir.path().join("outbox.db").display())
    }

    fn cleanup(self) -> impl Future<Output = ()> + Send {
        TestSqlite::cleanup(self)
    }
}
