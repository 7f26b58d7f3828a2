//! `analytics` (8084): KPIs from processed events and offer decisions.
//!
//! Consumes `processed-events-topic` and `offers-topic` (consumer group `analytics`). Counts
//! are exact under redelivery: events are de-duplicated by id (the last
//! `ANALYTICS_DEDUP_CAPACITY` ids, default 200,000).
//!
//! `GET /api/analytics/summary`: event counts by type, users, sessions, orders, revenue,
//! session conversion rate (sessions with a purchase ÷ sessions), view-to-cart and
//! cart-to-purchase rates, offers by action, events in the last minute and per minute over the
//! last hour. `GET /api/analytics/user/{userId}`: one user's figures (404 when unknown).
//! The headline figures are also Prometheus gauges on `/metrics`.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::Json;
use axum::extract::{Path, State};
use axum::routing::get;
use chrono::{DateTime, Utc};
use events::{EventCounts, EventType, OfferDecision, ProcessedEvent, Topic};
use kit::config::{ConfigError, Env, positive};
use kit::dedup::SeenSet;
use kit::http::{ApiError, found};
use kit::kafka::{ConsumerSpec, Handler, HandlerError, Outbox, Record};
use kit::state::Shared;
use kit::{Context, Service};
use serde::Serialize;

/// The `analytics` service.
pub struct Analytics;

/// Settings of analytics.
#[derive(Debug, Clone)]
pub struct Config {
    /// `ANALYTICS_DEDUP_CAPACITY` (default 200,000).
    pub dedup_capacity: usize,
}

impl Service for Analytics {
    const NAME: &'static str = "analytics";
    const DEFAULT_PORT: u16 = 8084;
    type Config = Config;

    fn config(env: &Env) -> Result<Config, ConfigError> {
        Ok(Config { dedup_capacity: env.checked("ANALYTICS_DEDUP_CAPACITY", 200_000, positive)? })
    }

    async fn run(config: Config, mut ctx: Context) -> anyhow::Result<()> {
        let producer = ctx.pipeline_producer()?;
        let state = Shared::new(Kpis::new(config.dedup_capacity));
        ctx.spawn_consumer(
            &producer,
            ConsumerSpec::group("events-and-offers", [Topic::ProcessedEvents, Topic::Offers], "analytics").restoring(),
            Counter(Shared::clone(&state)),
        );
        let routes = axum::Router::new()
            .route("/api/analytics/summary", get(summary))
            .route("/api/analytics/user/{user_id}", get(user))
            .with_state(state);
        ctx.serve(routes).await
    }
}

/// One user's figures.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserStats {
    pub user_id: String,
    pub counts: EventCounts,
    pub orders: u64,
    pub revenue: f64,
    pub sessions: u64,
    pub offers: BTreeMap<String, u64>,
    pub first_seen: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
}

/// All figures.
pub struct Kpis {
    seen: SeenSet,
    totals: EventCounts,
    orders: u64,
    revenue: f64,
    users: HashMap<String, UserStats>,
    sessions: HashSet<String>,
    converted_sessions: HashSet<String>,
    offers: BTreeMap<String, u64>,
    /// Events per minute (minute since the epoch -> count), for the last hour.
    per_minute: BTreeMap<i64, u64>,
}

/// The summary body.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub totals: EventCounts,
    pub events: u64,
    pub users: usize,
    pub sessions: usize,
    pub orders: u64,
    pub revenue: f64,
    pub conversion_rate: f64,
    pub view_to_cart_rate: f64,
    pub cart_to_purchase_rate: f64,
    pub offers: BTreeMap<String, u64>,
    pub events_last_minute: u64,
    pub events_per_minute: Vec<MinuteCount>,
    pub generated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MinuteCount {
    pub minute: DateTime<Utc>,
    pub events: u64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { (a as f64 / b as f64 * 10_000.0).round() / 10_000.0 }
}

impl Kpis {
    pub fn new(dedup_capacity: usize) -> Self {
        Self {
            seen: SeenSet::new(dedup_capacity),
            totals: EventCounts::default(),
            orders: 0,
            revenue: 0.0,
            users: HashMap::new(),
            sessions: HashSet::new(),
            converted_sessions: HashSet::new(),
            offers: BTreeMap::new(),
            per_minute: BTreeMap::new(),
        }
    }

    /// Counts one event; `false` if it was a redelivery.
    pub fn record_event(&mut self, e: &ProcessedEvent, now: DateTime<Utc>) -> bool {
        if !self.seen.insert(&e.event_id) {
            return false;
        }
        self.totals.add(e.event_type);
        let new_session = self.sessions.insert(e.session_id.clone());
        let u = self
            .users
            .entry(e.user_id.clone())
            .or_insert_with(|| UserStats { user_id: e.user_id.clone(), ..Default::default() });
        u.counts.add(e.event_type);
        if new_session {
            u.sessions += 1;
        }
        u.first_seen = Some(u.first_seen.map_or(e.occurred_at, |t| t.min(e.occurred_at)));
        u.last_seen = Some(u.last_seen.map_or(e.occurred_at, |t| t.max(e.occurred_at)));
        if let (EventType::Purchase, Some(order)) = (e.event_type, &e.order) {
            self.orders += 1;
            self.revenue += order.amount;
            u.orders += 1;
            u.revenue += order.amount;
            self.converted_sessions.insert(e.session_id.clone());
        }
        // Bucketed by processing time (not arrival here), so a replay after a restart puts
        // events back in their own minutes.
        let (minute, current) = (e.processed_at.timestamp() / 60, now.timestamp() / 60);
        if minute > current - 60 {
            *self.per_minute.entry(minute).or_default() += 1;
        }
        self.per_minute.retain(|m, _| *m > current - 60);
        true
    }

    /// Counts one offer decision; `false` if it was a redelivery.
    pub fn record_offer(&mut self, o: &OfferDecision) -> bool {
        if !self.seen.insert(&o.decision_id) {
            return false;
        }
        *self.offers.entry(o.action.as_str().to_owned()).or_default() += 1;
        let u = self
            .users
            .entry(o.user_id.clone())
            .or_insert_with(|| UserStats { user_id: o.user_id.clone(), ..Default::default() });
        *u.offers.entry(o.action.as_str().to_owned()).or_default() += 1;
        true
    }

    pub fn user(&self, id: &str) -> Option<&UserStats> {
        self.users.get(id)
    }

    pub fn summary(&self, now: DateTime<Utc>) -> Summary {
        let minute = now.timestamp() / 60;
        let t = &self.totals;
        Summary {
            totals: t.clone(),
            events: t.total(),
            users: self.users.values().filter(|u| u.counts.total() > 0).count(),
            sessions: self.sessions.len(),
            orders: self.orders,
            revenue: (self.revenue * 100.0).round() / 100.0,
            conversion_rate: ratio(self.converted_sessions.len() as u64, self.sessions.len() as u64),
            view_to_cart_rate: ratio(t.add_to_cart, t.product_views),
            cart_to_purchase_rate: ratio(t.purchases, t.add_to_cart),
            offers: self.offers.clone(),
            events_last_minute: self.per_minute.get(&minute).copied().unwrap_or(0),
            events_per_minute: (minute - 59..=minute)
                .map(|m| MinuteCount {
                    minute: DateTime::from_timestamp(m * 60, 0).unwrap_or(now),
                    events: self.per_minute.get(&m).copied().unwrap_or(0),
                })
                .collect(),
            generated_at: now,
        }
    }
}

struct Counter(Shared<Kpis>);

impl Handler for Counter {
    fn handle(&mut self, rec: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        let mut k = self.0.write();
        match rec.topic {
            Topic::ProcessedEvents => {
                k.record_event(&rec.json()?, Utc::now());
            }
            Topic::Offers => {
                k.record_offer(&rec.json()?);
            }
            other => return Err(HandlerError::malformed(format!("unexpected topic {other}"))),
        }
        metrics::gauge!("analytics_events").set(k.totals.total() as f64);
        metrics::gauge!("analytics_orders").set(k.orders as f64);
        metrics::gauge!("analytics_revenue").set(k.revenue);
        Ok(())
    }
}

async fn summary(State(k): State<Shared<Kpis>>) -> Json<Summary> {
    Json(k.read().summary(Utc::now()))
}

async fn user(State(k): State<Shared<Kpis>>, Path(user_id): Path<String>) -> Result<Json<UserStats>, ApiError> {
    found(k.read().user(&user_id).cloned(), || format!("no analytics for user {user_id:?}: no events seen"))
}

#[cfg(test)]
mod tests {
    use events::{ProcessedOrder, SourceRef};

    use super::*;

    fn event(id: &str, user: &str, session: &str, t: EventType) -> ProcessedEvent {
        ProcessedEvent {
            schema_version: 1,
            event_id: id.into(),
            user_id: user.into(),
            session_id: session.into(),
            event_type: t,
            occurred_at: Utc::now(),
            processed_at: Utc::now(),
            correlation_id: "c".into(),
            product: None,
            campaign_id: None,
            query: None,
            recommendation_id: None,
            order: (t == EventType::Purchase).then(|| ProcessedOrder {
                order_id: "o".into(),
                amount: 25.5,
                currency: "EUR".into(),
                items: vec![],
                offer_decision_id: None,
            }),
            source: SourceRef { topic: "t".into(), partition: 0, offset: 0 },
        }
    }

    #[test]
    fn counts_are_exact_under_redelivery() {
        let mut k = Kpis::new(100);
        let now = Utc::now();
        for e in [
            event("1", "a", "s1", EventType::ProductView),
            event("2", "a", "s1", EventType::AddToCart),
            event("3", "a", "s1", EventType::Purchase),
            event("3", "a", "s1", EventType::Purchase),
            event("4", "b", "s2", EventType::ProductView),
            event("4", "b", "s2", EventType::ProductView),
        ] {
            k.record_event(&e, now);
        }
        let s = k.summary(now);
        assert_eq!((s.events, s.orders, s.users, s.sessions), (4, 1, 2, 2));
        assert_eq!(s.revenue, 25.5);
        assert_eq!(s.conversion_rate, 0.5);
        assert_eq!(s.view_to_cart_rate, 0.5);
        assert_eq!(s.cart_to_purchase_rate, 1.0);
        assert_eq!(s.events_last_minute, 4);
        assert_eq!(s.events_per_minute.len(), 60);
        assert_eq!(k.user("a").expect("known").orders, 1);
        assert!(k.user("nobody").is_none());
    }
}
