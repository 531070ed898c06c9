use outbox_runtime::outbox_service;

#[outbox_service(name = "Task_Service")]
pub struct Task;

fn main() {}
