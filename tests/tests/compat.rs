//! The compatibility check (`outbox_runtime::compat`) on fixtures: each file of
//! `tests/fixtures/compat/` holds a previous and a current catalog export and the
//! breaking changes expected (kind, version, path), none for the non-breaking ones.
//! Then the same check on schemas schemars derives from real types, and the file
//! helper users call from their CI.

use std::path::PathBuf;

use outbox_runtime::compat::{self, FileCheck};
use outbox_runtime::schemars::{self, JsonSchema};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

fn fixtures() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/compat");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("fixture entry").path();
            let text = std::fs::read_to_string(&path).expect("fixture text");
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            (name, serde_json::from_str(&text).expect("fixture JSON"))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_fixture_gives_exactly_its_expected_breaking_changes() {
    let cases = fixtures();
    assert!(cases.len() >= 20, "fixtures found: {}", cases.len());
    let mut failures = Vec::new();
    for (name, case) in &cases {
        let report = compat::check(&case["previous"], &case["current"]);
        let got: Vec<Value> = report
            .breaking
            .iter()
            .map(|c| json!([format!("{:?}", c.kind), c.version, c.path]))
            .collect();
        if got != *case["expect"].as_array().unwrap() {
            failures.push(format!(
                "{name} ({}): expected {}, got {}\n{report}",
                case["about"],
                case["expect"],
                Value::Array(got)
            ));
        }
        // Every report says what to do, in words.
        if !report.is_compatible() {
            assert!(report.to_string().contains("upcast("), "{report}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_breaking_change_names_the_event_version_path_and_change() {
    let case = &fixtures()
        .into_iter()
        .find(|(name, _)| name == "type_changed_in_defs")
        .unwrap()
        .1;
    let report = compat::check(&case["previous"], &case["current"]);
    assert_eq!(
        report.breaking[0].to_string(),
        "`order.placed` v1 $.lines[].qty: type changed: integer (uint32) → string"
    );
}

// The same check on what schemars derives (Option, Vec, nested structs in $defs).

mod v1 {
    use super::*;
    #[derive(Serialize, Deserialize, JsonSchema)]
    #[schemars(crate = "outbox_runtime::schemars")]
    pub struct Order {
        pub id: String,
        pub lines: Vec<Line>,
        pub note: Option<String>,
    }
    #[derive(Serialize, Deserialize, JsonSchema)]
    #[schemars(crate = "outbox_runtime::schemars")]
    pub struct Line {
        pub sku: String,
        pub qty: u32,
    }
}

mod optional_added {
    use super::*;
    #[derive(Serialize, Deserialize, JsonSchema)]
    #[schemars(crate = "outbox_runtime::schemars")]
    pub struct Order {
        pub id: String,
        pub lines: Vec<super::v1::Line>,
        pub note: Option<String>,
        pub coupon: Option<String>,
    }
}

mod qty_text_note_required {
    use super::*;
    #[derive(Serialize, Deserialize, JsonSchema)]
    #[schemars(crate = "outbox_runtime::schemars")]
    pub struct Order {
        pub id: String,
        pub lines: Vec<Line>,
        pub note: String,
    }
    #[derive(Serialize, Deserialize, JsonSchema)]
    #[schemars(crate = "outbox_runtime::schemars")]
    pub struct Line {
        pub sku: String,
        pub qty: String,
    }
}

fn export_of(schema: schemars::Schema) -> Value {
    json!({ "events": [{
        "event_type": "order.placed",
        "version": 1,
        "versions": [{ "version": 1, "schema": schema }],
    }]})
}

#[test]
fn schemas_derived_by_schemars_are_compared_field_by_field() {
    let before = export_of(schemars::schema_for!(v1::Order));
    let fine = compat::check(
        &before,
        &export_of(schemars::schema_for!(optional_added::Order)),
    );
    assert!(fine.is_compatible(), "{fine}");
    let broken = compat::check(
        &before,
        &export_of(schemars::schema_for!(qty_text_note_required::Order)),
    );
    let got: Vec<(String, String)> = broken
        .breaking
        .iter()
        .map(|c| (format!("{:?}", c.kind), c.path.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("TypeChanged".to_owned(), "$.lines[].qty".to_owned()),
            ("TypeChanged".to_owned(), "$.note".to_owned()),
            ("RequiredFieldAdded".to_owned(), "$.note".to_owned()),
        ],
        "{broken}"
    );
}

#[test]
fn the_file_helper_records_first_then_compares() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("outbox-catalog.json");
    let before = export_of(schemars::schema_for!(v1::Order));
    assert_eq!(
        compat::check_file(&path, &before).expect("first run"),
        FileCheck::Recorded
    );
    // Recorded as pretty JSON, ending in a newline, for diffs.
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.ends_with("}\n") && text.contains("\n  \"events\""),
        "{text}"
    );
    compat::assert_compatible(
        &path,
        &export_of(schemars::schema_for!(optional_added::Order)),
    );
    match compat::check_file(
        &path,
        &export_of(schemars::schema_for!(qty_text_note_required::Order)),
    ) {
        Ok(FileCheck::Compared(report)) => assert_eq!(report.breaking.len(), 3, "{report}"),
        other => panic!("expected a comparison, got {other:?}"),
    }
    std::fs::write(&path, "{ not json").unwrap();
    let err = compat::check_file(&path, &before).unwrap_err();
    assert!(err.message.contains("is not JSON"), "{err}");
}
