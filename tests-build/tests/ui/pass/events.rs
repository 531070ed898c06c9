// Struct and enum events with every option; the values the traits and the registry see.
use outbox_runtime::__private::{inventory, EventRegistration};
use outbox_runtime::{outbox_event, outbox_service, Event, Service};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_service(name = "agent", table = "outbox_events")]
pub struct Agent;

#[outbox_event(service = Task, key = task_id)]
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
    pub title: String,
}

#[outbox_event(service = Task, name = "task.renamed", version = 3, max_retries = 5, key = task_id)]
#[derive(Serialize, Deserialize)]
pub struct TaskRenamed {
    pub task_id: u64,
    pub title: String,
}

// An optional key: `None` publishes without a key.
#[outbox_event(service = Task, key = parent)]
#[derive(Serialize, Deserialize)]
pub struct SubtaskAdded {
    pub parent: Option<u32>,
}

// A raw identifier as the key field.
#[outbox_event(service = Task, key = r#type)]
#[derive(Serialize, Deserialize)]
pub struct TaskTyped {
    pub r#type: String,
}

#[outbox_event(service = Agent, name = "agent.state", max_retries = 0)]
#[derive(Serialize, Deserialize)]
#[serde(tag = "state")]
pub enum AgentState {
    Started { agent_id: String },
    Stopped { agent_id: String, reason: String },
    Idle,
}

// Attributes in either order.
#[derive(Serialize, Deserialize)]
#[outbox_event(service = Agent)]
pub struct AgentPinged;

// Compiled out, and its impls and registration with it.
#[outbox_event(service = NoSuchService)]
#[cfg(any())]
pub struct CompiledOut;

fn service_of<E: Event>() -> &'static str {
    <E::Service as Service>::NAME
}

fn main() {
    let created = TaskCreated {
        task_id: "t-1".into(),
        title: "write tests".into(),
    };
    assert_eq!(created.key().as_deref(), Some("t-1"));
    let renamed = TaskRenamed {
        task_id: 42,
        title: "x".into(),
    };
    assert_eq!(renamed.key().as_deref(), Some("42"));
    assert_eq!(SubtaskAdded { parent: None }.key(), None);
    assert_eq!(SubtaskAdded { parent: Some(7) }.key().as_deref(), Some("7"));
    assert_eq!(
        TaskTyped {
            r#type: "bug".into()
        }
        .key()
        .as_deref(),
        Some("bug")
    );
    assert_eq!(AgentState::Idle.key(), None);
    assert_eq!(AgentPinged.key(), None);

    assert_eq!(service_of::<TaskCreated>(), "task");
    assert_eq!(service_of::<AgentState>(), "agent");

    let registered: Vec<&EventRegistration> = inventory::iter::<EventRegistration>().collect();
    assert_eq!(registered.len(), 6, "{registered:?}");
    let find = |t: &str| *registered.iter().find(|r| r.event_type == t).unwrap();
    let r = find("task.renamed");
    assert_eq!(
        (r.version, r.service, r.service_table),
        (3, "task", "task_outbox")
    );
    assert_eq!((r.max_retries, r.key_field), (Some(5), Some("task_id")));
    assert_eq!(r.rust_type, format!("{}::TaskRenamed", module_path!()));
    let r = find("TaskTyped");
    assert_eq!(r.key_field, Some("type"));
    let r = find("agent.state");
    assert_eq!(
        (r.version, r.service, r.service_table),
        (1, "agent", "outbox_events")
    );
    assert_eq!((r.max_retries, r.key_field), (Some(0), None));
    let r = find("AgentPinged");
    assert_eq!(r.rust_type, format!("{}::AgentPinged", module_path!()));
}
