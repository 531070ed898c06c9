//! The operator tools on a zero-server setup: `cargo run --example console`.
//!
//! Creates a SQLite database (`OUTBOX_EXAMPLE_DB`, default `outbox-console.db` in the
//! system's temporary directory) with a few dead letters and a parked key on the first
//! run, then serves the web console on 127.0.0.1 (`PORT`, default 8089) and prints its
//! address and the operator token (`OUTBOX_CONSOLE_TOKEN`, or a fresh one).
//!
//! The same binary embeds the `outbox` command line, as an application does:
//!
//! ```text
//! cargo run --example console -- outbox status
//! cargo run --example console -- outbox dead list --service task --reason exhausted
//! cargo run --example console -- outbox dead replay --service task --reason permanent --dry-run
//! ```

use std::process::ExitCode;

use clap::Parser;
use outbox_runtime::backend::{AttemptsFence, Backend};
use outbox_runtime::cli::OutboxArgs;
use outbox_runtime::console::{router, ConsoleOptions};
use outbox_runtime::sqlite::sqlite_connect_options;
use outbox_runtime::{outbox_event, outbox_service, Admin, Catalog, DeadReason, Outbox, Sqlite};
use serde::{Deserialize, Serialize};

/// Owns tasks.
#[outbox_service]
pub struct Task;

/// A task was created.
#[outbox_event(service = Task, key = task_id)]
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
    pub title: String,
}

/// This example's command line: serve the console (the default), or the embedded
/// `outbox` command line.
#[derive(Debug, Parser)]
#[command(name = "console-example")]
struct Cli {
    #[command(subcommand)]
    command: Option<AppCommand>,
}

#[derive(Debug, clap::Subcommand)]
enum AppCommand {
    /// Serve the web console (the default).
    Serve,
    /// Operate the outbox.
    Outbox(Box<OutboxArgs>),
}

/// First run: publish some tasks, let four die (as a consumer would mark them), and
/// park a key with two events behind it.
async fn seed(
    pool: &sqlx::SqlitePool,
    catalog: &Catalog,
) -> Result<(), Box<dyn std::error::Error>> {
    let outbox = Outbox::<Task, Sqlite>::new(pool.clone(), catalog)?;
    outbox.migrate().await?;
    let route = catalog.route("task").ok_or("no route for task")?;
    if Sqlite::counts(pool, route.table(), route.service())
        .await?
        .dead
        > 0
    {
        return Ok(());
    }
    let dead = [
        (
            "t-1",
            DeadReason::Exhausted,
            "smtp relay timed out after 30 s [retries exhausted: failed 20 times]",
        ),
        (
            "t-2",
            DeadReason::Exhausted,
            "smtp relay timed out after 30 s [retries exhausted: failed 20 times]",
        ),
        ("t-3", DeadReason::Permanent, "template `welcome` not found"),
        (
            "t-4",
            DeadReason::Undecodable,
            "data error at line 1 column 12: missing field `title`",
        ),
    ];
    for (task, class, reason) in dead {
        let mut tx = outbox.begin().await?;
        let id = tx
            .publish(&TaskCreated {
                task_id: task.into(),
                title: format!("<b>{task}</b> shows as text, not markup"),
            })
            .await?;
        tx.commit().await?;
        let row = Sqlite::fetch(pool, route.table(), id.0)
            .await?
            .ok_or("row")?;
        Sqlite::mark_dead(pool, route.table(), row.id, AttemptsFence(0), reason, class).await?;
    }
    for n in 0..2 {
        let mut tx = outbox.begin().await?;
        tx.publish(&TaskCreated {
            task_id: "t-held".into(),
            title: format!("held event {n}"),
        })
        .await?;
        tx.commit().await?;
    }
    Admin::new(pool.clone(), catalog.clone())
        .acting_as("example")
        .park("task", "t-held")
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let path = std::env::var("OUTBOX_EXAMPLE_DB").unwrap_or_else(|_| {
        std::env::temp_dir()
            .join("outbox-console.db")
            .to_string_lossy()
            .into_owned()
    });
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(sqlite_connect_options(&path))
        .await?;
    let catalog = Catalog::global()?;
    seed(&pool, &catalog).await?;
    let admin = Admin::new(pool.clone(), catalog);

    if let Some(AppCommand::Outbox(args)) = &cli.command {
        return Ok(outbox_runtime::cli::run(args, admin).await);
    }
    let token = std::env::var("OUTBOX_CONSOLE_TOKEN")
        .unwrap_or_else(|_| uuid::Uuid::new_v4().simple().to_string());
    let app = router(
        admin,
        ConsoleOptions::read_only().operator_token(token.clone()),
    );
    let port = std::env::var("PORT").unwrap_or_else(|_| "8089".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!(
        "outbox console on http://{}/ (database {path})",
        listener.local_addr()?
    );
    println!("operator token: {token}");
    println!("Ctrl-C stops it");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(ExitCode::SUCCESS)
}
