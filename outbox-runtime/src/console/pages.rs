//! The pages (GET): overview, dead letters, one event, parked keys, audit log; and the
//! pieces the actions render with them (forms, errors).

use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use super::html::{esc, page, short, table, url_value};
use super::security::{csrf_cookie, fresh_token, CSRF_COOKIE};
use super::Shared;
use crate::admin::units::{age, parse_duration};
use crate::admin::Page;
use crate::backend::{Backend, DeadFilter, DeadReason, Status};
use crate::error::Error;
use crate::event::EventId;

/// Rows per page of dead letters.
const PAGE: u32 = 50;

/// The request's CSRF token: its cookie's, or a fresh one the response sets.
pub(super) struct Csrf {
    token: String,
    fresh: bool,
}

impl Csrf {
    pub(super) fn of(headers: &HeaderMap) -> Csrf {
        match csrf_cookie(headers) {
            Some(token) => Csrf {
                token,
                fresh: false,
            },
            None => Csrf {
                token: fresh_token(),
                fresh: true,
            },
        }
    }
}

/// A page response, setting the CSRF cookie if the request had none.
pub(super) fn respond<DB: Backend>(
    c: &Shared<DB>,
    csrf: &Csrf,
    status: StatusCode,
    title: &str,
    body: &str,
) -> Response {
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page(c.title(), c.base(), title, body),
    )
        .into_response();
    if csrf.fresh {
        let cookie = format!(
            "{CSRF_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
            csrf.token
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    response
}

/// An error page: the status an error deserves, its text escaped.
pub(super) fn error_page<DB: Backend>(c: &Shared<DB>, csrf: &Csrf, e: &Error) -> Response {
    let status = match e {
        Error::UnknownService(_) => StatusCode::NOT_FOUND,
        Error::InvalidRequest(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    tracing::warn!(error = %e, "console request failed");
    let body = format!("<p class=\"bad\">{}</p>", esc(&e.to_string()));
    respond(c, csrf, status, "Error", &body)
}

/// A refusal or a bad request, with its reason.
pub(super) fn plain_error<DB: Backend>(
    c: &Shared<DB>,
    csrf: &Csrf,
    status: StatusCode,
    why: &str,
) -> Response {
    let body = format!("<p class=\"bad\">{}</p>", esc(why));
    respond(c, csrf, status, "Refused", &body)
}

/// A POST form for an action, or nothing in a read-only console: the operator token to
/// type, the CSRF token, `hidden` fields, and a confirmation box if `confirm` says what.
pub(super) fn action_form<DB: Backend>(
    c: &Shared<DB>,
    csrf: &Csrf,
    action: &str,
    hidden: &[(&str, &str)],
    button: &str,
    confirm: Option<&str>,
) -> String {
    if !c.options.allows_changes() {
        return String::new();
    }
    let mut f = format!(
        "<form class=\"inline\" method=\"post\" action=\"{}\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(action),
        esc(&csrf.token)
    );
    for (name, value) in hidden {
        let _ = write!(
            f,
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            esc(name),
            esc(value)
        );
    }
    f.push_str(
        "<input type=\"password\" name=\"token\" placeholder=\"operator token\" \
         autocomplete=\"off\" required>",
    );
    if let Some(what) = confirm {
        let _ = write!(
            f,
            "<label><input type=\"checkbox\" name=\"confirm\" value=\"yes\" required> {}</label>",
            esc(what)
        );
    }
    let _ = write!(f, "<button type=\"submit\">{}</button></form>", esc(button));
    f
}

/// Dead-letter filter fields, as a query or a form sends them (every field text, so the
/// same struct reads both).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub(super) struct FilterForm {
    #[serde(rename = "type", default)]
    pub event_type: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub older_than: Option<String>,
    #[serde(default)]
    pub newer_than: Option<String>,
}

fn given(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl FilterForm {
    pub(super) fn filter(&self) -> Result<DeadFilter, Error> {
        let duration = |s: &Option<String>| {
            given(s)
                .map(parse_duration)
                .transpose()
                .map_err(Error::InvalidRequest)
        };
        Ok(DeadFilter {
            event_type: given(&self.event_type).map(str::to_owned),
            reason: given(&self.reason)
                .map(str::parse::<DeadReason>)
                .transpose()
                .map_err(Error::InvalidRequest)?,
            error_contains: given(&self.error).map(str::to_owned),
            key: given(&self.key).map(str::to_owned),
            older_than: duration(&self.older_than)?,
            newer_than: duration(&self.newer_than)?,
        })
    }

    /// The given fields as `(name, value)`, for links and hidden fields.
    pub(super) fn fields(&self) -> Vec<(&'static str, &str)> {
        [
            ("type", &self.event_type),
            ("reason", &self.reason),
            ("error", &self.error),
            ("key", &self.key),
            ("older_than", &self.older_than),
            ("newer_than", &self.newer_than),
        ]
        .into_iter()
        .filter_map(|(name, v)| given(v).map(|v| (name, v)))
        .collect()
    }

    fn query(&self) -> String {
        self.fields()
            .iter()
            .map(|(n, v)| format!("{n}={}", url_value(v)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// What an action did, named in the redirect after it (`?done=<what>&n=<count>`). Only
/// these fixed messages are ever shown, so a crafted link cannot make the console say
/// something of its author's choosing ("enter your token at …").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Done {
    Replayed,
    NotReplayed,
    Discarded,
    NotDiscarded,
    ReplayedMatching,
    Parked,
    NothingHeld,
    Released,
    NotParked,
    /// Anything else: shown as nothing.
    #[serde(other)]
    Unknown,
}

impl Done {
    /// The query value.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Done::Replayed => "replayed",
            Done::NotReplayed => "not_replayed",
            Done::Discarded => "discarded",
            Done::NotDiscarded => "not_discarded",
            Done::ReplayedMatching => "replayed_matching",
            Done::Parked => "parked",
            Done::NothingHeld => "nothing_held",
            Done::Released => "released",
            Done::NotParked => "not_parked",
            Done::Unknown => "unknown",
        }
    }

    fn message(self, n: u64) -> Option<String> {
        Some(match self {
            Done::Replayed => "The event was replayed.".into(),
            Done::NotReplayed => "The event is not dead: nothing was replayed.".into(),
            Done::Discarded => "The event was discarded.".into(),
            Done::NotDiscarded => "The event is not dead: nothing was discarded.".into(),
            Done::ReplayedMatching => format!("Replayed {n} matching dead letters."),
            Done::Parked => format!("The key was parked: {n} events held."),
            Done::NothingHeld => "The key has no pending event: nothing was held.".into(),
            Done::Released => format!("The key was released: {n} events due now."),
            Done::NotParked => "The key is not parked.".into(),
            Done::Unknown => return None,
        })
    }
}

/// The note a redirect after an action asks for.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct Note {
    #[serde(default)]
    done: Option<Done>,
    /// Text, not a number: this struct is also read flattened, where serde sees strings.
    #[serde(default)]
    n: Option<String>,
}

fn note(n: &Note) -> String {
    let count = n.n.as_deref().and_then(|n| n.parse().ok()).unwrap_or(0);
    n.done
        .and_then(|d| d.message(count))
        .map(|m| format!("<p class=\"note\">{}</p>", esc(&m)))
        .unwrap_or_default()
}

fn num(n: u64) -> String {
    format!("<span class=\"num\">{n}</span>")
}

/// `/`: every service at a glance.
pub(super) async fn overview<DB: Backend>(
    State(c): State<Shared<DB>>,
    headers: HeaderMap,
    Query(n): Query<Note>,
) -> Response {
    let csrf = Csrf::of(&headers);
    let all = match c.admin.overview().await {
        Ok(all) => all,
        Err(e) => return error_page(&c, &csrf, &e),
    };
    let base = c.base();
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            let svc = url_value(&s.service);
            vec![
                format!(
                    "<a href=\"{}/services/{svc}/dead\">{}</a>",
                    esc(base),
                    esc(&s.service)
                ),
                esc(&s.table),
                num(s.counts.pending),
                num(s.backlog.due),
                esc(&age(s.backlog.oldest_due)),
                num(s.backlog.unconsumed),
                esc(&age(s.backlog.oldest_unconsumed)),
                num(s.backlog.waiting),
                if s.counts.dead > 0 {
                    format!(
                        "<a class=\"bad\" href=\"{}/services/{svc}/dead\">{}</a>",
                        esc(base),
                        s.counts.dead
                    )
                } else {
                    num(0)
                },
                num(s.counts.discarded),
                num(s.failing_keys),
                format!(
                    "<a href=\"{}/services/{svc}/keys\">{}</a>",
                    esc(base),
                    s.parked_keys
                ),
                num(s.counts.consumed),
            ]
        })
        .collect();
    let mode = if c.options.allows_changes() {
        "Operator actions need the operator token."
    } else {
        "Read-only: no operator token is configured."
    };
    let body = format!(
        "{}<p>{mode}</p>{}",
        note(&n),
        table(
            &[
                "Service",
                "Table",
                "Pending",
                "Due",
                "Oldest due",
                "Unconsumed",
                "Oldest unconsumed",
                "Waiting",
                "Dead",
                "Discarded",
                "Failing keys",
                "Parked keys",
                "Consumed",
            ],
            &rows
        )
    );
    respond(&c, &csrf, StatusCode::OK, "Overview", &body)
}

/// The query of the dead-letter page.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct DeadQuery {
    #[serde(flatten)]
    filter: FilterForm,
    #[serde(default)]
    after: Option<String>,
    #[serde(flatten)]
    note: Note,
}

/// `/services/{service}/dead`: dead letters with filters, a page at a time.
pub(super) async fn dead<DB: Backend>(
    State(c): State<Shared<DB>>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Query(q): Query<DeadQuery>,
) -> Response {
    let csrf = Csrf::of(&headers);
    let result = async {
        let filter = q.filter.filter()?;
        let after = match given(&q.after) {
            Some(a) => Some(a.parse::<i64>().map_err(|_| {
                Error::InvalidRequest(format!("the page cursor `{a}` is not a number"))
            })?),
            None => None,
        };
        let count = c.admin.count_dead(&service, &filter).await?;
        let page = c
            .admin
            .dead_letters(&service, &filter, Page { after, limit: PAGE })
            .await?;
        Ok::<_, Error>((count, page))
    }
    .await;
    let (count, page) = match result {
        Ok(r) => r,
        Err(e) => return error_page(&c, &csrf, &e),
    };
    let base = c.base();
    let svc = url_value(&service);
    let f = &q.filter;
    let input = |name: &str, label: &str, value: &Option<String>, hint: &str| {
        format!(
            "<label>{} <input name=\"{name}\" value=\"{}\" placeholder=\"{}\" size=\"14\"></label> ",
            esc(label),
            esc(value.as_deref().unwrap_or("")),
            esc(hint)
        )
    };
    let mut reasons = String::from("<option value=\"\">any reason</option>");
    for r in DeadReason::ALL {
        let selected = if f.reason.as_deref() == Some(r.as_str()) {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            reasons,
            "<option value=\"{0}\"{selected}>{0}</option>",
            r.as_str()
        );
    }
    let form = format!(
        "<form method=\"get\" action=\"{}/services/{svc}/dead\">{}<label>reason <select name=\"reason\">{reasons}</select></label> {}{}{}{}<button type=\"submit\">Filter</button></form>",
        esc(base),
        input("type", "type", &f.event_type, "event type"),
        input("error", "error contains", &f.error, "text"),
        input("key", "key", &f.key, "event key"),
        input("older_than", "older than", &f.older_than, "e.g. 2h"),
        input("newer_than", "newer than", &f.newer_than, "e.g. 7d"),
    );
    let rows: Vec<Vec<String>> = page
        .rows
        .iter()
        .map(|r| {
            vec![
                format!(
                    "<a href=\"{}/services/{svc}/events/{}\">{}</a>",
                    esc(base),
                    r.event_id,
                    r.event_id
                ),
                esc(&r.event_type),
                esc(r.key.as_deref().unwrap_or("-")),
                esc(&r
                    .dead_at
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default()),
                num(u64::try_from(r.attempts).unwrap_or(0)),
                esc(r.dead_reason.as_deref().unwrap_or("-")),
                esc(&short(r.last_error.as_deref().unwrap_or(""), 160)),
            ]
        })
        .collect();
    let mut body = format!(
        "{}<p><a href=\"{}/services/{svc}/keys\">Parked keys of {}</a></p>{form}<p id=\"count\">{count} dead letters match.</p>",
        note(&q.note),
        esc(base),
        esc(&service),
    );
    if rows.is_empty() {
        body.push_str("<p>No dead letters match.</p>");
    } else {
        body.push_str(&table(
            &[
                "Event id",
                "Type",
                "Key",
                "Dead since",
                "Attempts",
                "Reason",
                "Last error",
            ],
            &rows,
        ));
    }
    if let Some(next) = page.next {
        let query = f.query();
        let sep = if query.is_empty() { "" } else { "&" };
        let _ = write!(
            body,
            "<p><a id=\"next\" href=\"{}/services/{svc}/dead?{}{sep}after={next}\">Next page</a></p>",
            esc(base),
            esc(&query)
        );
    }
    if count > 0 {
        let action = format!("{base}/services/{svc}/replay");
        let form = action_form(
            &c,
            &csrf,
            &action,
            &f.fields(),
            "Replay all matching…",
            None,
        );
        if !form.is_empty() {
            let _ = write!(
                body,
                "<h2>Replay</h2><p>Shows how many first (a dry run), then asks again.</p>{form}"
            );
        }
    }
    respond(
        &c,
        &csrf,
        StatusCode::OK,
        &format!("Dead letters of {service}"),
        &body,
    )
}

/// `/services/{service}/events/{id}`: one event, whole.
pub(super) async fn event<DB: Backend>(
    State(c): State<Shared<DB>>,
    headers: HeaderMap,
    Path((service, id)): Path<(String, String)>,
    Query(n): Query<Note>,
) -> Response {
    let csrf = Csrf::of(&headers);
    let Ok(uuid) = Uuid::parse_str(&id) else {
        return plain_error(&c, &csrf, StatusCode::BAD_REQUEST, "not an event id");
    };
    let detail = match c.admin.event(&service, EventId(uuid)).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            let why = format!("service {service} has no event {uuid}");
            return plain_error(&c, &csrf, StatusCode::NOT_FOUND, &why);
        }
        Err(e) => return error_page(&c, &csrf, &e),
    };
    let r = &detail.row;
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
    };
    let fields: Vec<Vec<String>> = [
        ("Event id", r.event_id.to_string()),
        ("Service", r.service.clone()),
        ("Type", r.event_type.clone()),
        ("Version", r.version.to_string()),
        ("Key", r.key.clone().unwrap_or_else(|| "-".into())),
        ("Status", r.status.as_str().to_owned()),
        (
            "Reason",
            r.dead_reason.clone().unwrap_or_else(|| "-".into()),
        ),
        ("Attempts", format!("{} of {}", r.attempts, r.max_retries)),
        ("Table / row", format!("{} / {}", detail.table, r.id)),
        ("Topic", detail.topic.clone()),
        ("Created", r.created_at.to_rfc3339()),
        ("Published", time(r.published_at)),
        ("Consumed", time(r.consumed_at)),
        ("Dead", time(r.dead_at)),
        ("Parked", time(r.parked_at)),
        ("Next attempt", r.next_attempt_at.to_rfc3339()),
        (
            "Trace context",
            r.trace_context.clone().unwrap_or_else(|| "-".into()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| vec![esc(k), esc(&v)])
    .collect();
    let mut body = format!(
        "{}{}<h2>Last error</h2><pre id=\"last-error\">{}</pre><h2>Payload</h2><pre id=\"payload\">{}</pre>",
        note(&n),
        table(&["Field", "Value"], &fields),
        esc(r.last_error.as_deref().unwrap_or("-")),
        esc(&r.payload),
    );
    if r.status == Status::Dead {
        let base = format!(
            "{}/services/{}/events/{uuid}",
            c.base(),
            url_value(&service)
        );
        let replay = action_form(
            &c,
            &csrf,
            &format!("{base}/replay"),
            &[],
            "Replay",
            Some("replay this event"),
        );
        let discard = action_form(
            &c,
            &csrf,
            &format!("{base}/discard"),
            &[],
            "Discard",
            Some("set it aside for good"),
        );
        if !replay.is_empty() {
            let _ = write!(body, "<h2>Actions</h2>{replay}{discard}");
        }
    }
    respond(&c, &csrf, StatusCode::OK, &format!("Event {uuid}"), &body)
}

/// `/services/{service}/keys`: parked keys, park and unpark.
pub(super) async fn keys<DB: Backend>(
    State(c): State<Shared<DB>>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Query(n): Query<Note>,
) -> Response {
    let csrf = Csrf::of(&headers);
    let keys = match c.admin.parked(&service).await {
        Ok(k) => k,
        Err(e) => return error_page(&c, &csrf, &e),
    };
    let base = format!("{}/services/{}/keys", c.base(), url_value(&service));
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                esc(&k.key),
                num(k.pending),
                esc(&k.parked_since.to_rfc3339()),
                action_form(
                    &c,
                    &csrf,
                    &format!("{base}/unpark"),
                    &[("key", &k.key)],
                    "Unpark",
                    Some("release"),
                ),
            ]
        })
        .collect();
    let mut body = note(&n);
    if rows.is_empty() {
        body.push_str("<p>No parked keys.</p>");
    } else {
        body.push_str(&table(&["Key", "Pending", "Parked since", ""], &rows));
    }
    if c.options.allows_changes() {
        let form = action_form(
            &c,
            &csrf,
            &format!("{base}/park"),
            &[],
            "Park",
            Some("hold this key's events"),
        )
        .replacen(
            "<input type=\"password\"",
            "<input name=\"key\" placeholder=\"event key\" required> <input type=\"password\"",
            1,
        );
        let _ = write!(body, "<h2>Park a key</h2><p>Its pending events are not published until it is unparked; later ones wait behind them.</p>{form}");
    }
    respond(
        &c,
        &csrf,
        StatusCode::OK,
        &format!("Parked keys of {service}"),
        &body,
    )
}

/// `/audit`: what operators did.
pub(super) async fn audit<DB: Backend>(
    State(c): State<Shared<DB>>,
    headers: HeaderMap,
) -> Response {
    let csrf = Csrf::of(&headers);
    let entries = match c.admin.audit_log(None, 200).await {
        Ok(e) => e,
        Err(e) => return error_page(&c, &csrf, &e),
    };
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                esc(&e.at.format("%Y-%m-%d %H:%M:%S").to_string()),
                esc(&e.actor),
                esc(&e.action),
                esc(&e.service),
                num(e.affected),
                esc(&short(&e.target, 200)),
            ]
        })
        .collect();
    let body = if rows.is_empty() {
        "<p>Nothing yet.</p>".to_owned()
    } else {
        table(
            &["At", "Actor", "Action", "Service", "Affected", "Target"],
            &rows,
        )
    };
    respond(&c, &csrf, StatusCode::OK, "Audit log", &body)
}
