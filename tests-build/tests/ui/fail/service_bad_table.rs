use outbox_runtime::outbox_service;

#[outbox_service(table = "task-outbox")]
pub struct Task;

fn main() {}
