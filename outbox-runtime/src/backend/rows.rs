//! Rows decoded once, for every backend. Three column types differ between the
//! databases and are read through newtypes that absorb the difference:
//!
//! - [`DbTime`]: a timestamp (`TIMESTAMPTZ`, MySQL `DATETIME(6)` in UTC, SQLite `INTEGER`
//!   unix microseconds);
//! - [`DbText`]: text (MySQL may flag binary-collated columns as binary, and sqlx
//!   refuses to decode those as text, so MySQL reads bytes);
//! - [`DbFlag`]: a `CASE … THEN 1 ELSE 0 END` (`INTEGER` on PostgreSQL, `BIGINT`
//!   elsewhere).

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Database, Decode, Row, Type};
use uuid::Uuid;

use super::{ClaimedRow, OutboxRow, RowState, Status};

/// A timestamp column (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DbTime(pub DateTime<Utc>);

/// A text column (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct DbText(pub String);

/// A 0/1 column (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DbFlag(pub bool);

/// Implements `Type` and `Decode` for `$new` on `$db` by decoding `$raw` and mapping it
/// with `$map` (a `fn($raw) -> Result<$new, BoxDynError>`).
macro_rules! read_as {
    ($db:ty, $new:ty, $raw:ty, $map:expr) => {
        impl Type<$db> for $new {
            fn type_info() -> <$db as Database>::TypeInfo {
                <$raw as Type<$db>>::type_info()
            }
            fn compatible(ty: &<$db as Database>::TypeInfo) -> bool {
                <$raw as Type<$db>>::compatible(ty)
            }
        }
        impl<'r> Decode<'r, $db> for $new {
            fn decode(
                value: <$db as Database>::ValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let map: fn($raw) -> Result<$new, sqlx::error::BoxDynError> = $map;
                map(<$raw as Decode<'r, $db>>::decode(value)?)
            }
        }
    };
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use sqlx::Postgres;
    read_as!(Postgres, DbTime, DateTime<Utc>, |t| Ok(DbTime(t)));
    read_as!(Postgres, DbText, String, |s| Ok(DbText(s)));
    read_as!(Postgres, DbFlag, i32, |v| Ok(DbFlag(v == 1)));
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use sqlx::MySql;
    read_as!(MySql, DbTime, DateTime<Utc>, |t| Ok(DbTime(t)));
    read_as!(MySql, DbText, Vec<u8>, |b| Ok(DbText(String::from_utf8(
        b
    )?)));
    read_as!(MySql, DbFlag, i64, |v| Ok(DbFlag(v == 1)));
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use sqlx::Sqlite;
    read_as!(Sqlite, DbTime, i64, |us| DbTime::from_micros(us));
    read_as!(Sqlite, DbText, String, |s| Ok(DbText(s)));
    read_as!(Sqlite, DbFlag, i64, |v| Ok(DbFlag(v == 1)));
}

impl DbTime {
    /// From unix microseconds (SQLite's storage).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn from_micros(us: i64) -> Result<DbTime, sqlx::error::BoxDynError> {
        DateTime::from_timestamp_micros(us)
            .map(DbTime)
            .ok_or_else(|| format!("{us} µs is out of range for a timestamp").into())
    }
}

/// The row decoders, for any backend's rows.
pub(crate) trait OutboxRowExt: Row {
    /// A whole row (`{row}` columns).
    fn outbox_row(&self) -> Result<OutboxRow, sqlx::Error>;
    /// A claimed row (`{claimed}` columns).
    fn claimed_row(&self) -> Result<ClaimedRow, sqlx::Error>;
    /// A consumer's view (`{row_state}` columns).
    fn row_state(&self) -> Result<RowState, sqlx::Error>;
}

/// Claimed rows, in id order (`RETURNING` has no defined order).
pub(crate) fn claimed_rows<R: OutboxRowExt>(rows: &[R]) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    let mut claimed = rows
        .iter()
        .map(OutboxRowExt::claimed_row)
        .collect::<Result<Vec<_>, _>>()?;
    claimed.sort_by_key(|r| r.id);
    Ok(claimed)
}

fn status(v: i16) -> Result<Status, sqlx::Error> {
    Status::from_i16(v)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown outbox status {v}").into()))
}

impl<R: Row> OutboxRowExt for R
where
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i32: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i16: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Uuid: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> DbTime: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> DbText: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> DbFlag: Decode<'r, R::Database> + Type<R::Database>,
{
    fn outbox_row(&self) -> Result<OutboxRow, sqlx::Error> {
        let text = |c: &str| self.try_get::<DbText, _>(c).map(|t| t.0);
        let opt_text = |c: &str| self.try_get::<Option<DbText>, _>(c).map(|t| t.map(|t| t.0));
        let time = |c: &str| self.try_get::<DbTime, _>(c).map(|t| t.0);
        let opt_time = |c: &str| self.try_get::<Option<DbTime>, _>(c).map(|t| t.map(|t| t.0));
        Ok(OutboxRow {
            id: self.try_get("id")?,
            event_id: self.try_get("event_id")?,
            service: text("service")?,
            event_type: text("event_type")?,
            version: self.try_get("event_version")?,
            key: opt_text("event_key")?,
            payload: text("payload")?,
            status: status(self.try_get("status")?)?,
            attempts: self.try_get("attempts")?,
            max_retries: self.try_get("max_retries")?,
            next_attempt_at: time("next_attempt_at")?,
            last_error: opt_text("last_error")?,
            created_at: time("created_at")?,
            updated_at: time("updated_at")?,
            published_at: opt_time("published_at")?,
            consumed_at: opt_time("consumed_at")?,
            dead_at: opt_time("dead_at")?,
            waiting_since: opt_time("waiting_since")?,
            trace_context: opt_text("trace_context")?,
            dead_reason: opt_text("dead_reason")?,
            parked_at: opt_time("parked_at")?,
        })
    }

    fn claimed_row(&self) -> Result<ClaimedRow, sqlx::Error> {
        Ok(ClaimedRow {
            id: self.try_get("id")?,
            event_id: self.try_get("event_id")?,
            event_type: self.try_get::<DbText, _>("event_type")?.0,
            version: self.try_get("event_version")?,
            key: self.try_get::<Option<DbText>, _>("event_key")?.map(|t| t.0),
            payload: self.try_get::<DbText, _>("payload")?.0,
            attempts: self.try_get("attempts")?,
            created_at: self.try_get::<DbTime, _>("created_at")?.0,
            trace_context: self
                .try_get::<Option<DbText>, _>("trace_context")?
                .map(|t| t.0),
        })
    }

    fn row_state(&self) -> Result<RowState, sqlx::Error> {
        Ok(RowState {
            id: self.try_get("id")?,
            status: status(self.try_get("status")?)?,
            attempts: self.try_get("attempts")?,
            max_retries: self.try_get("max_retries")?,
            key: self.try_get::<Option<DbText>, _>("event_key")?.map(|t| t.0),
            event_type: self.try_get::<DbText, _>("event_type")?.0,
            version: self.try_get("event_version")?,
            payload: self.try_get::<DbText, _>("payload")?.0,
            due: self.try_get::<DbFlag, _>("due")?.0,
            waiting: self.try_get::<DbFlag, _>("waiting")?.0,
            created_at: self.try_get::<DbTime, _>("created_at")?.0,
            published_at: self
                .try_get::<Option<DbTime>, _>("published_at")?
                .map(|t| t.0),
            open_before: self.try_get("open_before")?,
        })
    }
}
