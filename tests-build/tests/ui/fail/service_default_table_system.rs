use outbox_runtime::outbox_service;

// The name is fine; the table it derives, `pg_sync_outbox`, is in PostgreSQL's
// system namespace.
#[outbox_service]
pub struct PgSync;

fn main() {}
