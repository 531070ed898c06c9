use outbox_runtime::outbox_event;
use serde::{Deserialize, Serialize};

// A plain struct, not declared with `#[outbox_service]`.
pub struct Billing;

#[outbox_event(service = Billing)]
#[derive(Serialize, Deserialize)]
pub struct InvoicePaid {
    pub invoice_id: String,
}

fn main() {}
