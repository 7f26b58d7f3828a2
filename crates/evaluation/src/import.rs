//! A history sent through the ingestion APIs, in batches, in the file's order: what
//! `retargetiq events import` and `retargetiq evaluate --live` do.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::history::{self, History, Interaction};

/// Where the ingestion APIs are.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// user-activity: `POST /api/users/activity`, `PUT /api/catalog/products`.
    pub user_activity: String,
    /// order: `POST /api/orders/place`.
    pub order: String,
}

impl Endpoints {
    fn url(base: &str, path: &str) -> String {
        format!("{}{path}", base.trim_end_matches('/'))
    }
}

/// What was sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    pub products: usize,
    pub activity: usize,
    pub orders: usize,
}

/// Events as the ingestion APIs take them: (is an order, JSON), in time order.
pub type Events = Vec<(bool, Value)>;

/// The messages of a history: its products as catalog entries, and its interactions as the
/// APIs take them.
pub fn messages(history: &History, interactions: &[Interaction]) -> anyhow::Result<(Vec<Value>, Events)> {
    let now = chrono::Utc::now();
    let products = history
        .products
        .values()
        .map(|p| serde_json::to_value(events::CatalogProduct::of(p, now)))
        .collect::<Result<_, _>>()?;
    let events = history::steps(interactions, &history.products)
        .into_iter()
        .map(|s| match s {
            events::generate::Step::Activity(a) => serde_json::to_value(a).map(|v| (false, v)),
            events::generate::Step::Order(o) => serde_json::to_value(o).map(|v| (true, v)),
        })
        .collect::<Result<_, _>>()?;
    Ok((products, events))
}

/// Sends the products to the catalog, then the events in batches of `batch` (at most `rate`
/// per second when positive), keeping their order; prints progress every 2 s to stderr.
pub async fn send_all(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    products: &[Value],
    events: &[(bool, Value)],
    batch: usize,
    rate: f64,
) -> anyhow::Result<Sent> {
    let started = Instant::now();
    let mut sent = Sent::default();
    let catalog = Endpoints::url(&endpoints.user_activity, "/api/catalog/products");
    for chunk in products.chunks(events::validate::MAX_CATALOG_BATCH) {
        sent.products += send(http, reqwest::Method::PUT, &catalog, chunk).await?;
    }
    let activity = Endpoints::url(&endpoints.user_activity, "/api/users/activity");
    let orders = Endpoints::url(&endpoints.order, "/api/orders/place");
    let mut last_progress = Instant::now();
    let mut done = 0usize;
    // Consecutive events of one kind go together, so the order of the file is kept.
    for run in events.chunk_by(|a, b| a.0 == b.0) {
        for chunk in run.chunks(batch.max(1)) {
            let values: Vec<Value> = chunk.iter().map(|(_, v)| v.clone()).collect();
            if chunk[0].0 {
                sent.orders += send(http, reqwest::Method::POST, &orders, &values).await?;
            } else {
                sent.activity += send(http, reqwest::Method::POST, &activity, &values).await?;
            }
            done += values.len();
            if rate > 0.0 {
                let due = Duration::from_secs_f64(done as f64 / rate);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            if last_progress.elapsed() >= Duration::from_secs(2) {
                eprintln!("{done} of {} events sent", events.len());
                last_progress = Instant::now();
            }
        }
    }
    Ok(sent)
}

/// Sends one batch to an ingestion endpoint, retrying while the service answers `503` or
/// cannot be reached (for at most a minute; messages keep their ids, so a retry stores each
/// once); returns how many it accepted.
pub async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    endpoint: &str,
    batch: &[Value],
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let problem = match http.request(method.clone(), endpoint).json(batch).send().await {
            Ok(r) if r.status().is_success() => {
                let body: Value = r.json().await?;
                return Ok(body["accepted"].as_u64().unwrap_or(0) as usize);
            }
            Ok(r) if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => format!("{endpoint} answered 503"),
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                anyhow::bail!("{endpoint} answered {status}: {body}");
            }
            Err(e) => format!("{endpoint}: {e}"),
        };
        anyhow::ensure!(Instant::now() < deadline, "giving up after a minute: {problem}");
        tracing::warn!(%problem, "retrying the batch in 2 s");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
