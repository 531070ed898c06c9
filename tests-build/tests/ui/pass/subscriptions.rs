// A subscription: Notification handles Task's public event from its own inbox, with
// a handler for one backend and one generic over it; the catalog lists it.

use outbox_runtime::__private::{inventory, HandlerRegistration};
use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, Backend, Catalog, HandlerContext, HandlerError,
    Sqlite,
};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_service]
pub struct Notification;

#[outbox_service(name = "active-scheduler")]
pub struct ActiveScheduler;

#[outbox_event(service = Task, key = task_id, public)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

#[outbox_event(service = Task, key = task_id, public)]
#[derive(Serialize, Deserialize)]
pub struct TaskDone {
    pub task_id: String,
}

#[outbox_handler(subscriber = Notification)]
async fn notify_on_task_created(
    _ctx: &mut HandlerContext<Sqlite>,
    _event: TaskCreated,
) -> Result<(), HandlerError> {
    Ok(())
}

#[outbox_handler(subscriber = "active-scheduler")]
async fn schedule_on_task_done<DB: Backend>(
    _ctx: &mut HandlerContext<DB>,
    _event: TaskDone,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {
    let subscribers: Vec<Option<&str>> = inventory::iter::<HandlerRegistration>()
        .map(|h| h.subscriber)
        .collect();
    assert!(subscribers.contains(&Some("notification")));
    assert!(subscribers.contains(&Some("active-scheduler")));
    let catalog = Catalog::global().expect("the catalog is valid");
    let sub = catalog
        .subscription("notification", "task")
        .expect("listed");
    assert_eq!(sub.inbox, "notification_inbox");
    assert_eq!(sub.group, "outbox.task.subscriber.notification");
    assert_eq!(sub.topic, "outbox.task");
    assert_eq!(sub.handlers.len(), 1);
    let sub = catalog
        .subscription("active-scheduler", "task")
        .expect("listed");
    assert_eq!(sub.inbox, "active_scheduler_inbox");
    assert_eq!(catalog.to_json()["subscriptions"].as_array().map(Vec::len), Some(2));
    assert!(catalog.event("TaskCreated").unwrap().public);
}
