//! The UI pass case `ui/pass/handlers.rs`, compiled by the workspace build (trybuild
//! only checks the compile-fail cases, see `ui.rs`) and run as a test.

include!("ui/pass/handlers.rs");

#[test]
fn handlers() {
    main();
}
