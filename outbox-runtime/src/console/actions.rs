//! The actions (POST): replay, discard, a filtered replay after its dry run, park and
//! unpark. Each is checked by `security::refusal` first, and answers with a redirect to
//! the page it changed (so a reload does not repeat it).

use std::fmt::Write as _;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use uuid::Uuid;

use super::html::{esc, url_value};
use super::pages::{action_form, error_page, plain_error, respond, Csrf, Done, FilterForm};
use super::security::refusal;
use super::Shared;
use crate::admin::ReplayOptions;
use crate::backend::Backend;
use crate::event::EventId;

/// A filtered replay from the console: at most this many events a second, so a large
/// replay does not flood the handlers that failed on them.
const CONSOLE_REPLAY_RATE: u32 = 500;

/// What an action's form sends.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct ActionForm {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    confirm: Option<String>,
    /// The filter of a filtered replay, or the key (`key`) to park or unpark.
    #[serde(flatten)]
    filter: FilterForm,
}

impl ActionForm {
    fn confirmed(&self) -> bool {
        self.confirm.as_deref() == Some("yes")
    }
}

/// The refusal of a request that lacks the operator token or the CSRF token, if it does.
fn guard<DB: Backend>(c: &Shared<DB>, headers: &HeaderMap, form: &ActionForm) -> Option<Response> {
    let why = refusal(
        c.options.operator_token.as_deref(),
        headers,
        form.token.as_deref(),
        form.csrf.as_deref(),
    )?;
    tracing::warn!(reason = why, "console action refused");
    Some(plain_error(
        c,
        &Csrf::of(headers),
        StatusCode::FORBIDDEN,
        why,
    ))
}

fn unconfirmed<DB: Backend>(c: &Shared<DB>, headers: &HeaderMap) -> Response {
    let why = "tick the confirmation box to do this";
    plain_error(c, &Csrf::of(headers), StatusCode::BAD_REQUEST, why)
}

/// A 303 to `path` with a note saying what was done (one of the fixed [`Done`]s).
fn done(path: &str, what: Done, n: u64) -> Response {
    Redirect::to(&format!("{path}?done={}&n={n}", what.as_str())).into_response()
}

fn event_path<DB: Backend>(c: &Shared<DB>, service: &str, id: Uuid) -> String {
    format!("{}/services/{}/events/{id}", c.base(), url_value(service))
}

/// POST `/services/{service}/events/{id}/replay`.
pub(super) async fn replay_one<DB: Backend>(
    State(c): State<Shared<DB>>,
    headers: HeaderMap,
    Path((service, id)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    one(c, headers, service, id, form, true).await
}

/// POST `/services/{service}/events/{id}/discard`.
pub(super) async fn discard<DB: Backend>(
    State(c): State<Shared<DB>>,
    headers: HeaderMap,
    Path((service, id)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    one(c, headers, service, id, form, false).await
}

async fn one<DB: Backend>(
    c: Shared<DB>,
    headers: HeaderMap,
    service: String,
    id: String,
    form: ActionForm,
    replay: bool,
) -> Response {
    if let Some(refused) = guard(&c, &headers, &form) {
        return refused;
    }
    let csrf = Csrf::of(&headers);
    let Ok(uuid) = Uuid::parse_str(&id) else {
        return plain_error(&c, &csrf, StatusCode::BAD_REQUEST, "not an event id");
    };
    if !form.confirmed() {
        return unconfirmed(&c, &headers);
    }
    let result = if replay {
        c.admin.replay(&service, EventId(uuid)).await
    } else {
        c.admin.discard(&service, EventId(uuid)).await
    };
    let changed = match result {
        Ok(changed) => changed,
        Err(e) => return error_page(&c, &csrf, &e),
    };
    let what = match (replay, changed) {
        (true, true) => Done::Replayed,
        (true, false) => Done::NotReplayed,
        (false, true) => Done::Discarded,
        (false, false) => Done::NotDiscarded,
    };
    done(&event_path(&c, &service, uuid), what, u64::from(changed))
}

/// POST `/services/{service}/replay`: without `confirm`, the dry run and a form to
/// confirm; with it, the replay.
pub(super) async fn replay_matching<DB: Backend>(
    State(c): State<Shared<DB>>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Some(refused) = guard(&c, &headers, &form) {
        return refused;
    }
    let csrf = Csrf::of(&headers);
    let filter = match form.filter.filter() {
        Ok(f) => f,
        Err(e) => return error_page(&c, &csrf, &e),
    };
    let dead_path = format!("{}/services/{}/dead", c.base(), url_value(&service));
    if !form.confirmed() {
        let dry = match c
            .admin
            .replay_matching(&service, &filter, &ReplayOptions::dry_run(), |_| {})
            .await
        {
            Ok(r) => r,
            Err(e) => return error_page(&c, &csrf, &e),
        };
        let mut body = format!(
            "<p id=\"dry-run\">Dry run: <strong>{}</strong> dead letters of {} match and would be replayed.</p><ul>",
            dry.matched,
            esc(&service)
        );
        for id in &dry.sample {
            let _ = write!(
                body,
                "<li><a href=\"{}\">{id}</a></li>",
                esc(&event_path(&c, &service, *id))
            );
        }
        body.push_str("</ul>");
        if dry.matched > 0 {
            let mut hidden = form.filter.fields();
            hidden.push(("confirm", "yes"));
            let label = format!("Replay {} events", dry.matched);
            body.push_str(&action_form(
                &c,
                &csrf,
                &format!("{}/services/{}/replay", c.base(), url_value(&service)),
                &hidden,
                &label,
                None,
            ));
        }
        let _ = write!(body, "<p><a href=\"{}\">Back</a></p>", esc(&dead_path));
        return respond(
            &c,
            &csrf,
            StatusCode::OK,
            &format!("Replay dead letters of {service}?"),
            &body,
        );
    }
    let options = ReplayOptions::default().rate(CONSOLE_REPLAY_RATE);
    match c
        .admin
        .replay_matching(&service, &filter, &options, |_| {})
        .await
    {
        Ok(r) => done(&dead_path, Done::ReplayedMatching, r.replayed),
        Err(e) => error_page(&c, &csrf, &e),
    }
}

/// POST `/services/{service}/keys/park`.
pub(super) async fn park<DB: Backend>(
    State(c): State<Shared<DB>>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    hold(c, headers, service, form, true).await
}

/// POST `/services/{service}/keys/unpark`.
pub(super) async fn unpark<DB: Backend>(
    State(c): State<Shared<DB>>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    hold(c, headers, service, form, false).await
}

async fn hold<DB: Backend>(
    c: Shared<DB>,
    headers: HeaderMap,
    service: String,
    form: ActionForm,
    park: bool,
) -> Response {
    if let Some(refused) = guard(&c, &headers, &form) {
        return refused;
    }
    let csrf = Csrf::of(&headers);
    if !form.confirmed() {
        return unconfirmed(&c, &headers);
    }
    let key = form.filter.key.clone().unwrap_or_default();
    let result = if park {
        c.admin.park(&service, &key).await
    } else {
        c.admin.unpark(&service, &key).await
    };
    let n = match result {
        Ok(n) => n,
        Err(e) => return error_page(&c, &csrf, &e),
    };
    let what = match (park, n) {
        (true, 0) => Done::NothingHeld,
        (true, _) => Done::Parked,
        (false, 0) => Done::NotParked,
        (false, _) => Done::Released,
    };
    let keys = format!("{}/services/{}/keys", c.base(), url_value(&service));
    done(&keys, what, n)
}
