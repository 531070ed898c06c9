use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, HandlerContext, HandlerError, Sqlite,
};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_event(service = Task, key = task_id)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

pub struct Handlers;

impl Handlers {
    #[outbox_handler]
    async fn on_task_created(
        &self,
        _ctx: &mut HandlerContext<Sqlite>,
        _event: TaskCreated,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

fn main() {}
