//! `retrieval` (8086): candidate generation.
//!
//! Two inputs:
//! - a *replica* of `processed-events-topic` (every instance reads every partition from the
//!   beginning, so each holds the whole model; `/ready` waits until it has caught up). From it
//!   the [`Model`] learns co-visitation (products viewed in the same session, over the last
//!   [`SESSION_WINDOW`] views) and time-decayed popularity (half-life 24 h; views 1, clicks 1.5,
//!   carts 3, purchases 5).
//! - `user-features-topic` (consumer group `retrieval`, partitioned by user): on each new
//!   snapshot the user's candidates are generated and published to `candidates-topic`
//!   together with the snapshot, so ranking scores against the same features.
//!
//! Sources, each candidate tagged with its source and a source score in [0, 1]:
//! `retargeting` (in the cart or viewed, scored by the user's decayed engagement with the
//! product relative to their most engaged one), `co_visitation`,
//! `popular_in_category` (the user's top categories by affinity), `trending` (in those
//! categories, the products whose short-term popularity is furthest above their long-term
//! level) and `cold_start` (popular overall, for users with little history). Purchased
//! products are retargeted at half strength (shoppers come back to what they bought: to
//! reorder, compare, review) and proposed by no other source, except in [`REPURCHASABLE`]
//! categories of the demo catalog, which are retargeted in full (people rebuy groceries).
//!
//! `GET /retrieve/{userId}` shows the latest candidates (404 before the first).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use catalog::Catalog;
use chrono::{DateTime, Utc};
use compact_str::CompactString;
use events::{Candidate, CandidateSource, Candidates, EventType, ProcessedEvent, RankingFeatures, Topic, UserFeatures};
use foldhash::{HashMap as FastMap, HashSet as FastSet};
use kit::catalog::LiveCatalog;
use kit::config::{ConfigError, Env};
use kit::dedup::SeenSet;
use kit::http::{ApiError, UserId, found};
use kit::kafka::{ConsumerSpec, Handler, HandlerError, Outbox, Record};
use kit::state::{Shared, UserMap, user_map};
use kit::{Context, Service};

/// Views per session that count as "viewed together".
pub const SESSION_WINDOW: usize = 5;
/// Sessions tracked at once for co-visitation (oldest forgotten first).
pub const SESSIONS_TRACKED: usize = 100_000;
/// Popularity half-life, in hours.
pub const POPULARITY_HALF_LIFE_HOURS: f64 = 24.0;
/// Half-life of the short-term popularity that trending compares with the long-term one.
pub const TRENDING_HALF_LIFE_HOURS: f64 = 2.0;
/// Co-visited products kept per product (the strongest; pruned when twice as many).
pub const NEIGHBOURS_KEPT: usize = 100;
/// Products whose co-visits are kept (the most recently co-visited): product ids come from
/// clients too (events about products the catalog does not hold), so the map is bounded.
pub const COVISITED_PRODUCTS: usize = 200_000;
/// Products whose popularity is kept (the most recently engaged with), for the same reason.
pub const POPULAR_PRODUCTS: usize = 1_000_000;
/// Candidates per source.
pub const PER_SOURCE: usize = 20;
/// Most products retargeted: the user's own products are the strongest signal there is.
pub const RETARGETED: usize = 50;
/// Categories whose products people buy again: purchases there are not excluded.
pub const REPURCHASABLE: &[&str] = &["grocery"];
/// Trending needs at least this much short-term engagement (a few views), so one view of a
/// product nobody looked at before is not a trend.
const TRENDING_MIN_SHORT: f64 = 3.0;
/// A trend: short-term engagement this many times the level a steady rate would give it.
const TRENDING_LIFT: f64 = 1.5;
/// Trending products proposed per category at most.
const TRENDING_PER_CATEGORY: usize = 5;

/// Hours since the epoch: the time scale of the decayed counters' keys.
fn hours(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 3_600_000.0
}

/// Best first: by score, then by id.
fn best_first(a: &(String, f64), b: &(String, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0))
}

/// The `retrieval` service.
pub struct Retrieval;

impl Service for Retrieval {
    const NAME: &'static str = "retrieval";
    const DEFAULT_PORT: u16 = 8086;
    const PARTITIONED: bool = true;
    type Config = ();

    fn config(_env: &Env) -> Result<(), ConfigError> {
        Ok(())
    }

    async fn run((): (), mut ctx: Context) -> anyhow::Result<()> {
        let producer = ctx.pipeline_producer()?;
        let catalog = ctx.follow_catalog(&producer).await;
        let state = Shared::new(RetrievalState { catalog, ..RetrievalState::default() });
        ctx.spawn_consumer(
            &producer,
            ConsumerSpec::replica("model", [Topic::ProcessedEvents]),
            Learner(Shared::clone(&state)),
        );
        ctx.spawn_consumer(
            &producer,
            // A snapshot is the user's whole state: of a user's snapshots waiting, the latest
            // is enough (under load, a user's burst makes one list, not one per event).
            ConsumerSpec::group("user-features", [Topic::UserFeatures], "retrieval").coalescing([Topic::UserFeatures]),
            Retriever(Shared::clone(&state)),
        );
        let routes = axum::Router::new().route("/retrieve/{user_id}", get(get_candidates)).with_state(state);
        ctx.serve(routes).await
    }
}

/// What the service holds: the model and each user's latest candidates.
pub struct RetrievalState {
    pub model: Model,
    pub latest: UserMap<Candidates>,
    pub catalog: LiveCatalog,
}

impl Default for RetrievalState {
    fn default() -> Self {
        Self { model: Model::default(), latest: user_map(), catalog: LiveCatalog::default() }
    }
}

/// A time-decayed counter.
#[derive(Debug, Clone, Copy)]
struct Decayed {
    value: f64,
    at: DateTime<Utc>,
}

impl Decayed {
    /// `log2(value) + t / half-life` (t in hours since the epoch): of two counters with the
    /// same half-life, the one with the larger key is the larger at every later time, by a
    /// ratio of `2^(key difference)` that does not change as both decay.
    fn key(&self, half_life_hours: f64) -> f64 {
        self.value.log2() + hours(self.at) / half_life_hours
    }

    fn at(&self, t: DateTime<Utc>, half_life_hours: f64) -> f64 {
        let hours = (t - self.at).num_milliseconds().max(0) as f64 / 3_600_000.0;
        self.value * 0.5_f64.powf(hours / half_life_hours)
    }

    fn bump(slot: &mut Option<Decayed>, weight: f64, at: DateTime<Utc>, half_life_hours: f64) {
        let old = slot.unwrap_or(Decayed { value: 0.0, at });
        let t = old.at.max(at);
        *slot = Some(Decayed { value: old.at(t, half_life_hours) + weight, at: t });
    }
}

/// A product's popularity at two speeds.
#[derive(Debug, Clone, Copy, Default)]
struct Popularity {
    long: Option<Decayed>,
    short: Option<Decayed>,
}

impl Popularity {
    /// See [`Decayed::key`]: the order of long-term popularity, at any time.
    fn long_key(&self) -> f64 {
        self.long.map_or(f64::NEG_INFINITY, |d| d.key(POPULARITY_HALF_LIFE_HOURS))
    }

    /// The order of the short-term count over the long-term one (the lift that makes a
    /// trend), at any time: both counters are bumped together, and at a later time `t` the
    /// log2 of their ratio is this key minus `t` times the difference of the inverse
    /// half-lives, the same for every product (see [`Decayed::key`]).
    fn lift_key(&self) -> f64 {
        let short = self.short.map_or(f64::NEG_INFINITY, |d| d.key(TRENDING_HALF_LIFE_HOURS));
        short - self.long_key()
    }

    fn long_at(&self, t: DateTime<Utc>) -> f64 {
        self.long.map_or(0.0, |d| d.at(t, POPULARITY_HALF_LIFE_HOURS))
    }

    fn short_at(&self, t: DateTime<Utc>) -> f64 {
        self.short.map_or(0.0, |d| d.at(t, TRENDING_HALF_LIFE_HOURS))
    }

    /// Whether the product can be trending: its short-term counter reached
    /// [`TRENDING_MIN_SHORT`] when it was last bumped. Between bumps the counter only decays, so
    /// a product that does not qualify now cannot before its next engagement (which notes it
    /// as changed). In a shop's long tail most engaged products were seen once or twice: they
    /// top the lift order (all their engagement is recent) and would be read and skipped on
    /// every snapshot.
    fn may_trend(&self) -> bool {
        self.short.is_some_and(|d| d.value >= TRENDING_MIN_SHORT)
    }

    /// [`Popularity::lift_key`] of a product that [may trend](Popularity::may_trend).
    fn trend_key(&self) -> Option<f64> {
        self.may_trend().then(|| self.lift_key())
    }
}

/// Co-visitation and popularity, learned from the processed stream.
pub struct Model {
    covis: lru::LruCache<String, Neighbours, foldhash::fast::RandomState>,
    sessions: HashMap<String, VecDeque<String>>,
    session_order: VecDeque<String>,
    popularity: lru::LruCache<String, Popularity, foldhash::fast::RandomState>,
    /// The product with the largest long-term popularity ([`Popularity::long_key`]).
    top: Option<(f64, String)>,
    /// Per-category lists derived from popularity and the catalog, kept between snapshots.
    lists: std::sync::Mutex<Lists>,
    seen: SeenSet,
    /// The latest event time learned: the model's clock (see [`Model::as_of`]).
    latest: Option<DateTime<Utc>>,
}

/// What [`generate`] reads of a category on every snapshot, computed once and then kept up
/// to date product by product, so that a snapshot costs the products that changed since the
/// last one rather than a scan of the category (with a shop's catalog, many thousands).
///
/// The lists are exactly what a fresh scan would give at their reference top counter: a
/// product's popular score depends only on its own counter, its prior and that reference
/// ([`Model::popularity_of`]), so when one product is learned or forgotten only its own place
/// can change. The top counter moves with nearly every view of the top product; the
/// reference follows it (a rescan of every list read) once it is [`TOP_DRIFT`] away, at most
/// once per [`TOP_REFRESH`] of event time. So live popularity is relative to a top counter
/// within 0.7 % of the top product's, or one taken less than a second of event time ago. A
/// catalog change or a long backlog of changes empties the lists at once.
#[derive(Default)]
struct Lists {
    /// The catalog revision and top key the lists were computed with, and when (event time)
    /// that top was taken.
    catalog: u64,
    top: f64,
    top_taken: Option<DateTime<Utc>>,
    /// By category (`None`: the whole catalog).
    by_category: HashMap<Option<String>, List>,
    /// Products learned or forgotten since the lists were last brought up to date (past
    /// [`CHANGES_KEPT`], no more are noted: the lists are recomputed).
    changed: HashSet<String>,
}

impl Lists {
    /// Notes that `id` was learned or forgotten.
    fn changed(&mut self, id: &str) {
        if self.changed.len() <= CHANGES_KEPT && !self.changed.contains(id) {
            self.changed.insert(id.to_owned());
        }
    }
}

/// Past this many changed products, the lists are recomputed rather than updated.
const CHANGES_KEPT: usize = 10_000;
/// How much event time may pass before the lists' reference top counter follows the top
/// product's (see [`Lists`]).
const TOP_REFRESH: chrono::TimeDelta = chrono::TimeDelta::seconds(1);
/// How far (log2) the top product's counter may move from the lists' reference before it
/// follows (see [`Lists`]): live popularity off by a factor under 2^0.01 (0.7 %). A top that
/// moves with every view would otherwise rescan every list read once a second for good: in a
/// steady state the top counter's key grows by 1/24 an hour ([`Decayed::key`]), so the
/// reference follows it about every 15 minutes instead.
const TOP_DRIFT: f64 = 0.01;

struct List {
    /// The [`PER_SOURCE`] most popular available products, best first, ties by id.
    popular: Vec<(String, f64)>,
    /// The category's available products that [may trend](Popularity::may_trend), by
    /// [`Popularity::lift_key`]: trends are read from the top.
    engaged: std::collections::BTreeSet<(Key, String)>,
    /// The key each member of `engaged` is filed under.
    keys: HashMap<String, Key>,
}

/// An `f64` ordered by [`f64::total_cmp`].
#[derive(Debug, Clone, Copy)]
struct Key(f64);

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl List {
    /// Files `id` under its lift `key` (`None`: cannot trend, or not a member).
    fn engage(&mut self, id: &str, key: Option<f64>) {
        if let Some(old) = self.keys.remove(id) {
            self.engaged.remove(&(old, id.to_owned()));
        }
        if let Some(key) = key {
            self.keys.insert(id.to_owned(), Key(key));
            self.engaged.insert((Key(key), id.to_owned()));
        }
    }

    /// Puts `id` in its place for its new `score` (`None`: no longer a member). False when
    /// the list must be recomputed: a product in it fell, and one outside might now pass it.
    fn update(&mut self, id: &str, score: Option<f64>) -> bool {
        let at = self.popular.iter().position(|(p, _)| p == id);
        match (at, score) {
            (Some(i), Some(s)) if s >= self.popular[i].1 => {
                self.popular.remove(i);
            }
            (Some(_), _) => return false,
            (None, None) => return true,
            (None, Some(_)) => {}
        }
        if let Some(s) = score {
            let entry = (id.to_owned(), s);
            let place = self.popular.partition_point(|e| best_first(e, &entry).is_lt());
            if place < PER_SOURCE {
                self.popular.insert(place, entry);
                self.popular.truncate(PER_SOURCE);
            }
        }
        true
    }
}

impl Default for Model {
    fn default() -> Self {
        Self::bounded(COVISITED_PRODUCTS, POPULAR_PRODUCTS)
    }
}

impl Model {
    /// A model keeping the co-visits of at most `covisited` products and the popularity of at
    /// most `popular` (the most recently engaged with).
    pub fn bounded(covisited: usize, popular: usize) -> Self {
        Self {
            covis: lru::LruCache::with_hasher(bound(covisited), foldhash::fast::RandomState::default()),
            sessions: HashMap::new(),
            session_order: VecDeque::new(),
            popularity: lru::LruCache::with_hasher(bound(popular), foldhash::fast::RandomState::default()),
            top: None,
            lists: std::sync::Mutex::default(),
            seen: SeenSet::new(200_000),
            latest: None,
        }
    }
}

impl Model {
    /// Learns from one event (redeliveries are ignored).
    pub fn learn(&mut self, e: &ProcessedEvent) {
        if !self.seen.insert(&e.idempotency_key()) {
            return;
        }
        self.latest = self.latest.max(Some(e.occurred_at));
        let weight = e.event_type.engagement_weight();
        if let Some(p) = &e.product
            && weight > 0.0
        {
            self.bump(&p.product_id, weight, e.occurred_at);
            if matches!(e.event_type, EventType::ProductView | EventType::Click) {
                self.co_visit(&e.session_id, &p.product_id);
            }
        }
        if let Some(order) = &e.order {
            for item in &order.items {
                self.bump(&item.product.product_id, EventType::Purchase.engagement_weight(), e.occurred_at);
            }
        }
    }

    fn bump(&mut self, product: &str, weight: f64, at: DateTime<Utc>) {
        let lists = self.lists.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut top_forgotten = false;
        if !self.popularity.contains(product)
            && self.popularity.len() >= self.popularity.cap().get()
            && let Some((old, _)) = self.popularity.pop_lru()
        {
            top_forgotten = self.top.as_ref().is_some_and(|(_, id)| *id == old);
            lists.changed(&old);
        }
        lists.changed(product);
        let entry = self.popularity.get_or_insert_mut(product.to_owned(), Popularity::default);
        Decayed::bump(&mut entry.long, weight, at, POPULARITY_HALF_LIFE_HOURS);
        Decayed::bump(&mut entry.short, weight, at, TRENDING_HALF_LIFE_HOURS);
        let key = entry.long_key();
        if top_forgotten {
            self.top = self
                .popularity
                .iter()
                .map(|(id, p)| (p.long_key(), id))
                .max_by(|a, b| a.0.total_cmp(&b.0).then_with(|| b.1.cmp(a.1)))
                .map(|(key, id)| (key, id.clone()));
        } else if self.top.as_ref().is_none_or(|(top, _)| key > *top) {
            self.top = Some((key, product.to_owned()));
        }
    }

    fn co_visit(&mut self, session: &str, product: &str) {
        if !self.sessions.contains_key(session) {
            if self.session_order.len() >= SESSIONS_TRACKED
                && let Some(old) = self.session_order.pop_front()
            {
                self.sessions.remove(&old);
            }
            self.session_order.push_back(session.to_owned());
        }
        let recent = self.sessions.entry(session.to_owned()).or_default();
        for other in recent.iter().filter(|o| *o != product) {
            for (a, b) in [(product, other.as_str()), (other.as_str(), product)] {
                let neighbours = self.covis.get_or_insert_mut(a.to_owned(), Neighbours::default);
                *neighbours.entry(CompactString::from(b)).or_default() += 1.0;
                if neighbours.len() > 2 * NEIGHBOURS_KEPT {
                    prune(neighbours);
                }
            }
        }
        recent.retain(|p| p != product);
        recent.push_back(product.to_owned());
        if recent.len() > SESSION_WINDOW {
            recent.pop_front();
        }
    }

    /// The time popularity and trends are measured at for a user whose latest event happened
    /// at `user_time`: the latest event time the model or the user has seen. Event time, not
    /// the wall clock, so an imported history gives the candidates it gave live.
    pub fn as_of(&self, user_time: DateTime<Utc>) -> DateTime<Utc> {
        self.latest.map_or(user_time, |t| t.max(user_time))
    }

    /// How often `a` and `b` were viewed together.
    pub fn co_visits(&self, a: &str, b: &str) -> f64 {
        self.covis.peek(a).and_then(|m| m.get(b)).copied().unwrap_or(0.0)
    }

    /// Popularity in [0, 1]: half the catalog prior, half the live signal — the product's
    /// decayed engagement relative to the top product's, a ratio that does not change with
    /// time as both decay.
    fn popularity_of(&self, product: &catalog::Product, top: f64) -> f64 {
        let live = match self.popularity.peek(&product.id) {
            Some(p) if top.is_finite() => (p.long_key() - top).exp2(),
            _ => 0.0,
        };
        0.5 * product.popularity + 0.5 * live
    }

    /// The lists of `category` (`None`: the whole catalog), brought up to date with
    /// `catalog` and with what was learned since they were last read.
    fn with_list<T>(&self, catalog: &Catalog, category: Option<&str>, read: impl FnOnce(&List) -> T) -> T {
        let mut lists = self.lists.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let lists = &mut *lists;
        let top = self.top.as_ref().map_or(f64::NEG_INFINITY, |(key, _)| *key);
        let moved = (top - lists.top).abs();
        let top_due = lists.top.to_bits() != top.to_bits()
            && (!lists.top.is_finite()
                || moved >= TOP_DRIFT
                    && lists.top_taken.zip(self.latest).is_none_or(|(taken, latest)| latest - taken >= TOP_REFRESH));
        if lists.catalog != catalog.revision() || top_due || lists.changed.len() > CHANGES_KEPT {
            lists.by_category.clear();
            lists.changed.clear();
            lists.catalog = catalog.revision();
        }
        if top_due {
            lists.top = top;
            lists.top_taken = self.latest;
        }
        let top = lists.top;
        for id in lists.changed.drain() {
            let product = catalog.available(&id);
            let score = product.map(|p| self.popularity_of(p, top));
            let lift_key = self.popularity.peek(&id).and_then(Popularity::trend_key);
            for key in [product.map(|p| Some(p.category.clone())), Some(None)].into_iter().flatten() {
                let Some(list) = lists.by_category.get_mut(&key) else { continue };
                if !list.update(&id, score) {
                    lists.by_category.remove(&key);
                } else if key.is_some() {
                    list.engage(&id, lift_key);
                }
            }
        }
        let list =
            lists.by_category.entry(category.map(str::to_owned)).or_insert_with(|| self.list(catalog, category, top));
        read(list)
    }

    /// The top counter the lists are computed with, and when (event time) it was taken.
    #[cfg(test)]
    fn reference_top(&self) -> (f64, Option<DateTime<Utc>>) {
        let lists = self.lists.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (lists.top, lists.top_taken)
    }

    /// The lists of `category`, computed from a scan of it, live popularity relative to `top`.
    fn list(&self, catalog: &Catalog, category: Option<&str>, top: f64) -> List {
        let members: Box<dyn Iterator<Item = &catalog::Product>> = match category {
            Some(c) => Box::new(catalog.in_category(c)),
            None => Box::new(catalog.by_popularity()),
        };
        let mut list = List { popular: Vec::new(), engaged: Default::default(), keys: HashMap::new() };
        let mut scored: Vec<(&str, f64)> = Vec::with_capacity(members.size_hint().0);
        for p in members {
            if category.is_some()
                && let Some(key) = self.popularity.peek(&p.id).and_then(Popularity::trend_key)
            {
                list.engage(&p.id, Some(key));
            }
            scored.push((&p.id, self.popularity_of(p, top)));
        }
        // Up to the whole catalog scored: only the best are sorted.
        keep_best(&mut scored, PER_SOURCE);
        list.popular = scored.into_iter().map(|(id, score)| (id.to_owned(), score)).collect();
        list
    }

    /// The products of a category rising fastest: short-term engagement over the long-term
    /// level it would have at a steady rate, scored in [0, 1].
    pub fn trending(&self, catalog: &Catalog, category: &str, n: usize, now: DateTime<Utc>) -> Vec<(String, f64)> {
        // At a steady rate r per hour the two counters settle at r·h/ln 2 for half-life h, so
        // their ratio is short/long = 2/24: a trend is a ratio well above that.
        let steady = TRENDING_HALF_LIFE_HOURS / POPULARITY_HALF_LIFE_HOURS;
        // The members come highest lift first (see `Popularity::lift_key`): the scan stops at
        // the first whose lift at `now` is below TRENDING_LIFT, or, once `n` trends are found, at the
        // first below the n-th. MARGIN covers rounding: each product read is checked as it is.
        const MARGIN: f64 = 1e-6;
        let log_lift = |key: f64| {
            key - hours(now) * (1.0 / TRENDING_HALF_LIFE_HOURS - 1.0 / POPULARITY_HALF_LIFE_HOURS) - steady.log2()
        };
        let mut scored: Vec<(String, f64)> = Vec::new();
        self.with_list(catalog, Some(category), |list| {
            let mut nth: Option<f64> = None;
            for (key, id) in list.engaged.iter().rev() {
                if log_lift(key.0) < TRENDING_LIFT.log2() - MARGIN || nth.is_some_and(|nth| key.0 < nth - MARGIN) {
                    break;
                }
                let Some(pop) = self.popularity.peek(id) else { continue };
                let short = pop.short_at(now);
                let lift = short / (pop.long_at(now) * steady).max(1e-9);
                if short >= TRENDING_MIN_SHORT && lift > TRENDING_LIFT {
                    scored.push((id.clone(), 1.0 - 1.0 / lift));
                    if scored.len() == n {
                        nth = Some(key.0);
                    }
                }
            }
        });
        scored.sort_by(best_first);
        scored.truncate(n);
        scored
    }

    /// The `n` (at most [`PER_SOURCE`]) most popular products of a category (or of the whole
    /// catalog), with scores.
    fn popular(&self, catalog: &Catalog, category: Option<&str>, n: usize) -> Vec<(String, f64)> {
        self.with_list(catalog, category, |list| list.popular.iter().take(n).cloned().collect())
    }
}

/// Keeps the `n` best of `scored` (by score, then id), best first, without sorting the others.
fn keep_best(scored: &mut Vec<(&str, f64)>, n: usize) {
    let best = |a: &(&str, f64), b: &(&str, f64)| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0));
    if scored.len() > n {
        scored.select_nth_unstable_by(n, best);
        scored.truncate(n);
    }
    scored.sort_by(best);
}

fn bound(n: usize) -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(n).unwrap_or(std::num::NonZeroUsize::MIN)
}

/// A product's co-visited products and how often. The ids are kept inline (a product id is
/// rarely longer than 24 bytes): reading a few hundred neighbours per candidate list chased a
/// pointer to a scattered heap string for each, a cache miss apiece, and that was most of
/// retrieval's CPU. The entries are one dense array (an index map; a hash map's are spread
/// over a table up to four times their size): summing five seeds' neighbours for a snapshot
/// waited on memory for a third of `generate`'s time (48 µs to 34 µs a snapshot, measured on
/// 5,000 users' learned sessions).
type Neighbours = indexmap::IndexMap<CompactString, f64, foldhash::fast::RandomState>;

/// Keeps the [`NEIGHBOURS_KEPT`] strongest co-visits.
fn prune(neighbours: &mut Neighbours) {
    let mut counts: Vec<f64> = neighbours.values().copied().collect();
    counts.sort_by(|a, b| b.total_cmp(a));
    let floor = counts.get(NEIGHBOURS_KEPT - 1).copied().unwrap_or(0.0);
    neighbours.retain(|_, c| *c >= floor);
    if neighbours.len() > NEIGHBOURS_KEPT {
        // Ties at the floor: drop some of them, in name order, to stay bounded.
        let mut tied: Vec<CompactString> =
            neighbours.iter().filter(|(_, c)| **c == floor).map(|(k, _)| k.clone()).collect();
        tied.sort();
        for k in tied.into_iter().take(neighbours.len() - NEIGHBOURS_KEPT) {
            neighbours.swap_remove(&k);
        }
    }
}

/// The candidates for a user's features. Products the catalog has withdrawn are left out;
/// products it does not know yet may be retargeted or co-visited.
pub fn generate(model: &Model, catalog: &Catalog, f: &UserFeatures, now: DateTime<Utc>) -> Vec<Candidate> {
    let bought: FastSet<&str> = f
        .purchased
        .iter()
        .filter(|id| catalog.get(id).is_none_or(|p| !REPURCHASABLE.contains(&p.category.as_str())))
        .map(String::as_str)
        .collect();
    let mut out: Vec<Candidate> = Vec::with_capacity(RETARGETED + f.cart.len() + 5 * PER_SOURCE);
    // Every source but retargeting proposes each product once by construction (a map's keys, a
    // category's list; categories do not share products), so only retargeting, which draws
    // on both the cart and the recent views, needs to be told what it already proposed.
    let push = |out: &mut Vec<Candidate>, id: Cow<'_, str>, source, score: f64| {
        // What the user bought is retargeted at half strength (they often come back to it:
        // to reorder, compare or review) and never suggested by the other sources.
        let score = match (bought.contains(&*id), source) {
            (false, _) => score,
            (true, CandidateSource::Retargeting) => score * 0.5,
            (true, _) => return,
        };
        if catalog.get(&id).is_none_or(|p| p.available) {
            out.push(Candidate { product_id: CompactString::from(id), source, source_score: score.clamp(0.0, 1.0) });
        }
    };

    // Retargeting: the user's own products (cart and recent views), scored by how much they
    // engaged with each — decayed, so recency counts too — relative to the most engaged one.
    // Shoppers come back to what they kept coming back to, not only to the very last thing
    // (on real histories this beats ordering by recency alone: docs/quality.md).
    // Features from before `productEngagement` existed: the cart first, then most recent first.
    let engagement = |id: &str| f.product_engagement.get(id).copied().unwrap_or(0.0);
    let cart = f.cart.iter().map(|id| (id, 1.0));
    let viewed =
        f.recently_viewed.iter().take(RETARGETED).enumerate().map(|(i, id)| (id, 0.9 * 0.85_f64.powi(i as i32)));
    let own: Vec<(&String, f64)> = cart.chain(viewed).collect();
    // Relative to the most engaged product not bought: a purchase (weight 5) would otherwise
    // squash everything else the shopper is still considering.
    let considered = own.iter().filter(|(id, _)| !bought.contains(id.as_str()));
    let most = considered.map(|(id, _)| engagement(id)).fold(0.0, f64::max);
    let most = if most > 0.0 { most } else { own.iter().map(|(id, _)| engagement(id)).fold(0.0, f64::max) };
    let mut retargeted: FastSet<&str> = FastSet::with_capacity_and_hasher(own.len(), Default::default());
    for (id, by_recency) in own {
        if retargeted.insert(id) {
            let score = if most > 0.0 { engagement(id) / most } else { by_recency };
            push(&mut out, Cow::Borrowed(id), CandidateSource::Retargeting, score);
        }
    }

    // Co-visitation of the five most recent views, nearer views weighing more.
    let seeds: Vec<Option<&Neighbours>> = f.recently_viewed.iter().take(5).map(|seed| model.covis.peek(seed)).collect();
    let mut covis: FastMap<&str, f64> =
        FastMap::with_capacity_and_hasher(seeds.iter().flatten().map(|n| n.len()).sum(), Default::default());
    for (i, seed) in seeds.into_iter().enumerate() {
        if let Some(neighbours) = seed {
            for (q, c) in neighbours {
                *covis.entry(q.as_str()).or_default() += c / (1.0 + i as f64);
            }
        }
    }
    // The recent views are dropped once, after the sums (a few dozen), not looked up for each
    // of the up to a thousand neighbours summed.
    for v in &f.recently_viewed {
        covis.remove(v.as_str());
    }
    let max = covis.values().copied().fold(0.0, f64::max);
    let mut covis: Vec<(&str, f64)> = covis.into_iter().collect();
    // Up to a thousand neighbours summed: only the best are sorted.
    keep_best(&mut covis, PER_SOURCE);
    for (id, c) in covis {
        push(&mut out, Cow::Borrowed(id), CandidateSource::CoVisitation, c / max);
    }

    // Popular in the user's top three categories, weighted by the category's share.
    let mut cats: Vec<(&String, &f64)> = f.category_affinity.iter().collect();
    cats.sort_by(|a, b| b.1.total_cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let total: f64 = cats.iter().take(3).map(|c| *c.1).sum();
    for (cat, aff) in cats.into_iter().take(3) {
        let share = if total > 0.0 { aff / total } else { 0.0 };
        let n = ((PER_SOURCE as f64 * share).ceil() as usize).clamp(3, PER_SOURCE);
        for (id, score) in model.popular(catalog, Some(cat), n) {
            push(&mut out, Cow::Owned(id), CandidateSource::PopularInCategory, score * share.sqrt());
        }
        for (id, score) in model.trending(catalog, cat, n.min(TRENDING_PER_CATEGORY), now) {
            push(&mut out, Cow::Owned(id), CandidateSource::Trending, score);
        }
    }

    // Cold start: too little history to fill a page.
    let distinct: FastSet<&str> = out.iter().map(|c| c.product_id.as_str()).collect();
    if distinct.len() < PER_SOURCE {
        for (id, score) in model.popular(catalog, None, PER_SOURCE) {
            push(&mut out, Cow::Owned(id), CandidateSource::ColdStart, score);
        }
    }
    out
}

struct Learner(Shared<RetrievalState>);

impl Handler for Learner {
    fn handle(&mut self, rec: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        let event: ProcessedEvent = rec.json()?;
        self.0.write().model.learn(&event);
        Ok(())
    }
}

struct Retriever(Shared<RetrievalState>);

impl Handler for Retriever {
    fn handle(&mut self, rec: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        let features: UserFeatures = rec.json()?;
        let now = Utc::now();
        // Generating only reads the model: the HTTP handlers may read alongside.
        let candidates = {
            let state = self.0.read();
            let as_of = state.model.as_of(features.last_seen);
            generate(&state.model, &state.catalog.read(), &features, as_of)
        };
        metrics::histogram!("retrieval_candidates").record(candidates.len() as f64);
        let mut msg = Candidates {
            schema_version: events::SCHEMA_VERSION,
            user_id: features.user_id.clone(),
            generated_at: now,
            features: RankingFeatures::from(features),
            candidates,
        };
        out.send(&msg);
        // Kept for `GET /retrieve` for up to `MAX_USERS` users: without the spare room the
        // list was built with (room for every source's most) or the features were decoded into.
        msg.candidates.shrink_to_fit();
        msg.features.recently_viewed.shrink_to_fit();
        msg.features.cart.shrink_to_fit();
        self.0.write().latest.put(msg.user_id.clone(), msg);
        Ok(())
    }
}

async fn get_candidates(
    State(state): State<Shared<RetrievalState>>,
    UserId(user_id): UserId,
) -> Result<Json<Candidates>, ApiError> {
    found(state.read().latest.peek(&user_id).cloned(), || format!("no candidates for user {user_id:?} yet"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use events::ProductInfo;

    use super::*;

    fn view(id: &str, session: &str, product: &str) -> ProcessedEvent {
        let p = Catalog::demo().get(product).expect("in catalog");
        ProcessedEvent {
            product: Some(ProductInfo::from_catalog(catalog::Catalog::demo(), &p.id)),
            ..events::generate::processed(id, "someone", session, EventType::ProductView, Utc::now())
        }
    }

    fn sources_of(c: &[Candidate], id: &str) -> Vec<CandidateSource> {
        c.iter().filter(|c| c.product_id == id).map(|c| c.source).collect()
    }

    #[test]
    fn co_visitation_is_learned_from_sessions() {
        let mut m = Model::default();
        m.learn(&view("1", "s1", "P00010"));
        m.learn(&view("2", "s1", "P00500"));
        m.learn(&view("3", "s2", "P00010"));
        m.learn(&view("4", "s2", "P00500"));
        m.learn(&view("4", "s2", "P00500")); // redelivery
        assert_eq!(m.co_visits("P00010", "P00500"), 2.0);
        assert_eq!(m.co_visits("P00500", "P00010"), 2.0);

        let f = UserFeatures { user_id: "u".into(), recently_viewed: vec!["P00010".into()], ..Default::default() };
        let c = generate(&m, Catalog::demo(), &f, Utc::now());
        assert!(sources_of(&c, "P00500").contains(&CandidateSource::CoVisitation), "{c:?}");
        assert!(sources_of(&c, "P00010").contains(&CandidateSource::Retargeting));
    }

    #[test]
    fn purchases_are_excluded_and_categories_drive_popularity() {
        let m = Model::default();
        let toy = Catalog::demo().in_category("toys").next().expect("toy").id.clone();
        let f = UserFeatures {
            user_id: "u".into(),
            cart: vec!["P00020".into()],
            recently_viewed: vec!["P00020".into(), toy.clone()],
            purchased: vec![toy.clone()],
            category_affinity: BTreeMap::from([("toys".to_owned(), 5.0)]),
            ..Default::default()
        };
        let c = generate(&m, Catalog::demo(), &f, Utc::now());
        // A bought product is only retargeted, at half strength: no other source proposes it.
        assert_eq!(sources_of(&c, &toy), [CandidateSource::Retargeting]);
        let score = c.iter().find(|c| c.product_id == toy).expect("retargeted").source_score;
        assert!((score - 0.5 * 0.9 * 0.85).abs() < 1e-9, "{score}");
        assert_eq!(c[0].product_id, "P00020");
        assert_eq!(c[0].source_score, 1.0);
        let popular: Vec<_> = c.iter().filter(|c| c.source == CandidateSource::PopularInCategory).collect();
        assert!(!popular.is_empty());
        assert!(popular.iter().all(|c| Catalog::demo().get(&c.product_id).expect("known").category == "toys"));
    }

    #[test]
    fn retargeting_follows_engagement_not_only_recency() {
        let (again, once, carted) = ("P00001".to_owned(), "P00002".to_owned(), "P00003".to_owned());
        let f = UserFeatures {
            user_id: "u".into(),
            cart: vec![carted.clone()],
            recently_viewed: vec![once.clone(), carted.clone(), again.clone()],
            product_engagement: BTreeMap::from([(again.clone(), 4.0), (once.clone(), 1.0), (carted.clone(), 2.0)]),
            ..Default::default()
        };
        let c = generate(&Model::default(), Catalog::demo(), &f, Utc::now());
        let score = |id: &str| {
            c.iter().find(|c| c.product_id == id && c.source == CandidateSource::Retargeting).map(|c| c.source_score)
        };
        // The product viewed again and again leads, though the last view was of another one.
        assert_eq!((score(&again), score(&carted), score(&once)), (Some(1.0), Some(0.5), Some(0.25)), "{c:?}");

        // A purchase weighs 5 but does not squash what the shopper is still considering: the
        // scale is the most engaged product not bought, and the bought one counts half its
        // engagement (6 / 4 / 2).
        let bought = "P00004".to_owned();
        let mut f = f;
        f.recently_viewed.push(bought.clone());
        f.purchased.push(bought.clone());
        f.product_engagement.insert(bought.clone(), 6.0);
        let c = generate(&Model::default(), Catalog::demo(), &f, Utc::now());
        let score = |id: &str| {
            c.iter().find(|c| c.product_id == id && c.source == CandidateSource::Retargeting).map(|c| c.source_score)
        };
        assert_eq!((score(&again), score(&once), score(&bought)), (Some(1.0), Some(0.25), Some(0.75)), "{c:?}");
    }

    #[test]
    fn new_users_get_cold_start_candidates() {
        let c = generate(&Model::default(), Catalog::demo(), &UserFeatures::default(), Utc::now());
        assert_eq!(c.len(), PER_SOURCE);
        assert!(c.iter().all(|c| c.source == CandidateSource::ColdStart));
    }

    #[test]
    fn each_source_proposes_a_product_once() {
        // Sessions over three categories, so that every source has something to propose.
        let mut m = Model::default();
        let demo = Catalog::demo();
        let ids: Vec<String> = ["toys", "books", "grocery"]
            .iter()
            .flat_map(|c| demo.in_category(c).take(30))
            .map(|p| p.id.clone())
            .collect();
        let now = Utc::now();
        for (i, id) in ids.iter().cycle().take(900).enumerate() {
            let mut e = view(&format!("e{i}"), &format!("s{}", i % 40), id);
            e.occurred_at = now - chrono::TimeDelta::seconds(900 - i as i64);
            m.learn(&e);
        }
        // The cart and the recent views overlap; a product is bought too.
        let f = UserFeatures {
            user_id: "u".into(),
            cart: vec![ids[1].clone(), ids[40].clone()],
            recently_viewed: vec![ids[40].clone(), ids[1].clone(), ids[2].clone(), ids[1].clone(), ids[70].clone()],
            purchased: vec![ids[2].clone()],
            category_affinity: BTreeMap::from([("toys".into(), 3.0), ("books".into(), 2.0), ("grocery".into(), 1.0)]),
            ..Default::default()
        };
        let c = generate(&m, demo, &f, now);
        let mut pairs: Vec<(&str, CandidateSource)> = c.iter().map(|c| (c.product_id.as_str(), c.source)).collect();
        let sources: HashSet<CandidateSource> = pairs.iter().map(|p| p.1).collect();
        assert!(sources.len() >= 4, "too few sources to tell: {sources:?}");
        pairs.sort();
        let proposed = pairs.len();
        pairs.dedup();
        assert_eq!(pairs.len(), proposed, "a product proposed twice by one source: {c:?}");
    }

    #[test]
    fn trending_is_a_recent_rise_not_a_steady_best_seller() {
        let mut m = Model::default();
        let toys: Vec<String> = Catalog::demo().in_category("toys").take(2).map(|p| p.id.clone()).collect();
        let (steady, rising) = (&toys[0], &toys[1]);
        let now = Utc::now();
        // The steady seller: viewed every hour for two days.
        for h in 0..48 {
            let mut e = view(&format!("s{h}"), &format!("s{h}"), steady);
            e.occurred_at = now - chrono::Duration::hours(48 - h);
            m.learn(&e);
        }
        // The riser: nothing until the last half hour, then a burst.
        for i in 0..6 {
            let mut e = view(&format!("r{i}"), &format!("r{i}"), rising);
            e.occurred_at = now - chrono::Duration::minutes(30 - i);
            m.learn(&e);
        }
        let trending = m.trending(Catalog::demo(), "toys", 5, now);
        assert_eq!(trending.first().map(|t| t.0.as_str()), Some(rising.as_str()), "{trending:?}");
        assert!(trending.iter().all(|t| t.0 != *steady), "{trending:?}");
        assert!(m.trending(Catalog::demo(), "books", 5, now).is_empty());

        let f = UserFeatures {
            user_id: "u".into(),
            category_affinity: BTreeMap::from([("toys".to_owned(), 1.0)]),
            ..Default::default()
        };
        assert!(sources_of(&generate(&m, Catalog::demo(), &f, now), rising).contains(&CandidateSource::Trending));
    }

    /// The lists kept between snapshots are always those a fresh scan gives: under random
    /// engagement, out-of-order times, a popularity memory small enough to forget products,
    /// and catalog changes.
    #[test]
    fn kept_lists_match_a_fresh_scan() {
        let demo = Catalog::demo();
        let categories = ["toys", "books", "grocery"];
        let products: Vec<catalog::Product> =
            categories.iter().flat_map(|c| demo.in_category(c).take(40).cloned()).collect();
        let mut catalog = Catalog::from_products(products.clone());
        let mut m = Model::bounded(1_000, 60);
        let mut seed = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let start = Utc::now() - chrono::Duration::days(3);
        let mut minutes = 0_i64;
        let mut checks = 0;
        let mut stale_reads = 0;
        // Reads more than TOP_REFRESH after the reference was taken, with the top moved less
        // than TOP_DRIFT: the reference stays.
        let mut drifted_reads = 0;
        let mut burst = (0, 0);
        for step in 0..3_000_u64 {
            // Skewed towards the first products of the list, with a few unknown ones, and now
            // and then a burst of views of one product: a trend.
            if burst.1 == 0 && next(40) == 0 {
                burst = (next(120) as usize, 5 + next(20));
            }
            let i = if burst.1 > 0 {
                burst.1 -= 1;
                burst.0
            } else {
                next(120).min(next(130)) as usize
            };
            let product = products.get(i).map_or_else(|| format!("UNKNOWN-{i}"), |p| p.id.clone());
            minutes += next(4) as i64;
            let mut e = view(&format!("e{step}"), &format!("s{}", next(50)), &products[0].id);
            e.product = Some(ProductInfo { product_id: product, ..e.product.clone().expect("product") });
            e.event_type = [EventType::ProductView, EventType::Click, EventType::AddToCart][next(3) as usize];
            e.occurred_at = start + chrono::Duration::minutes(minutes - next(30) as i64);
            m.learn(&e);
            if step == 1_500 {
                // One product withdrawn, one moved to another category.
                catalog.upsert(catalog::Product { available: false, ..products[1].clone() });
                catalog.upsert(catalog::Product { category: "books".into(), ..products[2].clone() });
            }
            if step % 7 != 0 {
                continue;
            }
            let now = m.as_of(e.occurred_at);
            for category in categories.iter().map(|c| Some(*c)).chain([None]) {
                let kept = m.popular(&catalog, category, PER_SOURCE);
                let (reference, taken) = m.reference_top();
                assert_eq!(kept, m.list(&catalog, category, reference).popular, "step {step}, {category:?}");
                let top = m.top.as_ref().map(|(key, _)| *key).expect("a top product");
                let stale = taken.zip(m.latest).is_some_and(|(taken, latest)| latest - taken >= TOP_REFRESH);
                let near = (top - reference).abs() < TOP_DRIFT;
                assert!(reference == top || !stale || near, "step {step}: reference {reference} for top {top}");
                stale_reads += usize::from(reference != top);
                drifted_reads += usize::from(reference != top && stale);
                if let Some(c) = category {
                    let mut scanned: Vec<(String, f64)> = catalog
                        .in_category(c)
                        .filter_map(|p| {
                            let pop = m.popularity.peek(&p.id)?;
                            let steady = TRENDING_HALF_LIFE_HOURS / POPULARITY_HALF_LIFE_HOURS;
                            let lift = pop.short_at(now) / (pop.long_at(now) * steady).max(1e-9);
                            (pop.short_at(now) >= TRENDING_MIN_SHORT && lift > TRENDING_LIFT)
                                .then(|| (p.id.clone(), 1.0 - 1.0 / lift))
                        })
                        .collect();
                    scanned.sort_by(best_first);
                    for n in [1, 3, 5] {
                        let top: Vec<_> = scanned.iter().take(n).cloned().collect();
                        assert_eq!(m.trending(&catalog, c, n, now), top, "step {step}, {c}, {n}");
                    }
                    checks += usize::from(scanned.len() > 3);
                }
            }
        }
        assert!(checks > 0, "some products were trending");
        assert!(stale_reads > 0, "some reads were between a new top and the reference following it");
        assert!(drifted_reads > 0, "some reads kept a reference near the top for longer than TOP_REFRESH");
        assert!(m.popularity.len() == 60, "products were forgotten");
    }

    /// A shop's long tail (products seen once or twice) is not read for trends: such a
    /// product cannot trend before its next engagement, and reading past the tail on every
    /// snapshot was most of retrieval's time with a large catalog.
    #[test]
    fn only_products_that_may_trend_are_read_for_trends() {
        let mut m = Model::default();
        let demo = Catalog::demo();
        let toys: Vec<String> = demo.in_category("toys").map(|p| p.id.clone()).collect();
        let now = Utc::now();
        for (i, toy) in toys.iter().enumerate() {
            let mut e = view(&format!("tail-{i}"), &format!("t{i}"), toy);
            e.occurred_at = now - chrono::Duration::minutes(40);
            m.learn(&e);
        }
        for i in 0..6 {
            let mut e = view(&format!("burst-{i}"), &format!("b{i}"), &toys[7]);
            e.occurred_at = now - chrono::Duration::minutes(30 - i);
            m.learn(&e);
        }
        let trending = m.trending(demo, "toys", 5, now);
        assert_eq!(trending.iter().map(|t| t.0.as_str()).collect::<Vec<_>>(), [toys[7].as_str()]);
        let filed = m.with_list(demo, Some("toys"), |list| list.engaged.len());
        assert_eq!(filed, 1, "of {} toys engaged with", toys.len());
    }

    #[test]
    fn equal_trends_are_ordered_by_id() {
        let mut m = Model::default();
        let now = Utc::now();
        let toys: Vec<String> = Catalog::demo().in_category("toys").take(3).map(|p| p.id.clone()).collect();
        // The same burst for each: equal lifts.
        for (k, toy) in toys.iter().enumerate() {
            for i in 0..6 {
                let mut e = view(&format!("{k}-{i}"), &format!("s{k}-{i}"), toy);
                e.occurred_at = now - chrono::Duration::minutes(30 - i);
                m.learn(&e);
            }
        }
        let mut sorted = toys.clone();
        sorted.sort();
        for n in 1..=3 {
            let ids: Vec<String> = m.trending(Catalog::demo(), "toys", n, now).into_iter().map(|t| t.0).collect();
            assert_eq!(ids, sorted[..n], "n = {n}");
        }
    }

    #[test]
    fn groceries_can_be_bought_again() {
        let catalog = Catalog::demo();
        let milk = catalog.in_category("grocery").next().expect("grocery").id.clone();
        let book = catalog.in_category("books").next().expect("book").id.clone();
        let f = UserFeatures {
            user_id: "u".into(),
            recently_viewed: vec![milk.clone(), book.clone()],
            purchased: vec![milk.clone(), book.clone()],
            ..Default::default()
        };
        let c = generate(&Model::default(), Catalog::demo(), &f, Utc::now());
        let score = |id: &str| c.iter().find(|c| c.product_id == id).map(|c| c.source_score);
        assert_eq!(score(&milk), Some(0.9), "groceries are rebought: full strength");
        assert_eq!(score(&book), Some(0.5 * 0.9 * 0.85), "{c:?}");
    }

    /// Product ids come from clients too: however many distinct ones arrive, the model keeps
    /// the most recently engaged with, up to its bounds.
    #[test]
    fn products_kept_are_bounded() {
        let mut model = Model::bounded(10, 20);
        let some_product = Catalog::demo().products()[0].id.clone();
        for i in 0..100 {
            let mut e = view(&format!("e{i}"), &format!("s{}", i / 2), &some_product);
            if let Some(p) = e.product.as_mut() {
                p.product_id = format!("CLIENT-{i:03}");
            }
            model.learn(&e);
        }
        assert_eq!(model.popularity.len(), 20);
        assert_eq!(model.covis.len(), 10);
        assert!(model.popularity.peek("CLIENT-099").is_some() && model.popularity.peek("CLIENT-000").is_none());
        assert!(model.co_visits("CLIENT-099", "CLIENT-098") > 0.0, "the newest co-visits are kept");
    }

    /// Learning with nobody reading the lists (a replay at start) notes a bounded backlog.
    #[test]
    fn unread_changes_are_bounded() {
        let mut model = Model::default();
        let some_product = Catalog::demo().products()[0].id.clone();
        for i in 0..3 * CHANGES_KEPT {
            let mut e = view(&format!("e{i}"), &format!("s{i}"), &some_product);
            if let Some(p) = e.product.as_mut() {
                p.product_id = format!("CLIENT-{i}");
            }
            model.learn(&e);
        }
        let backlog = model.lists.get_mut().expect("lists").changed.len();
        assert!(backlog <= CHANGES_KEPT + 1, "{backlog} changes noted");
        // Past the backlog, the lists are computed afresh, and still right.
        let kept = model.popular(Catalog::demo(), None, PER_SOURCE);
        assert_eq!(kept, model.list(Catalog::demo(), None, model.reference_top().0).popular);
    }

    #[test]
    fn co_visitation_keeps_the_strongest_neighbours() {
        let mut neighbours: Neighbours =
            (0..2 * NEIGHBOURS_KEPT + 1).map(|i| (format!("P{i:05}").into(), i as f64)).collect();
        prune(&mut neighbours);
        assert_eq!(neighbours.len(), NEIGHBOURS_KEPT);
        let weakest = neighbours.values().copied().fold(f64::INFINITY, f64::min);
        assert_eq!(weakest, (NEIGHBOURS_KEPT + 1) as f64, "the strongest are kept");
        // All tied: still bounded.
        let mut tied: Neighbours = (0..3 * NEIGHBOURS_KEPT).map(|i| (format!("P{i:05}").into(), 1.0)).collect();
        prune(&mut tied);
        assert_eq!(tied.len(), NEIGHBOURS_KEPT);
    }
}
