// Names that reach SQL or Kafka are checked types: a table name cannot be built from an
// unchecked string outside the runtime (only `TableName::new`, which applies the
// grammar, builds one).
use outbox_runtime::TableName;

fn main() {
    let _table = TableName("secrets CROSS JOIN (SELECT 1) q".into());
}
