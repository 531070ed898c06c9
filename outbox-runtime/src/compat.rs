//! The compatibility check: the event catalog of this build against a committed
//! previous one ([`Catalog::to_json`](crate::Catalog::to_json)), before it ships.
//!
//! Rows and records outlive deployments: a row written by yesterday's code is read by
//! today's consumer. So a change of an event's shape that today's type cannot read
//! (a field removed, a field's type changed, a required field added, a field made
//! required, a type, an enum value or `null` no longer accepted) is breaking unless
//! the version was bumped and the previous version is still decodable: declared in
//! the new type's `upcast(...)` chain, with its schema unchanged. An event type that
//! disappears, or whose version goes down, is breaking too. Adding an optional field
//! or making a field optional is not.
//!
//! Schemas come from the export (`versions[].schema`, feature `schema`, types that
//! derive `JsonSchema`); `$ref`s into `$defs`, nested objects, arrays and nullable
//! (`Option`) fields are followed. The comparison is conservative: a changed `format`
//! (`int32` → `int64`) or changed alternatives of a tagged enum count as a type change.
//! A version whose schema was known before and is unknown now is reported, since it
//! can no longer be checked.
//!
//! Pure: no database, no broker. In a test of your own crate:
//!
//! ```no_run
//! #[test]
//! fn events_stay_compatible() {
//!     outbox_runtime::compat::assert_compatible_with_file(concat!(
//!         env!("CARGO_MANIFEST_DIR"),
//!         "/outbox-catalog.json"
//!     ));
//! }
//! ```
//!
//! The first run writes the file (commit it); later runs fail on a breaking change with
//! a report. `OUTBOX_UPDATE_CATALOG=1` records the current export when a change is
//! intended.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde_json::Value;

/// The environment variable that makes [`check_file`] record the current export.
pub const UPDATE_ENV: &str = "OUTBOX_UPDATE_CATALOG";

/// What kind of breaking change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ChangeKind {
    /// The event type is no longer in the catalog.
    EventRemoved,
    /// The current version is lower than before.
    VersionWentDown,
    /// The previous current version is no longer decodable (not in `upcast(...)`).
    VersionNotDecodable,
    /// A field the previous schema had is gone.
    FieldRemoved,
    /// A field's (or the payload's) type, format, enum values or nullability changed.
    TypeChanged,
    /// A field old payloads may lack is now required.
    RequiredFieldAdded,
    /// A version's schema was exported before and is unknown now.
    SchemaMissing,
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChangeKind::EventRemoved => "event type removed",
            ChangeKind::VersionWentDown => "version went down",
            ChangeKind::VersionNotDecodable => "previous version no longer decodable",
            ChangeKind::FieldRemoved => "field removed",
            ChangeKind::TypeChanged => "type changed",
            ChangeKind::RequiredFieldAdded => "required field added",
            ChangeKind::SchemaMissing => "schema missing",
        })
    }
}

/// One breaking change.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BreakingChange {
    /// The event type.
    pub event_type: String,
    /// The schema version it concerns.
    pub version: u32,
    /// Where in the payload (`$`, `$.amount.cents`, `$.lines[]`).
    pub path: String,
    /// What kind of change.
    pub kind: ChangeKind,
    /// What changed, in words.
    pub detail: String,
}

impl fmt::Display for BreakingChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` v{} {}: {}: {}",
            self.event_type, self.version, self.path, self.kind, self.detail
        )
    }
}

/// The result of [`check`]: every breaking change, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompatReport {
    /// The breaking changes; empty when the current export is compatible.
    pub breaking: Vec<BreakingChange>,
}

impl CompatReport {
    /// No breaking change.
    pub fn is_compatible(&self) -> bool {
        self.breaking.is_empty()
    }
}

impl fmt::Display for CompatReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.breaking.is_empty() {
            return f.write_str("no breaking change");
        }
        writeln!(f, "{} breaking change(s):", self.breaking.len())?;
        for change in &self.breaking {
            writeln!(f, "  - {change}")?;
        }
        write!(
            f,
            "rows and records of the previous versions are still in tables and topics: \
             bump the event's `version` and declare the previous one in \
             `upcast(N = TypeVN)` with an `Into` the next version, or undo the change"
        )
    }
}

/// Compares the current catalog export with a previous one (both as
/// [`Catalog::to_json`](crate::Catalog::to_json) writes them).
pub fn check(previous: &Value, current: &Value) -> CompatReport {
    let before = events(previous);
    let now = events(current);
    let mut out = Vec::new();
    for (name, prev) in &before {
        let mut push = |version: u32, path: &str, kind: ChangeKind, detail: String| {
            out.push(BreakingChange {
                event_type: (*name).to_owned(),
                version,
                path: path.to_owned(),
                kind,
                detail,
            })
        };
        let Some(cur) = now.get(name) else {
            push(
                prev.version,
                "$",
                ChangeKind::EventRemoved,
                "the event type is gone; its rows and records would go dead".into(),
            );
            continue;
        };
        if cur.version < prev.version {
            push(
                cur.version,
                "$",
                ChangeKind::VersionWentDown,
                format!(
                    "version {} is below the previous {}",
                    cur.version, prev.version
                ),
            );
            continue;
        }
        if !cur.versions.contains_key(&prev.version) {
            push(
                prev.version,
                "$",
                ChangeKind::VersionNotDecodable,
                format!(
                    "the current version is {} and version {} is not declared in `upcast(...)`: \
                     its rows and records would be read as version {}",
                    cur.version, prev.version, cur.version
                ),
            );
        }
        // Every version known before and now must read what it read before.
        for (version, prev_schema) in &prev.versions {
            let Some(cur_schema) = cur.versions.get(version) else {
                continue;
            };
            match (prev_schema, cur_schema) {
                (None, _) => {}
                (Some(_), None) => push(
                    *version,
                    "$",
                    ChangeKind::SchemaMissing,
                    "the previous export had its schema, this one has none: derive \
                     `JsonSchema` on its type (feature `schema`)"
                        .into(),
                ),
                (Some(p), Some(c)) => {
                    let mut diff = Diff {
                        prev_root: p,
                        cur_root: c,
                        seen: BTreeSet::new(),
                        found: Vec::new(),
                    };
                    diff.compare(p, c, "$".to_owned(), 0);
                    for (path, kind, detail) in diff.found {
                        push(*version, &path, kind, detail);
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    CompatReport { breaking: out }
}

/// An error of [`check_file`]: the file could not be read, parsed or written.
#[derive(Debug)]
pub struct CompatFileError {
    /// What failed, with the path.
    pub message: String,
}

impl fmt::Display for CompatFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CompatFileError {}

/// What [`check_file`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileCheck {
    /// The file did not exist or [`UPDATE_ENV`] was set: the current export was
    /// written to it.
    Recorded,
    /// Compared with the file: the report (possibly with breaking changes).
    Compared(CompatReport),
}

/// Compares `current` with the export recorded in `path`; writes `current` there when
/// the file does not exist or when `OUTBOX_UPDATE_CATALOG` is set (not `0` or empty).
pub fn check_file(path: impl AsRef<Path>, current: &Value) -> Result<FileCheck, CompatFileError> {
    let path = path.as_ref();
    let update = std::env::var_os(UPDATE_ENV).is_some_and(|v| !v.is_empty() && v != "0");
    if update || !path.exists() {
        let mut text = serde_json::to_string_pretty(current).map_err(|e| CompatFileError {
            message: format!("serialising the catalog export: {e}"),
        })?;
        text.push('\n');
        std::fs::write(path, text).map_err(|e| CompatFileError {
            message: format!("writing the catalog export to {}: {e}", path.display()),
        })?;
        return Ok(FileCheck::Recorded);
    }
    let text = std::fs::read_to_string(path).map_err(|e| CompatFileError {
        message: format!(
            "reading the previous catalog export {}: {e}",
            path.display()
        ),
    })?;
    let previous: Value = serde_json::from_str(&text).map_err(|e| CompatFileError {
        message: format!(
            "the previous catalog export {} is not JSON ({}); restore it from version control \
             or record a new one with {UPDATE_ENV}=1",
            path.display(),
            crate::redact::redact_json_error(&e)
        ),
    })?;
    Ok(FileCheck::Compared(check(&previous, current)))
}

/// For a test of your crate: the global catalog's export against the one recorded in
/// `path` ([`check_file`]). Panics with a readable report on a breaking change or when
/// the file cannot be used (or the catalog is invalid).
#[track_caller]
pub fn assert_compatible_with_file(path: impl AsRef<Path>) {
    let catalog = match crate::Catalog::global() {
        Ok(catalog) => catalog,
        Err(e) => panic!("{e}"),
    };
    assert_compatible(path, &catalog.to_json());
}

/// [`assert_compatible_with_file`] for an explicit export (a catalog built with
/// overrides, say).
#[track_caller]
pub fn assert_compatible(path: impl AsRef<Path>, current: &Value) {
    let path = path.as_ref();
    match check_file(path, current) {
        Ok(FileCheck::Recorded) => {}
        Ok(FileCheck::Compared(report)) if report.is_compatible() => {}
        Ok(FileCheck::Compared(report)) => panic!(
            "the event catalog is not compatible with {}: {report}\n\
             (if the change is intended and no row or record of the old shape remains \
             anywhere, record the new export with {UPDATE_ENV}=1)",
            path.display()
        ),
        Err(e) => panic!("{e}"),
    }
}

/// One event type of an export: its current version and every version's schema.
struct EventVersions {
    version: u32,
    versions: BTreeMap<u32, Option<Value>>,
}

fn events(export: &Value) -> BTreeMap<&str, EventVersions> {
    let mut out = BTreeMap::new();
    for e in export["events"].as_array().into_iter().flatten() {
        let (Some(name), Some(version)) = (e["event_type"].as_str(), as_u32(&e["version"])) else {
            continue;
        };
        let mut versions = BTreeMap::new();
        for v in e["versions"].as_array().into_iter().flatten() {
            if let Some(n) = as_u32(&v["version"]) {
                let schema = Some(&v["schema"]).filter(|s| !s.is_null()).cloned();
                versions.insert(n, schema);
            }
        }
        // An export from before versions were listed: the current one, schema unknown.
        versions.entry(version).or_insert(None);
        out.insert(name, EventVersions { version, versions });
    }
    out
}

fn as_u32(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// Nesting deeper than this is not compared (a safety net; `$ref` cycles stop sooner).
const MAX_DEPTH: usize = 64;

/// Keys that document a schema without changing what it accepts.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "examples",
    "default",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
];

struct Diff<'a> {
    prev_root: &'a Value,
    cur_root: &'a Value,
    /// `$ref` pairs on the way down, so recursive types stop.
    seen: BTreeSet<(String, String)>,
    found: Vec<(String, ChangeKind, String)>,
}

impl<'a> Diff<'a> {
    fn report(&mut self, path: &str, kind: ChangeKind, detail: String) {
        self.found.push((path.to_owned(), kind, detail));
    }

    fn compare(&mut self, prev: &'a Value, cur: &'a Value, path: String, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        let (prev, prev_ref) = resolve(prev, self.prev_root);
        let (cur, cur_ref) = resolve(cur, self.cur_root);
        if let (Some(p), Some(c)) = (&prev_ref, &cur_ref) {
            if !self.seen.insert((p.clone(), c.clone())) {
                return;
            }
        }
        let prev = Shape::of(prev, self.prev_root);
        let cur = Shape::of(cur, self.cur_root);
        self.compare_shapes(&prev, &cur, &path, depth);
        if let (Some(p), Some(c)) = (prev_ref, cur_ref) {
            self.seen.remove(&(p, c));
        }
    }

    fn compare_shapes(&mut self, prev: &Shape<'a>, cur: &Shape<'a>, path: &str, depth: usize) {
        if prev.nullable && !cur.nullable {
            self.report(
                path,
                ChangeKind::TypeChanged,
                "no longer accepts null".into(),
            );
        }
        if cur.anything {
            return;
        }
        if prev.anything {
            self.report(
                path,
                ChangeKind::TypeChanged,
                format!("accepted any value, now only {}", cur.describe()),
            );
            return;
        }
        if prev.types != cur.types && !(prev.types.is_empty() && cur.types.is_empty()) {
            // An integer is a number: widening is fine.
            let widened = prev.types.iter().all(|t| {
                cur.types.contains(t) || (*t == "integer" && cur.types.contains("number"))
            });
            if !widened {
                self.report(
                    path,
                    ChangeKind::TypeChanged,
                    format!("{} → {}", prev.describe(), cur.describe()),
                );
                return;
            }
        }
        if prev.format != cur.format && cur.format.is_some() {
            self.report(
                path,
                ChangeKind::TypeChanged,
                format!(
                    "format {} → {}",
                    prev.format.unwrap_or("(none)"),
                    cur.format.unwrap_or("(none)")
                ),
            );
        }
        if let (Some(prev_values), Some(cur_values)) = (&prev.values, &cur.values) {
            let gone: Vec<String> = prev_values
                .iter()
                .filter(|v| !cur_values.contains(v))
                .map(|v| v.to_string())
                .collect();
            if !gone.is_empty() {
                self.report(
                    path,
                    ChangeKind::TypeChanged,
                    format!("no longer accepts {}", gone.join(", ")),
                );
            }
        } else if cur.values.is_some() && prev.values.is_none() {
            self.report(
                path,
                ChangeKind::TypeChanged,
                "now restricted to a list of values".into(),
            );
        }
        if prev.alternatives != cur.alternatives {
            let (p, c) = (
                self.canonical_all(&prev.alternatives, self.prev_root),
                self.canonical_all(&cur.alternatives, self.cur_root),
            );
            if p.iter().any(|alt| !c.contains(alt)) {
                self.report(
                    path,
                    ChangeKind::TypeChanged,
                    "an alternative (enum variant) was removed or changed".into(),
                );
            }
        }
        if let (Some(prev_props), Some(cur_props)) = (prev.properties, cur.properties) {
            for (name, prev_field) in prev_props {
                let field_path = format!("{path}.{name}");
                match cur_props.get(name) {
                    None => self.report(
                        &field_path,
                        ChangeKind::FieldRemoved,
                        format!("field `{name}` is gone"),
                    ),
                    Some(cur_field) => {
                        if cur.required.contains(name.as_str())
                            && !prev.required.contains(name.as_str())
                        {
                            self.report(
                                &field_path,
                                ChangeKind::RequiredFieldAdded,
                                format!(
                                    "field `{name}` was optional and is now required: old \
                                     payloads may lack it"
                                ),
                            );
                        }
                        self.compare(prev_field, cur_field, field_path, depth + 1);
                    }
                }
            }
            for name in cur_props.keys() {
                if !prev_props.contains_key(name) && cur.required.contains(name.as_str()) {
                    self.report(
                        &format!("{path}.{name}"),
                        ChangeKind::RequiredFieldAdded,
                        format!(
                            "new field `{name}` is required: old payloads lack it (make it \
                             an `Option` or give it `#[serde(default)]`)"
                        ),
                    );
                }
            }
        }
        if let (Some(p), Some(c)) = (prev.items, cur.items) {
            self.compare(p, c, format!("{path}[]"), depth + 1);
        }
    }

    fn canonical_all(&self, alternatives: &[&Value], root: &Value) -> Vec<Value> {
        alternatives
            .iter()
            .map(|alt| canonical(alt, root, 0))
            .collect()
    }
}

/// A schema with its `$ref` followed (within the document), and the ref it came from.
fn resolve<'a>(mut node: &'a Value, root: &'a Value) -> (&'a Value, Option<String>) {
    let mut via = None;
    for _ in 0..MAX_DEPTH {
        let Some(reference) = node.get("$ref").and_then(Value::as_str) else {
            break;
        };
        let Some(target) = reference
            .strip_prefix('#')
            .and_then(|pointer| root.pointer(pointer))
        else {
            break;
        };
        via = Some(reference.to_owned());
        node = target;
    }
    (node, via)
}

/// A schema inlined (refs resolved up to a depth) without annotations: for comparing
/// alternatives.
fn canonical(node: &Value, root: &Value, depth: usize) -> Value {
    let (node, _) = resolve(node, root);
    if depth > 16 {
        return node.clone();
    }
    match node {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !ANNOTATIONS.contains(&k.as_str()) && *k != "$defs")
                .map(|(k, v)| (k.clone(), canonical(v, root, depth + 1)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| canonical(v, root, depth + 1))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// What one schema node accepts, as far as the check compares it.
struct Shape<'a> {
    /// `true` / `{}`: anything.
    anything: bool,
    nullable: bool,
    types: BTreeSet<&'a str>,
    format: Option<&'a str>,
    /// `enum` / `const`.
    values: Option<Vec<&'a Value>>,
    /// `anyOf` / `oneOf` alternatives other than `null`.
    alternatives: Vec<&'a Value>,
    properties: Option<&'a serde_json::Map<String, Value>>,
    required: BTreeSet<&'a str>,
    items: Option<&'a Value>,
}

impl<'a> Shape<'a> {
    fn of(node: &'a Value, root: &'a Value) -> Shape<'a> {
        let mut shape = Shape {
            anything: false,
            nullable: false,
            types: BTreeSet::new(),
            format: None,
            values: None,
            alternatives: Vec::new(),
            properties: None,
            required: BTreeSet::new(),
            items: None,
        };
        let map = match node {
            Value::Bool(b) => {
                shape.anything = *b;
                return shape;
            }
            Value::Object(map) => map,
            _ => return shape,
        };
        if map
            .keys()
            .all(|k| ANNOTATIONS.contains(&k.as_str()) || k == "$defs")
        {
            shape.anything = true;
            return shape;
        }
        match map.get("type") {
            Some(Value::String(t)) => {
                shape.types.insert(t.as_str());
            }
            Some(Value::Array(ts)) => shape.types.extend(ts.iter().filter_map(Value::as_str)),
            _ => {}
        }
        if shape.types.remove("null") {
            shape.nullable = true;
        }
        shape.format = map.get("format").and_then(Value::as_str);
        if let Some(Value::Array(values)) = map.get("enum") {
            shape.nullable |= values.iter().any(Value::is_null);
            shape.values = Some(values.iter().filter(|v| !v.is_null()).collect());
        } else if let Some(value) = map.get("const") {
            shape.values = Some(vec![value]);
        }
        shape.properties = map.get("properties").and_then(Value::as_object);
        if let Some(Value::Array(required)) = map.get("required") {
            shape.required = required.iter().filter_map(Value::as_str).collect();
        }
        shape.items = map.get("items");
        for key in ["anyOf", "oneOf"] {
            for alt in map.get(key).and_then(Value::as_array).into_iter().flatten() {
                let (resolved, _) = resolve(alt, root);
                if resolved.get("type").and_then(Value::as_str) == Some("null") {
                    shape.nullable = true;
                } else {
                    shape.alternatives.push(alt);
                }
            }
        }
        // `Option<Struct>`: `anyOf: [{$ref}, {type: null}]`, one alternative: compare
        // it as the node itself.
        if shape.alternatives.len() == 1 && shape.types.is_empty() && shape.properties.is_none() {
            let (inner, _) = resolve(shape.alternatives[0], root);
            let mut inner = Shape::of(inner, root);
            inner.nullable |= shape.nullable;
            return inner;
        }
        shape
    }

    fn describe(&self) -> String {
        let mut types: Vec<&str> = self.types.iter().copied().collect();
        if types.is_empty() && self.properties.is_some() {
            types.push("object");
        }
        if types.is_empty() {
            return "a restricted value".into();
        }
        let mut out = types.join(" or ");
        if let Some(format) = self.format {
            out.push_str(&format!(" ({format})"));
        }
        out
    }
}
