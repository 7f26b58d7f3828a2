//! `rl-offer` (8088): retargeting offers chosen by a contextual bandit that learns from the
//! orders that follow.
//!
//! **Actions** ([`OfferAction`]), each with a cost ([`cost`]): `NO_ACTION` (free), `REMINDER`
//! (a message: 0.10 EUR whether or not it works), `DISCOUNT_10` (10 % of the order it wins)
//! and `FREE_SHIPPING` (4.90 EUR on the order it wins).
//!
//! **Triggers** — the moments a retargeting offer makes sense; only these decide:
//! - `cart_abandoned`: something in the cart and no activity for `OFFER_CART_ABANDON_MINUTES`;
//! - `repeated_views`: the same product viewed `OFFER_REPEAT_VIEWS` times and not bought;
//! - `lapsed_customer`: a customer with an order who has not been seen for `OFFER_LAPSED_DAYS`;
//! - `api`: `POST /offer/select` (decide now for a user and, optionally, a given context).
//!
//! The first two and the third are found by a sweep every `OFFER_SWEEP_SECONDS` over the
//! users this instance holds; repeated views on each features snapshot.
//!
//! **Time** is event time ([`kit::clock::EventClock`]): the latest event time seen, running on
//! with the wall clock while no newer event arrives. Idle periods, reward windows and decision
//! times are measured on it, so an imported history (`retargetiq events import`) gets its
//! abandoned carts and rewards as it had them live, not "everything abandoned years ago". Events
//! older than the clock (an old history imported into a stack already running live) do not
//! move it back; their carts are then as old as they look.
//!
//! **Context** ([`OfferContext`]) from the user's latest features: purchase intent, recency,
//! activity, cart value, days since the previous visit, preferred category.
//!
//! **Policy**: LinUCB with an ε-greedy floor ([`bandit`]); the logged propensity is the exact
//! probability of the chosen action, and the explanation lists every action's expected net
//! revenue and uncertainty bonus.
//!
//! **Rewards**: an order within `OFFER_REWARD_WINDOW_MINUTES` after a decision is attributed to
//! it (to the decision the order names in `offerDecisionId`, else to the user's latest open
//! decision): the reward is the order amount net of the action's cost. A window that closes
//! without an order is a reward of minus the fixed cost (0 for most actions). Open decisions
//! are bounded: [`OPEN_PER_USER`] per user, for at most `MAX_USERS` users (see
//! `Policy::record`).
//!
//! **State across restarts**: at start the instance reads back its partitions of
//! `offers-topic` (its decisions, with contexts) and of `processed-events-topic` (the orders),
//! replays the attribution in time order and so relearns the same model, the open decisions and
//! every user's current offer; the user-features consumer restores the latest features.
//!
//! REST: `GET /offer/{userId}` (the current offer; 404 before the first decision),
//! `POST /offer/select` with `{"userId": "...", "context": {"purchaseIntent": 0.8, ...}}`
//! (context values default to the user's latest features), `GET /api/offers/policy` (each
//! action's learned mean reward and decisions learned from).

pub mod bandit;

use std::collections::{BTreeMap, VecDeque};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, Duration, Utc};
use events::{EventType, OfferAction, OfferDecision, ProcessedEvent, SessionStats, Topic};
use kit::clock::EventClock;
use kit::config::{ConfigError, Env, positive};
use kit::dedup::SeenSet;
use kit::http::{ApiError, UserId, found};
use kit::kafka::{ConsumerSpec, Handler, HandlerError, Outbox, Producer, Record};
use kit::state::{Shared, UserMap, user_map};
use kit::{Context, Service};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::Value;

pub use bandit::{Bandit, BanditConfig};

/// The policy's name in the decision log.
pub const POLICY: &str = "linucb-v1";
/// Cost of a reminder, EUR, whether or not it works.
pub const REMINDER_COST: f64 = 0.10;
/// Cost of free shipping on an order it wins, EUR.
pub const FREE_SHIPPING_COST: f64 = 4.90;
/// Share of the order a discount gives away.
pub const DISCOUNT_RATE: f64 = 0.10;
/// Products whose views are counted per user for the repeated-views trigger.
const VIEWED_PER_USER: usize = 20;
/// Open decisions kept per user (see `Policy::record`).
pub const OPEN_PER_USER: usize = 10;

/// What `action` costs when it is followed by an order of `amount` (or by none).
pub fn cost(action: OfferAction, order_amount: Option<f64>) -> f64 {
    match (action, order_amount) {
        (OfferAction::NoAction, _) => 0.0,
        (OfferAction::Reminder, _) => REMINDER_COST,
        (OfferAction::Discount10, Some(amount)) => DISCOUNT_RATE * amount,
        (OfferAction::FreeShipping, Some(_)) => FREE_SHIPPING_COST,
        (OfferAction::Discount10 | OfferAction::FreeShipping, None) => 0.0,
    }
}

/// The reward of a decision: the order's amount net of the action's cost, or minus the fixed
/// cost when no order followed.
pub fn net_reward(action: OfferAction, order_amount: Option<f64>) -> f64 {
    order_amount.unwrap_or(0.0) - cost(action, order_amount)
}

/// The `rl-offer` service.
pub struct RlOffer;

/// Settings of the offer service.
#[derive(Debug, Clone)]
pub struct Config {
    /// `OFFER_CART_ABANDON_MINUTES` (default 30).
    pub cart_abandon: Duration,
    /// `OFFER_REPEAT_VIEWS` (default 3).
    pub repeat_views: u32,
    /// `OFFER_LAPSED_DAYS` (default 14).
    pub lapsed: Duration,
    /// `OFFER_REWARD_WINDOW_MINUTES` (default 1440).
    pub reward_window: Duration,
    /// `OFFER_SWEEP_SECONDS` (default 10).
    pub sweep: std::time::Duration,
    /// `OFFER_EPSILON` (default 0.05) and `OFFER_UCB_ALPHA` (default 0.5).
    pub bandit: BanditConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cart_abandon: Duration::minutes(30),
            repeat_views: 3,
            lapsed: Duration::days(14),
            reward_window: Duration::hours(24),
            sweep: std::time::Duration::from_secs(10),
            bandit: BanditConfig::default(),
        }
    }
}

impl Service for RlOffer {
    const NAME: &'static str = "rl-offer";
    const DEFAULT_PORT: u16 = 8088;
    const PARTITIONED: bool = true;
    type Config = Config;

    fn config(env: &Env) -> Result<Config, ConfigError> {
        let unit = |v: &f64| {
            if v.is_finite() && (0.0..=1.0).contains(v) { Ok(()) } else { Err("must be a number from 0 to 1".into()) }
        };
        let non_negative = |v: &f64| {
            if v.is_finite() && *v >= 0.0 { Ok(()) } else { Err("must be a number >= 0".into()) }
        };
        Ok(Config {
            cart_abandon: Duration::minutes(env.checked("OFFER_CART_ABANDON_MINUTES", 30, positive)?),
            repeat_views: env.checked("OFFER_REPEAT_VIEWS", 3, positive)?,
            lapsed: Duration::days(env.checked("OFFER_LAPSED_DAYS", 14, positive)?),
            reward_window: Duration::minutes(env.checked("OFFER_REWARD_WINDOW_MINUTES", 1440, positive)?),
            sweep: std::time::Duration::from_secs(env.checked("OFFER_SWEEP_SECONDS", 10, positive)?),
            bandit: BanditConfig {
                epsilon: env.checked("OFFER_EPSILON", 0.05, unit)?,
                alpha: env.checked("OFFER_UCB_ALPHA", 0.5, non_negative)?,
            },
        })
    }

    async fn run(config: Config, mut ctx: Context) -> anyhow::Result<()> {
        let pipeline = ctx.pipeline_producer()?;
        let requests = ctx.request_producer()?;
        let sweep_every = config.sweep;
        let state = Shared::new(Policy::new(config, StdRng::from_os_rng()));
        // Several instances (group assignment, or more than one INSTANCE_COUNT) keep one bandit:
        // each learns from every instance's decisions and every order, read live from the
        // whole topics (started before the log is read back, so nothing falls between the two;
        // what both deliver is learned once).
        let shared = ctx.kafka.shares_partitions();
        if shared {
            ctx.spawn_consumer(
                &pipeline,
                ConsumerSpec::live("all-decisions-and-orders", [Topic::Offers, Topic::ProcessedEvents]),
                Learner(Shared::clone(&state)),
            );
        }
        let (decisions, orders) = read_history(&ctx, shared).await?;
        let stats = {
            let mut policy = state.write();
            policy.restore(decisions, orders);
            policy.stats()
        };
        tracing::info!(open = stats.open_decisions, learned = stats.learned, shared, "offer policy restored");
        ctx.spawn_consumer(
            &pipeline,
            ConsumerSpec::group("features-and-orders", [Topic::UserFeatures, Topic::ProcessedEvents], "rl-offer")
                .restoring_from([Topic::UserFeatures]),
            Decider { policy: Shared::clone(&state), learns_orders: !shared },
        );
        let (sweeper, producer, shutdown) = (Shared::clone(&state), requests.clone(), ctx.shutdown.clone());
        ctx.spawn_task(async move {
            let mut tick = tokio::time::interval(sweep_every);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    _ = tick.tick() => {}
                }
                let decisions = {
                    let mut policy = sweeper.write();
                    let now = policy.now();
                    policy.sweep(now)
                };
                for d in decisions {
                    metrics::counter!("offers_decisions_total", "action" => d.action.as_str(), "trigger" => d.trigger.clone()).increment(1);
                    if let Err(e) = producer.send(&d, None).await {
                        tracing::warn!(error = %e, user = %d.user_id, "could not log a decision; it stays in memory");
                    }
                }
            }
        });
        let routes = axum::Router::new()
            .route("/offer/{user_id}", get(get_offer))
            .route("/offer/select", post(select))
            .route("/api/offers/policy", get(get_policy))
            .with_state(AppState { state, producer: requests });
        ctx.serve(routes).await
    }
}

/// The logged decisions and orders of this instance's partitions (of all of them when the
/// bandit is `shared` among instances), for [`Policy::restore`]. The processed events are read
/// as they come and only the orders kept (a glance at the others, as live): what is held is
/// the decisions and the orders, not the log.
async fn read_history(ctx: &Context, shared: bool) -> anyhow::Result<(Vec<OfferDecision>, Vec<ProcessedEvent>)> {
    use kit::kafka::admin::for_each_in_partitions;
    let servers = &ctx.kafka.bootstrap_servers;
    let (a, b) = (ctx.kafka.clone(), ctx.kafka.clone());
    let (mut decisions, mut orders) = (Vec::new(), Vec::new());
    for_each_in_partitions(
        servers,
        Topic::Offers,
        move |p| shared || a.owns(p),
        |raw| {
            decisions.extend(kit::json::from_bytes::<OfferDecision>(raw).ok());
        },
    )
    .await?;
    for_each_in_partitions(
        servers,
        Topic::ProcessedEvents,
        move |p| shared || b.owns(p),
        |raw| {
            orders.extend(order_of(raw));
        },
    )
    .await?;
    Ok((decisions, orders))
}

/// The processed event `raw` when it is a readable order, read as the live consumer reads it
/// ([`glance`]); `None` for any other event and for what cannot be read.
fn order_of(raw: &[u8]) -> Option<ProcessedEvent> {
    glance(&Record::bare(Topic::ProcessedEvents, raw)).ok()?.1
}

/// Indicators the context's category is hashed into. Categories are open-ended (each shop
/// has its own), so the bandit cannot have one indicator per category: each category sets two
/// of these, chosen by two hash functions, so that two categories that share one indicator
/// (as `books` and `beauty` of the demo catalog do) are still told apart by the other.
pub const CATEGORY_BUCKETS: usize = 32;

/// The two indicators of a category (a stable hash with two seeds).
fn category_buckets(category: &str) -> [usize; 2] {
    let bucket = |seed: u64| (events::stable_hash(category, seed) % CATEGORY_BUCKETS as u64) as usize;
    [bucket(0), bucket(0x9e37_79b9_7f4a_7c15)]
}

/// What the policy looks at.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OfferContext {
    /// In [0, 1].
    pub purchase_intent: f64,
    /// In [0, 1]: 1 just now, e^-1 a day ago.
    pub recency: f64,
    /// In [0, 1].
    pub activity: f64,
    /// EUR.
    pub cart_value: f64,
    /// Days between the previous visit and the latest one (0 for a first visit).
    pub days_since_last_visit: f64,
    pub category: Option<String>,
}

/// What rl-offer keeps of a user's feature snapshot (`UserFeatures` on `user-features-topic`):
/// the fields its triggers and contexts read, decoded straight from the message. The rest —
/// category affinities, product engagement, windows, all but the latest view — is skipped
/// rather than built and kept: decoding and dropping whole snapshots was half of rl-offer's
/// CPU. The fields it reads are as required as in `UserFeatures`.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OfferFeatures {
    pub user_id: String,
    /// Time of the user's latest event.
    pub last_seen: DateTime<Utc>,
    pub last_event_type: Option<EventType>,
    /// The first (most recent) of the snapshot's `recentlyViewed`.
    #[serde(rename = "recentlyViewed", deserialize_with = "first_of_list")]
    pub last_viewed: Option<String>,
    pub purchased: Vec<String>,
    pub cart: Vec<String>,
    pub cart_value: f64,
    pub order_count: u64,
    pub purchase_intent: f64,
    pub activity_score: f64,
    pub preferred_category: Option<String>,
    #[serde(default)]
    pub session: SessionStats,
}

/// The first string of a JSON list of strings; the others are checked to be values and skipped.
fn first_of_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct First;
    impl<'de> serde::de::Visitor<'de> for First {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of product ids")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let first: Option<String> = seq.next_element()?;
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(first)
        }
    }
    d.deserialize_seq(First)
}

impl OfferContext {
    pub fn from_features(f: &OfferFeatures, now: DateTime<Utc>) -> Self {
        let hours = (now - f.last_seen).num_milliseconds().max(0) as f64 / 3_600_000.0;
        let gap = f.session.previous_visit_at.map_or(0.0, |prev| {
            (f.session.current_started_at.unwrap_or(f.last_seen) - prev).num_milliseconds().max(0) as f64 / 86_400_000.0
        });
        Self {
            purchase_intent: f.purchase_intent,
            recency: (-hours / 24.0).exp(),
            activity: f.activity_score,
            cart_value: f.cart_value,
            days_since_last_visit: gap,
            category: f.preferred_category.clone(),
        }
    }

    /// The context as logged: named numbers, the category as a `category.<name>` indicator.
    pub fn as_map(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::from([
            ("purchaseIntent".to_owned(), self.purchase_intent),
            ("recency".to_owned(), self.recency),
            ("activity".to_owned(), self.activity),
            ("cartValue".to_owned(), self.cart_value),
            ("daysSinceLastVisit".to_owned(), self.days_since_last_visit),
        ]);
        if let Some(c) = &self.category {
            m.insert(format!("category.{c}"), 1.0);
        }
        m
    }

    /// The context of a logged decision.
    pub fn from_map(m: &BTreeMap<String, f64>) -> Self {
        let get = |k: &str| m.get(k).copied().filter(|v| v.is_finite()).unwrap_or(0.0);
        Self {
            purchase_intent: get("purchaseIntent"),
            recency: get("recency"),
            activity: get("activity"),
            cart_value: get("cartValue"),
            days_since_last_visit: get("daysSinceLastVisit"),
            category: m
                .iter()
                .find(|(k, v)| k.starts_with("category.") && **v > 0.0)
                .map(|(k, _)| k["category.".len()..].to_owned()),
        }
    }

    /// The features the bandit's regressions use, each in [0, 1]: a bias, intent, recency,
    /// activity, cart value (1 − e^(−value/100 EUR)), lapse (days since the last visit / 30,
    /// capped at 1), and the category's indicators (see [`CATEGORY_BUCKETS`]).
    pub fn vector(&self) -> Vec<f64> {
        let mut x = vec![
            1.0,
            self.purchase_intent.clamp(0.0, 1.0),
            self.recency.clamp(0.0, 1.0),
            self.activity.clamp(0.0, 1.0),
            1.0 - (-self.cart_value.max(0.0) / 100.0).exp(),
            (self.days_since_last_visit / 30.0).clamp(0.0, 1.0),
        ];
        let mut buckets = [0.0; CATEGORY_BUCKETS];
        if let Some(c) = &self.category {
            for b in category_buckets(c) {
                buckets[b] = 1.0;
            }
        }
        x.extend(buckets);
        x
    }
}

/// Length of [`OfferContext::vector`].
pub fn dimensions() -> usize {
    6 + CATEGORY_BUCKETS
}

/// The original project's rule engine, kept as the baseline the bandit is measured against:
/// (action, explanation).
pub fn rules_v1(c: &OfferContext) -> (OfferAction, String) {
    if c.purchase_intent > 0.7 && c.recency > 0.5 {
        (
            OfferAction::Discount10,
            format!("purchase intent {:.2} > 0.7 and recency {:.2} > 0.5", c.purchase_intent, c.recency),
        )
    } else if c.purchase_intent > 0.4 && c.activity > 0.4 {
        (
            OfferAction::Reminder,
            format!("purchase intent {:.2} > 0.4 and activity {:.2} > 0.4", c.purchase_intent, c.activity),
        )
    } else {
        (OfferAction::NoAction, "no rule matched: intent or engagement too low".to_owned())
    }
}

/// A decision waiting for its reward.
#[derive(Debug, Clone)]
struct Open {
    decision_id: String,
    action: OfferAction,
    x: Vec<f64>,
    decided_at: DateTime<Utc>,
}

/// Counters of the policy, for the API and the UI.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStats {
    pub policy: &'static str,
    pub open_decisions: usize,
    /// Decisions whose reward was learned.
    pub learned: u64,
    /// Of those, decisions followed by an order.
    pub converted: u64,
    pub arms: Vec<bandit::ArmStats>,
}

/// The offer service's state: the bandit, open decisions, and what it knows of each user.
pub struct Policy {
    config: Config,
    bandit: Bandit,
    rng: StdRng,
    pub current: UserMap<OfferDecision>,
    pub features: UserMap<OfferFeatures>,
    /// User -> decisions awaiting their reward, oldest first: at most [`OPEN_PER_USER`] per
    /// user, for the users decided for most recently.
    open: UserMap<VecDeque<Open>>,
    /// user -> (product, views) for the repeated-views trigger.
    views: UserMap<VecDeque<(String, u32)>>,
    orders_seen: SeenSet,
    /// Decisions whose reward was learned: never opened again (a decision read twice, from the
    /// log at start and from the live topic, learns once).
    closed: SeenSet,
    learned: u64,
    converted: u64,
    /// Event time: what sweeps, reward windows and decisions are timed by.
    clock: EventClock,
}

impl Policy {
    pub fn new(config: Config, rng: StdRng) -> Self {
        Self::with_open_users(config, rng, kit::state::max_users())
    }

    /// A policy that keeps open decisions for at most `users` users (`MAX_USERS` in
    /// [`Policy::new`]).
    pub fn with_open_users(config: Config, rng: StdRng, users: std::num::NonZeroUsize) -> Self {
        Self {
            bandit: Bandit::new(dimensions(), config.bandit),
            config,
            rng,
            current: user_map(),
            features: user_map(),
            open: lru::LruCache::with_hasher(users, Default::default()),
            views: user_map(),
            orders_seen: SeenSet::new(100_000),
            closed: SeenSet::new(100_000),
            learned: 0,
            converted: 0,
            clock: EventClock::default(),
        }
    }

    /// The policy's event time ([`EventClock`]): the latest event time seen, running on with
    /// the wall clock while no newer event arrives.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Takes the time of an event (a features snapshot's latest event, an order).
    pub fn observe(&mut self, at: DateTime<Utc>) {
        self.clock.observe(at);
    }

    /// A processed event read with [`glance`]: its time moves the clock; an order is learned
    /// from.
    fn on_processed(&mut self, at: DateTime<Utc>, order: Option<ProcessedEvent>) {
        self.observe(at);
        if let Some(e) = order {
            self.on_order(&e);
        }
    }

    pub fn bandit(&self) -> &Bandit {
        &self.bandit
    }

    pub fn stats(&self) -> PolicyStats {
        PolicyStats {
            policy: POLICY,
            open_decisions: self.open.iter().map(|(_, list)| list.len()).sum(),
            learned: self.learned,
            converted: self.converted,
            arms: self.bandit.stats(),
        }
    }

    /// Decides an offer for `user_id` now, and opens it for its reward.
    pub fn decide(
        &mut self,
        user_id: &str,
        context: &OfferContext,
        trigger: &str,
        now: DateTime<Utc>,
    ) -> OfferDecision {
        let x = context.vector();
        let choice = self.bandit.choose(&x, &mut self.rng);
        let decision = OfferDecision {
            schema_version: events::SCHEMA_VERSION,
            decision_id: uuid::Uuid::new_v4().to_string(),
            user_id: user_id.to_owned(),
            decided_at: now,
            action: choice.action,
            propensity: choice.propensity,
            policy: POLICY.to_owned(),
            trigger: trigger.to_owned(),
            context: context.as_map(),
            explanation: choice.explanation(),
        };
        self.record(&decision);
        decision
    }

    /// Remembers a decision (made now, or read back from the log) as current and open.
    ///
    /// What a client can make it hold is bounded: a user keeps the latest [`OPEN_PER_USER`]
    /// decisions open, and open decisions are kept for the users decided for most recently
    /// (`MAX_USERS`). A decision pushed out is closed at once without a reward, as its window
    /// would most likely have closed it: an order is attributed to the latest open decision
    /// in its window unless it names another.
    fn record(&mut self, d: &OfferDecision) {
        if self.closed.contains(&d.decision_id)
            || self.open.peek(&d.user_id).is_some_and(|open| open.iter().any(|o| o.decision_id == d.decision_id))
        {
            return;
        }
        let mut pushed_out = Vec::new();
        if !self.open.contains(&d.user_id)
            && self.open.len() == self.open.cap().get()
            && let Some((_, list)) = self.open.pop_lru()
        {
            pushed_out.extend(list);
        }
        let x = OfferContext::from_map(&d.context).vector();
        let open = self.open.get_or_insert_mut(d.user_id.clone(), VecDeque::new);
        open.push_back(Open { decision_id: d.decision_id.clone(), action: d.action, x, decided_at: d.decided_at });
        while open.len() > OPEN_PER_USER {
            pushed_out.extend(open.pop_front());
        }
        if self.current.peek(&d.user_id).is_none_or(|c| c.decided_at <= d.decided_at) {
            self.current.put(d.user_id.clone(), d.clone());
        }
        for o in pushed_out {
            self.learn(&o, None);
        }
    }

    fn learn(&mut self, open: &Open, order_amount: Option<f64>) {
        self.closed.insert(&open.decision_id);
        self.bandit.learn(&open.x, open.action, net_reward(open.action, order_amount));
        self.learned += 1;
        self.converted += u64::from(order_amount.is_some());
        metrics::counter!("offers_rewards_total", "action" => open.action.as_str(), "converted" => if order_amount.is_some() { "yes" } else { "no" }).increment(1);
    }

    /// Attributes an order to the decision it names, or to the user's latest open decision
    /// within the reward window; returns the reward learned.
    pub fn on_order(&mut self, e: &ProcessedEvent) -> Option<f64> {
        let order = e.order.as_ref()?;
        if !self.orders_seen.insert(&e.idempotency_key()) {
            return None;
        }
        let window = self.config.reward_window;
        let open = self.open.get_mut(&e.user_id)?;
        let in_window = |o: &Open| o.decided_at <= e.occurred_at && e.occurred_at - o.decided_at <= window;
        let named = order.offer_decision_id.as_deref().and_then(|id| open.iter().position(|o| o.decision_id == id));
        let i = named.or_else(|| open.iter().rposition(in_window))?;
        let o = open.remove(i)?;
        if open.is_empty() {
            self.open.pop(&e.user_id);
        }
        self.learn(&o, Some(order.amount));
        Some(net_reward(o.action, Some(order.amount)))
    }

    /// Closes the decisions whose window ended before `now` without an order.
    fn expire(&mut self, now: DateTime<Utc>) {
        let window = self.config.reward_window;
        let (mut closed, mut emptied) = (Vec::new(), Vec::new());
        for (user, list) in self.open.iter_mut() {
            while list.front().is_some_and(|o| now - o.decided_at > window) {
                closed.extend(list.pop_front());
            }
            if list.is_empty() {
                emptied.push(user.clone());
            }
        }
        for user in emptied {
            self.open.pop(&user);
        }
        // In decision order, so that the same history always gives the same model.
        closed.sort_by(|a, b| a.decided_at.cmp(&b.decided_at).then_with(|| a.decision_id.cmp(&b.decision_id)));
        for o in closed {
            self.learn(&o, None);
        }
    }

    /// Takes a features snapshot; decides when it shows a product viewed repeatedly. A replay
    /// (restore) only rebuilds what the policy knows.
    pub fn on_features(&mut self, f: OfferFeatures, now: DateTime<Utc>, replay: bool) -> Option<OfferDecision> {
        let mut trigger = None;
        if f.last_event_type == Some(EventType::ProductView)
            && let Some(product) = &f.last_viewed
        {
            let views = self.views.get_or_insert_mut(f.user_id.clone(), VecDeque::new);
            let count = match views.iter_mut().find(|(p, _)| p == product) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    views.push_back((product.clone(), 1));
                    if views.len() > VIEWED_PER_USER {
                        views.pop_front();
                    }
                    1
                }
            };
            if count == self.config.repeat_views && !f.purchased.contains(product) {
                trigger = Some("repeated_views");
            }
        }
        let user = f.user_id.clone();
        let context = OfferContext::from_features(&f, now);
        self.features.put(user.clone(), f);
        let trigger = trigger.filter(|_| !replay)?;
        Some(self.decide(&user, &context, trigger, now))
    }

    /// The periodic work: closes expired decisions, and decides for abandoned carts and
    /// lapsed customers not decided for since their last activity.
    pub fn sweep(&mut self, now: DateTime<Utc>) -> Vec<OfferDecision> {
        self.expire(now);
        let due: Vec<(String, &'static str)> = self
            .features
            .iter()
            .map(|(_, f)| f)
            .filter(|f| self.current.peek(&f.user_id).is_none_or(|d| d.decided_at < f.last_seen))
            .filter_map(|f| {
                let idle = now - f.last_seen;
                if !f.cart.is_empty() && idle >= self.config.cart_abandon {
                    Some((f.user_id.clone(), "cart_abandoned"))
                } else if f.order_count > 0 && idle >= self.config.lapsed {
                    Some((f.user_id.clone(), "lapsed_customer"))
                } else {
                    None
                }
            })
            .collect();
        due.into_iter()
            .filter_map(|(user, trigger)| {
                let context = OfferContext::from_features(self.features.peek(&user)?, now);
                Some(self.decide(&user, &context, trigger, now))
            })
            .collect()
    }

    /// Rebuilds the model, the open decisions and the current offers from the decision log
    /// and the orders, replayed in time order.
    pub fn restore(&mut self, mut decisions: Vec<OfferDecision>, mut orders: Vec<ProcessedEvent>) {
        decisions.sort_by_key(|d| d.decided_at);
        orders.sort_by_key(|o| o.occurred_at);
        for at in decisions.iter().map(|d| d.decided_at).chain(orders.iter().map(|o| o.occurred_at)) {
            self.clock.observe(at);
        }
        let mut orders = orders.into_iter().peekable();
        for d in &decisions {
            while let Some(o) = orders.next_if(|o| o.occurred_at < d.decided_at) {
                self.expire(o.occurred_at);
                self.on_order(&o);
            }
            self.expire(d.decided_at);
            self.record(d);
        }
        for o in orders {
            self.expire(o.occurred_at);
            self.on_order(&o);
        }
        self.expire(self.now());
    }
}

/// Decides on the snapshots of this instance's users, and learns from their orders unless a
/// [`Learner`] learns from every order.
struct Decider {
    policy: Shared<Policy>,
    learns_orders: bool,
}

/// With several instances: learns from every instance's decisions and every order, so each
/// instance's bandit is the one model all of them make.
pub struct Learner(pub Shared<Policy>);

impl Handler for Learner {
    fn handle(&mut self, rec: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        let mut policy = self.0.write();
        match rec.topic {
            Topic::Offers => {
                let d: OfferDecision = rec.json()?;
                policy.observe(d.decided_at);
                policy.record(&d);
            }
            Topic::ProcessedEvents => {
                let (at, order) = glance(rec)?;
                policy.on_processed(at, order);
            }
            other => return Err(HandlerError::malformed(format!("rl-offer does not learn from {other}"))),
        }
        Ok(())
    }
}

/// What rl-offer reads of every processed event: when it happened (the policy's clock) and
/// whether it is an order. Only orders are learned from, so only they are read in full; the
/// others, nearly all of them, are skimmed without building their strings and maps.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Glance {
    occurred_at: DateTime<Utc>,
    #[serde(default)]
    order: Option<serde::de::IgnoredAny>,
}

/// The time of the processed event in `rec`, and the event itself when it is an order.
fn glance(rec: &Record<'_>) -> Result<(DateTime<Utc>, Option<ProcessedEvent>), HandlerError> {
    let glance: Glance = rec.json()?;
    let order = if glance.order.is_some() { Some(rec.json()?) } else { None };
    Ok((glance.occurred_at, order))
}

impl Handler for Decider {
    /// Forgets what it knows per user from the snapshots (replayed for the partitions held
    /// now). The bandit, the open decisions and the current offers are read from the whole
    /// decision log at start and stay: they are not per partition.
    fn reset(&mut self) -> bool {
        let mut policy = self.policy.write();
        policy.features = user_map();
        policy.views = user_map();
        true
    }

    fn handle(&mut self, rec: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        match rec.topic {
            Topic::UserFeatures => {
                let f: OfferFeatures = rec.json()?;
                let mut policy = self.policy.write();
                policy.observe(f.last_seen);
                let now = policy.now();
                if let Some(d) = policy.on_features(f, now, out.is_replay()) {
                    metrics::counter!("offers_decisions_total", "action" => d.action.as_str(), "trigger" => d.trigger.clone()).increment(1);
                    out.send(&d);
                }
            }
            Topic::ProcessedEvents => {
                // Rewards are relearned from the logs at start (`read_history`): processed
                // events are not replayed into this consumer (`restoring_from`), and were one,
                // it would not be learned twice.
                if self.learns_orders && !out.is_replay() {
                    let (at, order) = glance(rec)?;
                    self.policy.write().on_processed(at, order);
                }
            }
            other => return Err(HandlerError::malformed(format!("rl-offer does not read {other}"))),
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    state: Shared<Policy>,
    producer: Producer,
}

async fn get_offer(State(s): State<AppState>, UserId(user_id): UserId) -> Result<Json<OfferDecision>, ApiError> {
    found(s.state.read().current.peek(&user_id).cloned(), || format!("no offer decided for user {user_id:?} yet"))
}

async fn get_policy(State(s): State<AppState>) -> Json<PolicyStats> {
    Json(s.state.read().stats())
}

/// The keys `POST /offer/select` takes in `context`.
const CONTEXT_KEYS: [&str; 6] =
    ["purchaseIntent", "recency", "activity", "cartValue", "daysSinceLastVisit", "category"];

/// Parses a `POST /offer/select` body against the user's latest features.
pub fn parse_select(
    body: &Value,
    known: Option<&OfferFeatures>,
    now: DateTime<Utc>,
) -> Result<(String, OfferContext), ApiError> {
    let invalid = |field: &str, reason: &str| ApiError::Invalid { field: field.into(), reason: reason.into() };
    let obj = body.as_object().ok_or_else(|| invalid("$", "must be a JSON object with userId"))?;
    let user_id = match obj.get("userId") {
        // The rule of an event's userId: trimmed, 1 to 128 characters, no control characters.
        Some(Value::String(s)) => events::validate::user_id(s)?.to_owned(),
        Some(_) => return Err(invalid("userId", "must be a string")),
        None => return Err(invalid("userId", "is required")),
    };
    let mut ctx = known.map(|f| OfferContext::from_features(f, now)).unwrap_or_default();
    if let Some(c) = obj.get("context") {
        let c = c.as_object().ok_or_else(|| invalid("context", "must be an object"))?;
        // A misspelt key would otherwise be ignored silently, the user's own value deciding.
        if let Some(unknown) = c.keys().find(|k| !CONTEXT_KEYS.contains(&k.as_str())) {
            return Err(invalid(
                &format!("context.{unknown}"),
                &format!("is not a context value; the context takes {}", CONTEXT_KEYS.join(", ")),
            ));
        }
        let fields: [(&str, &mut f64, f64); 5] = [
            ("purchaseIntent", &mut ctx.purchase_intent, 1.0),
            ("recency", &mut ctx.recency, 1.0),
            ("activity", &mut ctx.activity, 1.0),
            ("cartValue", &mut ctx.cart_value, events::validate::MAX_AMOUNT),
            ("daysSinceLastVisit", &mut ctx.days_since_last_visit, 3650.0),
        ];
        for (name, slot, max) in fields {
            if let Some(v) = c.get(name) {
                let x = v.as_f64().filter(|x| x.is_finite() && (0.0..=max).contains(x));
                *slot =
                    x.ok_or_else(|| invalid(&format!("context.{name}"), &format!("must be a number from 0 to {max}")))?;
            }
        }
        if let Some(v) = c.get("category") {
            let max = events::validate::MAX_NAME_LEN;
            let cat = v
                .as_str()
                .map(str::trim)
                .filter(|c| !c.is_empty() && c.chars().count() <= max && !c.chars().any(char::is_control))
                .ok_or_else(|| {
                    invalid("context.category", &format!("must be a category name (1 to {max} characters)"))
                })?;
            ctx.category = Some(cat.to_owned());
        }
    }
    Ok((user_id, ctx))
}

async fn select(
    State(s): State<AppState>,
    kit::http::Body(body): kit::http::Body,
) -> Result<(StatusCode, Json<OfferDecision>), ApiError> {
    let body = kit::http::json_body(&body)?;
    let decision = {
        let mut state = s.state.write();
        let now = state.now();
        let known = body.get("userId").and_then(Value::as_str).and_then(|u| state.features.peek(u.trim()));
        let (user_id, context) = parse_select(&body, known, now)?;
        state.decide(&user_id, &context, "api", now)
    };
    s.producer
        .send(&decision, None)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the decision could not be logged: {e}")))?;
    metrics::counter!("offers_decisions_total", "action" => decision.action.as_str(), "trigger" => "api").increment(1);
    Ok((StatusCode::OK, Json(decision)))
}

#[cfg(test)]
mod tests {
    use events::{ProcessedItem, ProcessedOrder, UserFeatures};
    use serde_json::json;

    use super::*;

    fn policy() -> Policy {
        Policy::new(Config::default(), StdRng::seed_from_u64(9))
    }

    fn features(user: &str, at: DateTime<Utc>) -> UserFeatures {
        UserFeatures {
            user_id: user.into(),
            last_seen: at,
            purchase_intent: 0.8,
            preferred_category: Some("books".into()),
            ..Default::default()
        }
    }

    /// What rl-offer reads of a snapshot, through the wire format as the consumer reads it.
    fn offer(f: &UserFeatures) -> OfferFeatures {
        serde_json::from_slice(&serde_json::to_vec(f).expect("encode")).expect("decode")
    }

    fn order(id: &str, user: &str, amount: f64, at: DateTime<Utc>, decision: Option<&str>) -> ProcessedEvent {
        let p = catalog::Catalog::demo().products()[0].clone();
        ProcessedEvent {
            order: Some(ProcessedOrder {
                order_id: format!("o-{id}"),
                amount,
                currency: "EUR".into(),
                items: vec![ProcessedItem {
                    product: events::ProductInfo::from_catalog(catalog::Catalog::demo(), &p.id),
                    quantity: 1,
                    unit_price: amount,
                }],
                offer_decision_id: decision.map(str::to_owned),
            }),
            ..events::generate::processed(id, user, "s", EventType::Purchase, at)
        }
    }

    #[test]
    fn the_rules_of_the_original_project() {
        let c = |i, r, a| OfferContext { purchase_intent: i, recency: r, activity: a, ..Default::default() };
        assert_eq!(rules_v1(&c(0.8, 0.9, 0.0)).0, OfferAction::Discount10);
        assert_eq!(rules_v1(&c(0.8, 0.1, 0.5)).0, OfferAction::Reminder);
        assert_eq!(rules_v1(&c(0.5, 0.9, 0.5)).0, OfferAction::Reminder);
        assert_eq!(rules_v1(&c(0.3, 0.9, 0.9)).0, OfferAction::NoAction);
    }

    #[test]
    fn costs_and_rewards() {
        assert_eq!(net_reward(OfferAction::NoAction, Some(50.0)), 50.0);
        assert_eq!(net_reward(OfferAction::Discount10, Some(50.0)), 45.0);
        assert_eq!(net_reward(OfferAction::FreeShipping, Some(50.0)), 50.0 - FREE_SHIPPING_COST);
        assert_eq!(net_reward(OfferAction::Reminder, None), -REMINDER_COST);
        assert_eq!(net_reward(OfferAction::Discount10, None), 0.0);
    }

    #[test]
    fn the_context_round_trips_through_the_log() {
        let c = OfferContext {
            purchase_intent: 0.5,
            recency: 0.9,
            activity: 0.3,
            cart_value: 120.0,
            days_since_last_visit: 3.0,
            category: Some("toys".into()),
        };
        assert_eq!(OfferContext::from_map(&c.as_map()), c);
        let x = c.vector();
        assert_eq!(x.len(), dimensions());
        assert!(x.iter().all(|v| (0.0..=1.0).contains(v)), "{x:?}");
        assert_eq!(x.iter().skip(6).sum::<f64>(), 2.0, "two category indicators");
        let demo: Vec<[usize; 2]> = catalog::Catalog::demo().categories().map(category_buckets).collect();
        for (i, a) in demo.iter().enumerate() {
            assert!(demo[i + 1..].iter().all(|b| b != a), "the demo categories are told apart");
        }
    }

    #[test]
    fn repeated_views_trigger_a_decision_once_and_not_on_replay() {
        let mut p = policy();
        let now = Utc::now();
        let mut f = features("u", now);
        f.last_event_type = Some(EventType::ProductView);
        f.recently_viewed = vec!["P00042".into()];
        assert!(p.on_features(offer(&f), now, false).is_none());
        assert!(p.on_features(offer(&f), now, true).is_none(), "a replay never decides");
        let d = p.on_features(offer(&f), now, false).expect("third view decides");
        assert_eq!((d.trigger.as_str(), d.policy.as_str()), ("repeated_views", POLICY));
        assert!(d.propensity > 0.0 && d.propensity <= 1.0);
        assert_eq!(d.context["category.books"], 1.0);
        assert!(d.explanation.contains("LinUCB"), "{}", d.explanation);
        assert!(p.on_features(offer(&f), now, false).is_none(), "only at the threshold");
        assert_eq!(p.current.peek("u").map(|c| c.decision_id.clone()), Some(d.decision_id.clone()));
    }

    #[test]
    fn the_sweep_finds_abandoned_carts_and_lapsed_customers_once() {
        let mut p = policy();
        let now = Utc::now();
        let mut cart = features("carted", now - Duration::minutes(40));
        cart.cart = vec!["P00001".into()];
        let mut fresh = features("browsing", now - Duration::minutes(5));
        fresh.cart = vec!["P00001".into()];
        let mut lapsed = features("lapsed", now - Duration::days(20));
        lapsed.order_count = 2;
        for f in [cart, fresh, lapsed] {
            p.on_features(offer(&f), now, false);
        }
        let mut due: Vec<(String, String)> = p.sweep(now).into_iter().map(|d| (d.user_id, d.trigger)).collect();
        due.sort();
        assert_eq!(due, vec![("carted".into(), "cart_abandoned".into()), ("lapsed".into(), "lapsed_customer".into())]);
        assert!(p.sweep(now).is_empty(), "decided since the last activity");
    }

    /// An imported history is years old: its carts are abandoned when event time says so,
    /// not because the wall clock is far ahead of it.
    #[test]
    fn an_imported_history_is_swept_by_event_time() {
        let mut p = policy();
        let t0 = DateTime::parse_from_rfc3339("2019-10-01T10:00:00Z").expect("time").to_utc();
        let mut carted = features("carted", t0);
        carted.cart = vec!["P00001".into()];
        for f in [carted, features("other", t0 + Duration::minutes(10))] {
            p.observe(f.last_seen);
            let now = p.now();
            p.on_features(offer(&f), now, false);
        }
        assert!(p.sweep(p.now()).is_empty(), "10 minutes of event time: not abandoned yet");
        let later = features("other", t0 + Duration::minutes(35));
        p.observe(later.last_seen);
        p.on_features(offer(&later), t0 + Duration::minutes(35), false);
        let due: Vec<_> = p.sweep(p.now()).into_iter().map(|d| (d.user_id, d.trigger, d.decided_at)).collect();
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!((due[0].0.as_str(), due[0].1.as_str()), ("carted", "cart_abandoned"));
        assert!(due[0].2 - (t0 + Duration::minutes(35)) < Duration::seconds(5), "decided in event time: {due:?}");
    }

    #[test]
    fn orders_in_the_window_are_rewards_and_silence_is_a_zero() {
        let mut p = policy();
        let t0 = Utc::now() - Duration::hours(30);
        let a = p.decide("a", &OfferContext::default(), "api", t0);
        let b = p.decide("b", &OfferContext::default(), "api", t0);
        let reward = p.on_order(&order("o1", "a", 80.0, t0 + Duration::hours(2), None)).expect("attributed");
        assert!((reward - net_reward(a.action, Some(80.0))).abs() < 1e-9);
        assert!(p.on_order(&order("o1", "a", 80.0, t0 + Duration::hours(2), None)).is_none(), "redelivery");
        assert!(p.on_order(&order("o2", "a", 80.0, t0 + Duration::hours(3), None)).is_none(), "already closed");
        assert_eq!(p.stats().open_decisions, 1);
        p.sweep(t0 + Duration::hours(25));
        let stats = p.stats();
        assert_eq!((stats.open_decisions, stats.learned, stats.converted), (0, 2, 1));
        // Too late for b.
        assert!(p.on_order(&order("o3", "b", 10.0, t0 + Duration::hours(26), Some(&b.decision_id))).is_none());
    }

    /// A client may ask `POST /offer/select` for any number of decisions: a user keeps the
    /// latest [`OPEN_PER_USER`] open, the older ones closed unrewarded at once (an order goes to
    /// the latest open decision in its window unless it names another).
    #[test]
    fn a_users_open_decisions_are_bounded() {
        let mut p = policy();
        let t0 = Utc::now() - Duration::hours(1);
        let made: Vec<OfferDecision> = (0..OPEN_PER_USER as i64 + 15)
            .map(|i| p.decide("u", &OfferContext::default(), "api", t0 + Duration::seconds(i)))
            .collect();
        let stats = p.stats();
        assert_eq!((stats.open_decisions, stats.learned, stats.converted), (OPEN_PER_USER, 15, 0));
        assert!(made[..15].iter().all(|d| p.closed.contains(&d.decision_id)), "the oldest are closed");
        assert!(made[15..].iter().all(|d| !p.closed.contains(&d.decision_id)), "the latest are open");
        let last = made.last().expect("made");
        let reward = p.on_order(&order("o1", "u", 20.0, t0 + Duration::minutes(5), None)).expect("attributed");
        assert!((reward - net_reward(last.action, Some(20.0))).abs() < 1e-9);
        assert!(p.closed.contains(&last.decision_id));
        assert_eq!(p.stats().open_decisions, OPEN_PER_USER - 1);
    }

    /// Open decisions are kept for a bounded number of users: the least recently decided for
    /// gives way, its decisions closed unrewarded.
    #[test]
    fn open_decisions_are_kept_for_a_bounded_number_of_users() {
        let users = std::num::NonZeroUsize::new(3).expect("non-zero");
        let mut p = Policy::with_open_users(Config::default(), StdRng::seed_from_u64(9), users);
        let t0 = Utc::now() - Duration::hours(1);
        for (i, u) in ["a", "b", "c", "a", "d", "e"].into_iter().enumerate() {
            p.decide(u, &OfferContext::default(), "api", t0 + Duration::seconds(i as i64));
        }
        let stats = p.stats();
        assert_eq!((stats.open_decisions, stats.learned), (4, 2), "a twice, d and e open; b and c closed");
        let at = t0 + Duration::minutes(5);
        assert!(p.on_order(&order("o1", "b", 10.0, at, None)).is_none(), "b gave way");
        assert!(p.on_order(&order("o2", "c", 10.0, at, None)).is_none(), "c gave way");
        for u in ["a", "d", "e"] {
            assert!(p.on_order(&order(&format!("o-{u}"), u, 10.0, at, None)).is_some(), "{u} is open");
        }
    }

    /// Orders are read in full, every other processed event only for its time.
    #[test]
    fn a_processed_event_is_read_in_full_only_when_it_is_an_order() {
        let at = Utc::now() - Duration::hours(1);
        let bought = order("e1", "u1", 25.0, at, Some("d1"));
        let mut viewed = order("e2", "u1", 0.0, at + Duration::minutes(1), None);
        viewed.event_type = EventType::ProductView;
        viewed.order = None;
        let read = |e: &ProcessedEvent| {
            let payload = serde_json::to_vec(e).expect("json");
            glance(&Record::bare(Topic::ProcessedEvents, &payload)).expect("readable")
        };
        let (time, full) = read(&bought);
        assert_eq!(time, at);
        let full = full.expect("an order is read in full");
        assert_eq!((full.event_id.as_str(), full.order.as_ref().map(|o| o.amount)), ("e1", Some(25.0)));
        assert_eq!(read(&viewed).0, at + Duration::minutes(1));
        assert!(read(&viewed).1.is_none(), "a view is only glanced at");
        assert!(glance(&Record::bare(Topic::ProcessedEvents, b"{\"eventId\": 1}")).is_err(), "no time: malformed");
    }

    /// A feature snapshot as the feature store writes it is read for what the triggers and
    /// contexts use, with the same context as from the whole snapshot; one that lacks a field
    /// they use, or names the views wrongly, is malformed.
    #[test]
    fn a_snapshot_is_read_for_what_offers_use() {
        let at = Utc::now() - Duration::hours(2);
        let mut f = features("u7", at);
        f.last_event_type = Some(EventType::ProductView);
        f.recently_viewed = vec!["P00042".into(), "P00007".into(), "P00001".into()];
        f.cart = vec!["P00007".into()];
        f.cart_value = 12.5;
        f.purchased = vec!["P00003".into()];
        f.order_count = 1;
        f.activity_score = 0.4;
        f.category_affinity = BTreeMap::from([("books".into(), 3.0), ("toys".into(), 1.0)]);
        f.product_engagement = BTreeMap::from([("P00042".into(), 1.0), ("P00007".into(), 3.0)]);
        f.session.previous_visit_at = Some(at - Duration::days(3));
        f.session.current_started_at = Some(at - Duration::minutes(5));
        let read = offer(&f);
        assert_eq!(read.user_id, "u7");
        assert_eq!(read.last_viewed.as_deref(), Some("P00042"), "the most recent view");
        assert_eq!(
            (read.cart.clone(), read.purchased.clone(), read.order_count),
            (f.cart.clone(), f.purchased.clone(), 1)
        );
        let ctx = OfferContext::from_features(&read, at + Duration::hours(1));
        assert_eq!(ctx.cart_value, 12.5);
        assert_eq!(ctx.category.as_deref(), Some("books"));
        assert!((ctx.days_since_last_visit - (3.0 - 5.0 / 1440.0)).abs() < 1e-9, "{ctx:?}");
        assert!((ctx.recency - (-1.0_f64 / 24.0).exp()).abs() < 1e-9, "{ctx:?}");
        f.recently_viewed.clear();
        assert_eq!(offer(&f).last_viewed, None, "no views yet");

        let mut json = serde_json::to_value(&f).expect("json");
        json.as_object_mut().expect("object").remove("cart");
        assert!(serde_json::from_value::<OfferFeatures>(json.clone()).is_err(), "no cart: malformed");
        json["cart"] = json!([]);
        json["recentlyViewed"] = json!("P00042");
        assert!(serde_json::from_value::<OfferFeatures>(json.clone()).is_err(), "views not a list: malformed");
        json["recentlyViewed"] = json!([42]);
        assert!(serde_json::from_value::<OfferFeatures>(json).is_err(), "a view not a string: malformed");
    }

    /// Two instances decide for their own users; each learns from both instances' decisions
    /// and from every order (a `Learner` reading the whole topics), so both hold the same
    /// bandit. A decision or order read twice (from the log and live) is learned once.
    #[test]
    fn instances_learn_one_bandit_from_every_decision_and_order() {
        let (mut a, mut b) = (policy(), policy());
        let start = Utc::now() - Duration::days(2);
        let (mut decisions, mut orders) = (Vec::new(), Vec::new());
        for n in 0..60 {
            let at = start + Duration::minutes(10 * n);
            let ctx = OfferContext { purchase_intent: (n % 10) as f64 / 10.0, ..Default::default() };
            let user = format!("u{n}");
            // Even users are instance a's, odd ones b's.
            let d = if n % 2 == 0 { a.decide(&user, &ctx, "api", at) } else { b.decide(&user, &ctx, "api", at) };
            decisions.push(d);
            if n % 3 == 0 {
                orders.push(order(&format!("o{n}"), &user, 40.0, at + Duration::minutes(5), None));
            }
        }
        let (shared_a, shared_b) = (Shared::new(a), Shared::new(b));
        for shared in [&shared_a, &shared_b] {
            let mut learner = Learner(Shared::clone(shared));
            let mut feed = |topic: Topic, payload: Vec<u8>| {
                learner.handle(&Record::bare(topic, &payload), &mut Outbox::new(None)).expect("learns");
            };
            // Everything twice: the log read at start and the live topics overlap.
            for _ in 0..2 {
                for d in &decisions {
                    feed(Topic::Offers, serde_json::to_vec(d).expect("json"));
                }
                for o in &orders {
                    feed(Topic::ProcessedEvents, serde_json::to_vec(o).expect("json"));
                }
            }
            shared.write().sweep(Utc::now());
        }
        let (a, b) = (shared_a.read(), shared_b.read());
        let (sa, sb) = (a.stats(), b.stats());
        assert_eq!((sa.learned, sa.converted), (60, 20), "every decision learned once, every order once");
        assert_eq!((sa.learned, sa.converted, sa.open_decisions), (sb.learned, sb.converted, sb.open_decisions));
        let x = OfferContext { purchase_intent: 0.5, ..Default::default() }.vector();
        for (pa, pb) in a.bandit().scores(&x).iter().zip(b.bandit().scores(&x)) {
            assert!((pa.expected - pb.expected).abs() < 1e-9 && (pa.bonus - pb.bonus).abs() < 1e-9, "{pa:?} {pb:?}");
        }
    }

    #[test]
    fn a_restart_relearns_the_same_model_from_the_logs() {
        let mut live = policy();
        let start = Utc::now() - Duration::days(3);
        let (mut decisions, mut orders) = (Vec::new(), Vec::new());
        for n in 0..200 {
            let at = start + Duration::minutes(10 * n);
            let ctx = OfferContext {
                purchase_intent: (n % 10) as f64 / 10.0,
                category: Some(if n % 2 == 0 { "books" } else { "toys" }.into()),
                ..Default::default()
            };
            let user = format!("u{n}");
            let d = live.decide(&user, &ctx, "api", at);
            if n % 3 == 0 {
                let o = order(&format!("o{n}"), &user, 40.0, at + Duration::minutes(5), None);
                live.on_order(&o);
                orders.push(o);
            }
            live.sweep(at);
            decisions.push(d);
        }
        let now = Utc::now();
        live.sweep(now);
        let mut restored = policy();
        decisions.reverse(); // the log's order does not matter
        restored.restore(decisions, orders);
        // The restored clock stands at the log's last event; the live one was swept now.
        restored.sweep(now);
        let (a, b) = (live.stats(), restored.stats());
        assert_eq!((a.learned, a.converted, a.open_decisions), (b.learned, b.converted, b.open_decisions));
        assert_eq!(a.learned, 200);
        let x = OfferContext { purchase_intent: 0.5, ..Default::default() }.vector();
        for (sa, sb) in live.bandit().scores(&x).iter().zip(restored.bandit().scores(&x)) {
            assert!((sa.expected - sb.expected).abs() < 1e-6 && (sa.bonus - sb.bonus).abs() < 1e-6, "{sa:?} {sb:?}");
        }
        assert_eq!(restored.current.len(), 200);
    }

    /// The body is read by kit's rules: JSON whatever its `Content-Type`, and a key given twice
    /// is refused by name rather than read as its last value.
    #[tokio::test]
    async fn select_reads_its_body_strictly() {
        use axum::body::Body;
        use axum::http::Request;
        use http_body_util::BodyExt as _;
        use tower::ServiceExt as _;

        // A producer pointed at a port where no broker listens: nothing here reaches it.
        let producer = Producer::for_requests(&kit::kafka::KafkaSettings::for_broker("127.0.0.1:1")).expect("producer");
        let app = axum::Router::new()
            .route("/offer/select", post(select))
            .with_state(AppState { state: Shared::new(policy()), producer });
        let send = |body: &'static str| {
            let app = app.clone();
            async move {
                let resp = app.oneshot(Request::post("/offer/select").body(Body::from(body)).expect("request")).await;
                let resp = resp.expect("response");
                let status = resp.status();
                let body: Value =
                    serde_json::from_slice(&resp.into_body().collect().await.expect("body").to_bytes()).expect("JSON");
                (status, body)
            }
        };
        let (status, body) = send(r#"{"userId":"a","userId":"b"}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains(r#"the key "userId" is given twice"#)), "{body}");
        let (status, body) = send(r#"{"userId":"a","context":{"recency":2}}"#).await;
        assert_eq!((status, body["field"].as_str()), (StatusCode::BAD_REQUEST, Some("context.recency")), "{body}");
        let (status, body) = send("{oops").await;
        assert_eq!((status, body["field"].as_str()), (StatusCode::BAD_REQUEST, Some("$")), "{body}");
    }

    #[test]
    fn select_bodies_are_validated() {
        let now = Utc::now();
        let (user, ctx) =
            parse_select(&json!({"userId": "u", "context": {"purchaseIntent": 0.9, "category": "toys"}}), None, now)
                .expect("valid");
        assert_eq!((user.as_str(), ctx.purchase_intent, ctx.recency), ("u", 0.9, 0.0));
        assert_eq!(ctx.category.as_deref(), Some("toys"));
        let field = |v: Value| match parse_select(&v, None, now) {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(json!({})), "userId");
        assert_eq!(field(json!({"userId": 3})), "userId");
        assert_eq!(field(json!({"userId": "u", "context": {"recency": 2}})), "context.recency");
        assert_eq!(field(json!({"userId": "u", "context": {"category": " "}})), "context.category");
        assert_eq!(field(json!({"userId": "u", "context": {"category": 7}})), "context.category");
        assert_eq!(field(json!({"userId": "u", "context": []})), "context");
        assert_eq!(field(json!([])), "$");
        // A misspelt context key is refused, not ignored.
        assert_eq!(field(json!({"userId": "u", "context": {"purchase_intent": 0.9}})), "context.purchase_intent");
        // userId follows an event's rule: control characters refused, surrounding spaces trimmed.
        assert_eq!(field(json!({"userId": "a\u{7}b"})), "userId");
        let (user, _) = parse_select(&json!({"userId": "  u  "}), None, now).expect("trimmed");
        assert_eq!(user, "u");
    }
}
