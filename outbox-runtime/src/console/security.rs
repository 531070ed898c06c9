//! What stands between a browser and a change: the operator token, a CSRF token bound
//! to a cookie, and response headers that forbid scripts, framing and caching.
//!
//! A state-changing request is a POST whose form carries the operator token (typed by
//! the operator, compared in constant time) and the CSRF token that equals the
//! `SameSite=Strict`, `HttpOnly` cookie the console set on a page it served (double
//! submit: another site can neither read the cookie nor make the browser send it).
//! Without an operator token in [`super::ConsoleOptions`] the console is read-only and
//! refuses every POST.

use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::Response;

/// The CSRF cookie's name.
pub(super) const CSRF_COOKIE: &str = "outbox_console_csrf";

/// Equal in time that depends on the lengths only.
pub(super) fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random token (128 bits, hex).
pub(super) fn fresh_token() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The CSRF cookie's value in a request, if it has a well-formed one.
pub(super) fn csrf_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == CSRF_COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Why a POST is refused, or `None` if it may proceed.
pub(super) fn refusal(
    operator_token: Option<&str>,
    headers: &HeaderMap,
    form_token: Option<&str>,
    form_csrf: Option<&str>,
) -> Option<&'static str> {
    let Some(expected) = operator_token else {
        return Some("this console is read-only: no operator token is configured");
    };
    let cookie = csrf_cookie(headers);
    match (cookie.as_deref(), form_csrf) {
        (Some(c), Some(f)) if same(c, f) => {}
        _ => {
            return Some(
                "the form's CSRF token is missing or does not match: reload the page and try again",
            )
        }
    }
    match form_token {
        Some(t) if same(t, expected) => None,
        _ => Some("the operator token is missing or wrong"),
    }
}

/// Adds the headers every console response carries.
pub(super) async fn harden(mut response: Response) -> Response {
    let h = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posts_need_both_tokens() {
        let csrf = fresh_token();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {CSRF_COOKIE}={csrf}")).unwrap(),
        );
        assert_eq!(refusal(Some("op"), &headers, Some("op"), Some(&csrf)), None);
        assert!(refusal(None, &headers, Some("op"), Some(&csrf)).is_some());
        assert!(refusal(Some("op"), &headers, Some("no"), Some(&csrf)).is_some());
        assert!(refusal(Some("op"), &headers, None, Some(&csrf)).is_some());
        assert!(refusal(
            Some("op"),
            &headers,
            Some("op"),
            Some("0".repeat(32).as_str())
        )
        .is_some());
        assert!(refusal(Some("op"), &HeaderMap::new(), Some("op"), Some(&csrf)).is_some());
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
