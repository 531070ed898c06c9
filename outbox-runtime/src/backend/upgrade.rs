//! Upgrading tables made by an earlier release: the columns added since 0.1, added by
//! `migrate` to a table that lacks them, before the DDL (whose view names them) runs.
//!
//! A column is added only when the catalog says it is missing, so a `migrate` at every
//! start takes no table lock once the table is current (PostgreSQL's `ADD COLUMN IF NOT
//! EXISTS` would take an exclusive lock every time, and MySQL has no such clause).

use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Type};

use crate::route::TableName;

/// A column added after the first release, with each database's type. Every one is
/// nullable without a default, so adding it rewrites nothing (PostgreSQL 11+, InnoDB
/// instant ADD COLUMN, SQLite).
pub(crate) struct AddedColumn {
    pub name: &'static str,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub postgres: &'static str,
    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    pub mysql: &'static str,
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub sqlite: &'static str,
}

/// The columns added since 0.1, oldest first.
pub(crate) const ADDED_COLUMNS: &[AddedColumn] = &[
    AddedColumn {
        name: "waiting_since",
        postgres: "TIMESTAMPTZ NULL",
        mysql: "DATETIME(6) NULL",
        sqlite: "INTEGER NULL",
    },
    // The publisher's W3C trace context, `traceparent[;tracestate]` (feature `otel`).
    AddedColumn {
        name: "trace_context",
        postgres: "TEXT NULL",
        mysql: "VARCHAR(1024) CHARACTER SET ascii NULL",
        sqlite: "TEXT NULL",
    },
    // The class of a dead row's `last_error` (`DeadReason`), for operators' filters.
    AddedColumn {
        name: "dead_reason",
        postgres: "TEXT NULL",
        mysql: "VARCHAR(32) CHARACTER SET ascii NULL",
        sqlite: "TEXT NULL",
    },
    // Since when an operator has held the row's key (`Admin::park`).
    AddedColumn {
        name: "parked_at",
        postgres: "TIMESTAMPTZ NULL",
        mysql: "DATETIME(6) NULL",
        sqlite: "INTEGER NULL",
    },
];

/// Adds the [`ADDED_COLUMNS`] that `table` lacks. `existing_sql` lists the table's
/// columns (one bind: the table name); no column means no table yet, which the DDL then
/// creates whole. Runs on the caller's connection, under its migration lock.
pub(crate) async fn add_missing_columns<DB>(
    conn: &mut DB::Connection,
    table: &TableName,
    existing_sql: &str,
    column_type: fn(&AddedColumn) -> &'static str,
) -> Result<(), sqlx::Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'r> String: Decode<'r, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
{
    let existing: Vec<String> = sqlx::query_scalar(existing_sql)
        .bind(table.as_str())
        .fetch_all(&mut *conn)
        .await?;
    if existing.is_empty() {
        return Ok(());
    }
    for column in ADDED_COLUMNS {
        if existing.iter().any(|c| c.eq_ignore_ascii_case(column.name)) {
            continue;
        }
        let ddl = format!(
            "ALTER TABLE {table} ADD COLUMN {} {}",
            column.name,
            column_type(column)
        );
        conn.execute(ddl.as_str()).await?;
        tracing::info!(%table, column = column.name, "outbox table upgraded: column added");
    }
    Ok(())
}
