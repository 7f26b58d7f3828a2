//! `feature-store` (8085): per-user features from the processed event stream.
//!
//! Consumes `processed-events-topic` (consumer group `feature-store`: instances share the
//! users by partition), updates the user's features, and publishes the new snapshot to
//! `user-features-topic`. `GET /features/{userId}` answers with the features and
//! `updatedAt`, or 404 for a user it has never seen.
//!
//! Features: event counts by type, sessions, category affinity with exponential time decay
//! (half-life `AFFINITY_HALF_LIFE_HOURS`, default 72; weights: view 1, click 1.5, add to cart 3,
//! purchase 5), recently viewed products (20), the current cart and its value, purchases,
//! total spend, and three derived scores in [0, 1] (see [`derive_scores`]).
//!
//! Redeliveries are recognised by event id (the last 256 per user), so a snapshot is never
//! counted twice.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::routing::get;
use chrono::{DateTime, Utc};
use events::{EventType, ProcessedEvent, Topic, UserFeatures};
use kit::config::{ConfigError, Env};
use kit::dedup::SeenSet;
use kit::http::{ApiError, found};
use kit::kafka::{ConsumerSpec, Handler, HandlerError, Outbox, Record};
use kit::state::Shared;
use kit::{Context, Service};

/// Recently viewed products kept per user.
pub const RECENT_VIEWS: usize = 20;
/// Purchased products kept per user.
pub const PURCHASES_KEPT: usize = 50;
/// Event ids remembered per user for de-duplication.
pub const SEEN_PER_USER: usize = 256;

/// The `feature-store` service.
pub struct FeatureStore;

/// Settings of the feature store.
#[derive(Debug, Clone)]
pub struct Config {
    /// `AFFINITY_HALF_LIFE_HOURS` (default 72).
    pub affinity_half_life_hours: f64,
}

impl Service for FeatureStore {
    const NAME: &'static str = "feature-store";
    const DEFAULT_PORT: u16 = 8085;
    type Config = Config;

    fn config(env: &Env) -> Result<Config, ConfigError> {
        Ok(Config {
            affinity_half_life_hours: env.checked("AFFINITY_HALF_LIFE_HOURS", 72.0, |v: &f64| {
                if v.is_finite() && *v > 0.0 { Ok(()) } else { Err("must be a positive number of hours".into()) }
            })?,
        })
    }

    async fn run(config: Config, mut ctx: Context) -> anyhow::Result<()> {
        let producer = ctx.pipeline_producer()?;
        let store = Shared::new(Store::new(config));
        ctx.spawn_consumer(
            &producer,
            ConsumerSpec::group("processed-events", [Topic::ProcessedEvents], "feature-store").restoring(),
            Updater(Shared::clone(&store)),
        );
        let routes = axum::Router::new().route("/features/{user_id}", get(get_features)).with_state(store);
        ctx.serve(routes).await
    }
}

struct UserState {
    features: UserFeatures,
    seen: SeenSet,
    /// Engagement since the user's last purchase, for purchase intent.
    views_since_purchase: u64,
    clicks_since_purchase: u64,
}

/// All users' features.
pub struct Store {
    config: Config,
    users: HashMap<String, UserState>,
}

impl Store {
    pub fn new(config: Config) -> Self {
        Self { config, users: HashMap::new() }
    }

    pub fn get(&self, user_id: &str) -> Option<&UserFeatures> {
        self.users.get(user_id).map(|u| &u.features)
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Applies one event; returns the new snapshot, or `None` for a redelivered event.
    pub fn apply(&mut self, e: &ProcessedEvent, now: DateTime<Utc>) -> Option<UserFeatures> {
        let half_life = self.config.affinity_half_life_hours;
        let user = self.users.entry(e.user_id.clone()).or_insert_with(|| UserState {
            features: UserFeatures {
                schema_version: events::SCHEMA_VERSION,
                user_id: e.user_id.clone(),
                first_seen: e.occurred_at,
                last_seen: e.occurred_at,
                ..Default::default()
            },
            seen: SeenSet::new(SEEN_PER_USER),
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
        for v in f.category_affinity.values_mut() {
            *v *= decay;
        }
        f.category_affinity.retain(|_, v| *v > 1e-3);
        let weight = e.event_type.engagement_weight();
        if let Some(p) = &e.product
            && weight > 0.0
        {
            *f.category_affinity.entry(p.category.clone()).or_default() += weight;
        }

        f.counts.add(e.event_type);
        if f.current_session_id != e.session_id {
            f.sessions += 1;
            f.current_session_id.clone_from(&e.session_id);
        }
        let product_id = e.product.as_ref().map(|p| p.product_id.clone());
        match (e.event_type, product_id) {
            (EventType::ProductView | EventType::Click, Some(id)) => {
                if e.event_type == EventType::ProductView {
                    user.views_since_purchase += 1;
                } else {
                    user.clicks_since_purchase += 1;
                }
                move_to_front(&mut f.recently_viewed, id, RECENT_VIEWS);
            }
            (EventType::AddToCart, Some(id)) => move_to_front(&mut f.cart, id, usize::MAX),
            (EventType::RemoveFromCart, Some(id)) => f.cart.retain(|p| *p != id),
            _ => {}
        }
        if let Some(order) = &e.order {
            for item in &order.items {
                f.cart.retain(|p| *p != item.product.product_id);
                move_to_front(&mut f.purchased, item.product.product_id.clone(), PURCHASES_KEPT);
                *f.category_affinity.entry(item.product.category.clone()).or_default() +=
                    EventType::Purchase.engagement_weight();
            }
            f.order_count += 1;
            f.total_spend += order.amount;
            user.views_since_purchase = 0;
            user.clicks_since_purchase = 0;
        }
        let catalog = catalog::Catalog::global();
        f.cart_value = f.cart.iter().filter_map(|id| catalog.get(id)).map(|p| p.price).fold(0.0, |a, b| a + b);
        f.preferred_category =
            f.category_affinity.iter().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(a.0))).map(|(c, _)| c.clone());
        f.first_seen = f.first_seen.min(e.occurred_at);
        f.last_seen = f.last_seen.max(e.occurred_at);
        f.updated_at = now;
        f.last_event_id.clone_from(&e.event_id);
        f.last_event_type = Some(e.event_type);
        derive_scores(f, user.views_since_purchase, user.clicks_since_purchase, now);
        Some(f.clone())
    }
}

fn move_to_front(list: &mut Vec<String>, id: String, cap: usize) {
    list.retain(|p| *p != id);
    list.insert(0, id);
    list.truncate(cap);
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
    fn handle(&mut self, rec: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        let event: ProcessedEvent = rec.json()?;
        let snapshot = self.0.write().apply(&event, Utc::now());
        match snapshot {
            Some(f) => {
                metrics::counter!("features_updates_total").increment(1);
                out.send(&f);
            }
            None => metrics::counter!("features_duplicates_total").increment(1),
        }
        Ok(())
    }
}

async fn get_features(
    State(store): State<Shared<Store>>,
    Path(user_id): Path<String>,
) -> Result<Json<UserFeatures>, ApiError> {
    let store = store.read();
    found(store.get(&user_id).cloned(), || format!("no features for user {user_id:?}: no events seen for this user"))
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use events::{ProcessedItem, ProcessedOrder, ProductInfo, SourceRef};

    use super::*;

    fn product(id: &str) -> ProductInfo {
        let p = catalog::Catalog::global().get(id).expect("in catalog");
        ProductInfo { product_id: p.id.clone(), name: p.name.clone(), category: p.category.to_owned(), price: p.price }
    }

    fn event(id: &str, t: EventType, product_id: Option<&str>, at: DateTime<Utc>) -> ProcessedEvent {
        ProcessedEvent {
            schema_version: 1,
            event_id: id.into(),
            user_id: "u".into(),
            session_id: "s1".into(),
            event_type: t,
            occurred_at: at,
            processed_at: at,
            correlation_id: "c".into(),
            product: product_id.map(product),
            campaign_id: None,
            query: None,
            recommendation_id: None,
            order: None,
            source: SourceRef { topic: "processed-events-topic".into(), partition: 0, offset: 0 },
        }
    }

    fn store() -> Store {
        Store::new(Config { affinity_half_life_hours: 72.0 })
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
        let books = catalog::Catalog::global().in_category("books").next().expect("a book").id.clone();
        let toys = catalog::Catalog::global().in_category("toys").next().expect("a toy").id.clone();
        s.apply(&event("1", EventType::ProductView, Some(&books), t0), t0);
        // 144 h later (two half-lives) the book view weighs a quarter.
        let t1 = t0 + Duration::hours(144);
        let f = s.apply(&event("2", EventType::ProductView, Some(&toys), t1), t1).expect("new");
        assert!((f.category_affinity["books"] - 0.25).abs() < 1e-6, "{:?}", f.category_affinity);
        assert!((f.category_affinity["toys"] - 1.0).abs() < 1e-9);
        assert_eq!(f.preferred_category.as_deref(), Some("toys"));
    }
}
