//! `frontend-ui` (3000): the browser UI, server-rendered with askama.
//!
//! Pages: `/` (dashboard: KPI tiles for the last 5 minutes, hour, day or all time, the
//! funnel, events per minute, offer performance per action, recommendation click-through,
//! campaigns, pipeline lag, a live activity feed, simulate buttons), `/users/{userId}`
//! (explorer: recent events, recommendations with the current offer, features, the ranking
//! explanation, candidates by source), `/dead-letters`. The simulate buttons go through the
//! real ingestion APIs. Every panel fetches from one backend over REST with a short timeout;
//! a backend that is down turns its panel into a clear message while the page still renders.
//! Everything shown is escaped by askama (and by `textContent` in the page's script).
//!
//! The live feed: while someone watches (a browser connected to `GET /live`, or a dashboard
//! rendered in the last [`WATCHED_FOR`]), the UI reads the tail of `processed-events-topic`
//! once a second — what arrived since its last look, at most the newest 30 of each partition —
//! and pushes the newest events to the browsers over server-sent events; the dashboard's
//! small script prepends them to the feed and refreshes the KPI block (`GET /partials/kpis`).
//! The last 30 events are rendered with the page (a dashboard asks for a look first). At a
//! few events a second the feed shows every event; under heavy traffic it shows the newest of
//! each second, as many as a person can read, and the UI does no work per event: it used to
//! follow the topic and decode every event, about 7 % of a core at 6,000 events/s, whether
//! or not anyone watched.
//!
//! Backends are configured with `<SERVICE>_URL` variables (see [`Config`]).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use askama::Template;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use chrono::Utc;
use events::generate::{Generator, USER_COUNT, user_id as generated_user};
use events::{ProcessedEvent, Topic};
use kit::config::{ConfigError, Env};
use kit::http::{ApiError, Path, Query};
use kit::kafka::admin::TailReader;
use kit::state::Shared;
use kit::{Context, Service};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

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

    async fn run(config: Config, mut ctx: Context) -> anyhow::Result<()> {
        let feed = Feed::new(ctx.shutdown.clone());
        let reader = TailReader::new(&ctx.kafka.bootstrap_servers, Topic::ProcessedEvents)?;
        ctx.spawn_task(feed.clone().follow(reader));
        ctx.serve(router(config, feed)?).await
    }
}

/// Events shown with the page.
const FEED_LENGTH: usize = 30;

/// One processed event as the live feed shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedItem {
    /// The event's id (a browser that gets an event twice shows it once).
    pub id: String,
    pub at: String,
    pub user_id: String,
    pub event_type: String,
    pub detail: String,
}

impl FeedItem {
    fn of(e: &ProcessedEvent) -> Self {
        let detail = match (&e.product, &e.order) {
            (_, Some(o)) => format!("order €{:.2}, {} item(s)", o.amount, o.items.len()),
            (Some(p), None) if p.unknown => format!("{} (not in the catalog yet)", p.product_id),
            (Some(p), None) => format!("{} ({})", p.name, p.category),
            (None, None) => e.query.clone().map(|q| format!("\"{q}\"")).unwrap_or_default(),
        };
        Self {
            id: e.idempotency_key(),
            at: e.processed_at.format("%H:%M:%S").to_string(),
            user_id: e.user_id.clone(),
            event_type: e.event_type.as_str().to_owned(),
            detail,
        }
    }
}

/// How often the feed looks at the topic's tail while someone watches.
const FEED_EVERY: Duration = Duration::from_secs(1);

/// How long after a dashboard was rendered the feed keeps looking, with no browser connected
/// to `GET /live` (a page connects within moments; one that cannot still gets a fresh feed
/// with each load).
const WATCHED_FOR: Duration = Duration::from_secs(10);

/// How long a dashboard waits for the look it asked for before it renders what it has.
const FRESH_PATIENCE: Duration = Duration::from_secs(1);

/// The live feed: the latest events, and a channel to every connected browser.
#[derive(Clone)]
pub struct Feed {
    recent: Shared<VecDeque<FeedItem>>,
    tx: broadcast::Sender<FeedItem>,
    shutdown: CancellationToken,
    /// A page asks for a look at once.
    asked: Arc<Notify>,
    /// How many looks were made (a page waits for the one it asked for).
    looks: Arc<watch::Sender<u64>>,
    /// When a page last showed the feed.
    shown_at: Shared<Option<Instant>>,
    /// Whether [`Feed::follow`] runs (with none, nothing answers a page's ask).
    following: Arc<AtomicBool>,
}

impl Feed {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            recent: Shared::default(),
            tx: broadcast::channel(1024).0,
            shutdown,
            asked: Arc::default(),
            looks: Arc::new(watch::channel(0).0),
            shown_at: Shared::default(),
            following: Arc::default(),
        }
    }

    pub fn push(&self, item: FeedItem) {
        let mut recent = self.recent.write();
        recent.push_front(item.clone());
        recent.truncate(FEED_LENGTH);
        // No browser connected is fine.
        let _ = self.tx.send(item);
    }

    /// Takes what a look at the tail found: of the processed events among `payloads`, the
    /// newest [`FEED_LENGTH`] by processing time, oldest first (each ends up on top of the
    /// feed and goes to every connected browser). Anything else is skipped.
    pub fn take(&self, payloads: &[Vec<u8>]) {
        let mut events: Vec<ProcessedEvent> = payloads.iter().filter_map(|p| serde_json::from_slice(p).ok()).collect();
        events.sort_by_key(|e| e.processed_at);
        for e in &events[events.len().saturating_sub(FEED_LENGTH)..] {
            self.push(FeedItem::of(e));
        }
    }

    /// Whether anyone watches: a browser connected to `GET /live`, or a dashboard rendered in
    /// the last [`WATCHED_FOR`].
    fn watched(&self) -> bool {
        self.tx.receiver_count() > 0 || self.shown_at.read().is_some_and(|at| at.elapsed() < WATCHED_FOR)
    }

    /// Reads the tail of the topic once every [`FEED_EVERY`] while someone watches, and at
    /// once when a page asks, until shutdown. A look that fails (the broker away) leaves the
    /// feed as it was; the next one tries again.
    pub async fn follow(self, mut reader: TailReader) -> anyhow::Result<()> {
        self.following.store(true, Ordering::Relaxed);
        let mut tick = tokio::time::interval(FEED_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                () = self.asked.notified() => {}
                _ = tick.tick() => if !self.watched() { continue },
            }
            match reader.read_new(FEED_LENGTH as i64).await {
                Ok(payloads) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("live feed: reading the processed events again");
                    }
                    self.take(&payloads);
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = format!("{e:#}"), "live feed: cannot read the processed events");
                }
                Err(e) => tracing::debug!(error = format!("{e:#}"), "live feed: still cannot read"),
            }
            self.looks.send_modify(|n| *n += 1);
        }
    }

    /// For a page about to show the feed: asks for a look and waits for it, at most
    /// [`FRESH_PATIENCE`].
    async fn fresh(&self) {
        *self.shown_at.write() = Some(Instant::now());
        if !self.following.load(Ordering::Relaxed) {
            return;
        }
        let mut looks = self.looks.subscribe();
        let before = *looks.borrow_and_update();
        self.asked.notify_one();
        let _ = tokio::time::timeout(FRESH_PATIENCE, looks.wait_for(|n| *n > before)).await;
    }
}

struct Ui {
    config: Config,
    client: reqwest::Client,
    feed: Feed,
}

/// The UI's routes.
pub fn router(config: Config, feed: Feed) -> anyhow::Result<Router> {
    let client =
        reqwest::Client::builder().timeout(Duration::from_secs(3)).connect_timeout(Duration::from_secs(1)).build()?;
    Ok(Router::new()
        .route("/", get(dashboard))
        .route("/partials/kpis", get(kpis_partial))
        .route("/live", get(live))
        .route("/users", get(find_user))
        .route("/users/{user_id}", get(user_page))
        .route("/dead-letters", get(dead_letters))
        .route("/simulate/session", post(simulate_session))
        .route("/simulate/order", post(simulate_order))
        .route(
            "/static/style.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css")], include_str!("../static/style.css")) }),
        )
        .with_state(Arc::new(Ui { config, client, feed })))
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
        Some("session") => Some("Shopper session sent through the activity API; watch it in the live feed.".into()),
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

struct OfferRow {
    action: String,
    decisions: u64,
    orders: u64,
    acceptance_pct: f64,
    revenue: f64,
}

struct CampaignRow {
    campaign: String,
    events: u64,
    clicks: u64,
    orders: u64,
    revenue: f64,
}

struct SummaryView {
    events: u64,
    users: u64,
    sessions: u64,
    orders: u64,
    revenue: f64,
    conversion_pct: f64,
    ctr_pct: f64,
    recs_shown: u64,
    recs_clicked: u64,
    unknown_product_events: u64,
    lag_seconds: f64,
    funnel: Vec<Step>,
    minute_heights: Vec<(u64, u64)>,
    peak_per_minute: u64,
    offers: Vec<OfferRow>,
    campaigns: Vec<CampaignRow>,
}

/// The windows the dashboard offers: (query value, label).
const WINDOWS: [(&str, &str); 4] = [("5m", "5 minutes"), ("1h", "hour"), ("1d", "day"), ("all", "all time")];

#[derive(Debug, Default, Deserialize)]
struct DashboardQuery {
    done: Option<String>,
    window: Option<String>,
    user: Option<String>,
}

impl DashboardQuery {
    /// The chosen window, one of [`WINDOWS`] (anything else means the hour).
    fn window(&self) -> &'static str {
        WINDOWS.iter().map(|(w, _)| *w).find(|w| Some(*w) == self.window.as_deref()).unwrap_or("1h")
    }
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct DashboardPage {
    flash: Option<String>,
    window: &'static str,
    windows: [(&'static str, &'static str); 4],
    summary: Result<SummaryView, String>,
    feed: Vec<FeedItem>,
    /// (link, user id) of the user a simulated session was for.
    user_link: Option<(String, String)>,
}

#[derive(Template)]
#[template(path = "kpis.html")]
struct KpisPartial {
    summary: Result<SummaryView, String>,
}

fn summary_view(s: &Value, window: &'static str) -> SummaryView {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let w = &s["windows"][window];
    let t = &w["totals"];
    let views = n(&t["productViews"]);
    let steps = [("Product views", views), ("Added to cart", n(&t["addToCart"])), ("Purchases", n(&t["purchases"]))];
    let top = steps.iter().map(|s| s.1).max().unwrap_or(0).max(1);
    let minutes: Vec<u64> =
        s["eventsPerMinute"].as_array().map(|a| a.iter().map(|m| n(&m["events"])).collect()).unwrap_or_default();
    let peak = minutes.iter().copied().max().unwrap_or(0);
    SummaryView {
        events: n(&w["events"]),
        users: n(&s["users"]),
        sessions: n(&w["sessions"]),
        orders: n(&w["orders"]),
        revenue: f(&w["revenue"]),
        conversion_pct: f(&w["conversionRate"]) * 100.0,
        ctr_pct: f(&w["recommendationCtr"]) * 100.0,
        recs_shown: n(&w["recommendationsShown"]),
        recs_clicked: n(&w["recommendationsClicked"]),
        unknown_product_events: n(&w["unknownProductEvents"]),
        lag_seconds: f(&s["pipeline"]["meanEventAgeSeconds"]),
        funnel: steps
            .iter()
            .map(|(label, count)| Step { label, count: *count, width_pct: count * 100 / top })
            .collect(),
        minute_heights: minutes.iter().map(|m| (m * 100 / peak.max(1), *m)).collect(),
        peak_per_minute: peak,
        offers: w["offers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| OfferRow {
                action: text(&o["action"]),
                decisions: n(&o["decisions"]),
                orders: n(&o["orders"]),
                acceptance_pct: f(&o["acceptanceRate"]) * 100.0,
                revenue: f(&o["revenue"]),
            })
            .collect(),
        campaigns: s["campaigns"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| CampaignRow {
                campaign: text(&c["campaignId"]),
                events: n(&c["events"]),
                clicks: n(&c["clicks"]),
                orders: n(&c["orders"]),
                revenue: f(&c["revenue"]),
            })
            .collect(),
    }
}

fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => ApiError::Internal(anyhow::anyhow!("template: {e}")).into_response(),
    }
}

impl Ui {
    async fn summary(&self, window: &'static str) -> Result<SummaryView, String> {
        self.get(endpoint(&self.config.analytics, &["api", "analytics", "summary"]))
            .await
            .map(|s| summary_view(&s, window))
    }
}

async fn dashboard(State(ui): State<Arc<Ui>>, Query(q): Query<DashboardQuery>) -> Response {
    let window = q.window();
    let (summary, ()) = tokio::join!(ui.summary(window), ui.feed.fresh());
    let feed = ui.feed.recent.read().iter().cloned().collect();
    let flash = flash(&PageQuery { done: q.done.clone() });
    let user_link = q.user.as_deref().map(str::trim).filter(|u| !u.is_empty() && u.len() <= 128).map(|u| {
        let link = endpoint(&Url::parse("http://ui/users").unwrap_or_else(|_| unreachable!()), &[u]);
        (link.path().to_owned(), u.to_owned())
    });
    render(&DashboardPage { flash, window, windows: WINDOWS, summary, feed, user_link })
}

async fn kpis_partial(State(ui): State<Arc<Ui>>, Query(q): Query<DashboardQuery>) -> Response {
    render(&KpisPartial { summary: ui.summary(q.window()).await })
}

/// Server-sent events: first a `snapshot` of the latest events (so nothing that arrived
/// between rendering the page and connecting is missed), then each processed event as it
/// arrives (`activity`), until the browser leaves or the service stops.
async fn live(State(ui): State<Arc<Ui>>) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    // Subscribe before taking the snapshot: an event may then come twice, never not at all.
    let rx = ui.feed.tx.subscribe();
    let snapshot: Vec<FeedItem> = ui.feed.recent.read().iter().cloned().collect();
    let first = Event::default().event("snapshot").data(serde_json::to_string(&snapshot).unwrap_or_default());
    let stop = ui.feed.shutdown.clone();
    let live = futures::stream::unfold((rx, stop), |(mut rx, stop)| async move {
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => return None,
                r = rx.recv() => r,
            };
            match received {
                Ok(item) => {
                    let data = serde_json::to_string(&item).unwrap_or_default();
                    return Some((Ok(Event::default().event("activity").data(data)), (rx, stop)));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let stream = futures::StreamExt::chain(futures::stream::once(async move { Ok(first) }), live);
    Sse::new(stream).keep_alive(KeepAlive::default())
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
    /// Why no user can have the id asked for; the page then shows only that.
    refused: Option<String>,
    user_id: String,
    recommendations: Result<RecsView, String>,
    features: Result<Vec<(String, String)>, String>,
    explanation: Result<Vec<Explained>, String>,
    candidates: Result<Vec<(String, usize)>, String>,
    offer: Result<Vec<(String, String)>, String>,
    recent: Result<Vec<RecentRow>, String>,
}

struct RecentRow {
    at: String,
    event_type: String,
    detail: String,
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

async fn user_page(State(ui): State<Arc<Ui>>, Path(raw_id): Path<String>, Query(q): Query<PageQuery>) -> Response {
    // The services look users up by the id ingestion stored (trimmed); an id no event can
    // carry is the visitor's mistake, shown as such rather than as services "unavailable".
    let user_id = match events::validate::user_id(&raw_id) {
        Ok(id) => id.to_owned(),
        Err(e) => {
            let page = UserPage {
                flash: None,
                refused: Some(e.reason),
                user_id: raw_id,
                recommendations: Err(String::new()),
                features: Err(String::new()),
                explanation: Err(String::new()),
                candidates: Err(String::new()),
                offer: Err(String::new()),
                recent: Err(String::new()),
            };
            return (axum::http::StatusCode::BAD_REQUEST, render(&page)).into_response();
        }
    };
    let c = &ui.config;
    let (recs, features, ranked, candidates, offer, stats) = tokio::join!(
        ui.get(endpoint(&c.recommendation_api, &["recommend", &user_id])),
        ui.get(endpoint(&c.feature_store, &["features", &user_id])),
        ui.get(endpoint(&c.ranking, &["rank", &user_id])),
        ui.get(endpoint(&c.retrieval, &["retrieve", &user_id])),
        ui.get(endpoint(&c.rl_offer, &["offer", &user_id])),
        ui.get(endpoint(&c.analytics, &["api", "analytics", "user", &user_id])),
    );
    let recent = stats.map(|s| {
        s["recentEvents"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| RecentRow {
                at: text(&e["occurredAt"]),
                event_type: text(&e["eventType"]),
                detail: e["amount"]
                    .as_f64()
                    .map(|a| format!("order €{a:.2}"))
                    .or_else(|| e["productId"].as_str().map(str::to_owned))
                    .unwrap_or_default(),
            })
            .collect()
    });
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
        refused: None,
        user_id,
        recommendations,
        features,
        explanation,
        candidates,
        offer: offer.map(|o| fields(&o)),
        recent,
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
    let activity = endpoint(&ui.config.user_activity, &["api", "users", "activity"]);
    let back = endpoint(&Url::parse("http://ui/").unwrap_or_else(|_| unreachable!()), &[]);
    let user_query: String = url_encode(&user);
    match ui.post(activity.clone(), &Value::Array(events)).await {
        Ok(_) => {
            // The shopper is shown their recommendations and sometimes clicks one: both are
            // reported with the API's request id, which is what click-through is counted by.
            if let Ok(recs) = ui.get(endpoint(&ui.config.recommendation_api, &["recommend", &user])).await
                && let Some(request) = recs["requestId"].as_str()
            {
                let mut follow_up =
                    vec![json!({"userId": user, "eventType": "page_view", "recommendationId": request})];
                if let Some(first) = recs["recommendations"][0]["itemId"].as_str()
                    && rand::random_bool(0.5)
                {
                    follow_up.push(
                        json!({"userId": user, "eventType": "click", "productId": first, "recommendationId": request}),
                    );
                }
                if let Err(e) = ui.post(activity, &Value::Array(follow_up)).await {
                    tracing::warn!(error = %e, "recommendation impression not sent");
                }
            }
            Redirect::to(&format!("{}?done=session&user={user_query}", back.path())).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "simulated session not sent");
            Redirect::to(&format!("{}?done=failed", back.path())).into_response()
        }
    }
}

/// Percent-encodes a query value.
fn url_encode(value: &str) -> String {
    let mut url = Url::parse("http://ui/").unwrap_or_else(|_| unreachable!());
    url.query_pairs_mut().append_pair("v", value);
    url.query().unwrap_or("v=").trim_start_matches("v=").to_owned()
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
        let app = router(unreachable_backends(), Feed::new(CancellationToken::new())).expect("router");
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
        let app = router(unreachable_backends(), Feed::new(CancellationToken::new())).expect("router");
        let (_, html) = get(app.clone(), "/users/%3Cscript%3Ealert(1)%3C%2Fscript%3E").await;
        assert!(!html.contains("<script>alert(1)</script>"), "user input must be escaped");
        assert!(html.contains("&lt;script&gt;") || html.contains("&#60;script&#62;"), "the id is shown, escaped");
        let resp = app
            .oneshot(Request::get("/users?id=a%2Fb%20c").body(Body::empty()).expect("request"))
            .await
            .expect("response");
        assert_eq!(resp.headers()["location"], "/users/a%2Fb%20c");
    }

    #[tokio::test]
    async fn an_id_no_event_can_carry_is_a_400_page() {
        let app = router(unreachable_backends(), Feed::new(CancellationToken::new())).expect("router");
        let long = "u".repeat(events::validate::MAX_ID_LEN + 1);
        for bad in [long.as_str(), "%20", "a%01b"] {
            let (status, html) = get(app.clone(), &format!("/users/{bad}")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {html}");
            assert!(html.contains("No user can have this id"), "{bad}: {html}");
            assert!(
                !html.contains("are unavailable") && !html.contains("simulate-user-session"),
                "{bad}: only the refusal: {html}"
            );
        }
    }

    fn viewed(n: i64) -> Vec<u8> {
        let at = chrono::DateTime::from_timestamp(1_700_000_000 + n, 0).expect("time");
        let e =
            events::generate::processed(&format!("e{n}"), &format!("user-{n}"), "s", events::EventType::PageView, at);
        serde_json::to_vec(&e).expect("json")
    }

    /// A look at the tail finds events of several partitions, each in its own order: the feed
    /// gets the newest by processing time, newest on top, and a connected browser gets them
    /// oldest first (each goes on top as it comes); what is not an event is skipped.
    #[test]
    fn a_look_at_the_tail_feeds_the_newest_events_in_time_order() {
        let feed = Feed::new(CancellationToken::new());
        let mut browser = feed.tx.subscribe();
        // Two partitions' tails, interleaved in time, and a stray payload.
        let mut payloads: Vec<Vec<u8>> = (0..40).filter(|n| n % 2 == 0).map(viewed).collect();
        payloads.push(b"not an event".to_vec());
        payloads.extend((0..40).filter(|n| n % 2 == 1).map(viewed));
        feed.take(&payloads);
        let shown: Vec<String> = feed.recent.read().iter().map(|i| i.user_id.clone()).collect();
        let newest_first: Vec<String> = (10..40).rev().map(|n| format!("user-{n}")).collect();
        assert_eq!(shown, newest_first);
        let sent: Vec<String> = std::iter::from_fn(|| browser.try_recv().ok()).map(|i| i.user_id).collect();
        assert_eq!(sent, (10..40).map(|n| format!("user-{n}")).collect::<Vec<_>>());
        // The next look's events go on top.
        feed.take(&[viewed(40)]);
        assert_eq!(feed.recent.read().front().map(|i| i.user_id.as_str()), Some("user-40"));
        assert_eq!(feed.recent.read().len(), FEED_LENGTH);
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
