// Services with the default names and with every override.
use outbox_runtime::__private::{inventory, ServiceRegistration};
use outbox_runtime::{outbox_service, Service};

#[outbox_service]
pub struct Task;

#[outbox_service]
pub struct ActiveScheduler;

// The legacy shared table.
#[outbox_service(name = "agent", table = "outbox_events")]
pub struct Agent;

#[outbox_service(
    name = "mem",
    table = "memory_outbox_v2",
    topic = "memory-events",
    group = "memory-consumers"
)]
pub struct Memory;

mod nested {
    #[outbox_runtime::outbox_service]
    pub struct Notification;
}

fn main() {
    assert_eq!(Task::NAME, "task");
    assert_eq!(Task::TABLE, "task_outbox");
    assert_eq!(Task::TOPIC, "outbox.task");
    assert_eq!(Task::GROUP, "outbox.task.consumer");

    assert_eq!(ActiveScheduler::NAME, "active-scheduler");
    assert_eq!(ActiveScheduler::TABLE, "active_scheduler_outbox");
    assert_eq!(ActiveScheduler::TOPIC, "outbox.active-scheduler");
    assert_eq!(ActiveScheduler::GROUP, "outbox.active-scheduler.consumer");

    assert_eq!(Agent::NAME, "agent");
    assert_eq!(Agent::TABLE, "outbox_events");
    assert_eq!(Agent::TOPIC, "outbox.agent");
    assert_eq!(Agent::GROUP, "outbox.agent.consumer");

    assert_eq!(Memory::NAME, "mem");
    assert_eq!(Memory::TABLE, "memory_outbox_v2");
    assert_eq!(Memory::TOPIC, "memory-events");
    assert_eq!(Memory::GROUP, "memory-consumers");

    assert_eq!(<nested::Notification as Service>::NAME, "notification");

    let registered: Vec<&ServiceRegistration> = inventory::iter::<ServiceRegistration>().collect();
    assert_eq!(registered.len(), 5, "{registered:?}");
    let agent = registered.iter().find(|r| r.name == "agent").unwrap();
    assert_eq!(agent.table, "outbox_events");
    assert_eq!(agent.rust_type, format!("{}::Agent", module_path!()));
    let notification = registered
        .iter()
        .find(|r| r.name == "notification")
        .unwrap();
    assert_eq!(
        notification.rust_type,
        format!("{}::nested::Notification", module_path!())
    );
}
