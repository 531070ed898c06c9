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

#[outbox_event(service = Task, name = "task.renamed", version = 3, max_retries = 5, key = task_id,
    upcast(1 = old::TaskRenamedV1, 2 = old::TaskRenamedV2))]
#[derive(Serialize, Deserialize)]
pub struct TaskRenamed {
    pub task_id: u64,
    pub title: String,
}

// The older versions of `task.renamed`, each converting into the next; paths work.
mod old {
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub struct TaskRenamedV1 {
        pub task_id: u64,
    }

    #[derive(Deserialize)]
    pub struct TaskRenamedV2 {
        pub task_id: u64,
        pub name: String,
    }

    impl From<TaskRenamedV1> for TaskRenamedV2 {
        fn from(v1: TaskRenamedV1) -> Self {
            TaskRenamedV2 {
                task_id: v1.task_id,
                name: String::new(),
            }
        }
    }

    impl From<TaskRenamedV2> for super::TaskRenamed {
        fn from(v2: TaskRenamedV2) -> Self {
            super::TaskRenamed {
                task_id: v2.task_id,
                title: v2.name,
            }
        }
    }
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
    let older: Vec<(u32, String)> = r
        .older_versions
        .iter()
        .map(|o| (o.version, o.rust_type.to_owned()))
        .collect();
    assert_eq!(
        older,
        [
            (1, format!("{}::old::TaskRenamedV1", module_path!())),
            (2, format!("{}::old::TaskRenamedV2", module_path!())),
        ]
    );
    let from_v1 = TaskRenamed::decode(1, br#"{"task_id":9}"#).unwrap();
    assert_eq!((from_v1.task_id, from_v1.title.as_str()), (9, ""));
    let from_v2 = TaskRenamed::decode(2, br#"{"task_id":9,"name":"n"}"#).unwrap();
    assert_eq!(from_v2.title, "n");
    // Without a chain, every version up to the current one reads as the current type.
    assert!(TaskCreated::decode(1, br#"{"task_id":"t","title":"x"}"#).is_ok());
    assert!(TaskCreated::decode(2, br#"{"task_id":"t","title":"x"}"#).is_err());
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
