use outbox_runtime::outbox_event;
use serde::{Deserialize, Serialize};

#[outbox_event(service = Billing)]
#[derive(Serialize, Deserialize)]
pub struct InvoicePaid {
    pub invoice_id: String,
}

fn main() {}
