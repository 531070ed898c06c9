use outbox_runtime::outbox_service;

#[outbox_service(topic = "a.b_c")]
pub struct Task;

fn main() {}
