//! `ranking` (8087): scores candidates with the user's features, explains the score, and
//! learns its weights online from what users do with what they were shown.
//!
//! One consumer (group `ranking`, partitioned by user) reads two topics:
//! - `candidates-topic`: each product's candidate sources are merged into one feature vector,
//!   scored with a logistic model, and the ranked list (top [`MAX_RANKED`]) is published to
//!   `ranked-recommendations-topic`. Each item's features are kept here, so `GET
//!   /rank/{userId}` shows each feature's contribution to its logit (`weight × value`) and
//!   why it ranks where it does, with its name, category and price from the live catalog;
//!   the published lists leave both out. The top [`SERVED`] items
//!   are remembered as what the user is being shown.
//! - `processed-events-topic`: feedback. Only events *attributed to a shown list* teach: those
//!   carrying the `recommendationId` of a recommendation response (the shop sends it with a
//!   view or click that came from the list, as the UI does). An organic view says nothing about
//!   the list — the user never saw it — and treating it as a choice among the shown items
//!   teaches the model that retargeted products are passed over whenever a shopper browses on
//!   (on Taobao's histories it cut hit rate@10 from 0.328 to 0.230: docs/quality.md).
//!   An attributed view (label weight 1), click (1.5), add-to-cart (3) or purchase (5) of a
//!   product in the user's shown list is a positive example for that item — the first in half
//!   an hour: a click or cart right after the view that started it continues the same
//!   engagement; the shown items ranked above it that the user passed over ("skip-above", as
//!   in click-model learning to rank) and the one just below are negatives, except products
//!   the user is still engaged with. Each example is one step of stochastic gradient descent
//!   on the logistic loss with L2 shrinkage ([`LinearModel::learn`]). Redelivered events are
//!   recognised by id and learn once.
//!
//! Features of a (user, product) pair, each in [0, 1]: `retargeting` (the retargeting source
//! score), `in_cart`, `co_visitation`, `popularity` (popular-in-category or cold-start
//! score), `trending`, `category_affinity` (the user's affinity to the product's category
//! relative to their strongest), `price_fit` (closeness to the prices the user looks at, on a
//! log scale), and a constant `bias`.
//!
//! The model starts from hand-set weights ([`LinearModel::initial`]). Every published list
//! carries the weights, the number of updates behind them and the instance that learned them,
//! so a restarted instance resumes from the most-trained model it finds at the tail of
//! `ranked-recommendations-topic`. Several instances (group assignment, or more than one
//! `INSTANCE_COUNT`) each learn from their own users and stay one model: each follows the
//! topic's new lists and folds a peer's weights into its own every [`FOLD_EVERY`]
//! ([`LinearModel::fold`], averaging weighted by the updates behind each).
//! `GET /api/ranking/model` shows the current weights.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use catalog::Catalog;
use chrono::{DateTime, Utc};
use compact_str::CompactString;
use events::{CandidateSource, Candidates, ProcessedEvent, RankedItem, RankedRecommendations, Topic};
use kit::catalog::LiveCatalog;
use kit::config::{ConfigError, Env};
use kit::dedup::SeenSet;
use kit::http::{ApiError, UserId, found};
use kit::kafka::{ConsumerSpec, Handler, HandlerError, Outbox, Record};
use kit::state::{Shared, UserMap, user_map};
use kit::{Context, Service};
use serde::Serialize;

/// Items kept in a ranked list.
pub const MAX_RANKED: usize = 50;
/// Items of a ranked list that count as shown to the user (the API's default page).
pub const SERVED: usize = 10;
/// The model's features, in a fixed order.
pub const FEATURES: [&str; 8] =
    ["bias", "retargeting", "in_cart", "co_visitation", "popularity", "trending", "category_affinity", "price_fit"];
/// Engagements with the same product closer together than this are one engagement.
const ENGAGEMENT_SPAN: chrono::TimeDelta = chrono::TimeDelta::minutes(30);
/// Recent engagements remembered per user.
const ENGAGED_PER_USER: usize = 50;
/// Feedback events remembered for de-duplication.
const FEEDBACK_SEEN: usize = 100_000;
/// Ranked lists read back per partition at start to find the newest weights.
const RESTORE_TAIL: i64 = 20;

/// The `ranking` service.
pub struct Ranking;

/// Settings of ranking.
#[derive(Debug, Clone)]
pub struct Config {
    /// `RANKING_LEARNING_RATE` (default 0.05; 0 turns learning off).
    pub learning_rate: f64,
    /// `RANKING_L2` (default 0.0001): shrinkage of every weight towards 0 per update.
    pub l2: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self { learning_rate: 0.05, l2: 1e-4 }
    }
}

impl Service for Ranking {
    const NAME: &'static str = "ranking";
    const DEFAULT_PORT: u16 = 8087;
    const PARTITIONED: bool = true;
    type Config = Config;

    fn config(env: &Env) -> Result<Config, ConfigError> {
        let rate = |v: &f64| {
            if v.is_finite() && (0.0..=1.0).contains(v) { Ok(()) } else { Err("must be a number from 0 to 1".into()) }
        };
        let d = Config::default();
        Ok(Config {
            learning_rate: env.checked("RANKING_LEARNING_RATE", d.learning_rate, rate)?,
            l2: env.checked("RANKING_L2", d.l2, rate)?,
        })
    }

    async fn run(config: Config, mut ctx: Context) -> anyhow::Result<()> {
        let producer = ctx.pipeline_producer()?;
        let mut model = restore_model(&ctx.kafka.bootstrap_servers).await;
        model.instance = uuid::Uuid::new_v4().to_string();
        tracing::info!(updates = model.updates, instance = %model.instance, "ranking model ready");
        let catalog = ctx.follow_catalog(&producer).await;
        let ranker = Ranker::new(model, config, catalog);
        let state = RankState {
            latest: Shared::clone(&ranker.latest),
            model: Shared::clone(&ranker.model),
            catalog: Shared::clone(&ranker.catalog),
        };
        // Several instances (each learning from its own users) stay one model: each folds in
        // the weights its peers publish with their lists. One instance alone skips the reading.
        if ctx.kafka.shares_partitions() {
            ctx.spawn_consumer(
                &producer,
                ConsumerSpec::live("peer-models", [Topic::RankedRecommendations]),
                PeerModels::new(Shared::clone(&ranker.model)),
            );
        }
        ctx.spawn_consumer(
            &producer,
            // Of a user's candidate sets waiting, the latest is enough; every event counts.
            ConsumerSpec::group("candidates", [Topic::Candidates, Topic::ProcessedEvents], "ranking")
                .coalescing([Topic::Candidates]),
            ranker,
        );
        let routes = axum::Router::new()
            .route("/rank/{user_id}", get(get_ranked))
            .route("/api/ranking/model", get(get_model))
            .with_state(state);
        ctx.serve(routes).await
    }
}

/// The most-trained model published at the tail of the ranked topic, or the initial one.
async fn restore_model(bootstrap_servers: &str) -> LinearModel {
    match kit::kafka::admin::read_tail(bootstrap_servers, Topic::RankedRecommendations, RESTORE_TAIL).await {
        Ok(tail) => tail
            .iter()
            .filter_map(|raw| kit::json::from_bytes::<RankedRecommendations>(raw).ok())
            .max_by_key(|r| r.model_updates)
            .and_then(|r| LinearModel::from_published(&r))
            .unwrap_or_else(LinearModel::initial),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the published models; starting from the initial weights");
            LinearModel::initial()
        }
    }
}

/// The values of a (user, product) pair's features, in the order of [`FEATURES`]: a fixed
/// vector, not a map (a map per candidate was most of ranking's allocations).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Features(pub [f64; FEATURES.len()]);

impl Features {
    /// Each feature's name and value.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        FEATURES.into_iter().zip(self.0.iter().copied())
    }

    fn dot(&self, weights: &[f64; FEATURES.len()]) -> f64 {
        self.0.iter().zip(weights).map(|(x, w)| x * w).sum()
    }
}

/// A logistic model: score = sigmoid(Σ weight × feature).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinearModel {
    pub version: String,
    pub weights: BTreeMap<&'static str, f64>,
    /// SGD steps taken since the initial weights.
    pub updates: u64,
    /// The instance that learns this model (empty outside a running service).
    pub instance: String,
}

impl LinearModel {
    /// The hand-set starting point.
    pub fn initial() -> Self {
        Self {
            version: "linear-online".into(),
            weights: BTreeMap::from([
                ("bias", -2.0),
                ("retargeting", 2.0),
                ("in_cart", 1.0),
                ("co_visitation", 1.5),
                ("popularity", 1.0),
                ("trending", 0.5),
                ("category_affinity", 1.5),
                ("price_fit", 0.5),
            ]),
            updates: 0,
            instance: String::new(),
        }
    }

    /// Folds a peer instance's model into this one: each weight becomes the average of the two,
    /// weighted by the SGD steps behind each (periodic model averaging), so instances that
    /// learn from different users stay one model. Names it does not know are ignored.
    pub fn fold(&mut self, weights: &BTreeMap<String, f64>, updates: u64) {
        if updates == 0 {
            return;
        }
        let total = self.updates + updates;
        let (mine, theirs) = (self.updates as f64 / total as f64, updates as f64 / total as f64);
        for (name, w) in &mut self.weights {
            if let Some(peer) = weights.get(*name).filter(|p| p.is_finite()) {
                *w = mine * *w + theirs * peer;
            }
        }
        self.updates = self.updates.max(updates);
    }

    /// The model a ranked list was scored with, if it names known features.
    pub fn from_published(r: &RankedRecommendations) -> Option<Self> {
        let mut model = Self::initial();
        for (name, w) in &r.model_weights {
            let known = FEATURES.iter().find(|f| *f == name)?;
            if !w.is_finite() {
                return None;
            }
            model.weights.insert(known, *w);
        }
        model.updates = r.model_updates;
        Some(model)
    }

    /// The weights in the order of [`FEATURES`] (0 for a feature without one).
    pub fn vector(&self) -> [f64; FEATURES.len()] {
        FEATURES.map(|name| self.weights.get(name).copied().unwrap_or(0.0))
    }

    fn logit(&self, features: &Features) -> f64 {
        features.dot(&self.vector())
    }

    /// The score: the probability of engagement, rounded to 4 places.
    pub fn probability(&self, features: &Features) -> f64 {
        probability(features, &self.vector())
    }

    /// The score and each feature's contribution to the logit.
    pub fn score(&self, features: &Features) -> (f64, BTreeMap<String, f64>) {
        (self.probability(features), contributions(|name| self.weights.get(name).copied(), features))
    }

    /// One step of stochastic gradient descent on the logistic loss of `(features, label)`,
    /// scaled by `weight`, with L2 shrinkage. Weights stay within ±10.
    pub fn learn(&mut self, features: &Features, label: f64, weight: f64, config: &Config) {
        if config.learning_rate == 0.0 {
            return;
        }
        let error = label - sigmoid(self.logit(features));
        for (name, x) in features.iter() {
            if let Some(w) = self.weights.get_mut(name) {
                let shrink = if name == "bias" { 0.0 } else { config.l2 * *w };
                *w = (*w + config.learning_rate * (weight * error * x - shrink)).clamp(-10.0, 10.0);
            }
        }
        self.updates += 1;
    }
}

/// The score of `features` under `weights` (a model's [`LinearModel::vector`]).
fn probability(features: &Features, weights: &[f64; FEATURES.len()]) -> f64 {
    round4(sigmoid(features.dot(weights)))
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Ranks one user's candidates; returns the list and the features of each ranked item. Only
/// products the catalog has and offers are ranked (a product not in the catalog yet has no
/// name or price to show).
pub fn rank_with_features(
    model: &LinearModel,
    catalog: &Catalog,
    c: &Candidates,
) -> (RankedRecommendations, Vec<Features>) {
    let f = &c.features;
    let max_affinity = f.category_affinity.values().copied().fold(0.0, f64::max);
    let viewed_prices: Vec<f64> = f
        .recently_viewed
        .iter()
        .filter_map(|id| catalog.get(id))
        .filter(|p| p.price > 0.0)
        .map(|p| p.price.ln())
        .collect();
    let mean_log_price =
        (!viewed_prices.is_empty()).then(|| viewed_prices.iter().sum::<f64>() / viewed_prices.len() as f64);

    // product -> best score per source (indexed as `CandidateSource::ALL`)
    let mut merged: foldhash::HashMap<&str, [Option<f64>; CandidateSource::ALL.len()]> =
        foldhash::HashMap::with_capacity_and_hasher(c.candidates.len(), Default::default());
    for cand in &c.candidates {
        let slot = &mut merged.entry(cand.product_id.as_str()).or_default()[cand.source.index()];
        *slot = Some(slot.unwrap_or(0.0).max(cand.source_score));
    }

    let weights = model.vector();
    let scored: Vec<(f64, &catalog::Product, [Option<f64>; CandidateSource::ALL.len()], Features)> = merged
        .into_iter()
        .filter_map(|(id, sources)| {
            let product = catalog.available(id)?;
            let source = |s: CandidateSource| sources[s.index()].unwrap_or(0.0);
            let affinity = f.category_affinity.get(&product.category).copied().unwrap_or(0.0);
            let features = Features([
                1.0,
                source(CandidateSource::Retargeting),
                if f.cart.iter().any(|p| p == id) { 1.0 } else { 0.0 },
                source(CandidateSource::CoVisitation),
                source(CandidateSource::PopularInCategory).max(source(CandidateSource::ColdStart)),
                source(CandidateSource::Trending),
                if max_affinity > 0.0 { affinity / max_affinity } else { 0.0 },
                price_fit(product.price, mean_log_price),
            ]);
            // The explanation is computed when asked for (`explain`), not for every list.
            Some((probability(&features, &weights), product, sources, features))
        })
        .collect();
    // Best first, ties by id (unique: the candidates were merged by id). The order is found
    // on narrow keys, and the wide entries (sources and features, ~180 bytes) are read once
    // for the kept items: a stable sort of the entries themselves moved them about (18.5–19.2
    // µs per list before, 15.8–16.4 after, timed on 2,000 lists of 90 candidates).
    let mut order: Vec<(f64, &str, u32)> =
        scored.iter().enumerate().map(|(i, s)| (s.0, s.1.id.as_str(), i as u32)).collect();
    let best_first = |a: &(f64, &str, u32), b: &(f64, &str, u32)| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1));
    if order.len() > MAX_RANKED {
        order.select_nth_unstable_by(MAX_RANKED, best_first);
        order.truncate(MAX_RANKED);
    }
    order.sort_unstable_by(best_first);
    let mut items = Vec::with_capacity(order.len());
    let mut features = Vec::with_capacity(order.len());
    for (score, _, i) in order {
        let (_, product, sources, f) = &scored[i as usize];
        items.push(RankedItem {
            item_id: CompactString::from(product.id.as_str()),
            score,
            sources: CandidateSource::ALL
                .into_iter()
                .zip(sources)
                .filter(|(_, s)| s.is_some())
                .map(|(s, _)| s)
                .collect(),
        });
        features.push(*f);
    }
    let ranked = RankedRecommendations {
        schema_version: events::SCHEMA_VERSION,
        user_id: c.user_id.clone(),
        ranked_at: Utc::now(),
        model_version: model.version.clone(),
        model_updates: model.updates,
        model_instance: model.instance.clone(),
        model_weights: model.weights.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        items,
    };
    (ranked, features)
}

/// Each feature's contribution to the logit, by `weight`: weight times value, rounded to 4
/// places; features without a weight or contributing nothing are left out.
fn contributions(weight: impl Fn(&str) -> Option<f64>, features: &Features) -> BTreeMap<String, f64> {
    features
        .iter()
        .filter_map(|(name, x)| weight(name).map(|w| (name.to_owned(), round4(w * x))))
        .filter(|(_, c)| *c != 0.0)
        .collect()
}

/// A ranked list as `GET /rank/{userId}` shows it.
pub type Explained = RankedRecommendations<ExplainedItem>;

/// One item of a list as `GET /rank/{userId}` shows it: the published item with the
/// catalog's name, category and price (as the catalog has them when asked) and each
/// feature's contribution to its logit (by the weights the list was ranked with).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExplainedItem {
    pub item_id: CompactString,
    /// Empty (and left out) for a product the catalog no longer has.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub category: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub price: f64,
    pub score: f64,
    pub sources: events::Sources,
    /// Features contributing nothing are left out (and the map, if none contributes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub contributions: BTreeMap<String, f64>,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// The list described from `catalog` and explained (`features` are the items', in order) by
/// the weights it was ranked with (its `model_weights`): what [`LinearModel::score`] gave
/// when it was ranked.
pub fn explain(ranked: &RankedRecommendations, features: &[Features], catalog: &Catalog) -> Explained {
    let weights = &ranked.model_weights;
    let items = ranked
        .items
        .iter()
        .zip(features)
        .map(|(item, f)| {
            let product = catalog.get(&item.item_id);
            ExplainedItem {
                item_id: item.item_id.clone(),
                name: product.map(|p| p.name.clone()).unwrap_or_default(),
                category: product.map(|p| p.category.clone()).unwrap_or_default(),
                price: product.map_or(0.0, |p| p.price),
                score: item.score,
                sources: item.sources.clone(),
                contributions: contributions(|name| weights.get(name).copied(), f),
            }
        })
        .collect();
    RankedRecommendations {
        schema_version: ranked.schema_version,
        user_id: ranked.user_id.clone(),
        ranked_at: ranked.ranked_at,
        model_version: ranked.model_version.clone(),
        model_updates: ranked.model_updates,
        model_weights: ranked.model_weights.clone(),
        model_instance: ranked.model_instance.clone(),
        items,
    }
}

/// How close a price is to the (log-)mean price of what the user viewed, in [0, 1].
fn price_fit(price: f64, mean_log_price: Option<f64>) -> f64 {
    match mean_log_price {
        Some(m) if price > 0.0 => (1.0 - (price.ln() - m).abs() / 2.0).max(0.0),
        _ => 0.0,
    }
}

/// Ranks one user's candidates, described and explained.
pub fn rank(model: &LinearModel, catalog: &Catalog, c: &Candidates) -> Explained {
    let (ranked, features) = rank_with_features(model, catalog, c);
    explain(&ranked, &features, catalog)
}

/// A user's latest list as published, with its items' features: described and explained
/// when asked for.
#[derive(Clone)]
pub struct Kept {
    ranked: Arc<RankedRecommendations>,
    features: Vec<Features>,
}

impl Kept {
    /// The list as published: no explanations, no catalog data.
    pub fn ranked(&self) -> &RankedRecommendations {
        &self.ranked
    }

    /// The list as published, taken out (copied only if someone else still holds it).
    pub fn into_ranked(self) -> RankedRecommendations {
        Arc::unwrap_or_clone(self.ranked)
    }

    /// The list with each item's name, category and price as `catalog` has them now, and the
    /// contributions of its features when it was ranked.
    pub fn explained(&self, catalog: &Catalog) -> Explained {
        explain(&self.ranked, &self.features, catalog)
    }
}

type Latest = Shared<UserMap<Kept>>;

/// What the HTTP handlers read.
#[derive(Clone)]
struct RankState {
    latest: Latest,
    model: Shared<LinearModel>,
    catalog: LiveCatalog,
}

/// The consumer: ranks candidates and learns from feedback on what was shown.
pub struct Ranker {
    config: Config,
    pub model: Shared<LinearModel>,
    pub latest: Latest,
    /// user -> the shown items (id, features), best first.
    served: UserMap<Vec<(CompactString, Features)>>,
    /// user -> products engaged with lately, and when.
    engaged: UserMap<VecDeque<(String, DateTime<Utc>)>>,
    seen: SeenSet,
    catalog: LiveCatalog,
}

impl Ranker {
    pub fn new(model: LinearModel, config: Config, catalog: LiveCatalog) -> Self {
        Self {
            catalog,
            config,
            model: Shared::new(model),
            latest: Shared::new(user_map()),
            served: user_map(),
            engaged: user_map(),
            seen: SeenSet::new(FEEDBACK_SEEN),
        }
    }

    /// Ranks, remembers what is shown and the whole list (`GET /rank/{userId}`), and returns
    /// the list as it is published: the explanations and the catalog's data are added when
    /// `GET /rank` asks (they were most of each message's bytes, and no consumer of the topic
    /// reads them — the recommendation API answers with the live catalog's).
    pub fn rank(&mut self, c: &Candidates) -> Arc<RankedRecommendations> {
        let (ranked, features) = rank_with_features(&self.model.read(), &self.catalog.read(), c);
        let shown = ranked.items.iter().zip(&features).take(SERVED).map(|(i, f)| (i.item_id.clone(), *f)).collect();
        self.served.put(ranked.user_id.clone(), shown);
        let ranked = Arc::new(ranked);
        self.latest.write().put(ranked.user_id.clone(), Kept { ranked: Arc::clone(&ranked), features });
        ranked
    }

    /// Whether `product` is among the items `user` is being shown.
    pub fn shows(&self, user: &str, product: &str) -> bool {
        self.served.peek(user).is_some_and(|shown| shown.iter().any(|(id, _)| id == product))
    }

    /// Learns from one processed event; returns the number of examples it gave.
    pub fn feedback(&mut self, e: &ProcessedEvent) -> usize {
        let weight = e.event_type.engagement_weight();
        if weight <= 0.0 || !self.seen.insert(&e.idempotency_key()) {
            return 0;
        }
        let products: Vec<&str> = match &e.order {
            Some(o) => o.items.iter().map(|i| i.product.product_id.as_str()).collect(),
            None => e.product.iter().map(|p| p.product_id.as_str()).collect(),
        };
        // A product the user engaged with in the last half hour is the same engagement going
        // on (view, then click, then cart): only its start is a choice among what was shown.
        let engaged = self.engaged.get_or_insert_mut(e.user_id.clone(), VecDeque::new);
        // For the same reason, a product the user is still engaged with was not passed over
        // when they turned to another one: it is no negative example either. (Only an event
        // from a list shown to the user teaches anything; most are not.)
        let shown = e.recommendation_id.as_ref().and_then(|_| self.served.peek(&e.user_id));
        let ongoing: HashSet<String> = if shown.is_some() {
            engaged.iter().filter(|(_, at)| e.occurred_at - *at < ENGAGEMENT_SPAN).map(|(id, _)| id.clone()).collect()
        } else {
            HashSet::new()
        };
        let fresh: Vec<&str> = products
            .into_iter()
            .filter(|p| {
                let recent = engaged.iter().any(|(id, at)| id == p && e.occurred_at - *at < ENGAGEMENT_SPAN);
                engaged.retain(|(id, _)| id != p);
                engaged.push_back(((*p).to_owned(), e.occurred_at));
                if engaged.len() > ENGAGED_PER_USER {
                    engaged.pop_front();
                }
                !recent
            })
            .collect();
        let Some(shown) = shown else { return 0 };
        let mut model = self.model.write();
        let mut examples = 0;
        for product in fresh {
            let Some(pos) = shown.iter().position(|(id, _)| id == product) else { continue };
            model.learn(&shown[pos].1, 1.0, weight, &self.config);
            let passed_over =
                shown[..pos].iter().chain(shown.get(pos + 1)).filter(|(id, _)| !ongoing.contains(id.as_str()));
            let mut negatives = 0;
            for (_, features) in passed_over {
                model.learn(features, 0.0, weight / (pos as f64 + 1.0), &self.config);
                negatives += 1;
            }
            examples += 1 + negatives;
        }
        metrics::counter!("ranking_feedback_examples_total").increment(examples as u64);
        examples
    }
}

impl Handler for Ranker {
    fn handle(&mut self, rec: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        match rec.topic {
            Topic::Candidates => {
                let candidates: Candidates = rec.json()?;
                let ranked = self.rank(&candidates);
                metrics::counter!("ranking_lists_total").increment(1);
                metrics::gauge!("ranking_model_updates").set(ranked.model_updates as f64);
                out.send(&*ranked);
            }
            Topic::ProcessedEvents => {
                let event: ProcessedEvent = rec.json()?;
                self.feedback(&event);
            }
            other => return Err(HandlerError::malformed(format!("ranking does not read {other}"))),
        }
        Ok(())
    }
}

/// Folds the models that other ranking instances publish with their lists into this one's
/// (see [`LinearModel::fold`]), each peer at most once per [`FOLD_EVERY`] of its list times.
pub struct PeerModels {
    model: Shared<LinearModel>,
    /// Peer instance -> the list time of its model last folded.
    folded: HashMap<String, DateTime<Utc>>,
}

/// How often one peer's model is folded in.
pub const FOLD_EVERY: chrono::TimeDelta = chrono::TimeDelta::seconds(10);

/// The parts of a published list that carry its model.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PublishedModel {
    #[serde(default)]
    model_instance: String,
    ranked_at: DateTime<Utc>,
    #[serde(default)]
    model_updates: u64,
    #[serde(default)]
    model_weights: BTreeMap<String, f64>,
}

impl PeerModels {
    pub fn new(model: Shared<LinearModel>) -> Self {
        Self { model, folded: HashMap::new() }
    }
}

impl Handler for PeerModels {
    fn handle(&mut self, rec: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        let peer: PublishedModel = rec.json()?;
        let mut model = self.model.write();
        if peer.model_instance.is_empty() || peer.model_instance == model.instance {
            return Ok(());
        }
        let last = self.folded.get(&peer.model_instance);
        if last.is_some_and(|t| peer.ranked_at - *t < FOLD_EVERY) {
            return Ok(());
        }
        if self.folded.len() >= MAX_PEERS && last.is_none() {
            self.folded.clear(); // instances come and go; forgetting them only folds sooner
        }
        self.folded.insert(peer.model_instance, peer.ranked_at);
        model.fold(&peer.model_weights, peer.model_updates);
        metrics::counter!("ranking_peer_models_folded_total").increment(1);
        Ok(())
    }
}

/// Most peer instances remembered by [`PeerModels`].
const MAX_PEERS: usize = 1_000;

async fn get_ranked(State(state): State<RankState>, UserId(user_id): UserId) -> Result<Json<Explained>, ApiError> {
    let latest = state.latest.read();
    let catalog = state.catalog.read();
    found(latest.peek(&user_id).map(|kept| kept.explained(&catalog)), || {
        format!("no ranked list for user {user_id:?} yet")
    })
}

async fn get_model(State(state): State<RankState>) -> Json<LinearModel> {
    Json(state.model.read().clone())
}

#[cfg(test)]
mod tests {
    use events::{Candidate, EventType, RankingFeatures};

    use super::*;

    fn cand(id: &str, source: CandidateSource, score: f64) -> Candidate {
        Candidate { product_id: id.into(), source, source_score: score }
    }

    #[test]
    fn scores_are_explained_and_ordered() {
        let catalog = Catalog::demo();
        let viewed = catalog.in_category("books").next().expect("book").id.clone();
        let other_book = catalog.in_category("books").nth(3).expect("book").id.clone();
        let toy = catalog.in_category("toys").next().expect("toy").id.clone();
        let features = RankingFeatures {
            recently_viewed: vec![viewed.clone()],
            category_affinity: BTreeMap::from([("books".to_owned(), 4.0), ("toys".to_owned(), 1.0)]),
            ..Default::default()
        };
        let c = Candidates {
            schema_version: 1,
            user_id: "u".into(),
            generated_at: Utc::now(),
            features,
            candidates: vec![
                cand(&toy, CandidateSource::ColdStart, 0.9),
                cand(&other_book, CandidateSource::CoVisitation, 1.0),
                cand(&other_book, CandidateSource::PopularInCategory, 0.5),
                cand(&viewed, CandidateSource::Retargeting, 0.9),
            ],
        };
        let model = LinearModel::initial();
        let ranked = rank(&model, Catalog::demo(), &c);
        assert_eq!(ranked.items.len(), 3, "one item per product");
        let ids: Vec<_> = ranked.items.iter().map(|i| i.item_id.as_str()).collect();
        assert_eq!(ids.last(), Some(&toy.as_str()), "the unrelated cold-start toy ranks last: {ids:?}");
        assert!(ranked.items.windows(2).all(|w| w[0].score >= w[1].score));
        let book = ranked.items.iter().find(|i| i.item_id == other_book).expect("ranked");
        assert_eq!(book.sources.as_slice(), [CandidateSource::CoVisitation, CandidateSource::PopularInCategory]);
        // The contributions add up to the logit behind the score.
        let logit: f64 = book.contributions.values().sum();
        assert!((1.0 / (1.0 + (-logit).exp()) - book.score).abs() < 1e-3);
        assert_eq!(book.contributions["co_visitation"], 1.5);
        assert_eq!(book.contributions["category_affinity"], 1.5);
    }

    /// With more candidates than a list holds, the list is the best [`MAX_RANKED`] of all of
    /// them by score (ties by id), each explained as if scored alone.
    #[test]
    fn long_candidate_lists_keep_the_best() {
        let catalog = Catalog::demo();
        let sources = [CandidateSource::PopularInCategory, CandidateSource::CoVisitation, CandidateSource::Trending];
        let candidates: Vec<Candidate> = catalog
            .products()
            .iter()
            .take(3 * MAX_RANKED)
            .enumerate()
            .map(|(i, p)| cand(&p.id, sources[i % 3], ((i * 37) % 100) as f64 / 100.0))
            .collect();
        let features = RankingFeatures {
            category_affinity: BTreeMap::from([("books".to_owned(), 2.0), ("toys".to_owned(), 1.0)]),
            ..Default::default()
        };
        let c = Candidates { schema_version: 1, user_id: "u".into(), generated_at: Utc::now(), features, candidates };
        let model = LinearModel::initial();
        let (ranked, features) = rank_with_features(&model, catalog, &c);
        assert_eq!(ranked.items.len(), MAX_RANKED);
        assert_eq!(features.len(), MAX_RANKED);
        // Every candidate alone, scored and explained the one way.
        let mut alone: Vec<(f64, CompactString)> = c
            .candidates
            .iter()
            .map(|cand| {
                let one = Candidates { candidates: vec![cand.clone()], ..c.clone() };
                let (one, _) = rank_with_features(&model, catalog, &one);
                (one.items[0].score, one.items[0].item_id.clone())
            })
            .collect();
        alone.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let kept: Vec<(f64, CompactString)> = ranked.items.iter().map(|i| (i.score, i.item_id.clone())).collect();
        assert_eq!(kept, alone[..MAX_RANKED]);
        let ranked = explain(&ranked, &features, catalog);
        for (item, f) in ranked.items.iter().zip(&features) {
            assert_eq!(model.score(f), (item.score, item.contributions.clone()), "{}", item.item_id);
        }
    }

    /// The published list leaves the explanations out (most of its bytes); the service keeps
    /// them for `GET /rank/{userId}`.
    #[test]
    fn published_lists_carry_no_explanations() {
        let catalog = Catalog::demo();
        let book = catalog.in_category("books").next().expect("book").id.clone();
        let c = Candidates {
            schema_version: 1,
            user_id: "u".into(),
            generated_at: Utc::now(),
            features: RankingFeatures::default(),
            candidates: vec![cand(&book, CandidateSource::PopularInCategory, 0.8)],
        };
        let payload = serde_json::to_vec(&c).expect("json");
        let rec = Record::bare(Topic::Candidates, &payload);
        let mut ranker = Ranker::new(LinearModel::initial(), Config::default(), kit::catalog::demo());
        let mut out = Outbox::new(None);
        ranker.handle(&rec, &mut out).expect("ranks");
        let published: Vec<RankedRecommendations> = out.decoded();
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].items[0].item_id, book);
        let bytes = String::from_utf8(out.messages()[0].payload.to_vec()).expect("utf-8");
        assert!(!bytes.contains("\"name\"") && !bytes.contains("\"contributions\""), "{bytes}");
        let kept = ranker.latest.read().peek("u").map(|k| k.explained(&ranker.catalog.read())).expect("kept");
        assert_eq!((kept.items[0].name.as_str(), kept.items[0].category.as_str()), ("Complete Cookbook Pro", "books"));
        assert_eq!(kept.items[0].contributions["popularity"], 0.8, "{kept:?}");
    }

    /// Two instances that learned apart become one model: a peer's weights are folded in,
    /// weighted by the steps behind each; one's own lists and a peer's lists within
    /// [`FOLD_EVERY`] of the last fold are not folded again.
    #[test]
    fn peer_models_are_folded_in_by_the_steps_behind_them() {
        let mut mine = LinearModel::initial();
        mine.instance = "me".into();
        mine.updates = 100;
        let model = Shared::new(mine);
        let mut peers = PeerModels::new(Shared::clone(&model));
        let list = |instance: &str, seconds: i64, trending: f64, updates: u64| {
            let r: RankedRecommendations = RankedRecommendations {
                schema_version: 1,
                user_id: "u".into(),
                ranked_at: DateTime::UNIX_EPOCH + chrono::TimeDelta::seconds(seconds),
                model_version: "linear-online".into(),
                model_updates: updates,
                model_weights: BTreeMap::from([("trending".to_owned(), trending), ("mystery".to_owned(), 9.0)]),
                model_instance: instance.into(),
                items: vec![],
            };
            serde_json::to_vec(&r).expect("json")
        };
        let mut fold = |payload: Vec<u8>| {
            peers.handle(&Record::bare(Topic::RankedRecommendations, &payload), &mut Outbox::new(None)).expect("read");
        };
        fold(list("me", 0, 9.0, 1_000));
        assert_eq!(model.read().weights["trending"], 0.5, "its own lists are not folded");
        fold(list("peer", 0, 2.0, 300));
        // (100 × 0.5 + 300 × 2.0) / 400
        let after = model.read().clone();
        assert!((after.weights["trending"] - 1.625).abs() < 1e-12, "{after:?}");
        assert_eq!((after.updates, after.weights["bias"], after.weights.len()), (300, -2.0, FEATURES.len()));
        fold(list("peer", 5, 9.0, 310));
        assert!((model.read().weights["trending"] - 1.625).abs() < 1e-12, "within 10 s: not again");
        fold(list("peer", 10, 1.625, 400));
        assert!((model.read().weights["trending"] - 1.625).abs() < 1e-12, "agreeing models stay put");
        assert_eq!(model.read().updates, 400);
    }

    fn click(id: &str, user: &str, product: &str) -> ProcessedEvent {
        let p = Catalog::demo().get(product).expect("in catalog");
        ProcessedEvent {
            product: Some(events::ProductInfo::from_catalog(catalog::Catalog::demo(), &p.id)),
            recommendation_id: Some("r".into()),
            ..events::generate::processed(id, user, "s", EventType::Click, Utc::now())
        }
    }

    /// Users are shown a popular item (ranked first by the initial weights) and a trending
    /// one, and always click the trending one: the model must learn to put it first.
    #[test]
    fn feedback_moves_the_weights_towards_what_users_choose() {
        let catalog = Catalog::demo();
        let popular = catalog.in_category("books").next().expect("book").id.clone();
        let rising = catalog.in_category("books").nth(40).expect("book").id.clone();
        let mut ranker = Ranker::new(LinearModel::initial(), Config::default(), kit::catalog::demo());
        let before = ranker.model.read().clone();
        let candidates = |user: &str| Candidates {
            schema_version: 1,
            user_id: user.into(),
            generated_at: Utc::now(),
            features: RankingFeatures::default(),
            candidates: vec![
                cand(&popular, CandidateSource::PopularInCategory, 1.0),
                cand(&rising, CandidateSource::Trending, 0.6),
            ],
        };
        let first = ranker.rank(&candidates("u0"));
        assert_eq!(first.items[0].item_id, popular, "the initial weights prefer popularity");
        // A view of a shown product that did not come from the list is no choice among it.
        ranker.rank(&candidates("browser"));
        let mut organic = click("organic", "browser", &rising);
        organic.recommendation_id = None;
        assert_eq!(ranker.feedback(&organic), 0, "an unattributed event teaches nothing");
        for n in 0..300 {
            let user = format!("u{n}");
            ranker.rank(&candidates(&user));
            assert_eq!(ranker.feedback(&click(&format!("e{n}"), &user, &rising)), 2, "one positive, one negative");
        }
        // A redelivered click and a click on something never shown teach nothing.
        assert_eq!(ranker.feedback(&click("e1", "u1", &rising)), 0);
        assert_eq!(ranker.feedback(&click("x", "u1", &catalog.in_category("toys").next().expect("toy").id)), 0);
        let after = ranker.model.read().clone();
        assert_eq!(after.updates, 600);
        assert!(after.weights["trending"] > before.weights["trending"], "{after:?}");
        assert!(after.weights["popularity"] < before.weights["popularity"], "{after:?}");
        let last = ranker.rank(&candidates("late"));
        assert_eq!(last.items[0].item_id, rising, "{last:?}");
        assert_eq!(last.model_updates, 600);

        // A restarted instance resumes from the published weights.
        let resumed = LinearModel::from_published(&last).expect("known features");
        assert_eq!((resumed.updates, &resumed.weights), (after.updates, &after.weights));
        let mut unknown = RankedRecommendations::clone(&last);
        unknown.model_weights.insert("mystery".into(), 1.0);
        assert!(LinearModel::from_published(&unknown).is_none());
    }
}
