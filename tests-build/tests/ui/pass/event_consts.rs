// The constants `#[outbox_event]` sets, read through the `Event` trait.
use outbox_runtime::__private::{HandledBy, PublishedThrough};
use outbox_runtime::{outbox_event, outbox_service, Event, Service};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_event(service = Task, key = task_id)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
}

#[outbox_event(service = Task, name = "task.closed", version = 2, max_retries = 9)]
#[derive(Serialize, Deserialize)]
pub struct TaskClosed {
    pub task_id: String,
}

fn routed<E: PublishedThrough<Task> + HandledBy<Task>>() -> &'static str {
    <<E as Event>::Service as Service>::NAME
}

fn main() {
    assert_eq!(<TaskCreated as Event>::EVENT_TYPE, "TaskCreated");
    assert_eq!(<TaskCreated as Event>::VERSION, 1);
    assert_eq!(<TaskCreated as Event>::MAX_RETRIES, None);
    assert_eq!(<TaskClosed as Event>::EVENT_TYPE, "task.closed");
    assert_eq!(<TaskClosed as Event>::VERSION, 2);
    assert_eq!(<TaskClosed as Event>::MAX_RETRIES, Some(9));
    assert_eq!(routed::<TaskCreated>(), "task");
    assert_eq!(routed::<TaskClosed>(), "task");
}
