//! `event-processor` (8083): validates, enriches, de-duplicates and routes raw events.
//!
//! Reads `user-activity-topic` and `order-topic` (consumer group `event-processor`) and writes
//! one stream, `processed-events-topic`, keyed by user so a user's events stay in order.
//!
//! - Validation: the same rules as the ingestion APIs, in strict mode (a message from a foreign
//!   producer must carry `eventId` and `timestamp`). Failures go to `dead-letter-topic` with the
//!   original bytes, source topic/partition/offset, the field and the reason (see `kit::kafka`).
//! - Enrichment: product name, category and price from the catalog (an event naming a product
//!   the catalog lacks first waits until the catalog holds everything written to
//!   `catalog-topic` before the event: `kit::catalog::CatalogSync`); a session id when the
//!   client sent none (a gap of `SESSION_GAP_SECONDS` without events starts a new session);
//!   the user's latest campaign carried onto later events for `CAMPAIGN_WINDOW_HOURS`; a
//!   correlation id (Kafka header `correlation-id`, created here if the producer sent none).
//! - De-duplication by `eventId` over the last `DEDUP_CAPACITY` ids (each id is kept twice,
//!   in a FIFO and a hash set: on the order of 150 bytes for a UUID, so about 30 MB at the
//!   default of 200,000). The memory survives restarts: on start the processor replays its
//!   partitions up to the committed offsets (`ConsumerSpec::restoring`).
//!
//! Ops endpoints: `GET /api/processor/stats`, `GET /api/dead-letters?limit=N` (the latest
//! dead letters, from a replica of the dead-letter topic) and `POST /api/dead-letters/replay`
//! (`{"ids": [...]}` or `{"all": true}`: the original bytes back to their source topic; needs
//! `Authorization: Bearer <OPS_TOKEN>`).

use std::collections::{HashMap, VecDeque};

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use chrono::{DateTime, Duration, Utc};
use events::validate::{self, Strictness};
use events::{
    ActivityEvent, DeadLetter, EventType, OrderEvent, ProcessedEvent, ProcessedItem, ProcessedOrder, ProductInfo, Topic,
};
use kit::catalog::{CatalogSync, LiveCatalog};
use kit::config::{ConfigError, Env, positive};
use kit::dedup::SeenSet;
use kit::http::{ApiError, Body, OpsToken, Query};
use kit::kafka::{ConsumerSpec, Handler, HandlerError, Outbox, Producer, Record};
use kit::state::{Shared, UserMap, user_map};
use kit::telemetry::LineBudget;
use kit::{Context, Service};
use serde::{Deserialize, Serialize};

/// The `event-processor` service.
pub struct EventProcessor;

/// Settings of the event processor.
#[derive(Debug, Clone)]
pub struct Config {
    /// `DEDUP_CAPACITY`: how many recent event ids are remembered (default 200,000).
    pub dedup_capacity: usize,
    /// `SESSION_GAP_SECONDS`: inactivity that starts a new session (default 1800).
    pub session_gap: Duration,
    /// `CAMPAIGN_WINDOW_HOURS`: how long a campaign is attributed to later events (default 168).
    pub campaign_window: Duration,
    /// `OPS_TOKEN`: required by the replay endpoint (unset: disabled).
    pub ops_token: OpsToken,
    /// `EVENT_LOG_PER_SECOND`: events logged one line each per second at most (default 100;
    /// the rest are counted in the next line, see [`LineBudget`]; 0: none).
    pub event_log_per_second: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            dedup_capacity: 200_000,
            session_gap: Duration::minutes(30),
            campaign_window: Duration::hours(168),
            ops_token: OpsToken::default(),
            event_log_per_second: 100,
        }
    }
}

impl Service for EventProcessor {
    const NAME: &'static str = "event-processor";
    const DEFAULT_PORT: u16 = 8083;
    const PARTITIONED: bool = true;
    type Config = Config;

    fn config(env: &Env) -> Result<Config, ConfigError> {
        let d = Config::default();
        Ok(Config {
            dedup_capacity: env.checked("DEDUP_CAPACITY", d.dedup_capacity, positive)?,
            session_gap: Duration::seconds(env.checked("SESSION_GAP_SECONDS", 1800, positive)?),
            campaign_window: Duration::hours(env.checked("CAMPAIGN_WINDOW_HOURS", 168, |v: &i64| {
                if *v < 0 { Err("must be >= 0".into()) } else { Ok(()) }
            })?),
            ops_token: OpsToken::from_env(env)?,
            event_log_per_second: env.get("EVENT_LOG_PER_SECOND", d.event_log_per_second)?,
        })
    }

    async fn run(config: Config, mut ctx: Context) -> anyhow::Result<()> {
        let producer = ctx.pipeline_producer()?;
        let token = config.ops_token.clone();
        let stats = Shared::new(Stats::default());
        let letters = Shared::new(VecDeque::new());
        let (catalog, sync) = ctx.follow_catalog_synced(&producer).await?;
        ctx.spawn_consumer(
            &producer,
            ConsumerSpec::group("raw-events", [Topic::UserActivity, Topic::Order], "event-processor").restoring(),
            Processor::new(config, Shared::clone(&stats), catalog).following(sync),
        );
        ctx.spawn_consumer(
            &producer,
            ConsumerSpec::replica("dead-letters", [Topic::DeadLetter]),
            LetterView(Shared::clone(&letters)),
        );
        let routes = axum::Router::new()
            .route("/api/processor/stats", get(get_stats))
            .route("/api/dead-letters", get(get_letters))
            .route("/api/dead-letters/replay", axum::routing::post(replay_letters))
            .with_state(AppState { stats, letters, producer: ctx.request_producer()?, token });
        ctx.serve(routes).await
    }
}

/// Counts for the stats endpoint (the same figures are Prometheus metrics).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub processed: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub rejected_by_field: HashMap<String, u64>,
    /// Events (and order lines) naming a product the catalog did not have yet.
    pub unknown_products: u64,
}

/// The processing state: pure logic, no I/O.
pub struct Processor {
    config: Config,
    seen: SeenSet,
    /// user -> (current session id, time of the user's latest event)
    sessions: UserMap<(String, DateTime<Utc>)>,
    /// user -> (latest campaign, when it was seen)
    campaigns: UserMap<(String, DateTime<Utc>)>,
    stats: Shared<Stats>,
    catalog: LiveCatalog,
    catalog_sync: CatalogSync,
    log_budget: LineBudget,
}

impl Processor {
    pub fn new(config: Config, stats: Shared<Stats>, catalog: LiveCatalog) -> Self {
        Self {
            seen: SeenSet::new(config.dedup_capacity),
            log_budget: LineBudget::new(config.event_log_per_second),
            config,
            sessions: user_map(),
            campaigns: user_map(),
            stats,
            catalog,
            catalog_sync: CatalogSync::always_current(),
        }
    }

    /// Before it enriches an event as naming an unknown product, waits until the catalog holds
    /// every product written before the event (see [`CatalogSync`]); without, the catalog is
    /// taken as it is.
    pub fn following(self, catalog_sync: CatalogSync) -> Self {
        Self { catalog_sync, ..self }
    }

    /// `Err(Wait)` when one of `products` is not in the catalog and the catalog may not hold
    /// every product written before `rec` yet.
    fn catalog_current_for<'a>(
        &self,
        rec: &Record<'_>,
        mut products: impl Iterator<Item = &'a str>,
    ) -> Result<(), HandlerError> {
        let unknown = {
            let catalog = self.catalog.read();
            products.any(|id| catalog.get(id).is_none())
        };
        match unknown.then(|| self.catalog_sync.wait_if_behind(rec.timestamp_ms)).flatten() {
            Some(wait) => Err(HandlerError::Wait(wait)),
            None => Ok(()),
        }
    }

    /// The catalog's data for a product, or an unknown product's placeholder (counted).
    fn product_info(&self, id: &str) -> ProductInfo {
        let info = ProductInfo::from_catalog(&self.catalog.read(), id);
        if info.unknown {
            metrics::counter!("processor_unknown_products_total").increment(1);
            self.stats().unknown_products += 1;
        }
        info
    }

    fn stats(&self) -> std::sync::RwLockWriteGuard<'_, Stats> {
        self.stats.write()
    }

    fn reject(&self, e: validate::FieldError) -> HandlerError {
        self.count_rejection(&e.field);
        HandlerError::invalid(e)
    }

    /// Counts a message refused for `field` (`$`: the payload as a whole, not JSON at all), by
    /// [`field_kind`].
    fn count_rejection(&self, field: &str) {
        let field = field_kind(field);
        metrics::counter!("processor_rejected_total", "field" => field.clone()).increment(1);
        let mut s = self.stats();
        s.rejected += 1;
        *s.rejected_by_field.entry(field).or_default() += 1;
    }

    /// A message that is not one at all (not JSON, or from a topic the processor does not
    /// read): counted as rejected for `$`, the whole payload, like the invalid ones.
    fn malformed(&self, e: HandlerError) -> HandlerError {
        self.count_rejection("$");
        e
    }

    /// The session of an event: the client's, or the user's current one, or (after
    /// `session_gap` of inactivity) a new one named after the event that starts it — so a
    /// replay of the same events after a restart rebuilds the same sessions.
    fn session(&mut self, user: &str, event_id: &str, given: Option<&str>, at: DateTime<Utc>) -> String {
        let gap = self.config.session_gap;
        let entry = self.sessions.get(user).cloned();
        let last = entry.as_ref().map_or(at, |(_, last)| (*last).max(at));
        let session = match (given, entry) {
            (Some(s), _) => s.to_owned(),
            (None, Some((s, last))) if at - last < gap => s,
            (None, _) => format!("s-{event_id}"),
        };
        self.sessions.put(user.to_owned(), (session.clone(), last));
        session
    }

    fn campaign(&mut self, user: &str, given: Option<&str>, at: DateTime<Utc>) -> Option<String> {
        if let Some(c) = given {
            self.campaigns.put(user.to_owned(), (c.to_owned(), at));
            return Some(c.to_owned());
        }
        self.campaigns.get(user).filter(|(_, since)| at - *since <= self.config.campaign_window).map(|(c, _)| c.clone())
    }

    fn activity(&mut self, e: ActivityEvent, rec: &Record<'_>, out: &mut Outbox, now: DateTime<Utc>) -> ProcessedEvent {
        let product = e.product_id.as_deref().map(|id| self.product_info(id));
        ProcessedEvent {
            schema_version: events::SCHEMA_VERSION,
            session_id: self.session(&e.user_id, &e.event_id, e.session_id.as_deref(), e.timestamp),
            campaign_id: self.campaign(&e.user_id, e.campaign_id.as_deref(), e.timestamp),
            correlation_id: correlation(out),
            event_id: e.event_id,
            user_id: e.user_id,
            event_type: e.event_type,
            occurred_at: e.timestamp,
            processed_at: now,
            product,
            query: e.query,
            recommendation_id: e.recommendation_id,
            order: None,
            source: rec.source(),
        }
    }

    fn order(&mut self, o: OrderEvent, rec: &Record<'_>, out: &mut Outbox, now: DateTime<Utc>) -> ProcessedEvent {
        let items = o
            .items
            .iter()
            .map(|i| {
                let mut product = self.product_info(&i.product_id);
                if product.unknown {
                    product.price = i.unit_price;
                }
                ProcessedItem { product, quantity: i.quantity, unit_price: i.unit_price }
            })
            .collect();
        ProcessedEvent {
            schema_version: events::SCHEMA_VERSION,
            session_id: self.session(&o.user_id, &o.event_id, o.session_id.as_deref(), o.timestamp),
            campaign_id: self.campaign(&o.user_id, o.campaign_id.as_deref(), o.timestamp),
            correlation_id: correlation(out),
            event_id: o.event_id,
            user_id: o.user_id,
            event_type: EventType::Purchase,
            occurred_at: o.timestamp,
            processed_at: now,
            product: None,
            query: None,
            recommendation_id: None,
            order: Some(ProcessedOrder {
                order_id: o.order_id,
                amount: o.amount,
                currency: o.currency,
                items,
                offer_decision_id: o.offer_decision_id,
            }),
            source: rec.source(),
        }
    }
}

/// The correlation id of the event: from the Kafka header, or a new one.
fn correlation(out: &mut Outbox) -> String {
    if out.correlation_id().is_none() {
        out.set_correlation_id(uuid::Uuid::new_v4().to_string());
    }
    out.correlation_id().unwrap_or_default().to_owned()
}

impl Handler for Processor {
    /// Forgets the ids, sessions and campaigns of every user (and this instance's counts) before
    /// the partitions it holds now are replayed into it.
    fn reset(&mut self) -> bool {
        self.seen = SeenSet::new(self.config.dedup_capacity);
        self.sessions = user_map();
        self.campaigns = user_map();
        *self.stats() = Stats::default();
        true
    }

    fn handle(&mut self, rec: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        let now = Utc::now();
        let value = rec.value().map_err(|e| self.malformed(e))?;
        let processed = match rec.topic {
            Topic::UserActivity => {
                let e = validate::activity(&value, now, Strictness::Stream).map_err(|e| self.reject(e))?;
                if !out.is_replay() {
                    self.catalog_current_for(rec, e.product_id.as_deref().into_iter())?;
                }
                if !self.seen.insert(&events::idempotency_key(&e.user_id, &e.event_id)) {
                    self.duplicate(&e.event_id);
                    return Ok(());
                }
                self.activity(e, rec, out, now)
            }
            Topic::Order => {
                let o = validate::order(&value, now, Strictness::Stream).map_err(|e| self.reject(e))?;
                if !out.is_replay() {
                    self.catalog_current_for(rec, o.items.iter().map(|i| i.product_id.as_str()))?;
                }
                if !self.seen.insert(&events::idempotency_key(&o.user_id, &o.event_id)) {
                    self.duplicate(&o.event_id);
                    return Ok(());
                }
                self.order(o, rec, out, now)
            }
            other => {
                return Err(self.malformed(HandlerError::malformed(format!("the processor does not read {other}"))));
            }
        };
        // One line per event, as the original project's users read it with `docker logs`, up
        // to EVENT_LOG_PER_SECOND: past that the lines cost more than the processing.
        if !out.is_replay()
            && let Some(skipped) = self.log_budget.admit(std::time::Instant::now())
        {
            if skipped > 0 {
                tracing::info!(skipped, "events processed without a line each (EVENT_LOG_PER_SECOND)");
            }
            let product = processed.product.as_ref().map_or("", |p| p.product_id.as_str());
            tracing::info!(
                event_id = %processed.event_id,
                user_id = %processed.user_id,
                event_type = processed.event_type.as_str(),
                product,
                correlation_id = %processed.correlation_id,
                "processed"
            );
        }
        metrics::counter!("processor_events_total", "type" => processed.event_type.as_str()).increment(1);
        metrics::histogram!("processor_event_age_seconds")
            .record((now - processed.occurred_at).num_milliseconds().max(0) as f64 / 1000.0);
        self.stats().processed += 1;
        out.send(&processed);
        Ok(())
    }
}

impl Processor {
    fn duplicate(&self, event_id: &str) {
        tracing::debug!(event_id, "duplicate dropped");
        metrics::counter!("processor_duplicates_total").increment(1);
        self.stats().duplicates += 1;
    }
}

/// How many dead letters the ops endpoint keeps.
const LETTERS_KEPT: usize = 200;

/// The latest dead letters, newest first.
struct LetterView(Shared<VecDeque<DeadLetter>>);

impl Handler for LetterView {
    fn handle(&mut self, rec: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        // A dead letter we cannot read is logged, not dead-lettered again.
        match rec.json::<DeadLetter>() {
            Ok(letter) => {
                let mut v = self.0.write();
                v.push_front(letter);
                v.truncate(LETTERS_KEPT);
            }
            Err(e) => tracing::warn!(error = %e, offset = rec.offset, "unreadable dead letter"),
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    stats: Shared<Stats>,
    letters: Shared<VecDeque<DeadLetter>>,
    producer: Producer,
    token: OpsToken,
}

/// `POST /api/dead-letters/replay` body: `{"ids": [...]}` or `{"all": true}`.
#[derive(Debug, Default, Deserialize)]
struct ReplayRequest {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    all: bool,
}

/// Sends the chosen dead letters (of the latest the view holds) back to their source topics;
/// requires the operations token.
async fn replay_letters(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
    Body(body): Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.token.check(&headers)?;
    let req: ReplayRequest = kit::http::json_as(&body)?;
    let letters: Vec<DeadLetter> = s.letters.read().iter().cloned().collect();
    let plan = kit::dead_letters::replay_plan(&letters, &req.ids, req.all)
        .map_err(|reason| ApiError::Invalid { field: "ids".into(), reason })?;
    for out in &plan {
        s.producer.send_outgoing(out).await.map_err(|e| ApiError::Unavailable(format!("replay stopped: {e}")))?;
    }
    tracing::info!(replayed = plan.len(), "dead letters replayed");
    Ok(Json(serde_json::json!({"replayed": plan.len()})))
}

async fn get_stats(State(s): State<AppState>) -> Json<Stats> {
    Json(s.stats.read().clone())
}

#[derive(Deserialize)]
struct LetterQuery {
    limit: Option<usize>,
}

async fn get_letters(State(s): State<AppState>, Query(q): Query<LetterQuery>) -> Json<Vec<DeadLetter>> {
    let limit = q.limit.unwrap_or(50).min(LETTERS_KEPT);
    Json(s.letters.read().iter().take(limit).cloned().collect())
}

/// A refused field with its array indexes left out (`items[3].quantity` -> `items[].quantity`):
/// what refusals are counted by.
fn field_kind(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(open) = rest.find('[') {
        let (before, from) = rest.split_at(open);
        out.push_str(before);
        let digits = from[1..].bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && from[1 + digits..].starts_with(']') {
            out.push_str("[]");
            rest = &from[digits + 2..];
        } else {
            out.push('[');
            rest = &from[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use events::generate::Generator;
    use events::{DeadLetterKind, Message};
    use serde_json::json;

    use super::*;

    fn record<'a>(topic: Topic, payload: &'a [u8], offset: i64) -> Record<'a> {
        Record { topic, partition: 0, offset, key: None, payload, correlation_id: None, timestamp_ms: None }
    }

    fn processor() -> Processor {
        Processor::new(Config::default(), Shared::default(), kit::catalog::demo())
    }

    fn run(p: &mut Processor, topic: Topic, payload: &[u8]) -> Result<Vec<ProcessedEvent>, HandlerError> {
        let mut out = Outbox::default();
        p.handle(&record(topic, payload, 5), &mut out)?;
        Ok(out.decoded())
    }

    #[test]
    fn enriches_activity_and_assigns_sessions() {
        let mut p = processor();
        let t0 = Utc::now() - Duration::hours(3);
        let mut e = Generator::seeded(1).activity(t0);
        e.event_type = EventType::ProductView;
        e.product_id = Some("P00001".into());
        e.session_id = None;
        e.campaign_id = Some("spring".into());
        let out = run(&mut p, Topic::UserActivity, &serde_json::to_vec(&e).expect("json")).expect("processed");
        assert_eq!(out.len(), 1);
        let first = &out[0];
        let product = first.product.as_ref().expect("enriched");
        let catalog_product = catalog::Catalog::demo().get("P00001").expect("in catalog");
        assert_eq!((&product.category, product.price), (&catalog_product.category, catalog_product.price));
        assert!(first.session_id.starts_with("s-"));
        assert!(!first.correlation_id.is_empty());
        assert_eq!(first.source.offset, 5);

        // Ten minutes later: same session, campaign carried over.
        let mut later = e.clone();
        later.event_id = "later".into();
        later.campaign_id = None;
        later.timestamp = t0 + Duration::minutes(10);
        let second = run(&mut p, Topic::UserActivity, &serde_json::to_vec(&later).expect("json")).expect("processed");
        assert_eq!(second[0].session_id, first.session_id);
        assert_eq!(second[0].campaign_id.as_deref(), Some("spring"));

        // Two hours later: a new session.
        let mut much_later = later.clone();
        much_later.event_id = "much-later".into();
        much_later.timestamp = t0 + Duration::hours(2);
        let third =
            run(&mut p, Topic::UserActivity, &serde_json::to_vec(&much_later).expect("json")).expect("processed");
        assert_ne!(third[0].session_id, first.session_id);
    }

    #[test]
    fn unknown_products_are_accepted_and_enriched_once_they_arrive() {
        let catalog = kit::catalog::LiveCatalog::default();
        let stats = Shared::default();
        let mut p =
            Processor::new(Config::default(), Shared::clone(&stats), kit::catalog::LiveCatalog::clone(&catalog));
        let view = |id: &str| {
            let mut e = Generator::seeded(4).activity(Utc::now());
            e.event_type = EventType::ProductView;
            e.event_id = id.to_owned();
            e.product_id = Some("SKU-RED-SHOE-42".into());
            serde_json::to_vec(&e).expect("json")
        };
        let first = run(&mut p, Topic::UserActivity, &view("e1")).expect("accepted");
        let product = first[0].product.as_ref().expect("the product is named");
        assert!(product.unknown && product.product_id == "SKU-RED-SHOE-42" && product.known_category().is_none());
        assert_eq!(stats.read().unknown_products, 1);
        catalog.write().upsert(catalog::Product {
            id: "SKU-RED-SHOE-42".into(),
            name: "Red shoe".into(),
            category: "shoes".into(),
            price: 59.9,
            brand: None,
            available: true,
            popularity: 0.0,
        });
        let later = run(&mut p, Topic::UserActivity, &view("e2")).expect("accepted");
        let product = later[0].product.as_ref().expect("enriched");
        assert_eq!((product.unknown, product.category.as_str(), product.price), (false, "shoes", 59.9));
        assert_eq!(stats.read().unknown_products, 1);
    }

    #[test]
    fn a_new_session_after_the_gap() {
        let mut p = Processor::new(
            Config { session_gap: Duration::seconds(60), ..Config::default() },
            Shared::default(),
            kit::catalog::demo(),
        );
        let t0 = Utc::now() - Duration::hours(1);
        let a = p.session("u", "e1", None, t0);
        assert_eq!(a, "s-e1");
        assert_eq!(p.session("u", "e2", None, t0 + Duration::seconds(30)), a);
        assert_eq!(p.session("u", "e3", None, t0 + Duration::seconds(200)), "s-e3");
        assert_eq!(p.session("u", "e4", Some("given"), t0), "given");
    }

    #[test]
    fn duplicates_are_dropped() {
        let mut p = processor();
        let e = serde_json::to_vec(&Generator::seeded(2).activity(Utc::now())).expect("json");
        assert_eq!(run(&mut p, Topic::UserActivity, &e).expect("ok").len(), 1);
        assert_eq!(run(&mut p, Topic::UserActivity, &e).expect("ok").len(), 0);
        assert_eq!(p.stats().duplicates, 1);
    }

    #[test]
    fn orders_become_enriched_purchases() {
        let mut p = processor();
        let o = Generator::seeded(3).order(Utc::now());
        let out = run(&mut p, Topic::Order, &serde_json::to_vec(&o).expect("json")).expect("processed");
        assert_eq!(out[0].event_type, EventType::Purchase);
        let order = out[0].order.as_ref().expect("order");
        assert_eq!(order.items.len(), o.items.len());
        assert!(order.items.iter().all(|i| !i.product.category.is_empty()));
        assert_eq!(out[0].key(), o.user_id);
    }

    /// Refusals are counted by field whatever the order line: `items[].quantity`, not one
    /// counter (and one metric series) per line number. The dead letter names the line.
    #[test]
    fn refusals_are_counted_by_field_not_by_line() {
        let mut p = processor();
        for bad in [3, 7, 3] {
            let mut o = serde_json::to_value(Generator::seeded(3).order(Utc::now())).expect("json");
            let items = o["items"].as_array_mut().expect("items");
            while items.len() <= bad {
                items.push(items[0].clone());
            }
            items[bad]["quantity"] = json!(0);
            match run(&mut p, Topic::Order, &serde_json::to_vec(&o).expect("json")) {
                Err(HandlerError::Reject { field, .. }) => {
                    assert_eq!(field.as_deref(), Some(format!("items[{bad}].quantity").as_str()));
                }
                other => panic!("{other:?}"),
            }
        }
        let stats = p.stats().clone();
        assert_eq!(stats.rejected_by_field.len(), 1, "{stats:?}");
        assert_eq!(stats.rejected_by_field.get("items[].quantity"), Some(&3), "{stats:?}");
        assert_eq!(field_kind("[12].items[3].productId"), "[].items[].productId");
        assert_eq!(field_kind("eventId"), "eventId");
        assert_eq!(field_kind("a[b]"), "a[b]");
    }

    /// Any producer may write the topics: a message with a key given twice is malformed, not
    /// read as its last value.
    #[test]
    fn a_key_given_twice_is_malformed() {
        let mut p = processor();
        let twice =
            br#"{"eventId":"e","userId":"a","userId":"b","eventType":"page_view","timestamp":"2026-01-01T00:00:00Z"}"#;
        match run(&mut p, Topic::UserActivity, twice) {
            Err(HandlerError::Reject { kind: DeadLetterKind::Malformed, reason, .. }) => {
                assert!(reason.contains(r#""userId""#), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_and_malformed_messages_are_rejected_with_a_reason() {
        let mut p = processor();
        match run(&mut p, Topic::UserActivity, b"{oops") {
            Err(HandlerError::Reject { kind: DeadLetterKind::Malformed, .. }) => {}
            other => panic!("{other:?}"),
        }
        // A foreign producer's event without eventId/timestamp is checked strictly.
        let foreign = br#"{"userId":"u","eventType":"page_view"}"#;
        match run(&mut p, Topic::UserActivity, foreign) {
            Err(HandlerError::Reject { kind: DeadLetterKind::Invalid, field, .. }) => {
                assert_eq!(field.as_deref(), Some("eventId"));
            }
            other => panic!("{other:?}"),
        }
        let bad_product = br#"{"eventId":"e","userId":"u","eventType":"click","productId":"NO PE","timestamp":"2026-01-01T00:00:00Z"}"#;
        match run(&mut p, Topic::UserActivity, bad_product) {
            Err(HandlerError::Reject { field, reason, .. }) => {
                assert_eq!(field.as_deref(), Some("productId"));
                assert!(reason.contains("NO PE"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Every refusal is counted, the payload that is not JSON for the whole value (`$`).
        let stats = p.stats().clone();
        assert_eq!(stats.rejected, 3, "{stats:?}");
        assert_eq!(stats.rejected_by_field.get("$"), Some(&1), "{stats:?}");
        assert_eq!(stats.rejected_by_field.get("eventId"), Some(&1), "{stats:?}");
    }
}
