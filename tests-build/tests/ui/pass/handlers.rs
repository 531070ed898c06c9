// Concrete and generic handlers, with real sqlx writes through the handler's
// transaction; and publishing through the owning service's outbox.
use outbox_runtime::__private::{inventory, HandlerRegistration};
use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, Backend, HandlerContext, HandlerError, Outbox,
    Sqlite,
};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Task;

#[outbox_service]
pub struct Notification;

#[outbox_event(service = Task, key = task_id)]
#[derive(Serialize, Deserialize)]
pub struct TaskCreated {
    pub task_id: String,
    pub title: String,
}

#[outbox_event(service = Notification)]
#[derive(Serialize, Deserialize)]
pub enum NotificationSent {
    Email { to: String },
    Sms { to: String },
}

#[outbox_handler]
async fn on_task_created(
    ctx: &mut HandlerContext<Sqlite>,
    event: TaskCreated,
) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO tasks (id, title) VALUES (?, ?)")
        .bind(&event.task_id)
        .bind(&event.title)
        .execute(ctx.conn())
        .await?;
    if ctx.attempt() > 3 {
        return Err(HandlerError::permanent("gave up"));
    }
    Ok(())
}

// Any error type that converts into `HandlerError`, and the service asserted.
#[outbox_handler(service = Task)]
pub async fn audit_task_created(
    ctx: &mut HandlerContext<Sqlite>,
    TaskCreated { task_id, .. }: TaskCreated,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO audit (event_id, task_id) VALUES (?, ?)")
        .bind(ctx.event_id().to_string())
        .bind(task_id)
        .execute(ctx.conn())
        .await?;
    Ok(())
}

// Generic over the backend: runs on every backend compiled in.
#[outbox_handler(service = Notification)]
async fn on_notification_sent<DB: Backend>(
    ctx: &mut HandlerContext<DB>,
    event: NotificationSent,
) -> Result<(), HandlerError> {
    let to = match event {
        NotificationSent::Email { to } | NotificationSent::Sms { to } => to,
    };
    if to.is_empty() {
        return Err(HandlerError::permanent(format!(
            "no recipient in {}",
            ctx.event_id()
        )));
    }
    tokio_free_yield().await;
    Ok(())
}

// A where clause on the backend parameter is fine too.
#[outbox_handler]
async fn count_notifications<D>(
    _ctx: &mut HandlerContext<D>,
    _event: NotificationSent,
) -> Result<(), HandlerError>
where
    D: Backend + Send,
{
    Ok(())
}

async fn tokio_free_yield() {}

// Compiled out, and its glue and registration with it.
#[outbox_handler]
#[cfg(any())]
async fn compiled_out(
    _ctx: &mut HandlerContext<Sqlite>,
    _event: NoSuchEvent,
) -> Result<(), HandlerError> {
    Ok(())
}

// The event goes through the outbox of the service that owns it.
#[allow(dead_code)]
async fn create_task(
    outbox: &Outbox<Task, Sqlite>,
    conn: &mut sqlx::SqliteConnection,
) -> outbox_runtime::Result<()> {
    outbox
        .publish(
            conn,
            &TaskCreated {
                task_id: "t-1".into(),
                title: "write tests".into(),
            },
        )
        .await?;
    Ok(())
}

fn main() {
    let handlers: Vec<&HandlerRegistration> = inventory::iter::<HandlerRegistration>().collect();
    assert_eq!(handlers.len(), 4, "{handlers:?}");
    let find = |name: &str| {
        let path = format!("{}::{name}", module_path!());
        *handlers.iter().find(|h| h.name == path).unwrap()
    };

    let h = find("on_task_created");
    assert_eq!(
        (h.service, h.event_type, h.event_version),
        ("task", "TaskCreated", 1)
    );
    assert_eq!(h.factory.backends(), ["sqlite"]);
    assert!(h.for_backend::<Sqlite>().is_some());

    let h = find("audit_task_created");
    assert_eq!(h.service, "task");

    let h = find("on_notification_sent");
    assert_eq!(
        (h.service, h.event_type),
        ("notification", "NotificationSent")
    );
    assert_eq!(h.factory.backends(), ["any"]);
    assert!(h.for_backend::<Sqlite>().is_some());

    let h = find("count_notifications");
    assert!(h.for_backend::<Sqlite>().is_some());

    // The handler is still an ordinary fn.
    let _ = on_task_created;
}
