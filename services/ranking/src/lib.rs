//! `ranking` (8087): scores candidates with the user's features and explains the score.
//!
//! Consumes `candidates-topic` (consumer group `ranking`), merges each product's candidate
//! sources into one feature vector, scores it with a logistic model and publishes the ranked
//! list (top [`MAX_RANKED`]) to `ranked-recommendations-topic`. Each item carries the
//! contribution of every feature to its logit (`weight × value`), so `GET /rank/{userId}`
//! shows why an item ranks where it does.
//!
//! Features of a (user, product) pair, each in [0, 1]:
//! `retargeting` (the retargeting source score), `in_cart`, `co_visitation`, `popularity`
//! (popular-in-category or cold-start score), `category_affinity` (the user's affinity to the
//! product's category relative to their strongest), `price_fit` (closeness to the prices the
//! user looks at, on a log scale), and a constant `bias`.
//!
//! The weights of this first version (`linear-v1`) are set by hand in [`LinearModel::v1`];
//! learning them online from feedback is the next step (see the README's roadmap).

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::{Path, State};
use axum::routing::get;
use catalog::Catalog;
use chrono::Utc;
use events::{CandidateSource, Candidates, RankedItem, RankedRecommendations, Topic};
use kit::config::{ConfigError, Env};
use kit::http::{ApiError, found};
use kit::kafka::{ConsumerSpec, Handler, HandlerError, Outbox, Record};
use kit::state::Shared;
use kit::{Context, Service};

/// Items kept in a ranked list.
pub const MAX_RANKED: usize = 50;

/// The `ranking` service.
pub struct Ranking;

impl Service for Ranking {
    const NAME: &'static str = "ranking";
    const DEFAULT_PORT: u16 = 8087;
    type Config = ();

    fn config(_env: &Env) -> Result<(), ConfigError> {
        Ok(())
    }

    async fn run((): (), mut ctx: Context) -> anyhow::Result<()> {
        let producer = ctx.pipeline_producer()?;
        let latest: Latest = Shared::default();
        ctx.spawn_consumer(
            &producer,
            ConsumerSpec::group("candidates", [Topic::Candidates], "ranking"),
            Ranker { model: LinearModel::v1(), latest: Shared::clone(&latest) },
        );
        let routes = axum::Router::new().route("/rank/{user_id}", get(get_ranked)).with_state(latest);
        ctx.serve(routes).await
    }
}

type Latest = Shared<HashMap<String, RankedRecommendations>>;

/// A logistic model: score = sigmoid(Σ weight × feature).
#[derive(Debug, Clone)]
pub struct LinearModel {
    pub version: String,
    pub weights: BTreeMap<&'static str, f64>,
}

impl LinearModel {
    /// The hand-set first version.
    pub fn v1() -> Self {
        Self {
            version: "linear-v1".into(),
            weights: BTreeMap::from([
                ("bias", -2.0),
                ("retargeting", 2.0),
                ("in_cart", 1.0),
                ("co_visitation", 1.5),
                ("popularity", 1.0),
                ("category_affinity", 1.5),
                ("price_fit", 0.5),
            ]),
        }
    }

    /// The score and each feature's contribution to the logit.
    pub fn score(&self, features: &BTreeMap<&'static str, f64>) -> (f64, BTreeMap<String, f64>) {
        let contributions: BTreeMap<String, f64> = features
            .iter()
            .filter_map(|(name, x)| self.weights.get(name).map(|w| ((*name).to_owned(), round4(w * x))))
            .filter(|(_, c)| *c != 0.0)
            .collect();
        let logit: f64 = features.iter().filter_map(|(name, x)| self.weights.get(name).map(|w| w * x)).sum();
        (round4(1.0 / (1.0 + (-logit).exp())), contributions)
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Ranks one user's candidates.
pub fn rank(model: &LinearModel, c: &Candidates) -> RankedRecommendations {
    let catalog = Catalog::global();
    let f = &c.features;
    let max_affinity = f.category_affinity.values().copied().fold(0.0, f64::max);
    let viewed_prices: Vec<f64> =
        f.recently_viewed.iter().filter_map(|id| catalog.get(id)).map(|p| p.price.ln()).collect();
    let mean_log_price =
        (!viewed_prices.is_empty()).then(|| viewed_prices.iter().sum::<f64>() / viewed_prices.len() as f64);

    // product -> (sources, best score per source)
    let mut merged: BTreeMap<&str, BTreeMap<CandidateSource, f64>> = BTreeMap::new();
    for cand in &c.candidates {
        let slot = merged.entry(cand.product_id.as_str()).or_default().entry(cand.source).or_insert(0.0);
        *slot = slot.max(cand.source_score);
    }

    let mut items: Vec<RankedItem> = merged
        .into_iter()
        .filter_map(|(id, sources)| {
            let product = catalog.get(id)?;
            let source = |s| sources.get(&s).copied().unwrap_or(0.0);
            let affinity = f.category_affinity.get(product.category).copied().unwrap_or(0.0);
            let features = BTreeMap::from([
                ("bias", 1.0),
                ("retargeting", source(CandidateSource::Retargeting)),
                ("in_cart", if f.cart.iter().any(|p| p == id) { 1.0 } else { 0.0 }),
                ("co_visitation", source(CandidateSource::CoVisitation)),
                ("popularity", source(CandidateSource::PopularInCategory).max(source(CandidateSource::ColdStart))),
                ("category_affinity", if max_affinity > 0.0 { affinity / max_affinity } else { 0.0 }),
                ("price_fit", mean_log_price.map_or(0.0, |m| (1.0 - (product.price.ln() - m).abs() / 2.0).max(0.0))),
            ]);
            let (score, contributions) = model.score(&features);
            Some(RankedItem {
                item_id: product.id.clone(),
                name: product.name.clone(),
                category: product.category.to_owned(),
                price: product.price,
                score,
                sources: sources.keys().copied().collect(),
                contributions,
            })
        })
        .collect();
    items.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.item_id.cmp(&b.item_id)));
    items.truncate(MAX_RANKED);
    RankedRecommendations {
        schema_version: events::SCHEMA_VERSION,
        user_id: c.user_id.clone(),
        ranked_at: Utc::now(),
        model_version: model.version.clone(),
        items,
    }
}

struct Ranker {
    model: LinearModel,
    latest: Latest,
}

impl Handler for Ranker {
    fn handle(&mut self, rec: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        let candidates: Candidates = rec.json()?;
        let ranked = rank(&self.model, &candidates);
        metrics::counter!("ranking_lists_total").increment(1);
        out.send(&ranked);
        self.latest.write().insert(ranked.user_id.clone(), ranked);
        Ok(())
    }
}

async fn get_ranked(
    State(latest): State<Latest>,
    Path(user_id): Path<String>,
) -> Result<Json<RankedRecommendations>, ApiError> {
    let latest = latest.read();
    found(latest.get(&user_id).cloned(), || format!("no ranked list for user {user_id:?} yet"))
}

#[cfg(test)]
mod tests {
    use events::{Candidate, UserFeatures};

    use super::*;

    fn cand(id: &str, source: CandidateSource, score: f64) -> Candidate {
        Candidate { product_id: id.into(), source, source_score: score }
    }

    #[test]
    fn scores_are_explained_and_ordered() {
        let catalog = Catalog::global();
        let viewed = catalog.in_category("books").next().expect("book").id.clone();
        let other_book = catalog.in_category("books").nth(3).expect("book").id.clone();
        let toy = catalog.in_category("toys").next().expect("toy").id.clone();
        let features = UserFeatures {
            user_id: "u".into(),
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
        let model = LinearModel::v1();
        let ranked = rank(&model, &c);
        assert_eq!(ranked.items.len(), 3, "one item per product");
        let ids: Vec<_> = ranked.items.iter().map(|i| i.item_id.as_str()).collect();
        assert_eq!(ids.last(), Some(&toy.as_str()), "the unrelated cold-start toy ranks last: {ids:?}");
        assert!(ranked.items.windows(2).all(|w| w[0].score >= w[1].score));
        let book = ranked.items.iter().find(|i| i.item_id == other_book).expect("ranked");
        assert_eq!(book.sources, vec![CandidateSource::CoVisitation, CandidateSource::PopularInCategory]);
        // The contributions add up to the logit behind the score.
        let logit: f64 = book.contributions.values().sum();
        assert!((1.0 / (1.0 + (-logit).exp()) - book.score).abs() < 1e-3);
        assert_eq!(book.contributions["co_visitation"], 1.5);
        assert_eq!(book.contributions["category_affinity"], 1.5);
    }
}
