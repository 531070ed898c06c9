//! The UI pass case `ui/pass/subscriptions.rs`, compiled by the workspace build
//! (trybuild only checks the compile-fail cases, see `ui.rs`) and run as a test.

include!("ui/pass/subscriptions.rs");

#[test]
fn subscriptions() {
    main();
}
