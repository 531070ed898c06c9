use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, HandlerContext, HandlerError, Outbox, Sqlite,
};
use serde::Deserialize;

#[outbox_service]
pub struct Task;

// Forgot `Serialize`, and the event is published and handled: one error, here, and
// none at its uses (which used to say, falsely, "owned by another service").
#[outbox_event(service = Task)]
#[derive(Deserialize)]
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

pub async fn create_task(outbox: &Outbox<Task, Sqlite>) -> outbox_runtime::Result<()> {
    let mut tx = outbox.begin().await?;
    tx.publish(&TaskCreated {
        task_id: "t-1".into(),
    })
    .await?;
    tx.commit().await?;
    Ok(())
}

fn main() {}
