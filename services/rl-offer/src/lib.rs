//! `rl-offer` (8088): offer decisions (reminder, discount, free shipping, nothing).
//!
//! Consumes `user-features-topic` (consumer group `rl-offer`) and decides an offer whenever a
//! user's features change what the policy would do (or the last decision is older than
//! `OFFER_REFRESH_SECONDS`); every decision goes to `offers-topic` with its context, action,
//! propensity, policy, trigger and a decision id, so it can be learned from and evaluated
//! off-policy later.
//!
//! Policy of this first version: the original project's rule engine, made explicit and
//! logged (`rules-v1`, deterministic, so the propensity of the chosen action is 1):
//! `DISCOUNT_10` when purchase intent > 0.7 and recency > 0.5; `REMINDER` when intent > 0.4
//! and activity > 0.4; otherwise `NO_ACTION`. The contextual bandit replaces it next.
//!
//! REST: `GET /offer/{userId}` (the current offer; 404 before the first decision) and
//! `POST /offer/select` with `{"userId": "...", "context": {"purchaseIntent": 0.8, ...}}`
//! (decide now; context values default to the user's latest features).

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, Duration, Utc};
use events::{OfferAction, OfferDecision, Topic, UserFeatures};
use kit::config::{ConfigError, Env, positive};
use kit::http::{ApiError, found};
use kit::kafka::{ConsumerSpec, Handler, HandlerError, Outbox, Producer, Record};
use kit::state::Shared;
use kit::{Context, Service};
use serde_json::Value;

/// The `rl-offer` service.
pub struct RlOffer;

/// Settings of the offer service.
#[derive(Debug, Clone)]
pub struct Config {
    /// `OFFER_REFRESH_SECONDS`: a user's decision is renewed at most this often when the
    /// chosen action stays the same (default 900).
    pub refresh: Duration,
}

impl Service for RlOffer {
    const NAME: &'static str = "rl-offer";
    const DEFAULT_PORT: u16 = 8088;
    type Config = Config;

    fn config(env: &Env) -> Result<Config, ConfigError> {
        let secs = env.checked("OFFER_REFRESH_SECONDS", 900, positive)?;
        Ok(Config { refresh: Duration::seconds(secs) })
    }

    async fn run(config: Config, mut ctx: Context) -> anyhow::Result<()> {
        let pipeline = ctx.pipeline_producer()?;
        let requests = ctx.request_producer()?;
        let state = Shared::new(Offers::default());
        ctx.spawn_consumer(
            &pipeline,
            ConsumerSpec::group("user-features", [Topic::UserFeatures], "rl-offer"),
            Decider { state: Shared::clone(&state), config },
        );
        let routes = axum::Router::new()
            .route("/offer/{user_id}", get(get_offer))
            .route("/offer/select", post(select))
            .with_state(AppState { state, producer: requests });
        ctx.serve(routes).await
    }
}

/// What the policy looks at, each in [0, 1] except `cartValue`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OfferContext {
    pub purchase_intent: f64,
    pub recency: f64,
    pub activity: f64,
    pub cart_value: f64,
}

impl OfferContext {
    pub fn from_features(f: &UserFeatures, now: DateTime<Utc>) -> Self {
        let hours = (now - f.last_seen).num_milliseconds().max(0) as f64 / 3_600_000.0;
        Self {
            purchase_intent: f.purchase_intent,
            recency: (-hours / 24.0).exp(),
            activity: f.activity_score,
            cart_value: f.cart_value,
        }
    }

    fn as_map(self) -> BTreeMap<String, f64> {
        BTreeMap::from([
            ("purchaseIntent".to_owned(), self.purchase_intent),
            ("recency".to_owned(), self.recency),
            ("activity".to_owned(), self.activity),
            ("cartValue".to_owned(), self.cart_value),
        ])
    }
}

/// The rule policy: (action, explanation).
pub fn rules_v1(c: OfferContext) -> (OfferAction, String) {
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

/// A logged decision for a user and context.
pub fn decide(user_id: &str, context: OfferContext, trigger: &str, now: DateTime<Utc>) -> OfferDecision {
    let (action, explanation) = rules_v1(context);
    OfferDecision {
        schema_version: events::SCHEMA_VERSION,
        decision_id: uuid::Uuid::new_v4().to_string(),
        user_id: user_id.to_owned(),
        decided_at: now,
        action,
        propensity: 1.0,
        policy: "rules-v1".to_owned(),
        trigger: trigger.to_owned(),
        context: context.as_map(),
        explanation,
    }
}

/// Current decisions and latest features per user.
#[derive(Default)]
pub struct Offers {
    pub current: HashMap<String, OfferDecision>,
    pub features: HashMap<String, UserFeatures>,
}

struct Decider {
    state: Shared<Offers>,
    config: Config,
}

impl Handler for Decider {
    fn handle(&mut self, rec: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        let f: UserFeatures = rec.json()?;
        let now = Utc::now();
        let mut state = self.state.write();
        let context = OfferContext::from_features(&f, now);
        let trigger = f.last_event_type.map_or("features", |t| t.as_str());
        let decision = decide(&f.user_id, context, trigger, now);
        let renew = match state.current.get(&f.user_id) {
            None => true,
            Some(prev) => prev.action != decision.action || now - prev.decided_at >= self.config.refresh,
        };
        state.features.insert(f.user_id.clone(), f);
        if renew {
            metrics::counter!("offers_decisions_total", "action" => decision.action.as_str()).increment(1);
            out.send(&decision);
            state.current.insert(decision.user_id.clone(), decision);
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    state: Shared<Offers>,
    producer: Producer,
}

async fn get_offer(State(s): State<AppState>, Path(user_id): Path<String>) -> Result<Json<OfferDecision>, ApiError> {
    found(s.state.read().current.get(&user_id).cloned(), || format!("no offer decided for user {user_id:?} yet"))
}

/// Parses a `POST /offer/select` body against the user's latest features.
pub fn parse_select(
    body: &Value,
    known: Option<&UserFeatures>,
    now: DateTime<Utc>,
) -> Result<(String, OfferContext), ApiError> {
    let invalid = |field: &str, reason: &str| ApiError::Invalid { field: field.into(), reason: reason.into() };
    let obj = body.as_object().ok_or_else(|| invalid("$", "must be a JSON object with userId"))?;
    let user_id = match obj.get("userId") {
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= events::validate::MAX_ID_LEN => {
            s.trim().to_owned()
        }
        Some(Value::String(_)) => {
            return Err(invalid("userId", "must be a non-empty string of at most 128 characters"));
        }
        Some(_) => return Err(invalid("userId", "must be a string")),
        None => return Err(invalid("userId", "is required")),
    };
    let mut ctx = known.map(|f| OfferContext::from_features(f, now)).unwrap_or_default();
    if let Some(c) = obj.get("context") {
        let c = c.as_object().ok_or_else(|| invalid("context", "must be an object"))?;
        let fields: [(&str, &mut f64, f64); 4] = [
            ("purchaseIntent", &mut ctx.purchase_intent, 1.0),
            ("recency", &mut ctx.recency, 1.0),
            ("activity", &mut ctx.activity, 1.0),
            ("cartValue", &mut ctx.cart_value, events::validate::MAX_AMOUNT),
        ];
        for (name, slot, max) in fields {
            if let Some(v) = c.get(name) {
                let x = v.as_f64().filter(|x| x.is_finite() && (0.0..=max).contains(x));
                *slot =
                    x.ok_or_else(|| invalid(&format!("context.{name}"), &format!("must be a number from 0 to {max}")))?;
            }
        }
    }
    Ok((user_id, ctx))
}

async fn select(
    State(s): State<AppState>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<OfferDecision>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::Invalid { field: "$".into(), reason: e.body_text() })?;
    let now = Utc::now();
    let (user_id, context) = {
        let state = s.state.read();
        let known = body.get("userId").and_then(Value::as_str).and_then(|u| state.features.get(u.trim()));
        parse_select(&body, known, now)?
    };
    let decision = decide(&user_id, context, "api", now);
    s.producer
        .send(&decision, None)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the decision could not be logged: {e}")))?;
    metrics::counter!("offers_decisions_total", "action" => decision.action.as_str()).increment(1);
    s.state.write().current.insert(user_id, decision.clone());
    Ok((StatusCode::OK, Json(decision)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_rules_of_the_original_project() {
        let c = |i, r, a| OfferContext { purchase_intent: i, recency: r, activity: a, cart_value: 0.0 };
        assert_eq!(rules_v1(c(0.8, 0.9, 0.0)).0, OfferAction::Discount10);
        assert_eq!(rules_v1(c(0.8, 0.1, 0.5)).0, OfferAction::Reminder);
        assert_eq!(rules_v1(c(0.5, 0.9, 0.5)).0, OfferAction::Reminder);
        assert_eq!(rules_v1(c(0.3, 0.9, 0.9)).0, OfferAction::NoAction);
        let d = decide("u", c(0.8, 0.9, 0.0), "api", Utc::now());
        assert_eq!((d.propensity, d.policy.as_str()), (1.0, "rules-v1"));
        assert_eq!(d.context["purchaseIntent"], 0.8);
    }

    #[test]
    fn features_updates_decide_when_the_action_changes() {
        let state = Shared::new(Offers::default());
        let mut d = Decider { state: Shared::clone(&state), config: Config { refresh: Duration::hours(1) } };
        let mut f =
            UserFeatures { user_id: "u".into(), last_seen: Utc::now(), purchase_intent: 0.9, ..Default::default() };
        let mut run = |f: &UserFeatures| {
            let payload = serde_json::to_vec(f).expect("json");
            let rec = Record {
                topic: Topic::UserFeatures,
                partition: 0,
                offset: 0,
                key: None,
                payload: &payload,
                correlation_id: None,
                timestamp_ms: None,
            };
            let mut out = Outbox::default();
            d.handle(&rec, &mut out).expect("handled");
            out.decoded::<OfferDecision>()
        };
        assert_eq!(run(&f)[0].action, OfferAction::Discount10);
        assert!(run(&f).is_empty(), "same action, no new decision");
        f.purchase_intent = 0.1;
        assert_eq!(run(&f)[0].action, OfferAction::NoAction);
        assert_eq!(state.read().current["u"].action, OfferAction::NoAction);
    }

    #[test]
    fn select_bodies_are_validated() {
        let now = Utc::now();
        let (user, ctx) =
            parse_select(&json!({"userId": "u", "context": {"purchaseIntent": 0.9}}), None, now).expect("valid");
        assert_eq!((user.as_str(), ctx.purchase_intent, ctx.recency), ("u", 0.9, 0.0));
        let field = |v: Value| match parse_select(&v, None, now) {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(json!({})), "userId");
        assert_eq!(field(json!({"userId": 3})), "userId");
        assert_eq!(field(json!({"userId": "u", "context": {"recency": 2}})), "context.recency");
        assert_eq!(field(json!({"userId": "u", "context": []})), "context");
        assert_eq!(field(json!([])), "$");
    }
}
