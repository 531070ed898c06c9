//! `outbox`: the operator command line, outside the application.
//!
//! ```text
//! export DATABASE_URL=postgres://ops@db/app
//! my-app outbox catalog --json > catalog.json     # once, from the application
//! outbox --catalog catalog.json status
//! outbox --route task=task_outbox dead list --service task --reason exhausted
//! ```
//!
//! Everything after the connection options is [`outbox_runtime::cli`]'s command line,
//! the same one an application embeds. Exit codes: 0 done, 1 an error or nothing to act
//! on, 2 a usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use outbox_runtime::cli::{run, OutboxArgs};
use outbox_runtime::sqlite::sqlite_connect_options;
use outbox_runtime::{Admin, Backend, Catalog, RouteSpec};
use sqlx::pool::PoolOptions;

/// Operate transactional outboxes: status, dead letters, replay, parked keys, audit,
/// migrations.
#[derive(Debug, Parser)]
#[command(name = "outbox", version)]
struct Cli {
    /// The database: `postgres://…`, `mysql://…` (MariaDB too) or `sqlite:path`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// A catalog export of the application (`<app> outbox catalog --json`).
    #[arg(long, env = "OUTBOX_CATALOG")]
    catalog: Option<PathBuf>,
    /// A service and its table, `service=table`, or a service on its default table
    /// (`<service>_outbox`); repeatable; instead of `--catalog`.
    #[arg(
        long = "route",
        value_name = "SERVICE[=TABLE]",
        conflicts_with = "catalog"
    )]
    routes: Vec<String>,
    #[command(flatten)]
    outbox: OutboxArgs,
}

fn catalog(cli: &Cli) -> Result<Catalog, String> {
    if let Some(path) = &cli.catalog {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the catalog {}: {e}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("the catalog {} is not JSON: {e}", path.display()))?;
        return Catalog::from_export(&json).map_err(|e| format!("{}: {e}", path.display()));
    }
    if cli.routes.is_empty() {
        return Err(
            "which services? give --catalog FILE (an export: `<app> outbox catalog --json`) \
             or --route SERVICE[=TABLE]"
                .into(),
        );
    }
    let specs = cli
        .routes
        .iter()
        .map(|r| {
            let (service, table) = match r.split_once('=') {
                Some((service, table)) => (service.trim(), table.trim().to_owned()),
                None => (r.trim(), outbox_runtime::names::default_table(r.trim())),
            };
            Ok(RouteSpec {
                service: service.to_owned(),
                table,
                topic: None,
                group: None,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Catalog::from_routes(specs).map_err(|e| e.to_string())
}

async fn with<DB: Backend>(
    pool: Result<sqlx::Pool<DB>, sqlx::Error>,
    catalog: Catalog,
    args: &OutboxArgs,
) -> ExitCode {
    match pool {
        // The URL is not printed: it may hold a password.
        Err(e) => {
            eprintln!(
                "error: connecting to the {} database: {e}",
                DB::BACKEND_NAME
            );
            ExitCode::from(1)
        }
        Ok(pool) => {
            let code = run(args, Admin::new(pool.clone(), catalog)).await;
            pool.close().await;
            code
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let catalog = match catalog(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let url = cli.database_url.as_str();
    let scheme = url.split(':').next().unwrap_or("");
    match scheme {
        "postgres" | "postgresql" => {
            let pool = PoolOptions::<sqlx::Postgres>::new()
                .max_connections(2)
                .connect(url)
                .await;
            with(pool, catalog, &cli.outbox).await
        }
        "mysql" | "mariadb" => {
            let url = url.replacen("mariadb:", "mysql:", 1);
            let pool = PoolOptions::<sqlx::MySql>::new()
                .max_connections(2)
                .connect(&url)
                .await;
            with(pool, catalog, &cli.outbox).await
        }
        "sqlite" => {
            let pool = PoolOptions::<sqlx::Sqlite>::new()
                .max_connections(2)
                .connect_with(sqlite_connect_options(url))
                .await;
            with(pool, catalog, &cli.outbox).await
        }
        _ => {
            eprintln!(
                "error: DATABASE_URL must start with postgres://, mysql:// (or mariadb://) or \
                 sqlite:"
            );
            ExitCode::from(2)
        }
    }
}
