use outbox_runtime::outbox_service;

#[outbox_service(topc = "outbox.task")]
pub struct Task;

fn main() {}
