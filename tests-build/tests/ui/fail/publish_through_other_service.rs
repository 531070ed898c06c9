use outbox_runtime::{outbox_event, outbox_service, Outbox, Sqlite};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_service]
pub struct Memory;

#[outbox_event(service = Task, key = task_id)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

// TaskCreated is owned by Task: it goes through Task's outbox, not Memory's.
async fn create_task(outbox: &Outbox<Memory, Sqlite>, conn: &mut sqlx::SqliteConnection) {
    let _ = outbox
        .publish(
            conn,
            &TaskCreated {
                task_id: "t-1".into(),
            },
        )
        .await;
}

fn main() {
    let _ = create_task;
}
