//! The grammar of every name that ends up in SQL or in Kafka.
//!
//! Service, table, topic, consumer-group and event-type names are spliced into SQL
//! statements and Kafka requests, so they are checked against a strict grammar before
//! use: at compile time by the macros and again at startup by the catalog (where
//! runtime overrides can change them). Table names must also not be SQL reserved words
//! ([`RESERVED_WORDS`]) or system names (`pg_*`, `sqlite_*`, `mysql`, ...), which pass
//! the grammar but fail, on one backend, in the middle of a migration.
//!
//! A crate of its own, used by `outbox-macros` (at compile time) and `outbox-runtime`
//! (at startup, as `outbox_runtime::names`), so the two checks can never disagree. It
//! has no dependencies.

/// What kind of name is being checked; selects the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NameKind {
    /// A service name: `[a-z][a-z0-9-]*`, at most 48 characters, no trailing or double `-`.
    Service,
    /// An SQL table name: `[a-z_][a-z0-9_]*`, at most [`MAX_TABLE_LEN`] (57) characters,
    /// not a [reserved word](RESERVED_WORDS) and not a [system name](SYSTEM_PREFIXES)
    /// (`pg_*`, `sqlite_*`, [`information_schema`, `mysql`, ...](SYSTEM_NAMES)).
    Table,
    /// A Kafka topic: `[a-zA-Z0-9._-]`, at most 249 characters, not `.` or `..`,
    /// not starting with `__` (internal topics), not mixing `.` and `_` (they collide
    /// in Kafka's metric names, KAFKA-13743).
    Topic,
    /// A Kafka consumer group: `[a-zA-Z0-9._-]`, at most 249 characters.
    Group,
    /// An event type name: `[A-Za-z][A-Za-z0-9._-]*`, at most 128 characters.
    EventType,
}

impl NameKind {
    /// A short human name of the kind, used in error messages.
    pub fn describe(self) -> &'static str {
        match self {
            NameKind::Service => "service name",
            NameKind::Table => "table name",
            NameKind::Topic => "topic name",
            NameKind::Group => "consumer group name",
            NameKind::EventType => "event type name",
        }
    }
}

/// The longest table name: 63 (PostgreSQL's identifier limit, which truncates longer
/// names; MySQL's is 64) less the 6 of `_audit`, so the tables the migration creates
/// beside it (`<table>_audit`, the view `<table>_view`) keep their full, distinct names.
pub const MAX_TABLE_LEN: usize = 63 - "_audit".len();

/// Checks `name` against the grammar of `kind`; on failure returns why, in words that
/// say what is allowed.
pub fn check_name(kind: NameKind, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{} must not be empty", kind.describe()));
    }
    let (max, allowed): (usize, &str) = match kind {
        NameKind::Service => (
            48,
            "lowercase letters, digits and `-`, starting with a letter",
        ),
        NameKind::Table => (
            MAX_TABLE_LEN,
            "lowercase letters, digits and `_`, not starting with a digit",
        ),
        NameKind::Topic | NameKind::Group => (249, "ASCII letters, digits, `.`, `_` and `-`"),
        NameKind::EventType => (
            128,
            "ASCII letters, digits, `.`, `_` and `-`, starting with a letter",
        ),
    };
    if name.len() > max {
        return Err(format!(
            "{} `{}` is {} characters long; the limit is {}",
            kind.describe(),
            name,
            name.len(),
            max
        ));
    }
    let first = name.as_bytes()[0];
    let char_ok = |c: u8| match kind {
        NameKind::Service => c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-',
        NameKind::Table => c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_',
        NameKind::Topic | NameKind::Group | NameKind::EventType => {
            c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-'
        }
    };
    let first_ok = match kind {
        NameKind::Service | NameKind::EventType => first.is_ascii_alphabetic(),
        NameKind::Table => first.is_ascii_lowercase() || first == b'_',
        NameKind::Topic | NameKind::Group => true,
    };
    if !first_ok || !name.bytes().all(char_ok) {
        return Err(format!(
            "{} `{}` has a character outside the allowed set: {}",
            kind.describe(),
            name,
            allowed
        ));
    }
    match kind {
        NameKind::Service if name.ends_with('-') || name.contains("--") => Err(format!(
            "service name `{}` must not end with `-` or contain `--`",
            name
        )),
        NameKind::Topic if name == "." || name == ".." => {
            Err(format!("topic name `{}` is reserved by Kafka", name))
        }
        NameKind::Topic if name.starts_with("__") => Err(format!(
            "topic name `{}` starts with `__`, which Kafka reserves for internal topics",
            name
        )),
        NameKind::Topic if name.contains('.') && name.contains('_') => Err(format!(
            "topic name `{}` mixes `.` and `_`, which collide in Kafka's metric names; use one of them",
            name
        )),
        NameKind::Table => check_table_is_not_reserved(name),
        _ => Ok(()),
    }
}

/// Refuses table names that pass the grammar but that a database refuses or resolves
/// to something else: reserved words (the migration would fail half-way, on one
/// backend only) and system names (`pg_class` would name PostgreSQL's catalog).
fn check_table_is_not_reserved(name: &str) -> Result<(), String> {
    if is_reserved_word(name) {
        return Err(format!(
            "table name `{name}` is a reserved word in SQL; choose another table name, e.g. `{name}_outbox`"
        ));
    }
    if let Some((_, owner)) = SYSTEM_NAMES.iter().find(|(n, _)| *n == name) {
        return Err(format!(
            "table name `{name}` is the name of {owner}; choose another table name, e.g. `{name}_outbox`"
        ));
    }
    if let Some((prefix, owner)) = SYSTEM_PREFIXES.iter().find(|(p, _)| name.starts_with(p)) {
        let rest = name[prefix.len()..].trim_start_matches('_');
        // `<rest>_outbox` is valid when `rest` starts with a letter and not with a
        // system prefix (no reserved or system name ends in `_outbox`); so is `rest`
        // itself when it already ends so (a default table: `pg_sync_outbox`).
        let valid = rest.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
            && !SYSTEM_PREFIXES.iter().any(|(p, _)| rest.starts_with(p));
        let example = if valid && rest.ends_with("_outbox") {
            rest.to_owned()
        } else if valid {
            format!("{rest}_outbox")
        } else {
            "app_outbox".to_owned()
        };
        return Err(format!(
            "table name `{name}` starts with `{prefix}`, which {owner}; choose another table name, e.g. `{example}`"
        ));
    }
    Ok(())
}

/// Whether `word` (lowercase) is in [`RESERVED_WORDS`].
pub fn is_reserved_word(word: &str) -> bool {
    RESERVED_WORDS.binary_search(&word).is_ok()
}

/// Name prefixes a database keeps for itself, with who keeps them (for the message).
pub const SYSTEM_PREFIXES: &[(&str, &str)] = &[
    ("pg_", "PostgreSQL reserves for its system catalogs"),
    ("sqlite_", "SQLite reserves for its internal tables"),
];

/// Names of the databases' system schemas, with whose they are (for the message).
pub const SYSTEM_NAMES: &[(&str, &str)] = &[
    ("information_schema", "the SQL standard's catalog schema"),
    ("mysql", "MySQL's and MariaDB's system schema"),
    (
        "performance_schema",
        "MySQL's and MariaDB's performance schema",
    ),
    ("sys", "MySQL's and MariaDB's sys schema"),
];

/// Words no outbox table may be named: the union of the words each supported database
/// refuses as an unquoted table name in the statements the outbox runs (`CREATE
/// TABLE`, `CREATE INDEX .. ON`, `INSERT INTO`, `SELECT .. FROM t alias`, `UPDATE`,
/// `DELETE FROM`). Sorted bytewise, for [`is_reserved_word`]'s binary search.
///
/// Where it comes from (a deliberate list: to change it, re-run the same probes):
///
/// - PostgreSQL: the `reserved` and `reserved (can be function or type)` key words
///   (`pg_get_keywords()` catcodes `R` and `T`) of PostgreSQL 15, each checked to fail
///   `CREATE TABLE <word>` while every other key word passed the outbox's statements;
///   plus `system_user` (reserved since 16).
/// - MySQL: the words marked reserved in the MySQL 8.0, 8.4 and 9.x manuals, including
///   those reserved in some releases only (`master_bind`, `manual`, `parallel`) and
///   `_filename`.
/// - MariaDB: every word of MariaDB 10.11's `information_schema.KEYWORDS` that fails
///   `CREATE TABLE <word>` (or, for `value`, `INSERT INTO <word> (..)`), plus the words
///   its manual lists as reserved in other releases (`general`, `slow`, `vector`,
///   `to_date`, ...).
/// - SQLite: every word of `sqlite3_keyword_name()` (3.40) that fails `CREATE TABLE
///   <word>`.
#[rustfmt::skip] // Dense rows, so the list stays readable.
pub const RESERVED_WORDS: &[&str] = &[
    "_filename", "accessible", "add", "all", "alter", "analyse", "analyze", "and", "any",
    "array", "as", "asc", "asensitive", "asymmetric", "authorization", "autoincrement",
    "before", "between", "bigint", "binary", "blob", "both", "by", "call", "cascade",
    "case", "cast", "change", "char", "character", "check", "collate", "collation",
    "column", "commit", "concurrently", "condition", "constraint", "continue", "conversion",
    "convert", "create", "cross", "cube", "cume_dist", "current_catalog", "current_date",
    "current_role", "current_schema", "current_time", "current_timestamp", "current_user",
    "cursor", "database", "databases", "day_hour", "day_microsecond", "day_minute",
    "day_second", "dec", "decimal", "declare", "default", "deferrable", "delayed", "delete",
    "delete_domain_id", "dense_rank", "desc", "describe", "deterministic", "distinct",
    "distinctrow", "div", "do", "do_domain_ids", "double", "drop", "dual", "each", "else",
    "elseif", "empty", "enclosed", "end", "escape", "escaped", "except", "exists", "exit",
    "explain", "external", "false", "fetch", "first_value", "float", "float4", "float8",
    "for", "force", "foreign", "freeze", "from", "full", "fulltext", "function", "general",
    "generated", "get", "grant", "group", "grouping", "groups", "having", "high_priority",
    "hour_microsecond", "hour_minute", "hour_second", "if", "ignore", "ignore_domain_ids",
    "ignore_server_ids", "ilike", "in", "index", "infile", "initially", "inner", "inout",
    "insensitive", "insert", "int", "int1", "int2", "int3", "int4", "int8", "integer",
    "intersect", "interval", "into", "io_after_gtids", "io_before_gtids", "is", "isnull",
    "iterate", "join", "json_table", "key", "keys", "kill", "lag", "last_value", "lateral",
    "lead", "leading", "leave", "left", "library", "like", "limit", "linear", "lines",
    "load", "localtime", "localtimestamp", "lock", "long", "longblob", "longtext", "loop",
    "low_priority", "manual", "master_bind", "master_demote_to_replica",
    "master_demote_to_slave", "master_heartbeat_period", "master_ssl_verify_server_cert",
    "match", "maxvalue", "mediumblob", "mediumint", "mediumtext", "middleint",
    "minute_microsecond", "minute_second", "mod", "modifies", "natural",
    "no_write_to_binlog", "not", "nothing", "notnull", "nth_value", "ntile", "null",
    "numeric", "of", "offset", "on", "only", "optimize", "optimizer_costs", "option",
    "optionally", "or", "order", "out", "outer", "outfile", "over", "overlaps",
    "page_checksum", "parallel", "parse_vcol_expr", "partition", "percent_rank", "placing",
    "portion", "precision", "primary", "procedure", "purge", "qualify", "range", "rank",
    "read", "read_write", "reads", "real", "recursive", "ref_system_id", "references",
    "regexp", "release", "rename", "repeat", "replace", "require", "resignal", "restrict",
    "return", "returning", "revoke", "right", "rlike", "row", "row_number", "rows",
    "schema", "schemas", "second_microsecond", "select", "sensitive", "separator",
    "session_user", "set", "show", "signal", "similar", "slow", "smallint", "some",
    "spatial", "specific", "sql", "sql_big_result", "sql_calc_found_rows",
    "sql_small_result", "sqlexception", "sqlstate", "sqlwarning", "ssl", "starting",
    "stats_auto_recalc", "stats_persistent", "stats_sample_pages", "stored",
    "straight_join", "symmetric", "system", "system_user", "table", "tablesample",
    "terminated", "then", "tinyblob", "tinyint", "tinytext", "to", "to_date", "trailing",
    "transaction", "trigger", "true", "undo", "union", "unique", "unlock", "unsigned",
    "update", "usage", "use", "user", "using", "utc_date", "utc_time", "utc_timestamp",
    "value", "values", "varbinary", "varchar", "varcharacter", "variadic", "varying",
    "vector", "verbose", "virtual", "when", "where", "while", "window", "with", "write",
    "xor", "year_month", "zerofill",
];

/// Converts a service name (`active-scheduler`) to its table stem (`active_scheduler`).
pub fn snake(service: &str) -> String {
    service.replace('-', "_")
}

/// The default outbox table of a service: `<name with - as _>_outbox`.
pub fn default_table(service: &str) -> String {
    format!("{}_outbox", snake(service))
}

/// The default Kafka topic of a service: `outbox.<name>`.
pub fn default_topic(service: &str) -> String {
    format!("outbox.{}", service)
}

/// The default consumer group of a service: `outbox.<name>.consumer`.
pub fn default_group(service: &str) -> String {
    format!("outbox.{}.consumer", service)
}

/// The default inbox table of a subscribing service: `<name with - as _>_inbox`. One
/// per subscriber, shared by every service it subscribes to.
pub fn default_inbox_table(subscriber: &str) -> String {
    format!("{}_inbox", snake(subscriber))
}

/// The default consumer group of a subscription:
/// `outbox.<publisher>.subscriber.<subscriber>`, one per (publisher, subscriber) pair,
/// so each subscriber reads the publisher's whole topic once.
pub fn default_subscription_group(publisher: &str, subscriber: &str) -> String {
    format!("outbox.{publisher}.subscriber.{subscriber}")
}

/// The default service name of a marker type: `ActiveScheduler` → `active-scheduler`.
pub fn kebab_from_camel(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 4);
    for (i, c) in ident.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else if c == '_' {
            out.push('-');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_documented_rule() {
        assert_eq!(default_table("active-scheduler"), "active_scheduler_outbox");
        assert_eq!(default_topic("active-scheduler"), "outbox.active-scheduler");
        assert_eq!(
            default_group("active-scheduler"),
            "outbox.active-scheduler.consumer"
        );
        assert_eq!(kebab_from_camel("ActiveScheduler"), "active-scheduler");
        assert_eq!(kebab_from_camel("Task"), "task");
    }

    #[test]
    fn defaults_are_valid_names() {
        for s in [
            "agent",
            "memory",
            "notification",
            "task",
            "active-scheduler",
        ] {
            check_name(NameKind::Service, s).unwrap();
            check_name(NameKind::Table, &default_table(s)).unwrap();
            check_name(NameKind::Topic, &default_topic(s)).unwrap();
            check_name(NameKind::Group, &default_group(s)).unwrap();
        }
    }

    #[test]
    fn bad_names_are_rejected_with_a_reason() {
        let bad = [
            (NameKind::Service, ""),
            (NameKind::Service, "Task"),
            (NameKind::Service, "task-"),
            (NameKind::Service, "1task"),
            (NameKind::Table, "task-outbox"),
            (NameKind::Table, "tasks; drop table x"),
            (NameKind::Table, "9t"),
            (NameKind::Topic, "."),
            (NameKind::Topic, ".."),
            (NameKind::Topic, "__consumer_offsets"),
            (NameKind::Topic, "a.b_c"),
            (NameKind::Topic, "has space"),
            (NameKind::EventType, "1Created"),
            (NameKind::EventType, "Task Created"),
        ];
        for (kind, name) in bad {
            assert!(check_name(kind, name).is_err(), "{kind:?} {name:?}");
        }
        assert!(check_name(NameKind::Topic, &"a".repeat(250)).is_err());
        assert!(check_name(NameKind::Table, &"a".repeat(MAX_TABLE_LEN + 1)).is_err());
        check_name(NameKind::Table, &"a".repeat(MAX_TABLE_LEN)).unwrap();
        // The longest default table (`<service>_outbox`, service at its limit) fits.
        check_name(NameKind::Table, &default_table(&"a".repeat(48))).unwrap();
    }

    #[test]
    fn the_reserved_words_are_sorted_unique_and_valid_table_names_otherwise() {
        for pair in RESERVED_WORDS.windows(2) {
            assert!(pair[0] < pair[1], "not sorted or repeated: {pair:?}");
        }
        for word in RESERVED_WORDS {
            assert!(
                word.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'),
                "{word}"
            );
            // Each is refused for being reserved, not for its characters.
            let why = check_name(NameKind::Table, word).unwrap_err();
            assert!(why.contains("is a reserved word in SQL"), "{why}");
            // The suggested name is valid.
            check_name(NameKind::Table, &format!("{word}_outbox")).unwrap();
        }
    }

    #[test]
    fn reserved_words_of_each_database_are_refused_as_tables_with_the_fix() {
        // One or more words only one database reserves, per database.
        let words = [
            "select",
            "user",
            "order",
            "table",
            "group", // all of them, or PostgreSQL
            "analyse",
            "verbose",
            "system_user", // PostgreSQL only
            "key",
            "interval",
            "rank",
            "change",
            "value",
            "manual", // MySQL / MariaDB
            "autoincrement",
            "transaction",
            "nothing",
            "commit", // SQLite
        ];
        for word in words {
            let why = check_name(NameKind::Table, word).unwrap_err();
            assert_eq!(
                why,
                format!(
                    "table name `{word}` is a reserved word in SQL; choose another table \
                     name, e.g. `{word}_outbox`"
                )
            );
        }
        // Key words that every database accepts as a table name stay allowed, and so
        // do reserved words inside a longer name.
        for ok in [
            "events",
            "task",
            "message",
            "outbox",
            "select_outbox",
            "user_events",
        ] {
            check_name(NameKind::Table, ok).unwrap();
        }
        // Only table names: services, topics, groups and event types are never spliced
        // into SQL as identifiers.
        check_name(NameKind::Service, "select").unwrap();
        check_name(NameKind::Topic, "select").unwrap();
        check_name(NameKind::EventType, "select").unwrap();
    }

    #[test]
    fn system_names_and_prefixes_are_refused_as_tables() {
        let cases = [
            ("pg_class", "starts with `pg_`", "`class_outbox`"),
            ("pg_", "starts with `pg_`", "`app_outbox`"),
            ("pg_1", "starts with `pg_`", "`app_outbox`"),
            ("pg_sqlite_x", "starts with `pg_`", "`app_outbox`"),
            ("sqlite_master", "starts with `sqlite_`", "`master_outbox`"),
            ("sqlite_stat1", "starts with `sqlite_`", "`stat1_outbox`"),
            (
                "information_schema",
                "catalog schema",
                "`information_schema_outbox`",
            ),
            ("mysql", "system schema", "`mysql_outbox`"),
            (
                "performance_schema",
                "performance schema",
                "`performance_schema_outbox`",
            ),
            ("sys", "sys schema", "`sys_outbox`"),
        ];
        for (name, why, example) in cases {
            let err = check_name(NameKind::Table, name).unwrap_err();
            assert!(err.contains(why), "{name}: {err}");
            assert!(err.contains(&format!("e.g. {example}")), "{name}: {err}");
            let suggested = example.trim_matches('`');
            check_name(NameKind::Table, suggested).unwrap();
        }
        for ok in [
            "pgx_outbox",
            "page_outbox",
            "mysql_outbox",
            "system_outbox",
            "sqlitex",
        ] {
            check_name(NameKind::Table, ok).unwrap();
        }
    }

    #[test]
    fn default_tables_of_services_with_system_prefixes_are_refused() {
        // A service name can derive a table in a system namespace: the macro checks
        // the derived table too, so this fails at compile time, not mid-migration.
        let why = check_name(NameKind::Table, &default_table("pg-sync")).unwrap_err();
        assert!(why.ends_with("e.g. `sync_outbox`"), "{why}");
        assert!(check_name(NameKind::Table, &default_table("sqlite-cache")).is_err());
        check_name(NameKind::Table, &default_table("select")).unwrap();
    }
}
