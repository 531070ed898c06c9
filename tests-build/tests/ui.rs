//! Compile-time behaviour of the macros: the error each mistake gives.
//!
//! Only the compile-fail cases go through trybuild, which then runs `cargo check` on its
//! own copy of the dependency tree (no code generation, no linking) against
//! `outbox-runtime` without the `kafka` feature (no librdkafka to build from C): cold,
//! that is a small fraction of the full build. The cases that must compile
//! (`ui/pass/*.rs`) are ordinary test binaries (`tests/pass_*.rs`), built with the rest
//! of the workspace and run by the test runner.
//!
//! Regenerate the `.stderr` snapshots with `TRYBUILD=overwrite cargo test -p tests-build`
//! and read them: each must say the fix and point at the offending token. The toolchain
//! is pinned (rust-toolchain.toml) because rustc's wording changes between versions.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/fail/*.rs");
}
