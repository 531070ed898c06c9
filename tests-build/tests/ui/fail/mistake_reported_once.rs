// One mistake in a service and one in an event: each is reported once, at its token,
// and the code using them (events, handlers) does not fail as well.
use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, HandlerContext, HandlerError, Sqlite,
};
use serde::{Deserialize, Serialize};

#[outbox_service(table = "task-outbox")]
pub struct Task;

#[outbox_event(service = Task, version = 0)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

#[outbox_handler(service = Task)]
async fn on_task_created(
    _ctx: &mut HandlerContext<Sqlite>,
    _event: TaskCreated,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {}
