use outbox_runtime::outbox_service;

#[outbox_service]
pub struct Task {
    pub id: u32,
}

fn main() {}
