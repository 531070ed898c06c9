use outbox_runtime::outbox_event;
use serde::{Deserialize, Serialize};

// `"billing"` means the type `Billing`, which does not exist.
#[outbox_event(service = "billing")]
#[derive(Serialize, Deserialize)]
pub struct InvoicePaid {
    pub invoice_id: String,
}

fn main() {}
