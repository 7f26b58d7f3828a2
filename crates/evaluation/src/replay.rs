//! The services' own logic wired together in memory: each event goes through the event
//! processor's handler, the feature store, retrieval's model and candidate generation, ranking
//! (learning online from feedback as in the service) and ends in the recommendation API's
//! views, in the order the topics deliver; messages are passed in memory instead of through
//! Kafka. Every time-based feature advances by the events' own time.

use std::borrow::Borrow;

use events::generate::Step;
use events::{ActivityEvent, ProcessedEvent, Topic};
use kit::kafka::{Handler, Outbox, Record};
use kit::state::Shared;

/// Which events count as coming from a shown recommendation list (what ranking learns from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribution {
    /// Those that carry a `recommendationId`, as recorded: a real history.
    AsRecorded,
    /// An activity on a product the user's list shows at that moment: simulated shoppers,
    /// who are taken to reach a product through the list whenever the list holds it.
    ShownList,
}

/// The services' logic wired together in memory.
pub struct Platform {
    /// How many processed events the replay produced.
    pub processed: usize,
    /// The recommendation API's views at the end of the replay.
    pub views: recommendation_api::ViewState,
    pub model_updates: u64,
}

impl Platform {
    /// Replays the training traffic in order, handing each processed event to `observe` as
    /// it is made; returns the state at the end. The traffic is taken one step at a time, so
    /// a history need not be held as events.
    pub fn replay(
        training: impl IntoIterator<Item = impl Borrow<Step>>,
        catalog: kit::catalog::LiveCatalog,
        ranking_config: ranking::Config,
        attribution: Attribution,
        observe: impl FnMut(&ProcessedEvent),
    ) -> anyhow::Result<Self> {
        // The services log every event; a replay of a whole history would only drown the report.
        tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
            Self::replay_quietly(training, catalog, ranking_config, attribution, observe)
        })
    }

    fn replay_quietly(
        training: impl IntoIterator<Item = impl Borrow<Step>>,
        catalog: kit::catalog::LiveCatalog,
        ranking_config: ranking::Config,
        attribution: Attribution,
        mut observe: impl FnMut(&ProcessedEvent),
    ) -> anyhow::Result<Self> {
        let mut processor = event_processor::Processor::new(
            event_processor::Config::default(),
            Shared::new(Default::default()),
            Shared::clone(&catalog),
        );
        let mut store = feature_store::Store::new(
            feature_store::Config { affinity_half_life_hours: 72.0, ops_token: Default::default() },
            Shared::clone(&catalog),
        );
        let mut model = retrieval::Model::default();
        let mut ranker = ranking::Ranker::new(ranking::LinearModel::initial(), ranking_config, Shared::clone(&catalog));
        let mut processed = 0;
        for (offset, step) in training.into_iter().enumerate() {
            let (topic, payload, at) = match step.borrow() {
                Step::Activity(a)
                    if attribution == Attribution::ShownList
                        && a.recommendation_id.is_none()
                        && a.product_id.as_deref().is_some_and(|p| ranker.shows(&a.user_id, p)) =>
                {
                    let attributed = ActivityEvent { recommendation_id: Some(format!("shown-{offset}")), ..a.clone() };
                    (Topic::UserActivity, serde_json::to_vec(&attributed)?, a.timestamp)
                }
                Step::Activity(a) => (Topic::UserActivity, serde_json::to_vec(a)?, a.timestamp),
                Step::Order(o) => (Topic::Order, serde_json::to_vec(o)?, o.timestamp),
            };
            let rec = Record {
                topic,
                partition: 0,
                offset: offset as i64,
                key: None,
                payload: &payload,
                correlation_id: None,
                timestamp_ms: Some(at.timestamp_millis()),
            };
            let mut out = Outbox::new(None);
            processor.handle(&rec, &mut out).map_err(|e| anyhow::anyhow!("the processor rejected an event: {e:?}"))?;
            for event in out.decoded::<ProcessedEvent>() {
                // The order the topics deliver in: ranking sees the feedback before the
                // snapshots it causes reach it through the feature store and retrieval.
                ranker.feedback(&event);
                model.learn(&event);
                if let Some(features) = store.apply(&event, at).cloned() {
                    let candidates = events::Candidates {
                        schema_version: events::SCHEMA_VERSION,
                        user_id: features.user_id.clone(),
                        generated_at: at,
                        candidates: retrieval::generate(&model, &catalog.read(), &features, at),
                        features: events::RankingFeatures::from(features),
                    };
                    ranker.rank(&candidates);
                }
                observe(&event);
                processed += 1;
            }
        }
        // The lists move to the views one by one, least recently ranked first (the views'
        // order of forgetting stays ranking's); no second copy of every list is made.
        let mut latest = std::mem::replace(&mut *ranker.latest.write(), kit::state::user_map());
        let mut ranked = kit::state::user_map();
        while let Some((user, kept)) = latest.pop_lru() {
            ranked.put(user, kept.into_ranked().into());
        }
        let views = recommendation_api::ViewState { ranked, offers: kit::state::user_map(), catalog };
        let model_updates = ranker.model.read().updates;
        Ok(Self { processed, views, model_updates })
    }

    /// What the recommendation API answers for `user`.
    pub fn recommend(&self, user: &str, k: usize) -> anyhow::Result<Vec<String>> {
        let params = recommendation_api::Params { k: Some(k.to_string()), ..Default::default() };
        let answer = recommendation_api::answer(&self.views, user, &params)
            .map_err(|e| anyhow::anyhow!("the recommendation API refused: {e:?}"))?;
        Ok(answer.recommendations.into_iter().map(|i| i.item_id).collect())
    }
}
