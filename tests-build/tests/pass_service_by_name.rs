//! The UI pass case `ui/pass/service_by_name.rs`, compiled by the workspace build (trybuild
//! only checks the compile-fail cases, see `ui.rs`) and run as a test.

include!("ui/pass/service_by_name.rs");

#[test]
fn service_by_name() {
    main();
}
