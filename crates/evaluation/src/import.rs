//! A history sent through the ingestion APIs, in batches, in the file's order: what
//! `retargetiq events import` and `retargetiq evaluate --live` do.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use events::generate::Step;
use serde_json::Value;

use crate::progress::Progress;

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

/// Products as `PUT /api/catalog/products` takes them.
pub fn catalog_products(products: &BTreeMap<String, catalog::Product>) -> anyhow::Result<Vec<Value>> {
    let now = chrono::Utc::now();
    Ok(products.values().map(|p| serde_json::to_value(events::CatalogProduct::of(p, now))).collect::<Result<_, _>>()?)
}

/// An interaction as its ingestion API takes it: (is an order, JSON).
fn message(step: Step) -> anyhow::Result<(bool, Value)> {
    Ok(match step {
        Step::Activity(a) => (false, serde_json::to_value(a)?),
        Step::Order(o) => (true, serde_json::to_value(o)?),
    })
}

/// Sends events in the order they are pushed, in batches of consecutive events of one kind
/// (activity or orders) of at most `batch`, at most `rate` per second when positive; prints
/// progress every 2 s to stderr. Holds one batch at a time, so a history of any length can be
/// sent as it is read.
pub struct Sender<'a> {
    http: &'a reqwest::Client,
    catalog: String,
    activity: String,
    orders: String,
    batch: usize,
    rate: f64,
    /// The batch being filled, and whether it holds orders.
    pending: Vec<Value>,
    pending_orders: bool,
    sent: Sent,
    /// Events sent so far.
    done: usize,
    started: Instant,
    progress: Progress,
}

impl<'a> Sender<'a> {
    pub fn new(http: &'a reqwest::Client, endpoints: &Endpoints, batch: usize, rate: f64, total: usize) -> Self {
        Self {
            http,
            catalog: Endpoints::url(&endpoints.user_activity, "/api/catalog/products"),
            activity: Endpoints::url(&endpoints.user_activity, "/api/users/activity"),
            orders: Endpoints::url(&endpoints.order, "/api/orders/place"),
            batch: batch.max(1),
            rate,
            pending: Vec::new(),
            pending_orders: false,
            sent: Sent::default(),
            done: 0,
            started: Instant::now(),
            progress: Progress::new("events sent", total),
        }
    }

    /// Puts products in the catalog (before the events that name them).
    pub async fn products(&mut self, products: &[Value]) -> anyhow::Result<()> {
        for chunk in products.chunks(events::validate::MAX_CATALOG_BATCH) {
            self.sent.products += send(self.http, reqwest::Method::PUT, &self.catalog, chunk).await?;
        }
        Ok(())
    }

    /// Adds an event (an order when `order`), sending the batch it closes.
    pub async fn push(&mut self, order: bool, event: Value) -> anyhow::Result<()> {
        if !self.pending.is_empty() && (order != self.pending_orders || self.pending.len() >= self.batch) {
            self.flush().await?;
        }
        self.pending_orders = order;
        self.pending.push(event);
        Ok(())
    }

    /// Adds each step in turn (as its ingestion API takes it), sending the batches they fill;
    /// stops at the first error.
    pub async fn steps(&mut self, steps: impl IntoIterator<Item = anyhow::Result<Step>>) -> anyhow::Result<()> {
        for step in steps {
            let (order, event) = message(step?)?;
            self.push(order, event).await?;
        }
        Ok(())
    }

    /// Sends what is left; what was sent.
    pub async fn finish(mut self) -> anyhow::Result<Sent> {
        self.flush().await?;
        Ok(self.sent)
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.pending_orders {
            self.sent.orders += send(self.http, reqwest::Method::POST, &self.orders, &self.pending).await?;
        } else {
            self.sent.activity += send(self.http, reqwest::Method::POST, &self.activity, &self.pending).await?;
        }
        self.done += self.pending.len();
        self.pending.clear();
        if self.rate > 0.0 {
            let due = Duration::from_secs_f64(self.done as f64 / self.rate);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        self.progress.at(self.done);
        Ok(())
    }
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
