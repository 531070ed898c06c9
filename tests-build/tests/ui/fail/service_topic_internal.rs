use outbox_runtime::outbox_service;

#[outbox_service(topic = "__x")]
pub struct Task;

fn main() {}
