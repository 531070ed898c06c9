//! HTML for the console: one escaping function every shown value goes through, and the
//! page layout. No JavaScript anywhere (the Content-Security-Policy forbids it too).

use std::fmt::Write as _;

/// `s` escaped for HTML text and for double- or single-quoted attribute values.
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// `s` escaped for a URL query value (then for HTML, by the caller's `esc` or not:
/// the result has no character HTML needs escaped).
pub(super) fn url_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// `s` cut to `max` characters with `…`.
pub(super) fn short(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_owned(),
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}\
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;\
text-align:left;vertical-align:top}th{background:#f3f3f3}pre{background:#f7f7f7;padding:.5rem;\
white-space:pre-wrap;word-break:break-all}nav a{margin-right:1rem}.num{text-align:right}\
.bad{color:#a00;font-weight:bold}.ok{color:#070}.note{background:#fff6d5;padding:.5rem}\
form.inline{display:inline-block;margin:.25rem .5rem .25rem 0}input,select,button{margin:.1rem}";

/// A whole page: `title` (plain text) and `body` (HTML, already escaped where needed).
pub(super) fn page(console_title: &str, base: &str, title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{title} · {console}</title><style>{STYLE}</style></head><body>\
         <nav><a href=\"{base}/\">Overview</a><a href=\"{base}/audit\">Audit log</a></nav>\
         <h1>{title}</h1>{body}</body></html>",
        title = esc(title),
        console = esc(console_title),
        base = esc(base),
    )
}

/// A table: `header` cells (plain text) and rows of HTML cells.
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::from("<table><tr>");
    for h in header {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_markup_character_is_escaped() {
        assert_eq!(
            esc(r#"<script>alert('x')</script> & "q""#),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(url_value("a b&c=é"), "a%20b%26c%3D%C3%A9");
        assert_eq!(short("abcdef", 3), "abc…");
        let p = page("t", "/x", "<b>", "");
        assert!(p.contains("<h1>&lt;b&gt;</h1>") && !p.contains("<h1><b>"));
    }
}
