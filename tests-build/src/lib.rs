//! UI tests live in tests/: `ui.rs` (trybuild, the compile-fail cases) and `pass_*.rs`
//! (the cases that must compile, as ordinary test binaries).
