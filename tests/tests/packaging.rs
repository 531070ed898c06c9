//! The published crates carry what they need, and the users' copies agree with them.
//!
//! The DDL lives inside `outbox-runtime` (`outbox-runtime/migrations/`, compiled in with
//! `include_str!`, so the packaged crate has it); `migrations/` at the top level is the
//! copy users point their migration tools at. They must stay byte for byte the same.

#[test]
fn the_users_migrations_are_the_runtimes() {
    macro_rules! pair {
        ($backend:literal, $file:literal) => {
            (
                concat!($backend, "/", $file),
                include_str!(concat!("../../migrations/", $backend, "/", $file)),
                include_str!(concat!(
                    "../../outbox-runtime/migrations/",
                    $backend,
                    "/",
                    $file
                )),
            )
        };
    }
    let pairs = [
        pair!("postgres", "outbox_table.sql"),
        pair!("mysql", "outbox_table.sql"),
        pair!("sqlite", "outbox_table.sql"),
        pair!("postgres", "inbox_seen.sql"),
        pair!("mysql", "inbox_seen.sql"),
        pair!("sqlite", "inbox_seen.sql"),
    ];
    for (backend, users, runtimes) in pairs {
        assert_eq!(
            users, runtimes,
            "migrations/{backend} differs from outbox-runtime/migrations/{backend}: \
             copy the runtime's file over the users' copy"
        );
    }
}
