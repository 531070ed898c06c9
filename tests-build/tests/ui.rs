//! Compile-time behaviour of the macros: what compiles, and the error each mistake gives.
//!
//! Regenerate the `.stderr` snapshots with `TRYBUILD=overwrite cargo test -p tests-build`
//! and read them: each must say the fix and point at the offending token. The toolchain
//! is pinned (rust-toolchain.toml) because rustc's wording changes between versions.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
