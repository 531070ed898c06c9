//! The UI pass case `ui/pass/event_consts.rs`, compiled by the workspace build (trybuild
//! only checks the compile-fail cases, see `ui.rs`) and run as a test.

include!("ui/pass/event_consts.rs");

#[test]
fn event_consts() {
    main();
}
