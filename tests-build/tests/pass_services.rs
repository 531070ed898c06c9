//! The UI pass case `ui/pass/services.rs`, compiled by the workspace build (trybuild
//! only checks the compile-fail cases, see `ui.rs`) and run as a test.

include!("ui/pass/services.rs");

#[test]
fn services() {
    main();
}
