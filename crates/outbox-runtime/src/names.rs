//! The grammar of every name that ends up in SQL or in Kafka.
//!
//! Service, table, topic, consumer-group and event-type names are spliced into SQL
//! statements and Kafka requests, so they are checked against a strict grammar before
//! use: at compile time by the macros and again at startup by the catalog (where
//! runtime overrides can change them).
//!
//! This file is shared, byte for byte, with `outbox-macros` (which includes it with
//! `#[path]`), so the compile-time and the startup checks can never disagree. It
//! must stay free of dependencies.

/// What kind of name is being checked; selects the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NameKind {
    /// A service name: `[a-z][a-z0-9-]*`, at most 48 characters, no trailing or double `-`.
    Service,
    /// An SQL table name: `[a-z_][a-z0-9_]*`, at most 63 characters (PostgreSQL's limit).
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
            63,
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
        _ => Ok(()),
    }
}

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
        assert!(check_name(NameKind::Table, &"a".repeat(64)).is_err());
    }
}
