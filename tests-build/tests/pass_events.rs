//! The UI pass case `ui/pass/events.rs`, compiled by the workspace build (trybuild
//! only checks the compile-fail cases, see `ui.rs`) and run as a test.

include!("ui/pass/events.rs");

#[test]
fn events() {
    main();
}
