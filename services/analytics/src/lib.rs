//! `analytics` (8084): KPIs from processed events and offer decisions.
//!
//! Consumes `processed-events-topic` and `offers-topic` (consumer group `analytics`, state
//! restored from Kafka at start). Counts are exact under redelivery: events and decisions are
//! de-duplicated by id (the last `ANALYTICS_DEDUP_CAPACITY` ids, default 200,000).
//!
//! Figures, over the last 5 minutes, hour and day (per-minute buckets by processing time) and
//! all time: views, clicks, add-to-cart, purchases; orders and revenue; session conversion
//! (sessions with a purchase ÷ sessions started); view-to-cart and cart-to-purchase rates;
//! recommendation click-through (recommendation lists with a click ÷ lists shown, both
//! attributed by the recommendation API's request id, which clients send back as
//! `recommendationId`: a `page_view` carrying it reports the list shown, a `click` or
//! `product_view` carrying it a click on it); offers per action (decisions, orders attributed,
//! acceptance rate, revenue; an order is attributed to the decision it names in
//! `offerDecisionId`, else to the user's latest decision of the last 24 h). All time also:
//! per campaign (events, clicks, orders, revenue), events per minute for the last hour, and
//! the pipeline's lag (mean age of events when analytics counts them, and the processor's
//! delay, over the last 5 minutes).
//!
//! `GET /api/analytics/summary` and `GET /api/analytics/user/{userId}` (with the user's recent
//! events; 404 when unknown). The same figures are Prometheus gauges on `/metrics`, refreshed
//! every 5 s (`analytics_events{window,type}`, `analytics_orders{window}`,
//! `analytics_revenue{window}`, `analytics_conversion_rate{window}`,
//! `analytics_recommendation_ctr{window}`, `analytics_offer_acceptance_rate{action}`,
//! `analytics_offer_revenue{action}`, `analytics_campaign_revenue{campaign}`,
//! `analytics_event_age_seconds`).

use std::collections::{BTreeMap, HashMap, VecDeque};

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use chrono::{DateTime, Duration, Utc};
use events::{EventCounts, EventType, OfferAction, OfferDecision, ProcessedEvent, Topic};
use kit::config::{ConfigError, Env, positive};
use kit::dedup::SeenSet;
use kit::http::{ApiError, UserId, found};
use kit::kafka::{ConsumerSpec, Handler, HandlerError, Outbox, Record};
use kit::state::{Shared, UserMap, user_map};
use kit::{Context, Service};
use serde::Serialize;

/// Recent events kept per user.
pub const RECENT_EVENTS: usize = 20;
/// Decisions remembered for attributing orders.
const DECISIONS_KEPT: usize = 100_000;
/// How long after a decision an order without `offerDecisionId` is attributed to it.
const ATTRIBUTION_WINDOW: Duration = Duration::hours(24);
/// Minutes of per-minute figures kept (one day).
const MINUTES_KEPT: i64 = 24 * 60;
/// The windows reported, with their length in minutes (`None`: all time).
pub const WINDOWS: [(&str, Option<i64>); 4] =
    [("5m", Some(5)), ("1h", Some(60)), ("1d", Some(MINUTES_KEPT)), ("all", None)];

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
    const PARTITIONED: bool = true;
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
        let (gauges, shutdown) = (Shared::clone(&state), ctx.shutdown.clone());
        ctx.spawn_task(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    _ = tick.tick() => export_gauges(&gauges.read().summary(Utc::now())),
                }
            }
        });
        let routes = axum::Router::new()
            .route("/api/analytics/summary", get(summary))
            .route("/api/analytics/user/{user_id}", get(user))
            .with_state(state);
        ctx.serve(routes).await
    }
}

/// What a span of time (a minute, a window, all time) adds up to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub counts: EventCounts,
    pub orders: u64,
    pub revenue: f64,
    pub sessions_started: u64,
    pub sessions_converted: u64,
    pub recommendations_shown: u64,
    pub recommendations_clicked: u64,
    /// Events about a product the catalog did not hold yet when the event was processed.
    pub unknown_product_events: u64,
    /// By action: decisions, attributed orders, attributed revenue.
    pub offers: BTreeMap<OfferAction, (u64, u64, f64)>,
    /// Sum and count of event ages (seconds) and processing delays, for the pipeline's lag.
    pub age: (f64, u64),
    pub delay: (f64, u64),
}

impl Figures {
    fn merge(&mut self, o: &Figures) {
        self.counts.merge(&o.counts);
        self.orders += o.orders;
        self.revenue += o.revenue;
        self.sessions_started += o.sessions_started;
        self.sessions_converted += o.sessions_converted;
        self.recommendations_shown += o.recommendations_shown;
        self.recommendations_clicked += o.recommendations_clicked;
        self.unknown_product_events += o.unknown_product_events;
        for (a, (d, n, r)) in &o.offers {
            let slot = self.offers.entry(*a).or_default();
            slot.0 += d;
            slot.1 += n;
            slot.2 += r;
        }
        self.age = (self.age.0 + o.age.0, self.age.1 + o.age.1);
        self.delay = (self.delay.0 + o.delay.0, self.delay.1 + o.delay.1);
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
    /// Most recent first.
    pub recent_events: VecDeque<RecentEvent>,
    #[serde(skip)]
    latest_decision: Option<(String, DateTime<Utc>)>,
}

/// An event as the user explorer lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecentEvent {
    pub event_id: String,
    pub event_type: EventType,
    pub product_id: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub amount: Option<f64>,
}

/// One campaign's figures (all time).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CampaignStats {
    pub campaign_id: String,
    pub events: u64,
    pub clicks: u64,
    pub orders: u64,
    pub revenue: f64,
}

/// All figures.
pub struct Kpis {
    dedup_capacity: usize,
    seen: SeenSet,
    all: Figures,
    minutes: BTreeMap<i64, Figures>,
    users: UserMap<UserStats>,
    /// Users seen (a user forgotten after `MAX_USERS` others counts again on return).
    users_seen: u64,
    sessions: SeenSet,
    converted_sessions: SeenSet,
    campaigns: BTreeMap<String, CampaignStats>,
    /// decision id -> action, for attributing orders; the oldest forgotten first.
    decisions: HashMap<String, OfferAction>,
    decision_order: VecDeque<String>,
    attributed: SeenSet,
    shown: SeenSet,
    clicked: SeenSet,
}

/// A window's figures as the API shows them.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowSummary {
    pub totals: EventCounts,
    pub events: u64,
    pub orders: u64,
    pub revenue: f64,
    pub sessions: u64,
    pub conversion_rate: f64,
    pub view_to_cart_rate: f64,
    pub cart_to_purchase_rate: f64,
    pub recommendations_shown: u64,
    pub recommendations_clicked: u64,
    pub recommendation_ctr: f64,
    /// Events about products not in the catalog yet when processed (catalog feeds lag).
    pub unknown_product_events: u64,
    pub offers: Vec<OfferPerformance>,
}

/// How one offer action did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OfferPerformance {
    pub action: OfferAction,
    pub decisions: u64,
    pub orders: u64,
    pub acceptance_rate: f64,
    pub revenue: f64,
}

/// The pipeline's lag as analytics sees it (last 5 minutes).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineLag {
    /// Mean time from an event's occurrence to its counting here, seconds.
    pub mean_event_age_seconds: f64,
    /// Mean time from occurrence to the event processor, seconds.
    pub mean_processing_delay_seconds: f64,
}

/// The summary body.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub totals: EventCounts,
    pub events: u64,
    pub users: u64,
    pub sessions: u64,
    pub orders: u64,
    pub revenue: f64,
    pub conversion_rate: f64,
    pub view_to_cart_rate: f64,
    pub cart_to_purchase_rate: f64,
    pub offers: BTreeMap<String, u64>,
    pub recommendation_ctr: f64,
    /// `5m`, `1h`, `1d`, `all`.
    pub windows: BTreeMap<String, WindowSummary>,
    pub campaigns: Vec<CampaignStats>,
    pub pipeline: PipelineLag,
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

fn cents(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn window_summary(f: &Figures) -> WindowSummary {
    let t = &f.counts;
    WindowSummary {
        totals: t.clone(),
        events: t.total(),
        orders: f.orders,
        revenue: cents(f.revenue),
        sessions: f.sessions_started,
        conversion_rate: ratio(f.sessions_converted, f.sessions_started),
        view_to_cart_rate: ratio(t.add_to_cart, t.product_views),
        cart_to_purchase_rate: ratio(t.purchases, t.add_to_cart),
        recommendations_shown: f.recommendations_shown,
        recommendations_clicked: f.recommendations_clicked,
        recommendation_ctr: ratio(f.recommendations_clicked, f.recommendations_shown),
        unknown_product_events: f.unknown_product_events,
        offers: OfferAction::ALL
            .iter()
            .map(|a| {
                let (d, n, r) = f.offers.get(a).copied().unwrap_or_default();
                OfferPerformance {
                    action: *a,
                    decisions: d,
                    orders: n,
                    acceptance_rate: ratio(n, d),
                    revenue: cents(r),
                }
            })
            .collect(),
    }
}

impl Kpis {
    pub fn new(dedup_capacity: usize) -> Self {
        Self {
            dedup_capacity,
            seen: SeenSet::new(dedup_capacity),
            all: Figures::default(),
            minutes: BTreeMap::new(),
            users: user_map(),
            users_seen: 0,
            sessions: SeenSet::new(dedup_capacity),
            converted_sessions: SeenSet::new(dedup_capacity),
            campaigns: BTreeMap::new(),
            decisions: HashMap::new(),
            decision_order: VecDeque::new(),
            attributed: SeenSet::new(DECISIONS_KEPT),
            shown: SeenSet::new(dedup_capacity),
            clicked: SeenSet::new(dedup_capacity),
        }
    }

    /// Adds `f` to the minute of `at` and to all time (minutes older than a day are dropped).
    fn add(&mut self, at: DateTime<Utc>, now: DateTime<Utc>, f: impl Fn(&mut Figures)) {
        f(&mut self.all);
        let (minute, current) = (at.timestamp().div_euclid(60), now.timestamp().div_euclid(60));
        if minute > current - MINUTES_KEPT {
            f(self.minutes.entry(minute).or_default());
        }
        while self.minutes.first_key_value().is_some_and(|(m, _)| *m <= current - MINUTES_KEPT) {
            self.minutes.pop_first();
        }
    }

    fn user_mut(&mut self, id: &str) -> &mut UserStats {
        if !self.users.contains(id) {
            self.users_seen += 1;
        }
        self.users.get_or_insert_mut(id.to_owned(), || UserStats { user_id: id.to_owned(), ..Default::default() })
    }

    /// Counts one event; `false` if it was a redelivery. `live` is false during a replay at
    /// start, when the event's age says nothing about the pipeline's lag now.
    pub fn record_event(&mut self, e: &ProcessedEvent, now: DateTime<Utc>, live: bool) -> bool {
        if !self.seen.insert(&e.idempotency_key()) {
            return false;
        }
        // Bucketed by processing time (not arrival here), so a replay after a restart puts
        // events back in their own minutes.
        let at = e.processed_at;
        // Session ids, like event ids, are unique only per user.
        let session = events::idempotency_key(&e.user_id, &e.session_id);
        let new_session = self.sessions.insert(&session);
        let purchase = match (e.event_type, &e.order) {
            (EventType::Purchase, Some(order)) => Some(order),
            _ => None,
        };
        let converted = purchase.is_some() && self.converted_sessions.insert(&session);
        let rec = e.recommendation_id.as_deref();
        let shown = rec.is_some() && e.event_type == EventType::PageView && self.shown.insert(rec.unwrap_or_default());
        let clicked = rec.is_some()
            && matches!(e.event_type, EventType::Click | EventType::ProductView)
            && self.clicked.insert(rec.unwrap_or_default());
        let age = (now - e.occurred_at).num_milliseconds() as f64 / 1000.0;
        let delay = (e.processed_at - e.occurred_at).num_milliseconds() as f64 / 1000.0;
        let amount = purchase.map_or(0.0, |o| o.amount);
        let unknown = e.product.as_ref().is_some_and(|p| p.unknown)
            || e.order.as_ref().is_some_and(|o| o.items.iter().any(|i| i.product.unknown));
        self.add(at, now, |f| {
            f.unknown_product_events += u64::from(unknown);
            f.counts.add(e.event_type);
            f.sessions_started += u64::from(new_session);
            f.sessions_converted += u64::from(converted);
            f.recommendations_shown += u64::from(shown);
            f.recommendations_clicked += u64::from(clicked);
            if purchase.is_some() {
                f.orders += 1;
                f.revenue += amount;
            }
            if live {
                f.age = (f.age.0 + age.max(0.0), f.age.1 + 1);
                f.delay = (f.delay.0 + delay.max(0.0), f.delay.1 + 1);
            }
        });

        if let Some(c) = &e.campaign_id {
            if !self.campaigns.contains_key(c) && self.campaigns.len() >= MAX_CAMPAIGNS {
                // Campaign ids come from clients: keep the bound by forgetting the campaign
                // with the fewest events.
                if let Some(least) = self.campaigns.values().min_by_key(|s| s.events).map(|s| s.campaign_id.clone()) {
                    self.campaigns.remove(&least);
                }
            }
            let stats = self
                .campaigns
                .entry(c.clone())
                .or_insert_with(|| CampaignStats { campaign_id: c.clone(), ..Default::default() });
            stats.events += 1;
            stats.clicks += u64::from(e.event_type == EventType::Click);
            if purchase.is_some() {
                stats.orders += 1;
                stats.revenue = cents(stats.revenue + amount);
            }
        }

        // An order is the reward of the offer it names, or of the user's latest recent one.
        if let Some(order) = purchase {
            let latest = self.users.peek(&e.user_id).and_then(|u| u.latest_decision.clone());
            let decision = order
                .offer_decision_id
                .clone()
                .filter(|id| self.decisions.contains_key(id))
                .or_else(|| latest.filter(|(_, t)| e.occurred_at - *t <= ATTRIBUTION_WINDOW).map(|(id, _)| id));
            if let Some(id) = decision
                && let Some(action) = self.decisions.get(&id).copied()
                && self.attributed.insert(&id)
            {
                self.add(at, now, |f| {
                    let slot = f.offers.entry(action).or_default();
                    slot.1 += 1;
                    slot.2 += amount;
                });
            }
        }

        let u = self.user_mut(&e.user_id);
        u.counts.add(e.event_type);
        u.sessions += u64::from(new_session);
        u.first_seen = Some(u.first_seen.map_or(e.occurred_at, |t| t.min(e.occurred_at)));
        u.last_seen = Some(u.last_seen.map_or(e.occurred_at, |t| t.max(e.occurred_at)));
        if let Some(order) = purchase {
            u.orders += 1;
            u.revenue = cents(u.revenue + order.amount);
        }
        u.recent_events.push_front(RecentEvent {
            event_id: e.event_id.clone(),
            event_type: e.event_type,
            product_id: e.product.as_ref().map(|p| p.product_id.clone()),
            occurred_at: e.occurred_at,
            amount: purchase.map(|o| o.amount),
        });
        u.recent_events.truncate(RECENT_EVENTS);
        true
    }

    /// Counts one offer decision; `false` if it was a redelivery.
    pub fn record_offer(&mut self, o: &OfferDecision, now: DateTime<Utc>) -> bool {
        if !self.seen.insert(&o.decision_id) {
            return false;
        }
        self.add(o.decided_at, now, |f| f.offers.entry(o.action).or_default().0 += 1);
        if self.decision_order.len() >= DECISIONS_KEPT
            && let Some(old) = self.decision_order.pop_front()
        {
            self.decisions.remove(&old);
        }
        self.decisions.insert(o.decision_id.clone(), o.action);
        self.decision_order.push_back(o.decision_id.clone());
        let u = self.user_mut(&o.user_id);
        *u.offers.entry(o.action.as_str().to_owned()).or_default() += 1;
        if u.latest_decision.as_ref().is_none_or(|(_, t)| *t <= o.decided_at) {
            u.latest_decision = Some((o.decision_id.clone(), o.decided_at));
        }
        true
    }

    pub fn user(&self, id: &str) -> Option<&UserStats> {
        self.users.peek(id)
    }

    /// The figures of the last `minutes` minutes.
    fn window(&self, now: DateTime<Utc>, minutes: i64) -> Figures {
        let current = now.timestamp().div_euclid(60);
        let mut total = Figures::default();
        for (_, f) in self.minutes.range(current - minutes + 1..) {
            total.merge(f);
        }
        total
    }

    pub fn summary(&self, now: DateTime<Utc>) -> Summary {
        let minute = now.timestamp().div_euclid(60);
        let all = window_summary(&self.all);
        let windows: BTreeMap<String, WindowSummary> = WINDOWS
            .iter()
            .map(|(name, minutes)| {
                let f = minutes.map(|m| self.window(now, m));
                ((*name).to_owned(), f.as_ref().map_or_else(|| all.clone(), window_summary))
            })
            .collect();
        let recent = self.window(now, 5);
        let mean = |(sum, n): (f64, u64)| if n == 0 { 0.0 } else { (sum / n as f64 * 1000.0).round() / 1000.0 };
        let t = &self.all.counts;
        Summary {
            totals: t.clone(),
            events: t.total(),
            users: self.users_seen,
            sessions: self.all.sessions_started,
            orders: self.all.orders,
            revenue: cents(self.all.revenue),
            conversion_rate: ratio(self.all.sessions_converted, self.all.sessions_started),
            view_to_cart_rate: ratio(t.add_to_cart, t.product_views),
            cart_to_purchase_rate: ratio(t.purchases, t.add_to_cart),
            offers: self.all.offers.iter().map(|(a, (d, _, _))| (a.as_str().to_owned(), *d)).collect(),
            recommendation_ctr: all.recommendation_ctr,
            windows,
            campaigns: self.campaigns.values().cloned().collect(),
            pipeline: PipelineLag {
                mean_event_age_seconds: mean(recent.age),
                mean_processing_delay_seconds: mean(recent.delay),
            },
            events_last_minute: self.minutes.get(&minute).map_or(0, |f| f.counts.total()),
            events_per_minute: (minute - 59..=minute)
                .map(|m| MinuteCount {
                    minute: DateTime::from_timestamp(m * 60, 0).unwrap_or(now),
                    events: self.minutes.get(&m).map_or(0, |f| f.counts.total()),
                })
                .collect(),
            generated_at: now,
        }
    }
}

/// The summary's figures as Prometheus gauges.
fn export_gauges(s: &Summary) {
    for (window, w) in &s.windows {
        let window = window.clone();
        for t in EventType::ACTIVITY.into_iter().chain([EventType::Purchase]) {
            metrics::gauge!("analytics_events", "window" => window.clone(), "type" => t.as_str())
                .set(w.totals.get(t) as f64);
        }
        metrics::gauge!("analytics_orders", "window" => window.clone()).set(w.orders as f64);
        metrics::gauge!("analytics_revenue", "window" => window.clone()).set(w.revenue);
        metrics::gauge!("analytics_conversion_rate", "window" => window.clone()).set(w.conversion_rate);
        metrics::gauge!("analytics_recommendation_ctr", "window" => window).set(w.recommendation_ctr);
    }
    if let Some(all) = s.windows.get("all") {
        for o in &all.offers {
            metrics::gauge!("analytics_offer_acceptance_rate", "action" => o.action.as_str()).set(o.acceptance_rate);
            metrics::gauge!("analytics_offer_revenue", "action" => o.action.as_str()).set(o.revenue);
        }
    }
    // Campaign ids are client-chosen: only the top campaigns become metric labels.
    let mut top: Vec<&CampaignStats> = s.campaigns.iter().collect();
    top.sort_by(|a, b| b.revenue.total_cmp(&a.revenue).then(b.events.cmp(&a.events)));
    for c in top.into_iter().take(CAMPAIGN_LABELS) {
        metrics::gauge!("analytics_campaign_revenue", "campaign" => c.campaign_id.clone()).set(c.revenue);
    }
    metrics::gauge!("analytics_event_age_seconds").set(s.pipeline.mean_event_age_seconds);
}

/// Most campaigns analytics keeps figures for (campaign ids come from clients).
pub const MAX_CAMPAIGNS: usize = 10_000;

/// How many campaigns (by revenue) are exported as Prometheus labels.
pub const CAMPAIGN_LABELS: usize = 20;

struct Counter(Shared<Kpis>);

impl Handler for Counter {
    fn reset(&mut self) -> bool {
        let mut k = self.0.write();
        *k = Kpis::new(k.dedup_capacity);
        true
    }

    fn handle(&mut self, rec: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        let mut k = self.0.write();
        match rec.topic {
            Topic::ProcessedEvents => {
                k.record_event(&rec.json()?, Utc::now(), !out.is_replay());
            }
            Topic::Offers => {
                k.record_offer(&rec.json()?, Utc::now());
            }
            other => return Err(HandlerError::malformed(format!("unexpected topic {other}"))),
        }
        Ok(())
    }
}

async fn summary(State(k): State<Shared<Kpis>>) -> Json<Summary> {
    Json(k.read().summary(Utc::now()))
}

async fn user(State(k): State<Shared<Kpis>>, UserId(user_id): UserId) -> Result<Json<UserStats>, ApiError> {
    found(k.read().user(&user_id).cloned(), || format!("no analytics for user {user_id:?}: no events seen"))
}

#[cfg(test)]
mod tests {
    use events::ProcessedOrder;

    use super::*;

    fn event(id: &str, user: &str, session: &str, t: EventType) -> ProcessedEvent {
        ProcessedEvent {
            order: (t == EventType::Purchase).then(|| ProcessedOrder {
                order_id: "o".into(),
                amount: 25.5,
                currency: "EUR".into(),
                items: vec![],
                offer_decision_id: None,
            }),
            ..events::generate::processed(id, user, session, t, Utc::now())
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
            k.record_event(&e, now, true);
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

    fn decision(id: &str, user: &str, action: OfferAction, at: DateTime<Utc>) -> OfferDecision {
        OfferDecision {
            schema_version: 1,
            decision_id: id.into(),
            user_id: user.into(),
            decided_at: at,
            action,
            propensity: 0.9,
            policy: "p".into(),
            trigger: "api".into(),
            context: BTreeMap::new(),
            explanation: String::new(),
        }
    }

    #[test]
    fn windows_count_what_happened_in_them() {
        let mut k = Kpis::new(100);
        let now = Utc::now();
        let at = |minutes: i64, mut e: ProcessedEvent| {
            e.processed_at = now - Duration::minutes(minutes);
            e.occurred_at = e.processed_at;
            e
        };
        k.record_event(&at(2, event("1", "a", "s1", EventType::ProductView)), now, true);
        k.record_event(&at(30, event("2", "a", "s1", EventType::ProductView)), now, true);
        k.record_event(&at(300, event("3", "a", "s2", EventType::Purchase)), now, true);
        k.record_event(&at(3000, event("4", "b", "s3", EventType::ProductView)), now, true);
        let s = k.summary(now);
        let views = |w: &str| s.windows[w].totals.product_views;
        assert_eq!((views("5m"), views("1h"), views("1d"), views("all")), (1, 2, 2, 3));
        assert_eq!((s.windows["1h"].orders, s.windows["1d"].orders, s.windows["1d"].revenue), (0, 1, 25.5));
        assert_eq!(s.windows["all"].sessions, 3);
        assert_eq!(s.windows["1d"].conversion_rate, 0.5, "s2 converted of s1, s2");
    }

    #[test]
    fn events_for_products_not_in_the_catalog_are_counted() {
        let mut k = Kpis::new(100);
        let now = Utc::now();
        let mut unknown = event("1", "a", "s", EventType::ProductView);
        unknown.product = Some(events::ProductInfo::unknown("SKU-NEW"));
        k.record_event(&unknown, now, true);
        k.record_event(&unknown, now, true); // redelivery
        k.record_event(&event("2", "a", "s", EventType::ProductView), now, true);
        let s = k.summary(now);
        assert_eq!((s.windows["5m"].unknown_product_events, s.windows["all"].unknown_product_events), (1, 1));
        assert_eq!(s.windows["all"].events, 2);
    }

    #[test]
    fn click_through_is_attributed_by_request_id() {
        let mut k = Kpis::new(100);
        let now = Utc::now();
        let with_rec = |id: &str, t: EventType, rec: &str| {
            let mut e = event(id, "a", "s", t);
            e.recommendation_id = Some(rec.into());
            e
        };
        for e in [
            with_rec("1", EventType::PageView, "r1"),
            with_rec("2", EventType::PageView, "r2"),
            with_rec("3", EventType::PageView, "r3"),
            with_rec("4", EventType::PageView, "r4"),
            with_rec("5", EventType::Click, "r1"),
            with_rec("6", EventType::ProductView, "r1"), // the same list clicked again
            with_rec("7", EventType::Click, "r2"),
            with_rec("7", EventType::Click, "r2"),  // redelivery
            event("8", "a", "s", EventType::Click), // not from a recommendation
        ] {
            k.record_event(&e, now, true);
        }
        let w = &k.summary(now).windows["5m"];
        assert_eq!((w.recommendations_shown, w.recommendations_clicked, w.recommendation_ctr), (4, 2, 0.5));
    }

    #[test]
    fn orders_are_attributed_to_offers_and_campaigns() {
        let mut k = Kpis::new(100);
        let now = Utc::now();
        k.record_offer(&decision("d1", "a", OfferAction::Discount10, now - Duration::hours(1)), now);
        k.record_offer(&decision("d2", "b", OfferAction::Reminder, now - Duration::hours(2)), now);
        k.record_offer(&decision("d3", "c", OfferAction::Reminder, now - Duration::hours(30)), now);
        k.record_offer(&decision("d3", "c", OfferAction::Reminder, now - Duration::hours(30)), now);
        // a names nothing: its latest decision (d1) within a day gets it.
        let mut order_a = event("o1", "a", "s1", EventType::Purchase);
        order_a.campaign_id = Some("spring".into());
        k.record_event(&order_a, now, true);
        // b names d2 explicitly.
        let mut order_b = event("o2", "b", "s2", EventType::Purchase);
        if let Some(o) = order_b.order.as_mut() {
            o.offer_decision_id = Some("d2".into());
        }
        k.record_event(&order_b, now, true);
        // c's decision is too old.
        k.record_event(&event("o3", "c", "s3", EventType::Purchase), now, true);
        let s = k.summary(now);
        let perf = |a: OfferAction| s.windows["all"].offers.iter().find(|o| o.action == a).cloned().expect("row");
        let discount = perf(OfferAction::Discount10);
        assert_eq!(
            (discount.decisions, discount.orders, discount.acceptance_rate, discount.revenue),
            (1, 1, 1.0, 25.5)
        );
        let reminder = perf(OfferAction::Reminder);
        assert_eq!((reminder.decisions, reminder.orders, reminder.acceptance_rate), (2, 1, 0.5));
        assert_eq!(s.offers["REMINDER"], 2);
        assert_eq!(s.campaigns.len(), 1);
        assert_eq!((s.campaigns[0].orders, s.campaigns[0].revenue), (1, 25.5));
        assert_eq!(k.user("a").expect("a").recent_events[0].amount, Some(25.5));
    }

    /// Campaign ids are chosen by clients: however many arrive, analytics keeps at most
    /// `MAX_CAMPAIGNS` of them, forgetting the smallest first.
    #[test]
    fn campaigns_are_bounded() {
        let mut k = Kpis::new(100);
        let now = Utc::now();
        let mut big = event("big-0", "u", "s", EventType::ProductView);
        big.campaign_id = Some("big".into());
        k.record_event(&big, now, true);
        big.event_id = "big-1".into();
        k.record_event(&big, now, true);
        for n in 0..MAX_CAMPAIGNS + 50 {
            let mut e = event(&format!("e{n}"), "u", "s", EventType::ProductView);
            e.campaign_id = Some(format!("c{n}"));
            k.record_event(&e, now, true);
        }
        let s = k.summary(now);
        assert_eq!(s.campaigns.len(), MAX_CAMPAIGNS);
        assert!(s.campaigns.iter().any(|c| c.campaign_id == "big" && c.events == 2), "the largest campaign stays");
    }
}
