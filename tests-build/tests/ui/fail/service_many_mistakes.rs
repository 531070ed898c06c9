use outbox_runtime::outbox_service;

// Every mistake is reported in one compile, each at its token.
#[outbox_service(name = 5, table = "task-outbox", group = "g", group = "h", topc = "t")]
pub struct Task;

fn main() {}
