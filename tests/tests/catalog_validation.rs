//! What only linking reveals fails at startup, with ONE error that lists every problem.
//!
//! This test binary deliberately registers conflicting items, as two crates linked
//! into one service could: two event types with the same name, two handlers for one
//! event, an event whose service has no route (a hand-written `Service` that was never
//! registered), plus bad runtime overrides. (Each test file is its own binary, so
//! these registrations do not disturb the other tests.)

use outbox_runtime::{
    outbox_event, outbox_handler, outbox_service, Catalog, HandlerContext, HandlerError, Service,
    Sqlite,
};
use serde::{Deserialize, Serialize};

#[outbox_service]
pub struct Billing;

/// A service implemented by hand and never registered: its events have no route.
pub struct Ghost;
impl Service for Ghost {
    const NAME: &'static str = "ghost";
    const TABLE: &'static str = "";
    const TOPIC: &'static str = "outbox.ghost";
    const GROUP: &'static str = "outbox.ghost.consumer";
}

mod crate_a {
    use super::*;
    /// `InvoiceIssued` as one crate declares it.
    #[outbox_event(service = Billing)]
    #[derive(Serialize, Deserialize)]
    pub struct InvoiceIssued {
        pub id: u64,
    }

    #[outbox_handler]
    async fn on_invoice(
        _ctx: &mut HandlerContext<Sqlite>,
        _e: InvoiceIssued,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

mod crate_b {
    use super::*;
    /// Another crate's type with the same event type name.
    #[outbox_event(service = Billing, name = "InvoiceIssued")]
    #[derive(Serialize, Deserialize)]
    pub struct Invoice {
        pub number: String,
    }

    /// A second handler for crate A's event in the same consumer.
    #[outbox_handler]
    async fn on_invoice_again(
        _ctx: &mut HandlerContext<Sqlite>,
        _e: super::crate_a::InvoiceIssued,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// An event of the unregistered service.
#[outbox_event(service = Ghost)]
#[derive(Serialize, Deserialize)]
pub struct Haunted {
    pub at: String,
}

#[test]
fn startup_validation_lists_every_problem_at_once() {
    let err = Catalog::builder()
        .topic("billing", "bad topic")
        .table("nobody", "x_outbox")
        .build()
        .expect_err("the catalog must be refused");
    let text = err.to_string();
    println!("{text}");
    let expect = [
        "event type `InvoiceIssued` is declared twice",
        "event type `InvoiceIssued` has two handlers in service `billing`",
        "belongs to service `ghost`, which has no route",
        "service `billing`: topic name `bad topic` has a character outside the allowed set",
        "an override names service `nobody`, which is not declared",
    ];
    for e in expect {
        assert!(text.contains(e), "missing problem {e:?} in:\n{text}");
    }
    assert_eq!(err.problems.len(), expect.len(), "{text}");
    // Both declarations are named, so the fix is obvious.
    assert!(
        text.contains("crate_a::InvoiceIssued") && text.contains("crate_b::Invoice"),
        "{text}"
    );
    assert!(
        text.contains("on_invoice") && text.contains("on_invoice_again"),
        "{text}"
    );
    // The global catalog refuses too, with the same problems minus the overrides.
    let global = Catalog::global().expect_err("global catalog is invalid too");
    assert_eq!(global.problems.len(), 3, "{global}");
}
