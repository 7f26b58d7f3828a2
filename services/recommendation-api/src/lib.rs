//! `recommendation-api` (8089): serves recommendations from materialized views.
//!
//! Every instance keeps a replica of `ranked-recommendations-topic` and `offers-topic` (the
//! latest list and the latest offer per user, read from the beginning of every partition),
//! so a request never waits on another service: it keeps answering when upstream services
//! are down, and it scales by adding instances behind a load balancer. `/ready` waits until
//! both views have caught up.
//!
//! `GET /recommend/{userId}?k=10&category=books&exclude=P00001,P00002`:
//! `{"userId", "requestId", "recommendations": [{"itemId", "score", "rank", "name",
//! "category", "price", "sources"}], "offer", "coldStart", "modelVersion", "generatedAt"}`.
//! Unknown users get the catalog's best sellers (`"coldStart": true`). `requestId` is for
//! attributing later clicks (`recommendationId` on activity events).

use std::collections::HashSet;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use chrono::{DateTime, Utc};
use events::{CandidateSource, OfferDecision, RankedItem, RankedRecommendations, Topic};
use kit::catalog::LiveCatalog;
use kit::config::{ConfigError, Env};
use kit::http::{ApiError, Query, UserId};
use kit::kafka::{ConsumerSpec, Handler, HandlerError, Outbox, Record};
use kit::state::{Shared, UserMap, user_map};
use kit::{Context, Service};
use serde::{Deserialize, Serialize};

/// Default and largest `k`.
pub const DEFAULT_K: usize = 10;
pub const MAX_K: usize = 50;

/// The `recommendation-api` service.
pub struct RecommendationApi;

impl Service for RecommendationApi {
    const NAME: &'static str = "recommendation-api";
    const DEFAULT_PORT: u16 = 8089;
    type Config = ();

    fn config(_env: &Env) -> Result<(), ConfigError> {
        Ok(())
    }

    async fn run((): (), mut ctx: Context) -> anyhow::Result<()> {
        let producer = ctx.pipeline_producer()?;
        let catalog = ctx.follow_catalog(&producer).await;
        let views: Views = Shared::new(ViewState { catalog, ..ViewState::default() });
        ctx.spawn_consumer(
            &producer,
            // The view keeps each user's latest list (one ranking instance writes a user's lists,
            // in order): of those waiting, only the latest per user is read.
            ConsumerSpec::replica("ranked-view", [Topic::RankedRecommendations])
                .coalescing([Topic::RankedRecommendations]),
            ViewUpdater(Shared::clone(&views)),
        );
        ctx.spawn_consumer(
            &producer,
            ConsumerSpec::replica("offers-view", [Topic::Offers]),
            ViewUpdater(Shared::clone(&views)),
        );
        let routes = axum::Router::new().route("/recommend/{user_id}", get(recommend)).with_state(views);
        ctx.serve(routes).await
    }
}

/// The materialized views, of the [`kit::state::max_users`] most recently updated users.
pub struct ViewState {
    pub ranked: UserMap<List>,
    pub offers: UserMap<OfferDecision>,
    /// Products are shown as the catalog has them now: a price changed since the list was
    /// ranked shows the new price, and a withdrawn product is left out.
    pub catalog: LiveCatalog,
}

impl Default for ViewState {
    fn default() -> Self {
        Self { ranked: user_map(), offers: user_map(), catalog: LiveCatalog::default() }
    }
}

/// A user's latest ranked list as the view keeps it: what an answer uses of it. The model's
/// weights and the list's spare capacity are left behind (each instance keeps a list for
/// every user it serves, up to `MAX_USERS`).
#[derive(Debug, Clone, PartialEq)]
pub struct List {
    pub ranked_at: DateTime<Utc>,
    pub model_version: String,
    pub items: Box<[RankedItem]>,
}

impl From<RankedRecommendations> for List {
    fn from(r: RankedRecommendations) -> Self {
        Self { ranked_at: r.ranked_at, model_version: r.model_version, items: r.items.into_boxed_slice() }
    }
}

/// Most categories an error message lists.
const CATEGORIES_LISTED: usize = 20;

type Views = Shared<ViewState>;

struct ViewUpdater(Views);

impl Handler for ViewUpdater {
    fn handle(&mut self, rec: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        let mut v = self.0.write();
        match rec.topic {
            Topic::RankedRecommendations => {
                let mut r: RankedRecommendations = rec.json()?;
                // Keep the newest list even if an older one is redelivered later.
                if v.ranked.peek(&r.user_id).is_none_or(|old| old.ranked_at <= r.ranked_at) {
                    let user = std::mem::take(&mut r.user_id);
                    v.ranked.put(user, List::from(r));
                }
            }
            Topic::Offers => {
                let o: OfferDecision = rec.json()?;
                if v.offers.peek(&o.user_id).is_none_or(|old| old.decided_at <= o.decided_at) {
                    v.offers.put(o.user_id.clone(), o);
                }
            }
            other => return Err(HandlerError::malformed(format!("unexpected topic {other}"))),
        }
        Ok(())
    }
}

/// Query parameters of `GET /recommend/{userId}`.
#[derive(Debug, Default, Deserialize)]
pub struct Params {
    pub k: Option<String>,
    pub category: Option<String>,
    pub exclude: Option<String>,
}

/// One recommended item.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Item {
    pub item_id: String,
    pub score: f64,
    pub rank: usize,
    pub name: String,
    pub category: String,
    pub price: f64,
    pub sources: events::Sources,
}

/// The response body.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub user_id: String,
    pub request_id: String,
    pub recommendations: Vec<Item>,
    pub offer: Option<OfferDecision>,
    pub cold_start: bool,
    pub model_version: String,
    pub generated_at: DateTime<Utc>,
}

/// Builds the answer from the views (pure; no I/O).
pub fn answer(views: &ViewState, user_id: &str, params: &Params) -> Result<Response, ApiError> {
    let invalid = |field: &str, reason: String| ApiError::Invalid { field: field.into(), reason };
    let k = match params.k.as_deref() {
        None => DEFAULT_K,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|k| (1..=MAX_K).contains(k))
            .ok_or_else(|| invalid("k", format!("must be a whole number from 1 to {MAX_K}, got {raw:?}")))?,
    };
    let catalog = views.catalog.read();
    let category = params.category.as_deref().map(str::trim).filter(|c| !c.is_empty());
    if let Some(c) = category
        && !catalog.is_category(c)
    {
        let known: Vec<_> = catalog.categories().take(CATEGORIES_LISTED).collect();
        let more = if catalog.categories().count() > CATEGORIES_LISTED { ", ..." } else { "" };
        return Err(invalid("category", format!("unknown category {c:?}; known: {}{more}", known.join(", "))));
    }
    let exclude: HashSet<&str> =
        params.exclude.as_deref().unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let keep = |id: &str, cat: &str| !exclude.contains(id) && category.is_none_or(|c| c == cat);

    let (items, cold_start, model_version, generated_at): (Vec<Item>, bool, String, DateTime<Utc>) =
        match views.ranked.peek(user_id) {
            Some(r) => (
                r.items
                    .iter()
                    .filter_map(|i| Some((i, catalog.available(&i.item_id)?)))
                    .filter(|(_, p)| keep(&p.id, &p.category))
                    .map(|(i, p)| Item {
                        item_id: p.id.clone(),
                        score: i.score,
                        rank: 0,
                        name: p.name.clone(),
                        category: p.category.clone(),
                        price: p.price,
                        sources: i.sources.clone(),
                    })
                    .collect(),
                false,
                r.model_version.clone(),
                r.ranked_at,
            ),
            None => (Vec::new(), true, "cold-start-popularity".to_owned(), Utc::now()),
        };
    let mut items = items;
    // Fill up (or, for unknown users, fill entirely) with best sellers.
    if items.len() < k {
        let have: HashSet<String> = items.iter().map(|i| i.item_id.clone()).collect();
        let fill = catalog
            .by_popularity()
            .filter(|p| keep(&p.id, &p.category) && !have.contains(&p.id))
            .take(k - items.len())
            .map(|p| Item {
                item_id: p.id.clone(),
                score: (p.popularity * 0.5 * 10_000.0).round() / 10_000.0,
                rank: 0,
                name: p.name.clone(),
                category: p.category.clone(),
                price: p.price,
                sources: std::iter::once(CandidateSource::ColdStart).collect(),
            })
            .collect::<Vec<_>>();
        items.extend(fill);
    }
    items.truncate(k);
    for (i, item) in items.iter_mut().enumerate() {
        item.rank = i + 1;
    }
    Ok(Response {
        user_id: user_id.to_owned(),
        request_id: uuid::Uuid::new_v4().to_string(),
        recommendations: items,
        offer: views.offers.peek(user_id).cloned(),
        cold_start,
        model_version,
        generated_at,
    })
}

async fn recommend(
    State(views): State<Views>,
    UserId(user_id): UserId,
    Query(params): Query<Params>,
) -> Result<Json<Response>, ApiError> {
    let response = {
        let views = views.read();
        answer(&views, &user_id, &params)?
    };
    metrics::counter!("recommendations_served_total", "cold_start" => response.cold_start.to_string()).increment(1);
    tracing::debug!(user_id, request_id = %response.request_id, items = response.recommendations.len(), "served");
    Ok(Json(response))
}

#[cfg(test)]
mod tests {
    use catalog::Catalog;

    use super::*;

    fn views() -> ViewState {
        let catalog = Catalog::demo();
        let items = ["P00001", "P00700", "P00002"]
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let p = catalog.get(id).expect("known");
                RankedItem {
                    item_id: p.id.as_str().into(),
                    score: 0.9 - i as f64 / 10.0,
                    sources: std::iter::once(CandidateSource::Retargeting).collect(),
                }
            })
            .collect();
        let mut v = ViewState { catalog: kit::catalog::demo(), ..ViewState::default() };
        v.ranked.put("u".into(), List { ranked_at: Utc::now(), model_version: "linear-v1".into(), items });
        v
    }

    fn params(k: Option<&str>, category: Option<&str>, exclude: Option<&str>) -> Params {
        Params { k: k.map(Into::into), category: category.map(Into::into), exclude: exclude.map(Into::into) }
    }

    #[test]
    fn known_users_get_their_ranked_list_first() {
        let r = answer(&views(), "u", &params(Some("5"), None, None)).expect("answer");
        assert!(!r.cold_start);
        assert_eq!(r.recommendations.len(), 5);
        assert_eq!(r.recommendations[0].item_id, "P00001");
        assert_eq!(r.recommendations[0].rank, 1);
        assert_eq!(r.recommendations[3].sources.as_slice(), [CandidateSource::ColdStart], "filled with best sellers");
    }

    #[test]
    fn filters_and_cold_start() {
        let v = views();
        let cat = Catalog::demo().get("P00700").expect("known").category.as_str();
        let r = answer(&v, "u", &params(Some("3"), Some(cat), Some("P00700"))).expect("answer");
        assert!(r.recommendations.iter().all(|i| i.category == cat && i.item_id != "P00700"));
        let r = answer(&v, "stranger", &params(None, None, None)).expect("answer");
        assert!(r.cold_start);
        assert_eq!(r.recommendations.len(), DEFAULT_K);
        assert!(r.offer.is_none());
    }

    #[test]
    fn products_are_shown_as_the_catalog_has_them_now() {
        let v = views();
        let first = answer(&v, "u", &params(Some("3"), None, None)).expect("answer");
        let top = first.recommendations[0].item_id.clone();
        let mut changed = Catalog::demo().get(&top).expect("known").clone();
        changed.price = 1.25;
        v.catalog.write().upsert(changed.clone());
        let r = answer(&v, "u", &params(Some("3"), None, None)).expect("answer");
        assert_eq!((r.recommendations[0].item_id.as_str(), r.recommendations[0].price), (top.as_str(), 1.25));
        v.catalog.write().upsert(catalog::Product { available: false, ..changed });
        let r = answer(&v, "u", &params(Some("3"), None, None)).expect("answer");
        assert!(r.recommendations.iter().all(|i| i.item_id != top), "a withdrawn product is not shown");
    }

    #[test]
    fn bad_parameters_are_4xx_naming_the_parameter() {
        for (p, field) in [
            (params(Some("0"), None, None), "k"),
            (params(Some("ten"), None, None), "k"),
            (params(Some("51"), None, None), "k"),
            (params(None, Some("cars"), None), "category"),
        ] {
            match answer(&views(), "u", &p) {
                Err(ApiError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{other:?}"),
            }
        }
    }
}
