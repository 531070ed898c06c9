//! The `outbox` command line for operators (feature `cli`): status, dead letters,
//! replay, discard, parked keys, the audit log, the catalog and migrations, over
//! [`Admin`].
//!
//! Two ways to run it:
//!
//! - **Embedded** in the application's own binary, so it knows the compiled catalog:
//!   mount [`OutboxArgs`] as a subcommand and hand it to [`run`].
//!
//!   ```ignore
//!   #[derive(clap::Parser)]
//!   enum Cli {
//!       /// Run the service.
//!       Serve,
//!       /// Operate the outbox.
//!       Outbox(outbox_runtime::cli::OutboxArgs),
//!   }
//!
//!   match Cli::parse() {
//!       Cli::Serve => serve().await,
//!       Cli::Outbox(args) => {
//!           let admin = Admin::new(pool, Catalog::global()?);
//!           return outbox_runtime::cli::run(&args, admin).await;   // an ExitCode
//!       }
//!   }
//!   ```
//!
//!   `my-app outbox status`, `my-app outbox dead list --service task --reason exhausted`.
//! - **Standalone**: the `outbox` binary of the `outbox-cli` crate (`cargo install
//!   outbox-cli`), from `DATABASE_URL` and a catalog export (`my-app outbox catalog
//!   --json > catalog.json`) or `--service`/`--table`.
//!
//! Output is an aligned table, or JSON with `--json`. Exit codes: 0 done, 1 an error
//! or nothing to act on (an event that is not dead), 2 a usage error.

mod output;

use std::process::ExitCode;
use std::time::Duration;

use uuid::Uuid;

use crate::admin::units::{age, parse_duration};
use crate::admin::{Admin, Page, ReplayOptions};
use crate::backend::{Backend, DeadFilter, DeadReason};
use crate::error::Error;
use crate::event::EventId;
use output::{cell, Table};

/// The `outbox` command line's arguments: mount them as a subcommand of the
/// application's own clap parser (`Outbox(OutboxArgs)`).
#[derive(Debug, Clone, clap::Args)]
pub struct OutboxArgs {
    /// Print JSON instead of tables, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    /// Who the audit rows name (default: `cli:$USER`).
    #[arg(long, global = true, env = "OUTBOX_ACTOR")]
    pub actor: Option<String>,
    /// Act on this subscriber's inbox instead of the outboxes: each publisher it
    /// subscribes to stands for a service (`--inbox notification dead list -s task`).
    #[arg(long, global = true, value_name = "SUBSCRIBER")]
    pub inbox: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Every service at a glance: rows by status, the oldest due event, events published
    /// and not consumed yet, dead letters, keys held behind a failing head or parked.
    Status {
        /// Only this service.
        #[arg(long, short)]
        service: Option<String>,
    },
    /// Dead letters: list, show, replay, discard.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Hold a key's events, release them, list the held keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// What operators did: who, when, what, how many.
    Audit {
        /// Only this service.
        #[arg(long, short)]
        service: Option<String>,
        /// The newest this many entries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// The route catalog: services with their table, topic and group (with `--json`,
    /// the export the standalone `outbox` reads with `--catalog`).
    Catalog,
    /// Creates the outbox tables and their audit tables, or upgrades them.
    Migrate {
        /// Print the DDL instead of running it.
        #[arg(long)]
        print: bool,
    },
}

/// `outbox dead …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DeadCommand {
    /// Dead letters, oldest first, a page at a time.
    List {
        /// The service.
        #[arg(long, short)]
        service: String,
        /// Which ones.
        #[command(flatten)]
        filter: FilterArgs,
        /// Rows per page.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// The cursor a previous page printed.
        #[arg(long)]
        after: Option<i64>,
    },
    /// One event, whole: envelope, payload, attempts, times, last error.
    Show {
        /// The service.
        #[arg(long, short)]
        service: String,
        /// The event id.
        event_id: Uuid,
    },
    /// Replays one dead event, or every one a filter matches (`--all` for every dead
    /// letter of the service); `--dry-run` first to see how many.
    Replay {
        /// The service.
        #[arg(long, short)]
        service: String,
        /// One event.
        event_id: Option<Uuid>,
        /// Which ones, without an event id.
        #[command(flatten)]
        filter: FilterArgs,
        /// Every dead letter of the service (no filter).
        #[arg(long)]
        all: bool,
        /// Count and list, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many events a second.
        #[arg(long)]
        rate: Option<u32>,
        /// At most this many events in all.
        #[arg(long)]
        limit: Option<u64>,
        /// Events per transaction.
        #[arg(long, default_value_t = 100)]
        batch: u32,
    },
    /// Sets a dead event aside for good (kept, never replayed by a filter).
    Discard {
        /// The service.
        #[arg(long, short)]
        service: String,
        /// The event id.
        event_id: Uuid,
    },
}

/// `outbox keys …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCommand {
    /// Holds a key: its pending events are not published, later ones wait behind them.
    Park {
        /// The service.
        #[arg(long, short)]
        service: String,
        /// The event key.
        key: String,
    },
    /// Releases a parked key: its events drain in order.
    Unpark {
        /// The service.
        #[arg(long, short)]
        service: String,
        /// The event key.
        key: String,
    },
    /// The parked keys of a service.
    Parked {
        /// The service.
        #[arg(long, short)]
        service: String,
    },
}

/// Which dead letters (every given one must match).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
    /// The event type.
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// The reason class: undecodable, unknown_type, no_handler, version, permanent,
    /// exhausted, too_large.
    #[arg(long)]
    pub reason: Option<DeadReason>,
    /// Part of the last error, in any case.
    #[arg(long = "error")]
    pub error_contains: Option<String>,
    /// The event key.
    #[arg(long)]
    pub key: Option<String>,
    /// Dead for at least this long (90s, 15m, 2h, 7d).
    #[arg(long, value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Dead for at most this long.
    #[arg(long, value_parser = parse_duration)]
    pub newer_than: Option<Duration>,
}

impl From<&FilterArgs> for DeadFilter {
    fn from(a: &FilterArgs) -> Self {
        DeadFilter {
            event_type: a.event_type.clone(),
            reason: a.reason,
            error_contains: a.error_contains.clone(),
            key: a.key.clone(),
            older_than: a.older_than,
            newer_than: a.newer_than,
        }
    }
}

/// How a command ended, short of an error.
enum Ended {
    Done,
    /// Nothing to act on (exit 1).
    Nothing(String),
    /// The arguments make no sense together (exit 2).
    Usage(String),
}

/// Runs `args` against `admin`'s database and catalog, printing to stdout (errors to
/// stderr), and returns the exit code: 0 done, 1 an error or nothing to act on, 2 a
/// usage error. Changes are audited as `args.actor`, or `cli:$USER`.
pub async fn run<DB: Backend>(args: &OutboxArgs, admin: Admin<DB>) -> ExitCode {
    let actor = args.actor.clone().unwrap_or_else(|| {
        let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
        format!("cli:{user}")
    });
    let admin = admin.acting_as(actor);
    let admin = match &args.inbox {
        None => admin,
        Some(subscriber) => match admin.inbox(subscriber) {
            Ok(inbox) => inbox,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    match execute(args, &admin).await {
        Ok(Ended::Done) => ExitCode::SUCCESS,
        Ok(Ended::Nothing(why)) => {
            eprintln!("{why}");
            ExitCode::from(1)
        }
        Ok(Ended::Usage(why)) => {
            eprintln!("error: {why}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Prints `value` as pretty JSON.
fn print_json(value: &impl serde::Serialize) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::InvalidRequest(format!("printing JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

async fn execute<DB: Backend>(args: &OutboxArgs, admin: &Admin<DB>) -> Result<Ended, Error> {
    let json = args.json;
    match &args.command {
        Command::Status { service } => {
            let all = match service {
                Some(s) => vec![admin.service_overview(s).await?],
                None => admin.overview().await?,
            };
            if json {
                print_json(&all)?;
            } else {
                let mut t = Table::new(&[
                    "SERVICE",
                    "PENDING",
                    "DUE",
                    "OLDEST DUE",
                    "UNCONSUMED",
                    "OLDEST",
                    "WAITING",
                    "DEAD",
                    "DISCARDED",
                    "FAILING KEYS",
                    "PARKED KEYS",
                ]);
                for s in &all {
                    t.row(vec![
                        s.service.clone(),
                        s.counts.pending.to_string(),
                        s.backlog.due.to_string(),
                        age(s.backlog.oldest_due),
                        s.backlog.unconsumed.to_string(),
                        age(s.backlog.oldest_unconsumed),
                        s.backlog.waiting.to_string(),
                        s.counts.dead.to_string(),
                        s.counts.discarded.to_string(),
                        s.failing_keys.to_string(),
                        s.parked_keys.to_string(),
                    ]);
                }
                print!("{}", t.render());
            }
        }
        Command::Dead(DeadCommand::List {
            service,
            filter,
            limit,
            after,
        }) => {
            let page = admin
                .dead_letters(
                    service,
                    &filter.into(),
                    Page {
                        after: *after,
                        limit: *limit,
                    },
                )
                .await?;
            if json {
                print_json(&page)?;
            } else {
                let mut t = Table::new(&[
                    "EVENT ID",
                    "TYPE",
                    "KEY",
                    "DEAD SINCE",
                    "ATTEMPTS",
                    "REASON",
                    "LAST ERROR",
                ]);
                for r in &page.rows {
                    t.row(vec![
                        r.event_id.to_string(),
                        r.event_type.clone(),
                        r.key.clone().unwrap_or_else(|| "-".into()),
                        r.dead_at
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_else(|| "-".into()),
                        r.attempts.to_string(),
                        r.dead_reason.clone().unwrap_or_else(|| "-".into()),
                        cell(r.last_error.as_deref().unwrap_or(""), 80),
                    ]);
                }
                if t.is_empty() {
                    println!("no dead letters match");
                } else {
                    print!("{}", t.render());
                }
                if let Some(next) = page.next {
                    println!("more: --after {next}");
                }
            }
        }
        Command::Dead(DeadCommand::Show { service, event_id }) => {
            let Some(detail) = admin.event(service, EventId(*event_id)).await? else {
                return Ok(Ended::Nothing(format!(
                    "service `{service}` has no event {event_id}"
                )));
            };
            if json {
                print_json(&detail)?;
            } else {
                let r = &detail.row;
                let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
                };
                let mut t = Table::new(&["FIELD", "VALUE"]);
                for (field, value) in [
                    ("event id", r.event_id.to_string()),
                    ("service", r.service.clone()),
                    ("type", r.event_type.clone()),
                    ("version", r.version.to_string()),
                    ("key", r.key.clone().unwrap_or_else(|| "-".into())),
                    ("status", r.status.as_str().to_owned()),
                    ("table / row", format!("{} / {}", detail.table, r.id)),
                    ("topic", detail.topic.clone()),
                    ("attempts", format!("{} of {}", r.attempts, r.max_retries)),
                    ("created", r.created_at.to_rfc3339()),
                    ("published", time(r.published_at)),
                    ("dead", time(r.dead_at)),
                    ("parked", time(r.parked_at)),
                    (
                        "reason",
                        r.dead_reason.clone().unwrap_or_else(|| "-".into()),
                    ),
                    (
                        "trace",
                        r.trace_context.clone().unwrap_or_else(|| "-".into()),
                    ),
                ] {
                    t.row(vec![field.into(), value]);
                }
                print!("{}", t.render());
                println!("\nlast error:\n{}", r.last_error.as_deref().unwrap_or("-"));
                println!("\npayload:\n{}", r.payload);
            }
        }
        Command::Dead(DeadCommand::Replay {
            service,
            event_id,
            filter,
            all,
            dry_run,
            rate,
            limit,
            batch,
        }) => {
            let filter = DeadFilter::from(filter);
            if let Some(id) = event_id {
                if !filter.is_empty() || *all {
                    return Ok(Ended::Usage(
                        "give an event id or a filter (or --all), not both".into(),
                    ));
                }
                let id = EventId(*id);
                if *dry_run {
                    let dead = admin
                        .event(service, id)
                        .await?
                        .is_some_and(|d| d.row.status == crate::Status::Dead);
                    return report_one(json, "would_replay", dead, service, id);
                }
                let replayed = admin.replay(service, id).await?;
                return report_one(json, "replayed", replayed, service, id);
            }
            if filter.is_empty() && !*all {
                return Ok(Ended::Usage(
                    "replay what? give an event id, a filter (--type, --reason, --error, --key, \
                     --older-than, --newer-than) or --all"
                        .into(),
                ));
            }
            let options = ReplayOptions {
                dry_run: *dry_run,
                rate_per_sec: *rate,
                limit: *limit,
                batch: *batch,
            };
            let bar = if json || *dry_run {
                indicatif::ProgressBar::hidden()
            } else {
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {pos}/{len} replayed ({per_sec}, eta {eta})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar
            };
            let report = admin
                .replay_matching(service, &filter, &options, |p| {
                    bar.set_length(p.total);
                    bar.set_position(p.done);
                })
                .await;
            bar.finish_and_clear();
            let report = report?;
            if json {
                print_json(&report)?;
            } else if report.dry_run {
                println!("would replay {} dead letters of {service}", report.matched);
                for id in &report.sample {
                    println!("  {id}");
                }
                if report.matched > report.sample.len() as u64 {
                    println!(
                        "  … and {} more",
                        report.matched - report.sample.len() as u64
                    );
                }
            } else {
                println!(
                    "replayed {} of {} matching dead letters of {service}",
                    report.replayed, report.matched
                );
            }
        }
        Command::Dead(DeadCommand::Discard { service, event_id }) => {
            let id = EventId(*event_id);
            let done = admin.discard(service, id).await?;
            return report_one(json, "discarded", done, service, id);
        }
        Command::Keys(KeysCommand::Park { service, key }) => {
            let n = admin.park(service, key).await?;
            if json {
                print_json(&serde_json::json!({ "service": service, "key": key, "parked": n }))?;
            } else if n == 0 {
                return Ok(Ended::Nothing(format!(
                    "key `{key}` of {service} has no pending event: nothing to hold"
                )));
            } else {
                println!("parked key `{key}` of {service}: {n} events held");
            }
        }
        Command::Keys(KeysCommand::Unpark { service, key }) => {
            let n = admin.unpark(service, key).await?;
            if json {
                print_json(&serde_json::json!({ "service": service, "key": key, "released": n }))?;
            } else if n == 0 {
                return Ok(Ended::Nothing(format!(
                    "key `{key}` of {service} is not parked"
                )));
            } else {
                println!("released key `{key}` of {service}: {n} events due now");
            }
        }
        Command::Keys(KeysCommand::Parked { service }) => {
            let keys = admin.parked(service).await?;
            if json {
                print_json(&keys)?;
            } else if keys.is_empty() {
                println!("no parked keys in {service}");
            } else {
                let mut t = Table::new(&["KEY", "PENDING", "PARKED SINCE"]);
                for k in &keys {
                    t.row(vec![
                        k.key.clone(),
                        k.pending.to_string(),
                        k.parked_since.format("%Y-%m-%d %H:%M:%S").to_string(),
                    ]);
                }
                print!("{}", t.render());
            }
        }
        Command::Audit { service, limit } => {
            let entries = admin.audit_log(service.as_deref(), *limit).await?;
            if json {
                print_json(&entries)?;
            } else if entries.is_empty() {
                println!("no audit entries");
            } else {
                let mut t = Table::new(&["AT", "ACTOR", "ACTION", "SERVICE", "AFFECTED", "TARGET"]);
                for e in &entries {
                    t.row(vec![
                        e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        e.actor.clone(),
                        e.action.clone(),
                        e.service.clone(),
                        e.affected.to_string(),
                        cell(&e.target, 100),
                    ]);
                }
                print!("{}", t.render());
            }
        }
        Command::Catalog => {
            let catalog = admin.catalog();
            if json {
                print_json(&catalog.to_json())?;
            } else {
                let mut t = Table::new(&["SERVICE", "TABLE", "TOPIC", "GROUP", "EVENTS"]);
                for r in catalog.routes() {
                    let events: Vec<&str> = catalog
                        .events_of_service(r.service().as_str())
                        .map(|e| e.event_type.as_str())
                        .collect();
                    t.row(vec![
                        r.service().to_string(),
                        r.table().to_string(),
                        r.topic().to_string(),
                        r.group().to_string(),
                        events.join(", "),
                    ]);
                }
                print!("{}", t.render());
            }
        }
        Command::Migrate { print } => {
            let tables: Vec<_> = admin
                .catalog()
                .routes()
                .map(|r| r.table().clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            for table in &tables {
                if *print {
                    println!("-- {table}\n{}", DB::migration_sql(table));
                } else {
                    DB::migrate(admin.pool(), table)
                        .await
                        .map_err(|e| Error::db(format!("migrating {table}"), e))?;
                }
            }
            if !*print {
                if json {
                    let names: Vec<&str> = tables.iter().map(|t| t.as_str()).collect();
                    print_json(&serde_json::json!({ "migrated": names }))?;
                } else {
                    for table in &tables {
                        println!("migrated {table} (and {table}_audit)");
                    }
                }
            }
        }
    }
    Ok(Ended::Done)
}

/// The outcome of an action on one event: printed, and exit 1 if nothing changed.
fn report_one(
    json: bool,
    verb: &str,
    changed: bool,
    service: &str,
    id: EventId,
) -> Result<Ended, Error> {
    if json {
        print_json(&serde_json::json!({ "service": service, "event_id": id.0, verb: changed }))?;
        return Ok(Ended::Done);
    }
    if changed {
        println!("{}: event {id} of {service}", verb.replace('_', " "));
        Ok(Ended::Done)
    } else {
        Ok(Ended::Nothing(format!(
            "event {id} of {service} is not dead (already replayed or discarded, or no such event): nothing done"
        )))
    }
}
