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
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
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

/// Adds the ops routes and the standard layers to a service's router.
pub fn app(service: &'static str, health: Health, routes: Router) -> Router {
    routes
        .merge(ops_routes(service, health))
        .fallback(|| async { ApiError::NotFound("no such endpoint".to_owned()) })
        .layer(axum::middleware::from_fn(record_metrics))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(15)))
        .layer(CatchPanicLayer::custom(|_| ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()))
        // 5xx answers are logged where they arise (ApiError::Internal); a 503 from /ready while
        // a service starts is not an error worth a log line.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)))
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
    #[error("{0}")]
    Unauthorized(String),
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

impl From<events::validate::FieldError> for ApiError {
    fn from(e: events::validate::FieldError) -> Self {
        ApiError::Invalid { field: e.field, reason: e.reason }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            ApiError::Invalid { field, reason } => (
                StatusCode::BAD_REQUEST,
                json!({"error": format!("{field}: {reason}"), "field": field, "reason": reason}),
            ),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, json!({"error": m})),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, json!({"error": m})),
            ApiError::PayloadTooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, json!({"error": m})),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, json!({"error": m})),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, json!({"error": m})),
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, json!({"error": "internal error"}))
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

    #[tokio::test]
    async fn ready_follows_the_conditions() {
        let health = Health::default();
        let kafka = health.condition("kafka");
        let app = app("svc", health.clone(), Router::new());
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
    async fn metrics_are_prometheus_text() {
        let app = app("svc", Health::default(), Router::new());
        let _ = get_json(app.clone(), "/health").await;
        let resp = app.oneshot(Request::get("/metrics").body(Body::empty()).expect("request")).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        let text =
            String::from_utf8(resp.into_body().collect().await.expect("body").to_bytes().to_vec()).expect("utf8");
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
}
