//! Error messages that never carry payload values.
//!
//! serde quotes the offending value in its messages (`invalid type: string
//! "bob@example.com IBAN DE89…", expected u32 at line 1 column 20`), and those messages
//! end up in `last_error` and in logs, which outlive the payload and are read by more
//! people. [`redact_json_error`] keeps what an operator needs to find the fault: the
//! category (syntax, data, eof), line and column, the expected type, and field and
//! variant names from the type's schema. It drops every value taken from the payload.

use std::error::Error as StdError;

use serde_json::error::Category;

/// What replaces a value taken from the payload.
const ELIDED: &str = "…";

/// The message of a `serde_json` error without any value from the input:
/// `data error at line 1 column 20: invalid type: string, expected u32`.
///
/// - syntax, eof and io errors keep serde_json's message (a fixed text that never
///   quotes the input);
/// - `invalid type: <unexpected>, expected <what>` and `invalid value: ...` keep only
///   the kind of the unexpected value (`string`, `integer`, `floating point`,
///   `boolean`, `character`, `sequence`, `map`, ...), then the expected type;
/// - `unknown variant` and `unknown field` drop the name that came from the input
///   and keep the expected names (from the type);
/// - `missing field`, `duplicate field` and `invalid length` are kept (schema names
///   and counts);
/// - any other message (from a hand-written `Deserialize`, say) keeps its words, but
///   every quoted or backticked text before its `, expected` becomes `…`.
pub fn redact_json_error(err: &serde_json::Error) -> String {
    let category = match err.classify() {
        Category::Io => "io",
        Category::Syntax => "syntax",
        Category::Data => "data",
        Category::Eof => "eof",
    };
    let full = err.to_string();
    let position = format!(" at line {} column {}", err.line(), err.column());
    let message = match err.line() {
        0 => full.as_str(),
        _ => full.strip_suffix(&position).unwrap_or(&full),
    };
    let message = match err.classify() {
        Category::Data => redact_data_message(message),
        _ => message.to_owned(),
    };
    match err.line() {
        0 => format!("{category} error: {message}"),
        line => format!(
            "{category} error at line {line} column {}: {message}",
            err.column()
        ),
    }
}

/// The message of `err` and of each of its sources, joined with `: `, with every
/// `serde_json` error in the chain redacted by [`redact_json_error`], also where an
/// outer error repeats its message (`error occurred while decoding column 0: invalid
/// type: string "…"`). A source whose message the previous one already ends with is
/// not repeated.
pub fn redacted_error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut chain = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        chain.push(e);
        next = e.source();
    }
    // (raw message, redacted message) of every JSON error in the chain, the full
    // message before its position-less form, so the longer match is replaced first.
    let mut replacements: Vec<(String, String)> = Vec::new();
    for json in chain.iter().filter_map(|e| json_error(*e)) {
        let redacted = redact_json_error(json);
        let raw = json.to_string();
        let position = format!(" at line {} column {}", json.line(), json.column());
        if let Some(bare) = raw.strip_suffix(&position) {
            replacements.push((bare.to_owned(), redacted.clone()));
        }
        replacements.insert(0, (raw, redacted));
    }
    let mut messages: Vec<String> = Vec::with_capacity(chain.len());
    for e in chain {
        let message = match json_error(e) {
            Some(json) => redact_json_error(json),
            None => replacements
                .iter()
                .fold(e.to_string(), |m, (raw, red)| m.replace(raw.as_str(), red)),
        };
        // An outer error that embeds its source's message already said it.
        if messages.last().is_some_and(|prev| prev.ends_with(&message)) {
            continue;
        }
        messages.push(message);
    }
    messages.join(": ")
}

/// `e` as a `serde_json` error, directly or inside an `io::Error` (serde_json's
/// `From<serde_json::Error> for io::Error` hides it there, and `io::Error::source`
/// skips it).
fn json_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a serde_json::Error> {
    e.downcast_ref::<serde_json::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<serde_json::Error>())
    })
}

/// A data error's message (position already removed) without payload values.
fn redact_data_message(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let (unexpected, expected) = split_expected(rest);
            let kind = unexpected_kind(unexpected);
            return match expected {
                Some(expected) => format!("{prefix}{kind}, expected {expected}"),
                None => format!("{prefix}{kind}"),
            };
        }
    }
    for prefix in ["unknown variant ", "unknown field "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            // `unknown field `x`, expected ...` / `..., there are no fields`: the name
            // came from the input; what follows it comes from the type.
            let tail = rest
                .rfind(", expected ")
                .or_else(|| rest.rfind(", there are no "))
                .map(|at| &rest[at..])
                .unwrap_or("");
            return format!("{prefix}`{ELIDED}`{tail}");
        }
    }
    for prefix in ["missing field `", "duplicate field `"] {
        if message
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix('`'))
            .is_some_and(|name| !name.contains('`'))
        {
            return message.to_owned();
        }
    }
    if let Some(rest) = message.strip_prefix("invalid length ") {
        let (len, expected) = split_expected(rest);
        if !len.is_empty() && len.bytes().all(|c| c.is_ascii_digit()) {
            if let Some(expected) = expected {
                return format!("invalid length {len}, expected {expected}");
            }
        }
    }
    let (head, expected) = split_expected(message);
    let head = elide_quoted(head);
    match expected {
        Some(expected) => format!("{head}, expected {expected}"),
        None => head,
    }
}

/// Splits `<from the input>, expected <from the type>` at the LAST `, expected `: the
/// input part can contain that text (a string value can say anything), the type's
/// description does not.
fn split_expected(text: &str) -> (&str, Option<&str>) {
    match text.rfind(", expected ") {
        Some(at) => (&text[..at], Some(&text[at + ", expected ".len()..])),
        None => (text, None),
    }
}

/// The kind of a serde `Unexpected` as displayed (`string "x"` → `string`,
/// `integer `5`` → `integer`); `…` for a kind it does not know, which may quote the
/// input in its own way.
fn unexpected_kind(unexpected: &str) -> &str {
    // Longest first: `unit variant` before `unit value`'s prefix `unit`.
    const KINDS: &[&str] = &[
        "floating point",
        "newtype variant",
        "newtype struct",
        "struct variant",
        "tuple variant",
        "unit variant",
        "Option value",
        "unit value",
        "byte array",
        "character",
        "sequence",
        "boolean",
        "integer",
        "string",
        "number",
        "null",
        "enum",
        "map",
    ];
    KINDS
        .iter()
        .find(|kind| {
            unexpected
                .strip_prefix(**kind)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
        })
        .copied()
        .unwrap_or(ELIDED)
}

/// `text` with every `"..."` (with `\` escapes) and `` `...` `` span replaced by
/// `…`; an unterminated span runs to the end.
fn elide_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    match c {
                        _ if escaped => escaped = false,
                        '\\' => escaped = true,
                        '"' => break,
                        _ => {}
                    }
                }
                out.push_str(ELIDED);
            }
            '`' => {
                for c in chars.by_ref() {
                    if c == '`' {
                        break;
                    }
                }
                out.push_str(ELIDED);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::de::{Error as _, Unexpected};
    use serde::Deserialize;

    use super::*;

    /// What a leaked payload would look like; no part of it may survive.
    const SECRET: &str = "bob@example.com IBAN DE89370400440532013000";
    const SECRET_PARTS: &[&str] = &["bob", "example.com", "IBAN", "DE89", "370400440532013000"];

    fn assert_clean(redacted: &str) {
        for part in SECRET_PARTS {
            assert!(!redacted.contains(part), "`{part}` leaked: {redacted}");
        }
    }

    /// Redacts the error of decoding `json` into `T`, checks nothing leaked.
    fn redacted<T: serde::de::DeserializeOwned + std::fmt::Debug>(json: &str) -> String {
        let err = serde_json::from_str::<T>(json).expect_err("must not decode");
        let raw = err.to_string();
        let redacted = redact_json_error(&err);
        assert_clean(&redacted);
        println!("{raw}\n  -> {redacted}");
        redacted
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Payment {
        amount: u32,
        account: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Strict {
        amount: u32,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    enum Method {
        Card,
        Transfer,
    }

    #[test]
    fn invalid_type_keeps_the_kind_and_the_expected_type() {
        let json = format!(r#"{{"amount": "{SECRET}", "account": "x"}}"#);
        assert_eq!(
            redacted::<Payment>(&json),
            "data error at line 1 column 56: invalid type: string, expected u32"
        );
        assert_eq!(
            redacted::<Payment>(r#"{"amount": 1, "account": 4111111111111111}"#),
            "data error at line 1 column 41: invalid type: integer, expected a string"
        );
        assert_eq!(
            redacted::<Payment>(r#"{"amount": 1, "account": -4111111111111111}"#),
            "data error at line 1 column 42: invalid type: integer, expected a string"
        );
        assert_eq!(
            redacted::<Payment>(r#"{"amount": 1, "account": 1234.5678}"#),
            "data error at line 1 column 34: invalid type: floating point, expected a string"
        );
        assert_eq!(
            redacted::<Payment>(r#"{"amount": true, "account": "x"}"#),
            "data error at line 1 column 15: invalid type: boolean, expected u32"
        );
        assert_eq!(
            redacted::<Payment>(&format!(r#"{{"amount": ["{SECRET}"], "account": "x"}}"#)),
            "data error at line 1 column 11: invalid type: sequence, expected u32"
        );
        assert_eq!(
            redacted::<Payment>(&format!(
                r#"{{"amount": {{"k": "{SECRET}"}}, "account": "x"}}"#
            )),
            "data error at line 1 column 11: invalid type: map, expected u32"
        );
        assert_eq!(
            redacted::<Payment>(r#"{"amount": null, "account": "x"}"#),
            "data error at line 1 column 15: invalid type: null, expected u32"
        );
        assert_eq!(
            redacted::<Payment>(&format!(r#"["{SECRET}"]"#)),
            "data error at line 1 column 46: invalid type: string, expected u32"
        );
        assert_eq!(
            redacted::<char>(r#""ab""#),
            "data error at line 1 column 4: invalid value: string, expected a character"
        );
    }

    #[test]
    fn invalid_value_keeps_the_kind_and_the_expected_type() {
        assert_eq!(
            redacted::<u8>("4111111111111111"),
            "data error at line 1 column 16: invalid value: integer, expected u8"
        );
        assert_eq!(
            redacted::<i8>("-4111111111111111"),
            "data error at line 1 column 17: invalid value: integer, expected i8"
        );
        // A hand-written Deserialize that quotes the value it refuses, as serde's
        // helpers do, including a string that itself contains `, expected `.
        for unexpected in [
            Unexpected::Str(SECRET),
            Unexpected::Str(&format!("{SECRET}\", expected x, \"{SECRET}")),
            Unexpected::Char('\u{1F4B3}'),
            Unexpected::Bytes(SECRET.as_bytes()),
            Unexpected::Other(SECRET),
        ] {
            let err = serde_json::Error::invalid_value(unexpected, &"an e-mail address");
            let red = redact_json_error(&err);
            assert_clean(&red);
            assert!(red.starts_with("data error: invalid value: "), "{red}");
            assert!(red.ends_with(", expected an e-mail address"), "{red}");
            assert!(!red.contains('\u{1F4B3}'), "{red}");
        }
    }

    #[test]
    fn unknown_names_from_the_input_are_dropped_the_schema_names_kept() {
        assert_eq!(
            redacted::<Method>(&format!(r#""{SECRET}""#)),
            "data error at line 1 column 45: unknown variant `…`, expected `Card` or `Transfer`"
        );
        assert_eq!(
            redacted::<Strict>(&format!(r#"{{"amount": 1, "{SECRET}": 2}}"#)),
            "data error at line 1 column 59: unknown field `…`, expected `amount`"
        );
        #[derive(Debug, Deserialize)]
        enum Never {}
        assert_eq!(
            redacted::<Never>(&format!(r#""{SECRET}""#)),
            "data error at line 1 column 45: unknown variant `…`, there are no variants"
        );
    }

    #[test]
    fn schema_names_and_lengths_are_kept() {
        assert_eq!(
            redacted::<Payment>(&format!(r#"{{"account": "{SECRET}"}}"#)),
            "data error at line 1 column 58: missing field `amount`"
        );
        assert_eq!(
            redacted::<Payment>(&format!(
                r#"{{"amount": 1, "amount": 2, "account": "{SECRET}"}}"#
            )),
            "data error at line 1 column 22: duplicate field `amount`"
        );
        assert_eq!(
            redacted::<(u32, u32)>("[1]"),
            "data error at line 1 column 3: invalid length 1, expected a tuple of size 2"
        );
    }

    #[test]
    fn syntax_and_eof_errors_keep_serde_json_s_fixed_message() {
        assert_eq!(
            redacted::<Payment>(&format!(r#"{{"account": "{SECRET}" oops}}"#)),
            "syntax error at line 1 column 59: expected `,` or `}`"
        );
        assert_eq!(
            redacted::<Payment>("{oops"),
            "syntax error at line 1 column 2: key must be a string"
        );
        assert_eq!(
            redacted::<Payment>(&format!(r#"{{"account": "{SECRET}"#)),
            "eof error at line 1 column 56: EOF while parsing a string"
        );
        assert_eq!(
            redacted::<BTreeMap<String, u32>>(&format!(r#"{{"{SECRET}": 1}} trailing"#)),
            "syntax error at line 1 column 52: trailing characters"
        );
    }

    #[test]
    fn other_messages_lose_their_quoted_text() {
        #[derive(Debug)]
        struct Email;
        impl<'de> Deserialize<'de> for Email {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Err(D::Error::custom(format!(
                    "`{s}` is not an address \"{s}\" of ours, expected user@host"
                )))
            }
        }
        assert_eq!(
            redacted::<Email>(&format!(r#""{SECRET}""#)),
            "data error: … is not an address … of ours, expected user@host"
        );
        let err = serde_json::Error::custom(format!("bad \"{SECRET}\\\" still quoted\" `{SECRET}"));
        assert_eq!(redact_json_error(&err), "data error: bad … …");
    }

    #[test]
    fn chains_are_redacted_where_an_outer_error_repeats_the_inner_message() {
        #[derive(Debug)]
        struct Outer(serde_json::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "error occurred while decoding column 0: {}", self.0)
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let json = format!(r#"{{"amount": "{SECRET}", "account": "x"}}"#);
        let inner = serde_json::from_str::<Payment>(&json).unwrap_err();
        let message = redacted_error_chain(&Outer(inner));
        assert_eq!(
            message,
            "error occurred while decoding column 0: data error at line 1 column 56: invalid \
             type: string, expected u32"
        );
        let inner = serde_json::from_str::<Payment>(&json).unwrap_err();
        let io = std::io::Error::from(inner);
        let message = redacted_error_chain(&io);
        assert_clean(&message);
        assert!(
            message.contains("invalid type: string, expected u32"),
            "{message}"
        );
        // Errors without JSON in them are unchanged.
        let plain = std::io::Error::other("disk full");
        assert_eq!(redacted_error_chain(&plain), "disk full");
    }
}
