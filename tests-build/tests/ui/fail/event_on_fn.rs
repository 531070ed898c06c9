use outbox_runtime::{outbox_event, outbox_service};

#[outbox_service]
pub struct Task;

#[outbox_event(service = Task)]
fn task_created() {}

fn main() {
    task_created();
}
