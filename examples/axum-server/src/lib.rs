//! Glue example: an [`axum`] server that serves the key endpoints of the
//! Matrix client-server API from keyclaim.
//!
//! - `POST /_matrix/client/v3/keys/upload` -> [`KeysApi::upload`]
//! - `POST /_matrix/client/v3/keys/claim` -> [`KeysApi::claim`]
//! - `POST /_matrix/client/v3/keys/reset` and its unstable MSC4162 path
//!   -> [`KeysApi::reset`]
//! - `GET /_matrix/client/v3/sync` -> [`KeysApi::sync`]: only the E2EE key
//!   fields (and a `next_batch`), as the part of `/sync` keyclaim owns. With
//!   `?since=...&timeout=MS` it long-polls until keyclaim reports a change of
//!   the device's keys (R11.1), as a homeserver wakes a device whose keys
//!   were claimed.
//!
//! # NOT real authentication
//!
//! A homeserver maps the access token to (user, device). This example has no
//! accounts: the caller names itself in the [`STAND_IN_AUTH_HEADER`] header,
//! `@user:server DEVICEID`, and is believed. Anyone can act as anyone. Do not
//! expose it beyond a test.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keyclaim::{ApiError, Device, KeyStore, KeysApi};
use serde_json::{Value, json};

/// The stand-in authentication header: `@user:server DEVICEID`.
/// **Not real authentication**: whoever sends it is believed.
pub const STAND_IN_AUTH_HEADER: &str = "x-keyclaim-stand-in-auth";

/// The longest long-poll the sync route grants, in milliseconds.
pub const MAX_SYNC_TIMEOUT_MS: u64 = 30_000;

/// The facade the routes share.
pub type Api = KeysApi<Arc<dyn KeyStore>>;

/// The router serving the endpoints over `api`.
pub fn router(api: Api) -> Router {
    // Let bodies a bit over keyclaim's own limit through, so that keyclaim
    // answers them with its Matrix error (M_TOO_LARGE); far larger ones are
    // cut off by axum and answered the same way.
    let body_limit = api.store().limits().max_body_bytes.saturating_add(1);
    Router::new()
        .route("/_matrix/client/v3/keys/upload", post(keys_upload))
        .route("/_matrix/client/v3/keys/claim", post(keys_claim))
        .route("/_matrix/client/v3/keys/reset", post(keys_reset))
        .route(
            "/_matrix/client/unstable/org.matrix.msc4162/keys/reset",
            post(keys_reset),
        )
        .route("/_matrix/client/v3/sync", get(sync))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(api)
}

fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response {
    (
        status,
        axum::Json(json!({ "errcode": errcode, "error": error })),
    )
        .into_response()
}

fn api_error(err: &ApiError) -> Response {
    if err.status() >= 500 {
        tracing::error!(error = %err, source = ?err.store_error(), "keyclaim failed");
    }
    let status = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(err.to_json())).into_response()
}

fn answer(result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(body) => axum::Json(body).into_response(),
        Err(err) => api_error(&err),
    }
}

fn body_error(rejection: &BytesRejection) -> Response {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        matrix_error(
            StatusCode::BAD_REQUEST,
            "M_TOO_LARGE",
            "request body too large",
        )
    } else {
        matrix_error(
            StatusCode::BAD_REQUEST,
            "M_NOT_JSON",
            "could not read the body",
        )
    }
}

/// The (user, device) the stand-in header names. NOT real authentication.
fn stand_in_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(STAND_IN_AUTH_HEADER)?.to_str().ok()?;
    let (user, device) = value.trim().split_once(' ')?;
    Some((user.to_owned(), device.trim().to_owned()))
}

fn missing_auth() -> Response {
    matrix_error(
        StatusCode::UNAUTHORIZED,
        "M_MISSING_TOKEN",
        "missing stand-in auth header `x-keyclaim-stand-in-auth: @user:server DEVICEID`",
    )
}

/// The stand-in caller and the body of a `POST`, or the error response for a
/// missing header or an unreadable body.
fn caller_and_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(String, String, Bytes), Box<Response>> {
    let (user, device) = stand_in_auth(headers).ok_or_else(|| Box::new(missing_auth()))?;
    let body = body.map_err(|rejection| Box::new(body_error(&rejection)))?;
    Ok((user, device, body))
}

async fn keys_upload(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match caller_and_body(&headers, body) {
        Ok((user, device, body)) => answer(api.upload(&user, &device, &body).await),
        Err(response) => *response,
    }
}

async fn keys_reset(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match caller_and_body(&headers, body) {
        Ok((user, device, body)) => answer(api.reset(&user, &device, &body).await),
        Err(response) => *response,
    }
}

async fn keys_claim(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // The claimer must be logged in, though who it is does not matter here.
    match caller_and_body(&headers, body) {
        Ok((_, _, body)) => answer(api.claim(&body).await),
        Err(response) => *response,
    }
}

/// The query parameters of `/sync` this example reads.
#[derive(Debug, serde::Deserialize)]
pub struct SyncParams {
    /// The token of the previous sync; without it, the answer is immediate.
    pub since: Option<String>,
    /// How long to wait for a change, in milliseconds.
    pub timeout: Option<u64>,
}

async fn sync(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(params): Query<SyncParams>,
) -> Response {
    let Some((user, device)) = stand_in_auth(&headers) else {
        return missing_auth();
    };
    let timeout = params.timeout.unwrap_or(0).min(MAX_SYNC_TIMEOUT_MS);
    if params.since.is_some() && timeout > 0 {
        // Subscribe before the wait begins, so that no change slips between.
        if let Ok(target) = Device::parse(&user, &device) {
            let mut changes = api.store().subscribe();
            let wait = async {
                loop {
                    match changes.recv().await {
                        Ok(changed) if changed.contains(&target) => break,
                        Ok(_) => {}
                        // Lagged: something changed, maybe this device.
                        Err(keyclaim::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(keyclaim::broadcast::error::RecvError::Closed) => break,
                    }
                }
            };
            // Timing out is the normal end of an idle long-poll.
            let _ = tokio::time::timeout(Duration::from_millis(timeout), wait).await;
        }
    }
    answer(api.sync(&user, &device).await.map(|mut fields| {
        if let Value::Object(map) = &mut fields {
            // An opaque token; this example keeps no sync history.
            map.insert("next_batch".to_owned(), json!("keyclaim-e2ee-only"));
        }
        fields
    }))
}

/// Opens the store a URL names (`memory:`, `sqlite:PATH`, `redb:PATH`,
/// `postgres://...`; see `keyclaim-open`).
///
/// # Errors
/// [`keyclaim::Error::InvalidConfig`] for a bad URL, or the backend's
/// errors on opening.
pub async fn open_store(url: &str) -> Result<Arc<dyn KeyStore>, keyclaim::Error> {
    keyclaim_open::open(url).await
}
