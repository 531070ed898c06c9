//! The published crates carry what they need, and the users' copies agree with them.
//!
//! The DDL lives inside `outbox-runtime` (`outbox-runtime/migrations/`, compiled in with
//! `include_str!`, so the packaged crate has it); `migrations/` at the top level is the
//! copy users point their migration tools at. They must stay byte for byte the same.

#[test]
fn the_users_migrations_are_the_runtimes() {
    let pairs = [
        (
            "postgres",
            include_str!("../../migrations/postgres/outbox_table.sql"),
            include_str!("../../outbox-runtime/migrations/postgres/outbox_table.sql"),
        ),
        (
            "mysql",
            include_str!("../../migrations/mysql/outbox_table.sql"),
            include_str!("../../outbox-runtime/migrations/mysql/outbox_table.sql"),
        ),
        (
            "sqlite",
            include_str!("../../migrations/sqlite/outbox_table.sql"),
            include_str!("../../outbox-runtime/migrations/sqlite/outbox_table.sql"),
        ),
    ];
    for (backend, users, runtimes) in pairs {
        assert_eq!(
            users, runtimes,
            "migrations/{backend}/outbox_table.sql differs from outbox-runtime/migrations/{backend}/outbox_table.sql: \
             copy the runtime's file over the users' copy"
        );
    }
}
