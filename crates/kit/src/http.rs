//! HTTP for every service: `/health`, `/ready`, `/metrics`, request tracing and metrics,
//! timeouts, panics turned into 500s, graceful shutdown, and [`ApiError`], the one error
//! type that keeps client errors (4xx, clear text naming the problem) apart from internal
//! ones (500, generic text, logged once).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

/// One readiness condition of a service (broker reachable, partitions assigned, view restored).
#[derive(Debug, Clone, Default)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The readiness conditions of a service; `/ready` is 200 only when all hold.
#[derive(Debug, Clone, Default)]
pub struct Health {
    flags: Arc<Mutex<BTreeMap<String, ReadyFlag>>>,
}

impl Health {
    /// Registers a condition, initially not met.
    pub fn condition(&self, name: impl Into<String>) -> ReadyFlag {
        let flag = ReadyFlag::default();
        self.flags.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.into(), flag.clone());
        flag
    }

    /// Each condition and whether it holds.
    pub fn report(&self) -> BTreeMap<String, bool> {
        self.flags
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.get()))
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.report().values().all(|v| *v)
    }
}

/// The process-wide Prometheus recorder (installed once; services running in one test
/// process share it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
                // A message's age grows with a backlog, to minutes after an outage: buckets
                // that still tell 10 s from an hour.
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("consumer_message_age_seconds".into()),
                        &[
                            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                            900.0, 3600.0,
                        ],
                    )
                })
                .map(PrometheusBuilder::install_recorder)
                .and_then(|r| r)
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    PrometheusBuilder::new().build_recorder().handle()
                });
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .ok();
            handle
        })
        .clone()
}

#[derive(Clone)]
struct OpsState {
    service: &'static str,
    health: Health,
    metrics: PrometheusHandle,
}

/// The routes every service has: `/health`, `/ready`, `/metrics`.
fn ops_routes(service: &'static str, health: Health) -> Router {
    Router::new()
        .route(
            "/health",
            get(|State(s): State<OpsState>| async move { Json(json!({"status": "ok", "service": s.service})) }),
        )
        .route(
            "/ready",
            get(|State(s): State<OpsState>| async move {
                let checks = s.health.report();
                let ready = checks.values().all(|v| *v);
                let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                (status, Json(json!({"ready": ready, "service": s.service, "checks": checks})))
            }),
        )
        .route("/metrics", get(|State(s): State<OpsState>| async move { s.metrics.render() }))
        .with_state(OpsState { service, health, metrics: metrics_handle() })
}

async fn record_metrics(req: Request, next: Next) -> Response {
    let path = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method.clone(), "path" => path.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "path" => path)
        .record(started.elapsed().as_secs_f64());
    response
}

/// A `Content-Encoding` in lower case without surrounding space (`GZIP ` is `gzip`: content
/// codings are case-insensitive), for the decompression layer, which compares bytes.
fn normalize_content_encoding(mut req: Request) -> Request {
    let header = axum::http::header::CONTENT_ENCODING;
    if let Some(value) = req.headers().get(&header).and_then(|v| v.to_str().ok()) {
        let normal = value.trim().to_ascii_lowercase();
        if normal != value
            && let Ok(normal) = axum::http::HeaderValue::from_str(&normal)
        {
            req.headers_mut().insert(header, normal);
        }
    }
    req
}

/// Which web pages may call a service from a browser script: `CORS_ALLOWED_ORIGINS`, a
/// comma-separated list of origins (`https://shop.example,http://localhost:3000`) or `*` for
/// any. Unset, a service sends no CORS headers, and a page on another origin can send only
/// what needs no preflight (a `text/plain` POST, `navigator.sendBeacon`) and read no answer.
///
/// An origin is written as browsers send it (scheme, host, port if not the default); it is
/// stored lower-cased, a default port and a trailing `/` dropped, so that
/// `HTTPS://Shop.example:443/` matches what a browser sends. A path, a query, a user or a
/// wildcard inside a host is refused at start: CORS matches whole origins.
///
/// CORS decides which pages may read answers and send JSON; it is not access control (any
/// non-browser client sends what it likes): the operations endpoints keep their token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Cors {
    /// No CORS headers (the default).
    #[default]
    Off,
    /// `*`: any origin.
    AnyOrigin,
    /// Only these origins, normalized.
    Origins(Vec<String>),
}

impl std::str::FromStr for Cors {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let listed: Vec<&str> = s.split(',').map(str::trim).filter(|o| !o.is_empty()).collect();
        match listed.as_slice() {
            [] => Ok(Cors::Off),
            ["*"] => Ok(Cors::AnyOrigin),
            _ if listed.contains(&"*") => Err("`*` allows any origin and cannot be listed with others".into()),
            _ => {
                let mut origins = Vec::with_capacity(listed.len());
                for origin in listed {
                    let normal = normalize_origin(origin)?;
                    if !origins.contains(&normal) {
                        origins.push(normal);
                    }
                }
                Ok(Cors::Origins(origins))
            }
        }
    }
}

/// An origin as a browser's `Origin` header spells it, or why `origin` is not one.
fn normalize_origin(origin: &str) -> Result<String, String> {
    let not_origin = |why: &str| {
        format!("{origin:?} is not an origin ({why}); write scheme, host and port only, as in https://shop.example")
    };
    let uri: axum::http::Uri = origin.parse().map_err(|e| not_origin(&format!("{e}")))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(not_origin("no scheme or host"));
    };
    if uri.path() != "/" || uri.query().is_some() {
        return Err(not_origin("a path or a query"));
    }
    if authority.as_str().contains('@') {
        return Err(not_origin("a user"));
    }
    let host = authority.host().to_ascii_lowercase();
    if host.is_empty() {
        return Err(not_origin("no host"));
    }
    if host.contains('*') {
        return Err(not_origin("a wildcard; list each origin, or give `*` alone for any"));
    }
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    };
    Ok(match authority.port_u16() {
        Some(port) if Some(port) != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

impl Cors {
    /// `CORS_ALLOWED_ORIGINS` (default: unset, [`Cors::Off`]).
    pub fn from_env(env: &crate::config::Env) -> Result<Self, crate::config::ConfigError> {
        env.get("CORS_ALLOWED_ORIGINS", Cors::Off)
    }

    /// The layer answering preflights and marking answers for the allowed origins. Methods and
    /// request headers are allowed as asked (each route still refuses a method it does not
    /// take, with a `405` the page can read); a browser may keep a preflight's answer an hour.
    fn layer(&self) -> Option<tower_http::cors::CorsLayer> {
        use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};
        let origin = match self {
            Cors::Off => return None,
            Cors::AnyOrigin => AllowOrigin::any(),
            Cors::Origins(origins) => {
                AllowOrigin::list(origins.iter().filter_map(|o| axum::http::HeaderValue::from_str(o).ok()))
            }
        };
        Some(
            CorsLayer::new()
                .allow_origin(origin)
                .allow_methods(AllowMethods::mirror_request())
                .allow_headers(AllowHeaders::mirror_request())
                .max_age(Duration::from_secs(3600)),
        )
    }
}

/// Adds the ops routes and the standard layers to a service's router, and answers browsers'
/// CORS requests as `cors` says.
pub fn app(service: &'static str, health: Health, cors: &Cors, routes: Router) -> Router {
    let routes = routes
        .merge(ops_routes(service, health))
        .fallback(|| async { ApiError::NotFound("no such endpoint".to_owned()) })
        // axum sets the `Allow` header on this answer.
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            ApiError::MethodNotAllowed(format!(
                "{} does not take {method}; the Allow header lists the methods it takes",
                uri.path()
            ))
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        // A body sent with `Content-Encoding: gzip`, `deflate` or `zstd` is read decompressed
        // (the limit above counts the decompressed bytes); any other encoding is left for
        // [`Body`] to refuse with a 415.
        .layer(RequestDecompressionLayer::new().pass_through_unaccepted(true))
        .layer(tower::util::MapRequestLayer::new(normalize_content_encoding))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(15)))
        .layer(CatchPanicLayer::custom(|_| ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()));
    // Outside the other layers, so that every answer (a 4xx, a timeout's 503) carries the
    // CORS headers a page needs to read it, and a preflight is answered before the handler.
    let routes = match cors.layer() {
        Some(cors) => routes.layer(cors),
        None => routes,
    };
    routes
        // Outside the timeout, the caught panic and CORS, so that their answers (a 503, a 500, a
        // preflight's) are counted as the client got them.
        .layer(axum::middleware::from_fn(record_metrics))
        // 5xx answers are logged where they arise (ApiError::Internal); a 503 from /ready while
        // a service starts is not an error worth a log line.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)))
}

/// axum's `Path`, refusing a segment it cannot read (not UTF-8, not of the type) with an
/// [`ApiError`] — JSON naming the problem — instead of axum's plain text.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(e) => Err(rejected(e.status(), e.body_text())),
        }
    }
}

/// The query string read as axum's `Query` reads it, refusing one it cannot read with a `400`
/// whose `field` is the parameter (`?limit=many` is `limit: invalid digit found in string`),
/// instead of axum's plain text.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(Query).map_err(|e| at_path(&e))
    }
}

/// A value that did not deserialize as a `400` whose `field` is where it failed: the path
/// (`ids[2]`, `limit`), the name of a missing field, or `$` for the value as a whole.
fn at_path<E: std::fmt::Display>(e: &serde_path_to_error::Error<E>) -> ApiError {
    let (path, reason) = (e.path().to_string(), e.inner().to_string());
    // A missing field has no path; serde's message names it ("missing field `k`").
    let missing = reason.strip_prefix("missing field `").and_then(|r| r.strip_suffix('`'));
    match (path.as_str(), missing) {
        (".", Some(name)) => ApiError::Invalid { field: name.into(), reason: "is required".into() },
        (".", None) => ApiError::Invalid { field: "$".into(), reason },
        _ => ApiError::Invalid { field: path, reason },
    }
}

/// A request body as a `T`: read as [`json_body`] reads it, then deserialized, a mismatch
/// being a `400` naming where (`ids[2]: invalid type: integer `7`, expected a string`).
pub fn json_as<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(json_body(body)?).map_err(|e| at_path(&e))
}

/// Most bytes a request body may hold, on every route of [`app`]; a larger body is a `413`.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The `Content-Encoding`s a request body may have (one at a time), besides none.
pub const SUPPORTED_ENCODINGS: &str = "gzip, deflate, zstd";

/// A request body's bytes, decompressed ([`app`]), refusing one over [`MAX_BODY_BYTES`] with a
/// `413` naming `$`, one in an encoding not among [`SUPPORTED_ENCODINGS`] with a `415`, and one
/// that cannot be read (a corrupt stream) with a `400`, in JSON instead of axum's plain text.
#[derive(Debug)]
pub struct Body(pub bytes::Bytes);

impl<S> axum::extract::FromRequest<S> for Body
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // What the decompression layer of [`app`] decoded has lost its header; what is left
        // is an encoding this service cannot read.
        if let Some(encoding) = req.headers().get(axum::http::header::CONTENT_ENCODING) {
            let encoding = String::from_utf8_lossy(encoding.as_bytes());
            let encoding = encoding.trim();
            if !encoding.eq_ignore_ascii_case("identity") {
                return Err(ApiError::UnsupportedEncoding(format!(
                    "Content-Encoding {encoding:?} is not supported: send the body as it is, or compressed \
                     with one of {SUPPORTED_ENCODINGS}"
                )));
            }
        }
        match bytes::Bytes::from_request(req, state).await {
            Ok(body) => Ok(Body(body)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::PayloadTooLarge(format!("the body is larger than {MAX_BODY_BYTES} bytes")))
            }
            Err(e) => Err(ApiError::BadRequest(format!("could not read the body: {}", e.body_text()))),
        }
    }
}

/// A `{user_id}` path segment, held to the rules of an event's `userId`
/// ([`events::validate::user_id`]): surrounding whitespace trimmed, so a lookup finds what
/// ingestion stored; an empty, overlong (over 128 characters) or control-character id is a
/// `400` naming `userId`, not an empty answer.
#[derive(Debug)]
pub struct UserId(pub String);

impl<S> axum::extract::FromRequestParts<S> for UserId
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state).await?;
        Ok(UserId(events::validate::user_id(&raw)?.to_owned()))
    }
}

/// An extractor's rejection: the client's mistake as a 400, a route's own (a path parameter
/// the route does not declare) as an internal error.
fn rejected(status: StatusCode, text: String) -> ApiError {
    if status.is_client_error() { ApiError::BadRequest(text) } else { ApiError::Internal(anyhow::anyhow!(text)) }
}

/// Serves `app` on `listener` until `shutdown`, then lets in-flight requests finish.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
}

/// The error type of every HTTP handler.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Input that breaks a rule, naming the field.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The body is compressed in a way the service cannot read.
    #[error("{0}")]
    UnsupportedEncoding(String),
    #[error("{0}")]
    Unauthorized(String),
    /// The endpoint exists but does not take the request's method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A dependency (the broker) is unavailable; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

/// `Json(value)`, or a 404 with `missing()` as the message.
pub fn found<T>(value: Option<T>, missing: impl FnOnce() -> String) -> Result<axum::Json<T>, ApiError> {
    value.map(axum::Json).ok_or_else(|| ApiError::NotFound(missing()))
}

/// A request body as a JSON value, or a `400` (field `$`) saying why it is not one: not
/// UTF-8, not JSON, or an object in it gives a key twice ([`crate::json::value_from_bytes`]).
/// Whatever the `Content-Type`: clients send JSON as `text/plain` or with no type at all.
pub fn json_body(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    crate::json::value_from_bytes(body)
        .map_err(|e| ApiError::Invalid { field: "$".into(), reason: format!("malformed JSON: {e}") })
}

impl From<events::validate::FieldError> for ApiError {
    fn from(e: events::validate::FieldError) -> Self {
        ApiError::Invalid { field: e.field, reason: e.reason }
    }
}

/// The token that operations endpoints changing state require (`OPS_TOKEN`, at least 16
/// characters), sent as `Authorization: Bearer <token>`. Unset, those endpoints are disabled.
#[derive(Clone, Default)]
pub struct OpsToken(Option<std::sync::Arc<str>>);

impl std::fmt::Debug for OpsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "OpsToken(set)" } else { "OpsToken(unset)" })
    }
}

impl OpsToken {
    pub fn new(token: Option<&str>) -> Self {
        Self(token.filter(|t| !t.is_empty()).map(std::sync::Arc::from))
    }

    /// `OPS_TOKEN`, refused at start when shorter than 16 characters.
    pub fn from_env(env: &crate::config::Env) -> Result<Self, crate::config::ConfigError> {
        let token = env.checked("OPS_TOKEN", String::new(), |t: &String| {
            if t.is_empty() || t.chars().count() >= 16 { Ok(()) } else { Err("must be at least 16 characters".into()) }
        })?;
        Ok(Self::new(Some(&token)))
    }

    /// Whether the request carries the token (compared in constant time).
    pub fn check(&self, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.0 else {
            return Err(ApiError::Unauthorized(
                "operations endpoints are disabled: set OPS_TOKEN to enable them".into(),
            ));
        };
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::Unauthorized("send the operations token as `Authorization: Bearer <OPS_TOKEN>`".into())
            })?;
        let (a, b) = (given.as_bytes(), expected.as_bytes());
        let same = a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0;
        if same { Ok(()) } else { Err(ApiError::Unauthorized("wrong operations token".into())) }
    }
}

impl ApiError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            ApiError::Invalid { field, reason } => {
                json!({"error": format!("{field}: {reason}"), "field": field, "reason": reason})
            }
            // The body as a whole is too large: the field is the body, `$`.
            ApiError::PayloadTooLarge(reason) => {
                json!({"error": format!("$: {reason}"), "field": "$", "reason": reason})
            }
            ApiError::UnsupportedEncoding(reason) => {
                json!({"error": reason, "field": "Content-Encoding", "reason": reason})
            }
            ApiError::BadRequest(m)
            | ApiError::NotFound(m)
            | ApiError::Unauthorized(m)
            | ApiError::MethodNotAllowed(m)
            | ApiError::Unavailable(m) => json!({"error": m}),
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                json!({"error": "internal error"})
            }
        };
        (status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;

    async fn get_json(app: Router, path: &str) -> (StatusCode, serde_json::Value) {
        let resp = app.oneshot(Request::get(path).body(Body::empty()).expect("request")).await.expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    /// `GET /metrics`: a 200 with the Prometheus text.
    async fn metrics_text(app: Router) -> String {
        let resp = app.oneshot(Request::get("/metrics").body(Body::empty()).expect("request")).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        String::from_utf8(resp.into_body().collect().await.expect("body").to_bytes().to_vec()).expect("utf8")
    }

    #[tokio::test]
    async fn ready_follows_the_conditions() {
        let health = Health::default();
        let kafka = health.condition("kafka");
        let app = app("svc", health.clone(), &Cors::Off, Router::new());
        let (status, body) = get_json(app.clone(), "/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["checks"]["kafka"], false);
        kafka.set(true);
        let (status, body) = get_json(app.clone(), "/ready").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = get_json(app.clone(), "/health").await;
        assert_eq!((status, body["service"].as_str()), (StatusCode::OK, Some("svc")));
        let (status, body) = get_json(app, "/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "no such endpoint");
    }

    #[tokio::test]
    async fn client_errors_are_json_naming_the_problem() {
        #[derive(serde::Deserialize)]
        struct Q {
            #[allow(dead_code)]
            limit: u32,
        }
        #[derive(serde::Deserialize)]
        struct Ids {
            ids: Vec<String>,
        }
        let routes = Router::new()
            .route("/items", axum::routing::post(|| async { StatusCode::ACCEPTED }))
            .route("/items/{id}", get(|Path(id): Path<String>| async move { id }))
            .route("/search", get(|_: Query<Q>| async { "ok" }))
            .route(
                "/echo",
                axum::routing::post(|super::Body(b): super::Body| async move {
                    json_as::<Ids>(&b).map(|ids| Json(json!({"ids": ids.ids})))
                }),
            );
        let app = app("svc", Health::default(), &Cors::Off, routes);
        let send = |req: Request| {
            let app = app.clone();
            async move {
                let resp = app.oneshot(req).await.expect("response");
                let (status, allow) = (resp.status(), resp.headers().get("allow").cloned());
                let bytes = resp.into_body().collect().await.expect("body").to_bytes();
                (status, allow, serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default())
            }
        };
        let (status, allow, body) = send(Request::delete("/items").body(Body::empty()).expect("request")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(allow.as_ref().map(|v| v.to_str().expect("ascii")), Some("POST"), "the Allow header stays");
        assert_eq!(body["error"], "/items does not take DELETE; the Allow header lists the methods it takes");
        let (status, _, body) = send(Request::get("/items/%FF").body(Body::empty()).expect("request")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body["error"].as_str().is_some_and(|e| e.contains("UTF-8") && e.contains("id")), "{body}");
        let (status, _, body) = send(Request::get("/search?limit=many").body(Body::empty()).expect("request")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            (body["field"].as_str(), body["reason"].as_str()),
            (Some("limit"), Some("invalid digit found in string"))
        );
        let (status, _, body) = send(Request::get("/search?other=1").body(Body::empty()).expect("request")).await;
        assert_eq!((status, body["field"].as_str()), (StatusCode::BAD_REQUEST, Some("limit")), "{body}");
        assert_eq!(body["reason"], "is required");
        let (status, _, body) = send(Request::get("/search?limit=3").body(Body::empty()).expect("request")).await;
        assert_eq!((status, body), (StatusCode::OK, serde_json::Value::Null));
        // A body over the limit: JSON naming the body, not axum's plain text.
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        let (status, _, body) = send(Request::post("/echo").body(Body::from(big)).expect("request")).await;
        assert_eq!((status, body["field"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("$")), "{body}");
        let (status, _, body) =
            send(Request::post("/echo").body(Body::from(r#"{"ids":["a",7]}"#)).expect("request")).await;
        assert_eq!((status, body["field"].as_str()), (StatusCode::BAD_REQUEST, Some("ids[1]")), "{body}");
        let (status, _, body) =
            send(Request::post("/echo").body(Body::from(r#"{"ids":["a"]}"#)).expect("request")).await;
        assert_eq!((status, body["ids"][0].as_str()), (StatusCode::OK, Some("a")), "{body}");
        let (status, _, body) = send(Request::get("/items/a%20b").body(Body::empty()).expect("request")).await;
        assert_eq!((status, body), (StatusCode::OK, serde_json::Value::Null), "a readable segment is decoded");
        let (status, _, body) = send(Request::get("/nope").body(Body::empty()).expect("request")).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::NOT_FOUND, Some("no such endpoint")));
    }

    /// A body compressed the way HTTP clients compress it is read as if sent plain, its size
    /// limit counted decompressed; an encoding the service cannot read is a `415` naming
    /// `Content-Encoding`, a corrupt stream a `400` — never "malformed JSON".
    #[tokio::test]
    async fn compressed_bodies_are_read_and_other_encodings_refused() {
        use std::io::Write as _;
        let routes = Router::new().route(
            "/echo",
            axum::routing::post(
                |super::Body(b): super::Body| async move { json_body(&b).map(|v| Json(json!({"got": v}))) },
            ),
        );
        let app = app("svc", Health::default(), &Cors::Off, routes);
        let send = |encoding: &str, body: Vec<u8>| {
            let req = Request::post("/echo").header("content-encoding", encoding).body(Body::from(body));
            let app = app.clone();
            async move {
                let resp = app.oneshot(req.expect("request")).await.expect("response");
                let status = resp.status();
                let bytes = resp.into_body().collect().await.expect("body").to_bytes();
                (status, serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default())
            }
        };
        let gzip = |plain: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(plain).expect("gzip");
            e.finish().expect("gzip")
        };
        let plain = br#"{"userId":"u1","eventType":"page_view"}"#;
        let deflate = {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(plain).expect("deflate");
            e.finish().expect("deflate")
        };
        let zstd = zstd::encode_all(&plain[..], 3).expect("zstd");
        for (encoding, body) in [("gzip", gzip(plain)), (" GZip", gzip(plain)), ("deflate", deflate), ("zstd", zstd)] {
            let (status, body) = send(encoding, body).await;
            assert_eq!((status, body["got"]["userId"].as_str()), (StatusCode::OK, Some("u1")), "{encoding}: {body}");
        }
        let (status, body) = send("Identity", plain.to_vec()).await;
        assert_eq!((status, body["got"]["userId"].as_str()), (StatusCode::OK, Some("u1")), "{body}");
        for encoding in ["br", "compress", "gzip, zstd", "x-custom"] {
            let (status, body) = send(encoding, gzip(plain)).await;
            assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{encoding}: {body}");
            assert_eq!(body["field"], "Content-Encoding", "{body}");
            assert!(body["error"].as_str().is_some_and(|e| e.contains(encoding) && e.contains("gzip")), "{body}");
        }
        // Not a gzip stream at all, and a stream cut short.
        let (status, body) = send("gzip", plain.to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| e.starts_with("could not read the body")), "{body}");
        let mut cut = gzip(plain);
        cut.truncate(cut.len() / 2);
        let (status, body) = send("gzip", cut).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        // Small on the wire, over the limit decompressed.
        let bomb = gzip(&vec![b' '; MAX_BODY_BYTES + 1]);
        assert!(bomb.len() < MAX_BODY_BYTES / 100);
        let (status, body) = send("gzip", bomb).await;
        assert_eq!((status, body["field"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("$")), "{body}");
    }

    #[test]
    fn allowed_origins_are_read_as_browsers_send_them() {
        let parsed = |s: &str| s.parse::<Cors>();
        assert_eq!(parsed(""), Ok(Cors::Off));
        assert_eq!(parsed(" * "), Ok(Cors::AnyOrigin));
        assert_eq!(
            parsed("HTTPS://Shop.Example:443/, http://localhost:3000,https://shop.example,http://[::1]:80"),
            Ok(Cors::Origins(vec![
                "https://shop.example".into(),
                "http://localhost:3000".into(),
                "http://[::1]".into()
            ]))
        );
        for (bad, says) in [
            ("https://shop.example/cart", "a path"),
            ("https://shop.example?a=1", "a path or a query"),
            ("shop.example", "no scheme"),
            ("https://user@shop.example", "a user"),
            ("https://*.shop.example", "wildcard"),
            ("*, https://shop.example", "cannot be listed"),
            ("https://shop example", "not an origin"),
        ] {
            let e = parsed(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
        let env = crate::config::Env::from_pairs([("CORS_ALLOWED_ORIGINS", "https://shop.example/x")]);
        let e = Cors::from_env(&env).expect_err("a path is refused at start");
        assert_eq!(e.var, "CORS_ALLOWED_ORIGINS");
    }

    /// A preflight from an allowed origin is answered for the method and headers it asks, and
    /// every answer to that origin (a 4xx too) says it may be read; another origin gets no
    /// such header; with CORS off, nothing changes (`OPTIONS` is a 405 as before).
    #[tokio::test]
    async fn browsers_are_answered_for_the_allowed_origins_only() {
        let routes = Router::new().route(
            "/echo",
            axum::routing::post(
                |super::Body(b): super::Body| async move { json_body(&b).map(|v| Json(json!({"got": v}))) },
            ),
        );
        let send = |app: Router, req: axum::http::request::Builder, body: &'static str| async move {
            let resp = app.oneshot(req.body(Body::from(body)).expect("request")).await.expect("response");
            let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
            (
                resp.status(),
                header("access-control-allow-origin"),
                header("access-control-allow-methods"),
                header("access-control-allow-headers"),
            )
        };
        let preflight = |origin: &str| {
            Request::options("/echo")
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "content-type,x-correlation-id")
        };
        let allowed: Cors = "https://shop.example".parse().expect("an origin");
        let shop = app("svc", Health::default(), &allowed, routes.clone());
        let (status, origin, methods, headers) = send(shop.clone(), preflight("https://shop.example"), "").await;
        assert!(status.is_success(), "{status}");
        assert_eq!(origin.as_deref(), Some("https://shop.example"));
        assert_eq!(methods.as_deref(), Some("POST"));
        assert_eq!(headers.as_deref(), Some("content-type,x-correlation-id"));
        let post =
            |origin: &str| Request::post("/echo").header("origin", origin).header("content-type", "application/json");
        let (status, origin, ..) = send(shop.clone(), post("https://shop.example"), r#"{"a":1}"#).await;
        assert_eq!((status, origin.as_deref()), (StatusCode::OK, Some("https://shop.example")));
        let (status, origin, ..) = send(shop.clone(), post("https://shop.example"), "{").await;
        assert_eq!((status, origin.as_deref()), (StatusCode::BAD_REQUEST, Some("https://shop.example")));
        let (_, origin, ..) = send(shop.clone(), preflight("https://elsewhere.example"), "").await;
        assert_eq!(origin, None, "another origin is not allowed");
        let (_, origin, ..) = send(shop.clone(), post("https://elsewhere.example"), r#"{"a":1}"#).await;
        assert_eq!(origin, None, "another origin cannot read the answer");

        let any = app("svc", Health::default(), &Cors::AnyOrigin, routes.clone());
        let (_, origin, ..) = send(any, preflight("https://elsewhere.example"), "").await;
        assert_eq!(origin.as_deref(), Some("*"));

        let off = app("svc", Health::default(), &Cors::Off, routes);
        let (status, origin, ..) = send(off.clone(), preflight("https://shop.example"), "").await;
        assert_eq!((status, origin), (StatusCode::METHOD_NOT_ALLOWED, None));
        let (status, origin, ..) = send(off, post("https://shop.example"), r#"{"a":1}"#).await;
        assert_eq!((status, origin), (StatusCode::OK, None));
    }

    // Paused: the timeout's 15 s pass at once.
    #[tokio::test(start_paused = true)]
    async fn every_answer_is_counted_as_sent() {
        async fn buggy() -> &'static str {
            panic!("a handler's bug")
        }
        async fn slow() -> &'static str {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "too late"
        }
        let routes = Router::new()
            .route("/counted-panic", get(buggy))
            .route("/counted-timeout", get(slow))
            .route("/counted-preflight", axum::routing::post(|| async { "" }));
        let allowed: Cors = "https://shop.example".parse().expect("origins");
        let app = app("svc", Health::default(), &allowed, routes);
        let panicked = app.clone().oneshot(Request::get("/counted-panic").body(Body::empty()).expect("request"));
        assert_eq!(panicked.await.expect("response").status(), StatusCode::INTERNAL_SERVER_ERROR);
        let timed_out = app.clone().oneshot(Request::get("/counted-timeout").body(Body::empty()).expect("request"));
        assert_eq!(timed_out.await.expect("response").status(), StatusCode::SERVICE_UNAVAILABLE);
        let preflight = Request::options("/counted-preflight")
            .header("origin", "https://shop.example")
            .header("access-control-request-method", "POST")
            .body(Body::empty())
            .expect("request");
        assert_eq!(app.clone().oneshot(preflight).await.expect("response").status(), StatusCode::OK);
        let text = metrics_text(app).await;
        for series in [
            r#"http_requests_total{method="GET",path="/counted-panic",status="500"} 1"#,
            r#"http_requests_total{method="GET",path="/counted-timeout",status="503"} 1"#,
            r#"http_requests_total{method="OPTIONS",path="/counted-preflight",status="200"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == series), "{series} in:\n{text}");
        }
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let app = app("svc", Health::default(), &Cors::Off, Router::new());
        let _ = get_json(app.clone(), "/health").await;
        let text = metrics_text(app).await;
        assert!(text.contains("http_requests_total"), "{text}");
    }

    #[test]
    fn client_and_internal_errors_differ() {
        let e: ApiError = events::validate::FieldError::new("userId", "is required").into();
        assert_eq!(e.into_response().status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            ApiError::Internal(anyhow::anyhow!("secret detail")).into_response().status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(ApiError::Unavailable("broker".into()).into_response().status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn operations_need_the_token() {
        use axum::http::HeaderMap;
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(axum::http::header::AUTHORIZATION, v.parse().expect("header"));
            h
        };
        let status = |r: Result<(), ApiError>| r.err().map(|e| e.status().as_u16());
        let off = OpsToken::default();
        assert_eq!(status(off.check(&with("Bearer anything-at-all-12345"))), Some(401));
        let on = OpsToken::new(Some("correct-horse-battery"));
        assert_eq!(status(on.check(&HeaderMap::new())), Some(401));
        assert_eq!(status(on.check(&with("Bearer correct-horse-batterx"))), Some(401));
        assert_eq!(status(on.check(&with("correct-horse-battery"))), Some(401));
        assert_eq!(status(on.check(&with("Bearer correct-horse-battery"))), None);
        assert!(!format!("{on:?}").contains("horse"), "the token is never printed");
        let env = crate::config::Env::from_pairs([("OPS_TOKEN", "short")]);
        assert!(OpsToken::from_env(&env).is_err(), "a short token is refused at start");
    }
}
