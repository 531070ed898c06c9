use outbox_runtime::outbox_service;

#[outbox_service(table = "select")]
pub struct Task;

fn main() {}
