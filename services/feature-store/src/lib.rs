//! `feature-store` (8085): per-user features from the processed event stream.
//!
//! Consumes `processed-events-topic` (consumer group `feature-store`: instances share the
//! users by partition), updates the user's features, and publishes the new snapshot to
//! `user-features-topic`. `GET /features/{userId}` answers with the features and
//! `updatedAt`, or 404 for a user it has never seen.
//!
//! Features: event counts by type (all time, and over the last hour, day and week — see
//! [`Windows`]), sessions (count, the current one's events and duration, the average events
//! per session, the previous visit), category affinity with exponential time decay
//! (half-life `AFFINITY_HALF_LIFE_HOURS`, default 72; weights: view 1, click 1.5, add to cart 3,
//! purchase 5; kept for the [`CATEGORIES_KEPT`] strongest categories), recently viewed products
//! ([`RECENT_VIEWS`]), the current cart and its value, purchases,
//! total spend, and three derived scores in [0, 1] (see [`derive_scores`]).
//!
//! Redeliveries are recognised by event id (the last 256 per user), so a snapshot is never
//! counted twice.

use std::collections::VecDeque;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use chrono::{DateTime, Utc};
use events::{EventCounts, EventType, ProcessedEvent, Topic, UserFeatures, WindowedCounts};
use kit::catalog::LiveCatalog;
use kit::config::{ConfigError, Env};
use kit::dedup::SeenSet;
use kit::http::{ApiError, OpsToken, UserId, found};
use kit::kafka::{ConsumerSpec, Handler, HandlerError, Outbox, Record};
use kit::state::{Shared, UserMap, user_map};
use kit::{Context, Service};

/// Recently viewed products kept per user.
pub const RECENT_VIEWS: usize = 50;
/// Purchased products kept per user.
pub const PURCHASES_KEPT: usize = 50;
/// Products kept in a cart (the oldest added drops out beyond it).
pub const CART_KEPT: usize = 100;
/// Event ids remembered per user for de-duplication.
pub const SEEN_PER_USER: usize = 256;
/// Categories whose affinity is kept per user (the strongest; beyond it the weakest drops out).
pub const CATEGORIES_KEPT: usize = 50;

/// The `feature-store` service.
pub struct FeatureStore;

/// Settings of the feature store.
#[derive(Debug, Clone)]
pub struct Config {
    /// `AFFINITY_HALF_LIFE_HOURS` (default 72).
    pub affinity_half_life_hours: f64,
    /// `OPS_TOKEN`: required to reset a user's features (unset: disabled).
    pub ops_token: OpsToken,
}

impl Service for FeatureStore {
    const NAME: &'static str = "feature-store";
    const DEFAULT_PORT: u16 = 8085;
    const PARTITIONED: bool = true;
    type Config = Config;

    fn config(env: &Env) -> Result<Config, ConfigError> {
        Ok(Config {
            affinity_half_life_hours: env.checked("AFFINITY_HALF_LIFE_HOURS", 72.0, |v: &f64| {
                if v.is_finite() && *v > 0.0 { Ok(()) } else { Err("must be a positive number of hours".into()) }
            })?,
            ops_token: OpsToken::from_env(env)?,
        })
    }

    async fn run(config: Config, mut ctx: Context) -> anyhow::Result<()> {
        let producer = ctx.pipeline_producer()?;
        let token = config.ops_token.clone();
        let catalog = ctx.follow_catalog(&producer).await;
        let store = Shared::new(Store::new(config, catalog));
        ctx.spawn_consumer(
            &producer,
            ConsumerSpec::group("processed-events", [Topic::ProcessedEvents], "feature-store").restoring(),
            Updater(Shared::clone(&store)),
        );
        let routes = axum::Router::new()
            .route("/features/{user_id}", get(get_features).delete(reset_features))
            .with_state(AppState { store, token });
        ctx.serve(routes).await
    }
}

/// Windowed event counters in time buckets: five-minute buckets for the last hour, hourly
/// ones for the last day and week. Only buckets with events exist, so a quiet user costs
/// nothing and a busy one at most 12 + 168 buckets.
#[derive(Debug, Default)]
pub struct Windows {
    minutes: VecDeque<(i64, EventCounts)>,
    hours: VecDeque<(i64, EventCounts)>,
}

const FIVE_MINUTES: i64 = 300;
const HOUR: i64 = 3_600;
const WEEK: i64 = 7 * 24 * HOUR;

impl Windows {
    /// Counts an event that happened at `at`.
    pub fn add(&mut self, t: EventType, at: DateTime<Utc>) {
        let secs = at.timestamp();
        bucket(&mut self.minutes, secs - secs.rem_euclid(FIVE_MINUTES)).add(t);
        bucket(&mut self.hours, secs - secs.rem_euclid(HOUR)).add(t);
        // Forget what no window can see any more (relative to the newest bucket).
        let newest = self.hours.back().map_or(secs, |b| b.0);
        while self.hours.front().is_some_and(|b| b.0 <= newest - WEEK) {
            self.hours.pop_front();
        }
        let newest = self.minutes.back().map_or(secs, |b| b.0);
        while self.minutes.front().is_some_and(|b| b.0 <= newest - HOUR) {
            self.minutes.pop_front();
        }
    }

    /// The counts of the windows ending at `now`.
    pub fn at(&self, now: DateTime<Utc>) -> WindowedCounts {
        let secs = now.timestamp();
        let sum = |buckets: &VecDeque<(i64, EventCounts)>, width: i64, span: i64| {
            let from = secs - secs.rem_euclid(width) - span + width;
            let mut total = EventCounts::default();
            for (_, c) in buckets.iter().filter(|(start, _)| *start >= from && *start <= secs) {
                total.merge(c);
            }
            total
        };
        WindowedCounts {
            last_1h: sum(&self.minutes, FIVE_MINUTES, HOUR),
            last_24h: sum(&self.hours, HOUR, 24 * HOUR),
            last_7d: sum(&self.hours, HOUR, WEEK),
        }
    }
}

/// The bucket starting at `start`, created in time order (an out-of-order event lands in its
/// own bucket wherever it belongs).
fn bucket(buckets: &mut VecDeque<(i64, EventCounts)>, start: i64) -> &mut EventCounts {
    let i = buckets.partition_point(|b| b.0 < start);
    if buckets.get(i).is_none_or(|b| b.0 != start) {
        buckets.insert(i, (start, EventCounts::default()));
    }
    &mut buckets[i].1
}

struct UserState {
    features: UserFeatures,
    seen: SeenSet,
    windows: Windows,
    /// Engagement since the user's last purchase, for purchase intent.
    views_since_purchase: u64,
    clicks_since_purchase: u64,
}

/// All users' features.
pub struct Store {
    config: Config,
    users: UserMap<UserState>,
    /// For the cart's value at current prices.
    catalog: LiveCatalog,
}

impl Store {
    pub fn new(config: Config, catalog: LiveCatalog) -> Self {
        Self { config, users: user_map(), catalog }
    }

    pub fn get(&self, user_id: &str) -> Option<&UserFeatures> {
        self.users.peek(user_id).map(|u| &u.features)
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Forgets a user's features; `false` for a user it does not know.
    pub fn reset(&mut self, user_id: &str) -> bool {
        self.users.pop(user_id).is_some()
    }

    /// Applies one event; returns the new snapshot, or `None` for a redelivered event. Every
    /// time-based feature advances by event time; `now` only stamps `updatedAt`. The snapshot
    /// is the stored one, lent: it is sent from where it lies, not copied for every event.
    pub fn apply(&mut self, e: &ProcessedEvent, now: DateTime<Utc>) -> Option<&UserFeatures> {
        let half_life = self.config.affinity_half_life_hours;
        let user = self.users.get_or_insert_mut(e.user_id.clone(), || UserState {
            features: UserFeatures {
                schema_version: events::SCHEMA_VERSION,
                user_id: e.user_id.clone(),
                first_seen: e.occurred_at,
                last_seen: e.occurred_at,
                ..Default::default()
            },
            seen: SeenSet::new(SEEN_PER_USER),
            windows: Windows::default(),
            views_since_purchase: 0,
            clicks_since_purchase: 0,
        });
        if !user.seen.insert(&e.event_id) {
            return None;
        }
        let f = &mut user.features;

        // Decay affinities to the time of this event, then add its weight.
        let hours = (e.occurred_at - f.last_seen).num_milliseconds().max(0) as f64 / 3_600_000.0;
        let decay = 0.5_f64.powf(hours / half_life);
        for v in f.category_affinity.values_mut().chain(f.product_engagement.values_mut()) {
            *v *= decay;
        }
        f.category_affinity.retain(|_, v| *v > 1e-3);
        let weight = e.event_type.engagement_weight();
        if let Some(category) = e.product.as_ref().and_then(|p| p.known_category())
            && weight > 0.0
        {
            *f.category_affinity.entry(category.to_owned()).or_default() += weight;
        }

        f.counts.add(e.event_type);
        user.windows.add(e.event_type, e.occurred_at);
        if f.current_session_id != e.session_id {
            if f.sessions > 0 {
                f.session.previous_visit_at = Some(f.last_seen);
            }
            f.sessions += 1;
            f.current_session_id.clone_from(&e.session_id);
            f.session.current_events = 0;
            f.session.current_started_at = Some(e.occurred_at);
        }
        f.session.current_events += 1;
        let started = *f.session.current_started_at.get_or_insert(e.occurred_at);
        f.session.current_duration_seconds =
            (e.occurred_at.max(f.last_seen) - started).num_milliseconds().max(0) as f64 / 1000.0;
        f.session.average_events_per_session = f.counts.total() as f64 / f.sessions as f64;
        if let Some(p) = &e.product
            && weight > 0.0
        {
            *f.product_engagement.entry(p.product_id.clone()).or_default() += weight;
        }
        // The products this event took off the ends of the three lists that keep engagement.
        let mut dropped: Vec<String> = Vec::new();
        let product_id = e.product.as_ref().map(|p| p.product_id.clone());
        match (e.event_type, product_id) {
            (EventType::ProductView | EventType::Click, Some(id)) => {
                if e.event_type == EventType::ProductView {
                    user.views_since_purchase += 1;
                } else {
                    user.clicks_since_purchase += 1;
                }
                dropped.extend(move_to_front(&mut f.recently_viewed, id, RECENT_VIEWS));
            }
            (EventType::AddToCart, Some(id)) => dropped.extend(move_to_front(&mut f.cart, id, CART_KEPT)),
            (EventType::RemoveFromCart, Some(id)) => f.cart.retain(|p| *p != id),
            _ => {}
        }
        if let Some(order) = &e.order {
            for item in &order.items {
                f.cart.retain(|p| *p != item.product.product_id);
                dropped.extend(move_to_front(&mut f.purchased, item.product.product_id.clone(), PURCHASES_KEPT));
                *f.product_engagement.entry(item.product.product_id.clone()).or_default() +=
                    EventType::Purchase.engagement_weight();
                if let Some(category) = item.product.known_category() {
                    *f.category_affinity.entry(category.to_owned()).or_default() +=
                        EventType::Purchase.engagement_weight();
                }
            }
            f.order_count += 1;
            f.total_spend += order.amount;
            f.last_purchase_at = f.last_purchase_at.max(Some(e.occurred_at));
            user.views_since_purchase = 0;
            user.clicks_since_purchase = 0;
        }
        // Engagement is kept for the products the lists keep (all of them bounded). Only a
        // product this event dropped from a list (or its own, if no list holds it) can have
        // left them all: those few are looked for in the lists, rather than every product
        // being filed in a set for every event. Should the map hold more than the lists (it
        // cannot, as only this code adds to either), every entry is checked.
        let in_lists = |id: &str| f.recently_viewed.iter().chain(&f.cart).chain(&f.purchased).any(|p| p == id);
        let own = e.product.as_ref().map(|p| p.product_id.as_str());
        for id in dropped.iter().map(String::as_str).chain(own).filter(|id| !in_lists(id)) {
            f.product_engagement.remove(id);
        }
        if f.product_engagement.len() > f.recently_viewed.len() + f.cart.len() + f.purchased.len() {
            let kept: foldhash::HashSet<&String> =
                f.recently_viewed.iter().chain(&f.cart).chain(&f.purchased).collect();
            f.product_engagement.retain(|p, _| kept.contains(p));
        }
        // Affinity is kept for the strongest categories only; the categories this event
        // engaged with stay (a new interest must be able to enter), the weakest others go.
        if f.category_affinity.len() > CATEGORIES_KEPT {
            let engaged = |c: &str| {
                e.product.as_ref().and_then(|p| p.known_category()) == Some(c)
                    || e.order.iter().flat_map(|o| &o.items).any(|i| i.product.known_category() == Some(c))
            };
            let mut others: Vec<(&String, f64)> =
                f.category_affinity.iter().filter(|(c, _)| !engaged(c)).map(|(c, v)| (c, *v)).collect();
            let excess = (f.category_affinity.len() - CATEGORIES_KEPT).min(others.len());
            if excess > 0 {
                // Weakest first; on a tie the later name goes (the preferred category's order).
                others.select_nth_unstable_by(excess - 1, |a, b| a.1.total_cmp(&b.1).then(b.0.cmp(a.0)));
                let dropped: Vec<String> = others[..excess].iter().map(|(c, _)| (*c).clone()).collect();
                for c in &dropped {
                    f.category_affinity.remove(c);
                }
            }
        }
        let catalog = self.catalog.read();
        f.cart_value = f.cart.iter().filter_map(|id| catalog.get(id)).map(|p| p.price).fold(0.0, |a, b| a + b);
        f.preferred_category =
            f.category_affinity.iter().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(a.0))).map(|(c, _)| c.clone());
        f.first_seen = f.first_seen.min(e.occurred_at);
        f.last_seen = f.last_seen.max(e.occurred_at);
        f.updated_at = now;
        // Windows and scores as of the user's latest event, not the wall clock: an imported
        // history gives the features it gave live.
        f.windows = user.windows.at(f.last_seen);
        f.last_event_id.clone_from(&e.event_id);
        f.last_event_type = Some(e.event_type);
        derive_scores(f, user.views_since_purchase, user.clicks_since_purchase, f.last_seen);
        Some(f)
    }
}

/// Puts `id` first in `list` (once), keeping at most `cap`; returns what fell off the end.
fn move_to_front(list: &mut Vec<String>, id: String, cap: usize) -> Vec<String> {
    list.retain(|p| *p != id);
    list.insert(0, id);
    if list.len() > cap { list.split_off(cap) } else { Vec::new() }
}

/// The derived scores, each in [0, 1]:
/// - `purchaseIntent` = 1 − exp(−(0.6·cart size + 0.08·views + 0.25·clicks since the last purchase));
/// - `activityScore` = 1 − exp(−events / 25);
/// - `recencyScore` = exp(−hours since the last event / 24), as of `now`.
pub fn derive_scores(f: &mut UserFeatures, views: u64, clicks: u64, now: DateTime<Utc>) {
    let raw = 0.6 * f.cart.len() as f64 + 0.08 * views.min(20) as f64 + 0.25 * clicks.min(10) as f64;
    f.purchase_intent = 1.0 - (-raw).exp();
    f.activity_score = 1.0 - (-(f.counts.total() as f64) / 25.0).exp();
    let hours = (now - f.last_seen).num_milliseconds().max(0) as f64 / 3_600_000.0;
    f.recency_score = (-hours / 24.0).exp();
}

struct Updater(Shared<Store>);

impl Handler for Updater {
    fn reset(&mut self) -> bool {
        self.0.write().users = user_map();
        true
    }

    fn handle(&mut self, rec: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        let event: ProcessedEvent = rec.json()?;
        let mut store = self.0.write();
        match store.apply(&event, Utc::now()) {
            Some(f) => {
                metrics::counter!("features_updates_total").increment(1);
                out.send(f);
            }
            None => metrics::counter!("features_duplicates_total").increment(1),
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    store: Shared<Store>,
    token: OpsToken,
}

async fn get_features(State(s): State<AppState>, UserId(user_id): UserId) -> Result<Json<UserFeatures>, ApiError> {
    let store = s.store.read();
    found(store.get(&user_id).cloned(), || format!("no features for user {user_id:?}: no events seen for this user"))
}

/// `DELETE /features/{userId}`: forgets the user's features (their next event starts afresh);
/// requires the operations token. A restart rebuilds features from the events still retained.
async fn reset_features(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
    UserId(user_id): UserId,
) -> Result<axum::http::StatusCode, ApiError> {
    s.token.check(&headers)?;
    if s.store.write().reset(&user_id) {
        tracing::info!(user = %user_id, "features reset");
        Ok(axum::http::StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no features for user {user_id:?}")))
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use events::{ProcessedItem, ProcessedOrder, ProductInfo};

    use super::*;

    fn product(id: &str) -> ProductInfo {
        ProductInfo::from_catalog(catalog::Catalog::demo(), id)
    }

    fn event(id: &str, t: EventType, product_id: Option<&str>, at: DateTime<Utc>) -> ProcessedEvent {
        ProcessedEvent { product: product_id.map(product), ..events::generate::processed(id, "u", "s1", t, at) }
    }

    fn store() -> Store {
        Store::new(Config { affinity_half_life_hours: 72.0, ops_token: OpsToken::default() }, kit::catalog::demo())
    }

    /// A week of history imported today gives the features the same week gave live: every
    /// window, decay, session and score runs on event time.
    #[test]
    fn an_imported_history_gives_the_features_it_gave_live() {
        let live_start = Utc::now() - Duration::days(7);
        let week: Vec<(EventType, &str, i64)> = vec![
            (EventType::ProductView, "P00001", 0),
            (EventType::ProductView, "P00302", 20),
            (EventType::AddToCart, "P00302", 25),
            (EventType::ProductView, "P00700", 60 * 24),
            (EventType::Click, "P00700", 60 * 24 + 3),
            (EventType::ProductView, "P00001", 60 * 24 * 6),
            (EventType::ProductView, "P00002", 60 * 24 * 6 + 50),
        ];
        let replay = |start: DateTime<Utc>, applied_at: &dyn Fn(DateTime<Utc>) -> DateTime<Utc>| {
            let mut s = store();
            let mut last = None;
            for (i, (t, p, minutes)) in week.iter().enumerate() {
                let at = start + Duration::minutes(*minutes);
                let mut e = event(&i.to_string(), *t, Some(p), at);
                e.session_id = format!("s{}", minutes / (60 * 24));
                last = s.apply(&e, applied_at(at)).cloned();
            }
            last.expect("features")
        };
        // Live: each event applied as it happens. Imported: the same events a year later, all
        // applied now.
        let live = replay(live_start, &|at| at + Duration::seconds(1));
        let imported = replay(live_start - Duration::days(365), &|_| Utc::now());
        assert_eq!(live.windows, imported.windows);
        assert_eq!(live.counts, imported.counts);
        assert_eq!(live.category_affinity, imported.category_affinity);
        assert_eq!(
            (live.sessions, &live.session.current_events),
            (imported.sessions, &imported.session.current_events)
        );
        assert_eq!(live.session.current_duration_seconds, imported.session.current_duration_seconds);
        assert_eq!((live.recency_score, live.purchase_intent), (imported.recency_score, imported.purchase_intent));
        assert_eq!((&live.cart, &live.recently_viewed), (&imported.cart, &imported.recently_viewed));
        assert!(
            live.windows.last_24h.product_views >= 1 && live.windows.last_7d.product_views == 5,
            "{:?}",
            live.windows
        );
    }

    #[test]
    fn views_carts_and_purchases() {
        let mut s = store();
        let t = Utc::now();
        let cat1 = product("P00001").category;
        s.apply(&event("1", EventType::ProductView, Some("P00001"), t), t).expect("new");
        s.apply(&event("2", EventType::ProductView, Some("P00002"), t), t).expect("new");
        let f = s.apply(&event("3", EventType::AddToCart, Some("P00001"), t), t).expect("new");
        assert_eq!(f.recently_viewed, vec!["P00002", "P00001"]);
        assert_eq!(f.cart, vec!["P00001"]);
        assert_eq!(f.counts.product_views, 2);
        assert_eq!(f.preferred_category.as_deref(), Some(cat1.as_str()));
        assert!((f.cart_value - product("P00001").price).abs() < 1e-9);
        assert!(f.purchase_intent > 0.5, "{}", f.purchase_intent);
        assert_eq!(f.sessions, 1);

        let mut purchase = event("4", EventType::Purchase, None, t);
        purchase.order = Some(ProcessedOrder {
            order_id: "o".into(),
            amount: 30.0,
            currency: "EUR".into(),
            items: vec![ProcessedItem { product: product("P00001"), quantity: 1, unit_price: 30.0 }],
            offer_decision_id: None,
        });
        let f = s.apply(&purchase, t).expect("new");
        assert!(f.cart.is_empty());
        assert_eq!(f.purchased, vec!["P00001"]);
        assert_eq!((f.order_count, f.total_spend), (1, 30.0));
        assert!(f.purchase_intent < 0.01);
        assert_eq!(s.get("u").expect("known").last_event_id, "4");
        assert!(s.get("nobody").is_none());
    }

    /// Engagement is kept for exactly the products of the recent views, the cart and the
    /// purchases, while products fall off the ends of those lists and leave the cart.
    #[test]
    fn engagement_is_kept_for_exactly_the_listed_products() {
        let mut s = store();
        let t = Utc::now() - Duration::hours(1);
        // A fixed pseudo-random walk over 300 products: enough for every list to overflow.
        let mut x: u64 = 7;
        let mut next = |n: u64| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % n
        };
        for i in 0..3_000 {
            let id = format!("P{:05}", 1 + next(300));
            let at = t + Duration::milliseconds(i);
            let e = match next(10) {
                0..=4 => event(&i.to_string(), EventType::ProductView, Some(&id), at),
                5 => event(&i.to_string(), EventType::Click, Some(&id), at),
                6 | 7 => event(&i.to_string(), EventType::AddToCart, Some(&id), at),
                8 => event(&i.to_string(), EventType::RemoveFromCart, Some(&id), at),
                _ => {
                    let mut e = event(&i.to_string(), EventType::Purchase, None, at);
                    let items = (0..1 + next(3))
                        .map(|_| ProcessedItem {
                            product: product(&format!("P{:05}", 1 + next(300))),
                            quantity: 1,
                            unit_price: 5.0,
                        })
                        .collect();
                    e.order = Some(ProcessedOrder {
                        order_id: format!("o{i}"),
                        amount: 5.0,
                        currency: "EUR".into(),
                        items,
                        offer_decision_id: None,
                    });
                    e
                }
            };
            let f = s.apply(&e, at).expect("new");
            let listed: std::collections::BTreeSet<&String> =
                f.recently_viewed.iter().chain(&f.cart).chain(&f.purchased).collect();
            let engaged: std::collections::BTreeSet<&String> = f.product_engagement.keys().collect();
            assert_eq!(engaged, listed, "after event {i}");
        }
        let f = s.get("u").expect("known");
        assert_eq!((f.recently_viewed.len(), f.purchased.len()), (RECENT_VIEWS, PURCHASES_KEPT));
    }

    /// A user active in more categories than are kept (a shop's shared "guest" id, a crawler)
    /// keeps the strongest affinities, always including the category just engaged with, so a
    /// snapshot's size and the work per event stay bounded.
    #[test]
    fn category_affinity_is_kept_for_the_strongest_categories() {
        let mut s = store();
        let t = Utc::now() - Duration::hours(1);
        let in_category = |id: &str, category: String| ProductInfo {
            product_id: id.into(),
            name: id.into(),
            category,
            price: 1.0,
            unknown: false,
        };
        // A category viewed often, then 500 categories viewed once each.
        for i in 0..10 {
            let mut e = event(&format!("a{i}"), EventType::ProductView, None, t);
            e.product = Some(in_category("A", "favourite".into()));
            s.apply(&e, t).expect("new");
        }
        for i in 0..500 {
            let at = t + Duration::seconds(i);
            let mut e = event(&format!("b{i}"), EventType::ProductView, None, at);
            e.product = Some(in_category(&format!("B{i}"), format!("c{i:03}")));
            let f = s.apply(&e, at).expect("new");
            assert!(
                f.category_affinity.len() <= CATEGORIES_KEPT,
                "{} categories after event {i}",
                f.category_affinity.len()
            );
            assert!(f.category_affinity.contains_key(&format!("c{i:03}")), "the event's own category, event {i}");
        }
        let f = s.get("u").expect("known");
        assert_eq!(f.category_affinity.len(), CATEGORIES_KEPT);
        assert_eq!(f.preferred_category.as_deref(), Some("favourite"));
        // A category engaged with again climbs among those kept.
        let at = t + Duration::seconds(600);
        for i in 0..3 {
            let mut e = event(&format!("d{i}"), EventType::ProductView, None, at);
            e.product = Some(in_category("D", "newcomer".into()));
            s.apply(&e, at).expect("new");
        }
        let f = s.get("u").expect("known");
        let newcomer = f.category_affinity["newcomer"];
        assert!(newcomer > 2.9, "{newcomer}");
        assert_eq!(f.category_affinity.len(), CATEGORIES_KEPT);
        // An order in more categories than are kept keeps every one of them.
        let at = t + Duration::seconds(700);
        let mut e = event("o", EventType::Purchase, None, at);
        e.order = Some(ProcessedOrder {
            order_id: "o".into(),
            amount: 60.0,
            currency: "EUR".into(),
            items: (0..CATEGORIES_KEPT + 10)
                .map(|i| ProcessedItem {
                    product: in_category(&format!("O{i}"), format!("o{i:03}")),
                    quantity: 1,
                    unit_price: 1.0,
                })
                .collect(),
            offer_decision_id: None,
        });
        let f = s.apply(&e, at).expect("new");
        assert_eq!(f.category_affinity.len(), CATEGORIES_KEPT + 10);
        assert!((0..CATEGORIES_KEPT + 10).all(|i| f.category_affinity.contains_key(&format!("o{i:03}"))));
    }

    #[test]
    fn redeliveries_do_not_count_twice() {
        let mut s = store();
        let t = Utc::now();
        let e = event("1", EventType::Click, Some("P00003"), t);
        assert!(s.apply(&e, t).is_some());
        assert!(s.apply(&e, t).is_none());
        assert_eq!(s.get("u").expect("known").counts.clicks, 1);
    }

    #[test]
    fn affinity_decays_with_time() {
        let mut s = store();
        let t0 = Utc::now() - Duration::hours(144);
        let books = catalog::Catalog::demo().in_category("books").next().expect("a book").id.clone();
        let toys = catalog::Catalog::demo().in_category("toys").next().expect("a toy").id.clone();
        s.apply(&event("1", EventType::ProductView, Some(&books), t0), t0);
        // 144 h later (two half-lives) the book view weighs a quarter.
        let t1 = t0 + Duration::hours(144);
        let f = s.apply(&event("2", EventType::ProductView, Some(&toys), t1), t1).expect("new");
        assert!((f.category_affinity["books"] - 0.25).abs() < 1e-6, "{:?}", f.category_affinity);
        assert!((f.category_affinity["toys"] - 1.0).abs() < 1e-9);
        assert_eq!(f.preferred_category.as_deref(), Some("toys"));
    }

    #[test]
    fn windows_count_what_happened_in_them() {
        let mut s = store();
        let now = Utc::now();
        let ago = |h: f64| now - Duration::milliseconds((h * 3_600_000.0) as i64);
        // Out of order on purpose: redelivery and replays do not arrive sorted.
        for (id, hours) in [("a", 0.5), ("b", 200.0), ("c", 30.0), ("d", 2.0), ("e", 0.1)] {
            let mut e = event(id, EventType::ProductView, Some("P00001"), ago(hours));
            e.session_id = format!("s-{id}");
            s.apply(&e, now);
        }
        let f = s.apply(&event("f", EventType::Click, Some("P00001"), now), now).expect("new");
        assert_eq!(f.windows.last_1h.product_views, 2, "{:?}", f.windows);
        assert_eq!(f.windows.last_1h.clicks, 1);
        assert_eq!(f.windows.last_24h.product_views, 3);
        assert_eq!(f.windows.last_7d.product_views, 4);
        assert_eq!(f.counts.product_views, 5);
        // Six events, five sessions ("s1" is the click's).
        assert_eq!(f.sessions, 6);
        assert_eq!(f.session.current_events, 1);
        assert!((f.session.average_events_per_session - 1.0).abs() < 1e-9);
    }

    #[test]
    fn session_stats_follow_the_current_session() {
        let mut s = store();
        let t0 = Utc::now() - Duration::hours(3);
        s.apply(&event("1", EventType::PageView, None, t0), t0);
        s.apply(&event("2", EventType::ProductView, Some("P00002"), t0 + Duration::seconds(90)), t0);
        let mut later = event("3", EventType::PageView, None, t0 + Duration::hours(2));
        later.session_id = "s2".into();
        let f = s.apply(&later, t0).expect("new");
        assert_eq!(f.sessions, 2);
        assert_eq!(f.session.previous_visit_at, Some(t0 + Duration::seconds(90)));
        assert_eq!(f.session.current_events, 1);
        assert_eq!(f.session.current_started_at, Some(t0 + Duration::hours(2)));
        let mut next = event("4", EventType::Click, Some("P00002"), t0 + Duration::hours(2) + Duration::seconds(30));
        next.session_id = "s2".into();
        let f = s.apply(&next, t0).expect("new");
        assert_eq!((f.session.current_events, f.session.current_duration_seconds), (2, 30.0));
        assert!((f.session.average_events_per_session - 2.0).abs() < 1e-9);
    }
}
