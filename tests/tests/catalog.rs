//! The route catalog of the five services: derived names, lookups by Rust type, by
//! event type name and by service, overrides, and the JSON export.

use outbox_runtime::{Catalog, Event};
use outbox_tests::services::{ActiveScheduler, Agent, JobScheduled, Memory, Task, TaskCreated};

#[test]
fn routes_follow_the_documented_rule_and_agent_keeps_the_legacy_table() {
    let catalog = Catalog::global().expect("valid catalog");
    let task = catalog.route_of::<Task>().unwrap();
    assert_eq!(
        (
            task.table().as_str(),
            task.topic().as_str(),
            task.group().as_str()
        ),
        ("task_outbox", "outbox.task", "outbox.task.consumer")
    );
    let sched = catalog.route_of::<ActiveScheduler>().unwrap();
    assert_eq!(sched.table(), "active_scheduler_outbox");
    assert_eq!(sched.topic(), "outbox.active-scheduler");
    assert_eq!(
        catalog.route_of::<Agent>().unwrap().table(),
        "outbox_events"
    );
    assert_eq!(
        catalog.route_of::<Memory>().unwrap().table(),
        "outbox_events"
    );
    assert_eq!(
        catalog.tables().len(),
        4,
        "agent and memory share one table"
    );
}

#[test]
fn events_are_found_by_type_and_by_name() {
    let catalog = Catalog::global().unwrap();
    let job = catalog.event_of::<JobScheduled>().unwrap();
    assert_eq!(job.event_type, "scheduler.JobScheduled");
    assert_eq!(job.version, 2);
    assert_eq!(job.service, "active-scheduler");
    assert_eq!(job.key_field.as_deref(), Some("job_id"));
    assert_eq!(catalog.event("TaskCreated").unwrap().service, "task");
    assert_eq!(<TaskCreated as Event>::EVENT_TYPE, "TaskCreated");
    let task_events: Vec<_> = catalog
        .events_of_service("task")
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(task_events, ["TaskCreated"]);
    let handlers: Vec<_> = catalog
        .handlers_of("task")
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(handlers, ["outbox_tests::services::on_task_created"]);
}

#[test]
fn overrides_apply_and_are_validated() {
    let catalog = Catalog::builder()
        .topic_prefix("staging.")
        .group_prefix("staging.")
        .table("notification", "notification_outbox_v2")
        .topic("task", "tasks.v2")
        .build()
        .unwrap();
    assert_eq!(catalog.route("task").unwrap().topic(), "staging.tasks.v2");
    assert_eq!(
        catalog.route("notification").unwrap().table(),
        "notification_outbox_v2"
    );
    assert_eq!(
        catalog.route("agent").unwrap().group(),
        "staging.outbox.agent.consumer"
    );

    let err = Catalog::builder()
        .table("task", "task; DROP TABLE users")
        .group("memory", "outbox.agent.consumer")
        .build()
        .unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    assert!(
        err.to_string()
            .contains("table name `task; DROP TABLE users`"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("share consumer group `outbox.agent.consumer`"),
        "{err}"
    );
}

#[test]
fn reserved_words_and_system_names_as_tables_are_catalog_problems() {
    // They pass the grammar but would fail mid-migration (or name PostgreSQL's own
    // catalog): refused at startup, every one listed, each with its fix.
    let err = Catalog::builder()
        .table("task", "pg_class")
        .table("notification", "user")
        .table("memory", "sqlite_sequence")
        .table("active-scheduler", "mysql")
        .build()
        .unwrap_err();
    let text = err.to_string();
    assert_eq!(err.problems.len(), 4, "{text}");
    for expected in [
        "service `task`: table name `pg_class` starts with `pg_`, which PostgreSQL reserves \
         for its system catalogs; choose another table name, e.g. `class_outbox`",
        "service `notification`: table name `user` is a reserved word in SQL; choose \
         another table name, e.g. `user_outbox`",
        "service `memory`: table name `sqlite_sequence` starts with `sqlite_`",
        "service `active-scheduler`: table name `mysql` is the name of MySQL's and \
         MariaDB's system schema",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

/// Variables as `from_env` would read them (`from_vars` takes them as an iterator, so
/// the test never touches, or races on, the process environment).
fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn environment_overrides_apply_and_other_outbox_variables_are_left_alone() {
    let catalog = Catalog::builder()
        .from_vars(vars(&[
            ("OUTBOX_TOPIC_PREFIX", "staging."),
            ("OUTBOX_GROUP_PREFIX", "staging."),
            ("OUTBOX_TASK_TOPIC", "tasks.v2"),
            ("OUTBOX_NOTIFICATION_TABLE", "notification_outbox_v2"),
            ("OUTBOX_ACTIVE_SCHEDULER_GROUP", "scheduler.consumer"),
            // Not of the per-service form, or the project's own tools' variables:
            // never overrides, never problems.
            ("OUTBOX_KAFKA_BROKERS", "127.0.0.1:9092"),
            ("OUTBOX_TEST_PG_URL", "postgres://x"),
            ("OUTBOX_TEST_KAFKA_TOPIC", "whatever"),
            ("OUTBOX_CHAOS_SEED", "7"),
            ("OUTBOX_TANSU_BIN", "/usr/bin/tansu"),
            ("OUTBOX_BENCH_GROUP", "bench"),
            ("OUTBOX_TASK", "x"),
            ("OUTBOX_TABLE", "x"),
            ("TASK_TABLE", "x"),
            ("PATH", "/usr/bin"),
        ]))
        .build()
        .expect("valid overrides build");
    let task = catalog.route("task").unwrap();
    assert_eq!(task.topic(), "staging.tasks.v2");
    assert_eq!(task.table(), "task_outbox");
    assert_eq!(
        catalog.route("notification").unwrap().table(),
        "notification_outbox_v2"
    );
    assert_eq!(
        catalog.route("active-scheduler").unwrap().group(),
        "staging.scheduler.consumer"
    );
}

#[test]
fn environment_variables_naming_no_declared_service_are_catalog_problems() {
    let err = Catalog::builder()
        .from_vars(vars(&[
            ("OUTBOX_TASKS_TABLE", "tasks_outbox"),
            ("OUTBOX_NOTIFICATON_TOPIC", "notifications"),
            ("OUTBOX_ACTIVE-SCHEDULER_GROUP", "g"),
            ("OUTBOX_task_TABLE", "t"),
            ("OUTBOX__GROUP", "g"),
            // A good one among them still applies (and is no problem).
            ("OUTBOX_TASK_TOPIC", "tasks.v2"),
            ("OUTBOX_KAFKA_BROKERS", "127.0.0.1:9092"),
        ]))
        // Together with every other kind of problem, in one error.
        .table("memory", "order")
        .build()
        .unwrap_err();
    let text = err.to_string();
    println!("{text}");
    let declared = "the declared services' variables are `OUTBOX_ACTIVE_SCHEDULER_`, \
                    `OUTBOX_AGENT_`, `OUTBOX_MEMORY_`, `OUTBOX_NOTIFICATION_`, `OUTBOX_TASK_` \
                    followed by TABLE, TOPIC or GROUP";
    for var in [
        "OUTBOX_TASKS_TABLE",
        "OUTBOX_NOTIFICATON_TOPIC",
        "OUTBOX_ACTIVE-SCHEDULER_GROUP",
        "OUTBOX_task_TABLE",
        "OUTBOX__GROUP",
    ] {
        let expected = format!(
            "environment variable `{var}` names no declared service ({declared}); fix its \
             name or unset it"
        );
        assert!(
            err.problems.contains(&expected),
            "missing {expected:?} in:\n{text}"
        );
    }
    assert!(
        text.contains("table name `order` is a reserved word in SQL"),
        "{text}"
    );
    assert_eq!(err.problems.len(), 6, "{text}");
}

#[test]
fn exports_as_json() {
    let json = Catalog::global().unwrap().to_json();
    let services: Vec<&str> = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    assert_eq!(
        services,
        [
            "active-scheduler",
            "agent",
            "memory",
            "notification",
            "task"
        ]
    );
    assert_eq!(json["events"].as_array().unwrap().len(), 5);
    assert_eq!(json["handlers"].as_array().unwrap().len(), 5);
    let job = json["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_type"] == "scheduler.JobScheduled")
        .unwrap();
    assert_eq!(job["rust_type"], "outbox_tests::services::JobScheduled");
}
