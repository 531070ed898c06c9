//! Routes: the checked names one service's events travel by (table, topic, consumer
//! group).
//!
//! Every name that is spliced into SQL or sent to Kafka has a type of its own here
//! ([`ServiceName`], [`TableName`], [`TopicName`], [`GroupName`]) whose only
//! constructor checks it against the grammar of [`crate::names`]. Store calls and the
//! relay take these types, so no path, public or internal, can put an unchecked
//! string into a statement. A [`Route`] is built only by the [`crate::Catalog`].

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::names::{check_name, NameKind};

macro_rules! checked_name {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Checks `name` against the grammar; the error says what is allowed.
            pub fn new(name: impl AsRef<str>) -> Result<Self> {
                Self::checked(name.as_ref()).map_err(Error::InvalidName)
            }

            /// [`new`](Self::new) with the grammar's own message as the error (for the
            /// catalog, which lists every problem).
            pub(crate) fn checked(name: &str) -> std::result::Result<Self, String> {
                check_name($kind, name)?;
                Ok($name(Arc::from(name)))
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }
    };
}

checked_name!(
    /// A service name (`task`, `active-scheduler`), checked.
    ServiceName,
    NameKind::Service
);
checked_name!(
    /// An outbox table name, checked: the only kind of table name the store splices
    /// into SQL.
    TableName,
    NameKind::Table
);
checked_name!(
    /// A Kafka topic name, checked.
    TopicName,
    NameKind::Topic
);
checked_name!(
    /// A Kafka consumer group name, checked.
    GroupName,
    NameKind::Group
);

/// Where one service's events go: its outbox table, topic and consumer group. Built
/// only by the [`crate::Catalog`], from checked names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    service: ServiceName,
    table: TableName,
    topic: TopicName,
    group: GroupName,
    rust_type: String,
}

impl Route {
    pub(crate) fn new(
        service: ServiceName,
        table: TableName,
        topic: TopicName,
        group: GroupName,
        rust_type: &str,
    ) -> Self {
        Route {
            service,
            table,
            topic,
            group,
            rust_type: rust_type.to_owned(),
        }
    }

    /// The service name.
    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    /// Its outbox table.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// Its Kafka topic.
    pub fn topic(&self) -> &TopicName {
        &self.topic
    }

    /// Its consumer group.
    pub fn group(&self) -> &GroupName {
        &self.group
    }

    /// Where the service is declared (`crate::module::Type`).
    pub fn rust_type(&self) -> &str {
        &self.rust_type
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_at_construction() {
        assert!(TableName::new("task_outbox").is_ok());
        assert!(TableName::new("secrets CROSS JOIN (SELECT 1) q").is_err());
        assert!(ServiceName::new("Task").is_err());
        assert!(TopicName::new("..").is_err());
        assert!(GroupName::new("has space").is_err());
        let t = TableName::new("task_outbox").unwrap();
        assert_eq!(t, "task_outbox");
        assert_eq!(t.to_string(), "task_outbox");
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"task_outbox\"");
    }
}
