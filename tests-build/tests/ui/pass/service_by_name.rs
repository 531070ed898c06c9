// `service = "active-scheduler"` names the type `ActiveScheduler`.
use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, Event, HandlerContext, HandlerError, Service,
    Sqlite,
};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct ActiveScheduler;

#[outbox_event(service = "active-scheduler", key = slot)]
#[derive(Serialize, Deserialize)]
pub struct SlotFreed {
    pub slot: u32,
}

#[outbox_handler(service = "active-scheduler")]
async fn on_slot_freed(
    _ctx: &mut HandlerContext<Sqlite>,
    _event: SlotFreed,
) -> Result<(), HandlerError> {
    Ok(())
}

fn main() {
    assert_eq!(
        <<SlotFreed as Event>::Service as Service>::NAME,
        "active-scheduler"
    );
}
