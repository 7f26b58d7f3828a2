//! `frontend-ui` (3000): the browser UI, server-rendered with askama.
//!
//! Pages: `/` (dashboard: KPI tiles, funnel, events per minute, offers by action, simulate
//! buttons), `/users/{userId}` (explorer: recommendations with the current offer, features,
//! the ranking explanation, candidates by source), `/dead-letters`. The simulate buttons go
//! through the real ingestion APIs. Every panel fetches from one backend over REST with a
//! short timeout; a backend that is down turns its panel into a clear message while the page
//! still renders. Everything shown is escaped by askama.
//!
//! Backends are configured with `<SERVICE>_URL` variables (see [`Config`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use chrono::Utc;
use events::generate::{Generator, USER_COUNT, user_id as generated_user};
use kit::config::{ConfigError, Env};
use kit::http::ApiError;
use kit::{Context, Service};
use reqwest::Url;
use serde::Deserialize;
use serde_json::{Value, json};

/// The `frontend-ui` service.
pub struct FrontendUi;

/// Where the backends are.
#[derive(Debug, Clone)]
pub struct Config {
    /// `USER_ACTIVITY_URL` (default `http://127.0.0.1:8081`)
    pub user_activity: Url,
    /// `ORDER_URL` (default `http://127.0.0.1:8082`)
    pub order: Url,
    /// `EVENT_PROCESSOR_URL` (default `http://127.0.0.1:8083`)
    pub event_processor: Url,
    /// `ANALYTICS_URL` (default `http://127.0.0.1:8084`)
    pub analytics: Url,
    /// `FEATURE_STORE_URL` (default `http://127.0.0.1:8085`)
    pub feature_store: Url,
    /// `RETRIEVAL_URL` (default `http://127.0.0.1:8086`)
    pub retrieval: Url,
    /// `RANKING_URL` (default `http://127.0.0.1:8087`)
    pub ranking: Url,
    /// `RL_OFFER_URL` (default `http://127.0.0.1:8088`)
    pub rl_offer: Url,
    /// `RECOMMENDATION_API_URL` (default `http://127.0.0.1:8089`)
    pub recommendation_api: Url,
}

impl Config {
    /// Every backend at `127.0.0.1` on its contract port.
    pub fn local() -> Self {
        let at =
            |port: u16| Url::parse(&format!("http://127.0.0.1:{port}")).unwrap_or_else(|_| unreachable!("a valid URL"));
        Self {
            user_activity: at(8081),
            order: at(8082),
            event_processor: at(8083),
            analytics: at(8084),
            feature_store: at(8085),
            retrieval: at(8086),
            ranking: at(8087),
            rl_offer: at(8088),
            recommendation_api: at(8089),
        }
    }
}

impl Service for FrontendUi {
    const NAME: &'static str = "frontend-ui";
    const DEFAULT_PORT: u16 = 3000;
    type Config = Config;

    fn config(env: &Env) -> Result<Config, ConfigError> {
        let d = Config::local();
        Ok(Config {
            user_activity: env.get("USER_ACTIVITY_URL", d.user_activity)?,
            order: env.get("ORDER_URL", d.order)?,
            event_processor: env.get("EVENT_PROCESSOR_URL", d.event_processor)?,
            analytics: env.get("ANALYTICS_URL", d.analytics)?,
            feature_store: env.get("FEATURE_STORE_URL", d.feature_store)?,
            retrieval: env.get("RETRIEVAL_URL", d.retrieval)?,
            ranking: env.get("RANKING_URL", d.ranking)?,
            rl_offer: env.get("RL_OFFER_URL", d.rl_offer)?,
            recommendation_api: env.get("RECOMMENDATION_API_URL", d.recommendation_api)?,
        })
    }

    async fn run(config: Config, ctx: Context) -> anyhow::Result<()> {
        ctx.condition("ui").set(true);
        ctx.serve(router(config)?).await
    }
}

struct Ui {
    config: Config,
    client: reqwest::Client,
}

/// The UI's routes.
pub fn router(config: Config) -> anyhow::Result<Router> {
    let client =
        reqwest::Client::builder().timeout(Duration::from_secs(3)).connect_timeout(Duration::from_secs(1)).build()?;
    Ok(Router::new()
        .route("/", get(dashboard))
        .route("/users", get(find_user))
        .route("/users/{user_id}", get(user_page))
        .route("/dead-letters", get(dead_letters))
        .route("/simulate/session", post(simulate_session))
        .route("/simulate/order", post(simulate_order))
        .route(
            "/static/style.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css")], include_str!("../static/style.css")) }),
        )
        .with_state(Arc::new(Ui { config, client })))
}

/// `base` with `segments` appended, each percent-encoded.
fn endpoint(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

impl Ui {
    /// GETs JSON; any failure becomes a sentence for the panel.
    async fn get(&self, url: Url) -> Result<Value, String> {
        let resp = self.client.get(url.clone()).send().await.map_err(|e| {
            if e.is_timeout() {
                format!("{url} did not answer in time")
            } else {
                format!("{} is unreachable", url.origin().ascii_serialization())
            }
        })?;
        let status = resp.status();
        let body: Value =
            resp.json().await.map_err(|_| format!("{url} answered {status} with a body that is not JSON"))?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(body["error"].as_str().map_or_else(|| format!("{url} answered {status}"), str::to_owned))
        }
    }

    async fn post(&self, url: Url, body: &Value) -> Result<Value, String> {
        let resp = self
            .client
            .post(url.clone())
            .json(body)
            .send()
            .await
            .map_err(|_| format!("{} is unreachable", url.origin().ascii_serialization()))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else {
            Err(body["error"].as_str().map_or_else(|| format!("{url} answered {status}"), str::to_owned))
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    done: Option<String>,
}

/// A message for a finished action: chosen here, never echoed from the query string.
fn flash(q: &PageQuery) -> Option<String> {
    match q.done.as_deref() {
        Some("session") => {
            Some("Shopper session sent through the activity API; the pipeline updates this page within seconds.".into())
        }
        Some("order") => Some("Order sent through the order API.".into()),
        Some("failed") => Some("The simulated traffic could not be sent: the ingestion API is unavailable.".into()),
        _ => None,
    }
}

struct Step {
    label: &'static str,
    count: u64,
    width_pct: u64,
}

struct SummaryView {
    events: u64,
    users: u64,
    sessions: u64,
    orders: u64,
    revenue: f64,
    conversion_pct: f64,
    funnel: Vec<Step>,
    minute_heights: Vec<u64>,
    offers: Vec<(String, u64)>,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct DashboardPage {
    flash: Option<String>,
    summary: Result<SummaryView, String>,
}

fn summary_view(s: &Value) -> SummaryView {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let t = &s["totals"];
    let views = n(&t["productViews"]);
    let steps = [("Product views", views), ("Added to cart", n(&t["addToCart"])), ("Purchases", n(&t["purchases"]))];
    let top = steps.iter().map(|s| s.1).max().unwrap_or(0).max(1);
    let minutes: Vec<u64> =
        s["eventsPerMinute"].as_array().map(|a| a.iter().map(|m| n(&m["events"])).collect()).unwrap_or_default();
    let peak = minutes.iter().copied().max().unwrap_or(0).max(1);
    SummaryView {
        events: n(&s["events"]),
        users: n(&s["users"]),
        sessions: n(&s["sessions"]),
        orders: n(&s["orders"]),
        revenue: s["revenue"].as_f64().unwrap_or(0.0),
        conversion_pct: s["conversionRate"].as_f64().unwrap_or(0.0) * 100.0,
        funnel: steps
            .iter()
            .map(|(label, count)| Step { label, count: *count, width_pct: count * 100 / top })
            .collect(),
        minute_heights: minutes.iter().map(|m| m * 100 / peak).collect(),
        offers: s["offers"].as_object().map(|o| o.iter().map(|(k, v)| (k.clone(), n(v))).collect()).unwrap_or_default(),
    }
}

fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => ApiError::Internal(anyhow::anyhow!("template: {e}")).into_response(),
    }
}

async fn dashboard(State(ui): State<Arc<Ui>>, Query(q): Query<PageQuery>) -> Response {
    let summary =
        ui.get(endpoint(&ui.config.analytics, &["api", "analytics", "summary"])).await.map(|s| summary_view(&s));
    render(&DashboardPage { flash: flash(&q), summary })
}

#[derive(Deserialize)]
struct FindUser {
    id: Option<String>,
}

async fn find_user(Query(q): Query<FindUser>) -> Response {
    match q.id.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => {
            Redirect::to(endpoint(&Url::parse("http://ui/users").unwrap_or_else(|_| unreachable!()), &[id]).path())
                .into_response()
        }
        None => Redirect::to("/").into_response(),
    }
}

struct RecItem {
    rank: u64,
    item_id: String,
    name: String,
    category: String,
    price: f64,
    score: f64,
    sources: String,
}

struct RecsView {
    cold_start: bool,
    model_version: String,
    offer: Option<String>,
    items: Vec<RecItem>,
}

struct Explained {
    item: String,
    score: f64,
    contributions: String,
}

#[derive(Template)]
#[template(path = "user.html")]
struct UserPage {
    flash: Option<String>,
    user_id: String,
    recommendations: Result<RecsView, String>,
    features: Result<Vec<(String, String)>, String>,
    explanation: Result<Vec<Explained>, String>,
    candidates: Result<Vec<(String, usize)>, String>,
    offer: Result<Vec<(String, String)>, String>,
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => {
            n.as_f64().filter(|f| f.fract() != 0.0).map_or_else(|| n.to_string(), |f| format!("{f:.3}"))
        }
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(", "),
        Value::Object(o) => o.iter().map(|(k, v)| format!("{k}: {}", text(v))).collect::<Vec<_>>().join(", "),
        Value::Null => "—".into(),
        Value::Bool(b) => b.to_string(),
    }
}

fn fields(v: &Value) -> Vec<(String, String)> {
    v.as_object().map(|o| o.iter().map(|(k, v)| (k.clone(), text(v))).collect()).unwrap_or_default()
}

async fn user_page(State(ui): State<Arc<Ui>>, Path(user_id): Path<String>, Query(q): Query<PageQuery>) -> Response {
    let c = &ui.config;
    let (recs, features, ranked, candidates, offer) = tokio::join!(
        ui.get(endpoint(&c.recommendation_api, &["recommend", &user_id])),
        ui.get(endpoint(&c.feature_store, &["features", &user_id])),
        ui.get(endpoint(&c.ranking, &["rank", &user_id])),
        ui.get(endpoint(&c.retrieval, &["retrieve", &user_id])),
        ui.get(endpoint(&c.rl_offer, &["offer", &user_id])),
    );
    let recommendations = recs.map(|r| RecsView {
        cold_start: r["coldStart"].as_bool().unwrap_or(false),
        model_version: text(&r["modelVersion"]),
        offer: r["offer"]["action"].as_str().map(str::to_owned),
        items: r["recommendations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| RecItem {
                rank: i["rank"].as_u64().unwrap_or(0),
                item_id: text(&i["itemId"]),
                name: text(&i["name"]),
                category: text(&i["category"]),
                price: i["price"].as_f64().unwrap_or(0.0),
                score: i["score"].as_f64().unwrap_or(0.0),
                sources: text(&i["sources"]),
            })
            .collect(),
    });
    let explanation = ranked.map(|r| {
        r["items"]
            .as_array()
            .into_iter()
            .flatten()
            .take(5)
            .map(|i| Explained {
                item: text(&i["name"]),
                score: i["score"].as_f64().unwrap_or(0.0),
                contributions: text(&i["contributions"]),
            })
            .collect()
    });
    let candidates = candidates.map(|c| {
        let mut by_source: BTreeMap<String, usize> = BTreeMap::new();
        for cand in c["candidates"].as_array().into_iter().flatten() {
            *by_source.entry(text(&cand["source"])).or_default() += 1;
        }
        by_source.into_iter().collect()
    });
    let features = features.map(|f| {
        let mut rows = fields(&f);
        rows.retain(|(k, _)| k != "schemaVersion");
        rows
    });
    render(&UserPage {
        flash: flash(&q),
        user_id,
        recommendations,
        features,
        explanation,
        candidates,
        offer: offer.map(|o| fields(&o)),
    })
}

struct LetterRow {
    failed_at: String,
    source: String,
    kind: String,
    reason: String,
    payload: String,
}

#[derive(Template)]
#[template(path = "dead_letters.html")]
struct DeadLettersPage {
    flash: Option<String>,
    letters: Result<Vec<LetterRow>, String>,
}

async fn dead_letters(State(ui): State<Arc<Ui>>) -> Response {
    let mut url = endpoint(&ui.config.event_processor, &["api", "dead-letters"]);
    url.set_query(Some("limit=100"));
    let letters = ui.get(url).await.map(|v| {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|l| LetterRow {
                failed_at: text(&l["failedAt"]),
                source: format!(
                    "{} [{}] @{}",
                    text(&l["source"]["topic"]),
                    text(&l["source"]["partition"]),
                    text(&l["source"]["offset"])
                ),
                kind: text(&l["kind"]),
                reason: text(&l["reason"]),
                payload: l["payload"]
                    .as_str()
                    .map_or_else(|| format!("(binary) {}", text(&l["payloadBase64"])), str::to_owned),
            })
            .collect()
    });
    render(&DeadLettersPage { flash: None, letters })
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SimulateForm {
    user_id: Option<String>,
}

/// A short browsing session of one shopper in their favourite category, sometimes adding
/// the last product to the cart.
pub fn session_events(user: &str, generator: &mut Generator) -> Vec<Value> {
    let session = format!("ui-{}", uuid::Uuid::new_v4());
    let now = Utc::now();
    let mut events: Vec<Value> = (0..4)
        .map(|_| {
            let p = generator.product_for(user);
            json!({"userId": user, "sessionId": session, "eventType": "product_view", "productId": p.id, "timestamp": now})
        })
        .collect();
    if let Some(last) = events.last().and_then(|e| e["productId"].as_str()).map(str::to_owned) {
        events.push(json!({"userId": user, "sessionId": session, "eventType": "add_to_cart", "productId": last, "timestamp": now}));
    }
    events
}

async fn simulate_session(State(ui): State<Arc<Ui>>, form: Result<Form<SimulateForm>, FormRejection>) -> Response {
    let mut generator = Generator::from_entropy();
    let user = form
        .ok()
        .and_then(|Form(f)| f.user_id)
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| generated_user(rand::random_range(1..=USER_COUNT)));
    let events = session_events(&user, &mut generator);
    let target = endpoint(&Url::parse("http://ui/users").unwrap_or_else(|_| unreachable!()), &[&user]);
    match ui.post(endpoint(&ui.config.user_activity, &["api", "users", "activity"]), &Value::Array(events)).await {
        Ok(_) => Redirect::to(&format!("{}?done=session", target.path())).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "simulated session not sent");
            Redirect::to(&format!("{}?done=failed", target.path())).into_response()
        }
    }
}

async fn simulate_order(State(ui): State<Arc<Ui>>) -> Response {
    match ui.post(endpoint(&ui.config.order, &["api", "orders", "place"]), &json!({})).await {
        Ok(_) => Redirect::to("/?done=order").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "simulated order not sent");
            Redirect::to("/?done=failed").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;

    /// Every backend at an address where nothing listens.
    fn unreachable_backends() -> Config {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let dead = Url::parse(&format!("http://127.0.0.1:{port}")).expect("url");
        Config {
            user_activity: dead.clone(),
            order: dead.clone(),
            event_processor: dead.clone(),
            analytics: dead.clone(),
            feature_store: dead.clone(),
            retrieval: dead.clone(),
            ranking: dead.clone(),
            rl_offer: dead.clone(),
            recommendation_api: dead,
        }
    }

    async fn get(app: Router, path: &str) -> (StatusCode, String) {
        let resp = app.oneshot(Request::get(path).body(Body::empty()).expect("request")).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn pages_render_when_every_backend_is_down() {
        let app = router(unreachable_backends()).expect("router");
        let (status, html) = get(app.clone(), "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(html.contains("id=\"kpis-unavailable\"") && html.contains("Analytics is unavailable"), "{html}");
        let (status, html) = get(app.clone(), "/users/user-0001").await;
        assert_eq!(status, StatusCode::OK);
        assert!(html.contains("Recommendations are unavailable"));
        let (status, html) = get(app.clone(), "/dead-letters").await;
        assert_eq!(status, StatusCode::OK);
        assert!(html.contains("The event processor is unavailable"));
        let (status, css) = get(app, "/static/style.css").await;
        assert_eq!(status, StatusCode::OK);
        assert!(css.contains(".tile"));
    }

    #[tokio::test]
    async fn user_ids_are_escaped_and_encoded() {
        let app = router(unreachable_backends()).expect("router");
        let (_, html) = get(app.clone(), "/users/%3Cscript%3Ealert(1)%3C%2Fscript%3E").await;
        assert!(!html.contains("<script>alert(1)</script>"), "user input must be escaped");
        assert!(html.contains("&lt;script&gt;") || html.contains("&#60;script&#62;"), "the id is shown, escaped");
        let resp = app
            .oneshot(Request::get("/users?id=a%2Fb%20c").body(Body::empty()).expect("request"))
            .await
            .expect("response");
        assert_eq!(resp.headers()["location"], "/users/a%2Fb%20c");
    }

    #[test]
    fn simulated_sessions_are_valid_activity() {
        let events = session_events("user-0007", &mut Generator::seeded(9));
        assert_eq!(events.len(), 5);
        for e in &events {
            events::validate::activity(e, Utc::now(), events::validate::Strictness::Api).expect("valid");
        }
        assert_eq!(events[4]["eventType"], "add_to_cart");
    }
}
