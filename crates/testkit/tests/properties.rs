//! Property tests of every request parser and message decoder: whatever the input, the answer
//! is a value or a 4xx naming the problem (or, for a message read from a topic, a rejection
//! that sends it to the dead-letter topic) — never a panic, never a 5xx.

use std::sync::Mutex;

use chrono::Utc;
use events::generate::Generator;
use events::validate::{self, Strictness};
use events::{
    ActivityEvent, Candidates, DeadLetter, OfferDecision, OrderEvent, ProcessedEvent, RankedRecommendations, Topic,
    UserFeatures,
};
use kit::ingest::parse_body;
use kit::kafka::Record;
use proptest::prelude::*;
use serde_json::Value;
use testkit::arbitrary::{json, key};

/// Both ingestion parsers on `body`: events, or a 4xx.
fn check_body(body: &[u8]) -> Result<(), TestCaseError> {
    let generator = Mutex::new(Generator::seeded(1));
    let now = Utc::now();
    if let Err(e) = parse_body::<ActivityEvent>(body, now, &generator) {
        prop_assert!(e.status().is_client_error(), "activity: {e:?}");
    }
    if let Err(e) = parse_body::<OrderEvent>(body, now, &generator) {
        prop_assert!(e.status().is_client_error(), "order: {e:?}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_are_events_or_a_4xx(body in prop::collection::vec(any::<u8>(), 0..600)) {
        check_body(&body)?;
    }

    #[test]
    fn any_json_is_events_or_a_4xx(doc in json()) {
        check_body(&serde_json::to_vec(&doc).expect("serializable"))?;
    }

    /// A valid event with one field replaced by anything: accepted, or refused naming a field.
    #[test]
    fn a_valid_event_with_one_field_changed(field in key(), value in json(), order in any::<bool>()) {
        let now = Utc::now();
        let mut g = Generator::seeded(7);
        let mut doc = if order {
            serde_json::to_value(g.order(now)).expect("json")
        } else {
            serde_json::to_value(g.activity(now)).expect("json")
        };
        if let Some(obj) = doc.as_object_mut() {
            obj.insert(field, value);
        }
        for strictness in [Strictness::Api, Strictness::Stream] {
            let result = if order {
                validate::order(&doc, now, strictness).map(|_| ())
            } else {
                validate::activity(&doc, now, strictness).map(|_| ())
            };
            if let Err(e) = result {
                prop_assert!(!e.field.is_empty() && !e.reason.is_empty(), "{e:?}");
            }
        }
        check_body(&serde_json::to_vec(&doc).expect("serializable"))?;
    }

    /// Every message type read from a topic: decoded, or a rejection for the dead-letter topic.
    #[test]
    fn decoders_never_panic(payload in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..400),
        json().prop_map(|v| serde_json::to_vec(&v).expect("serializable")),
    ]) {
        let rec = Record::bare(Topic::ProcessedEvents, &payload);
        let decoded = [
            rec.value().is_ok(),
            rec.json::<ActivityEvent>().is_ok(),
            rec.json::<OrderEvent>().is_ok(),
            rec.json::<ProcessedEvent>().is_ok(),
            rec.json::<UserFeatures>().is_ok(),
            rec.json::<Candidates>().is_ok(),
            rec.json::<RankedRecommendations>().is_ok(),
            rec.json::<OfferDecision>().is_ok(),
            rec.json::<DeadLetter>().is_ok(),
        ];
        // Bytes that are not JSON decode as nothing.
        if serde_json::from_slice::<Value>(&payload).is_err() {
            prop_assert!(decoded.iter().all(|ok| !ok));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// `POST /offer/select`: a decision context, or a 4xx naming the field.
    #[test]
    fn offer_select_bodies(doc in json(), user in ".{0,200}", intent in any::<f64>()) {
        let now = Utc::now();
        let mut variants = vec![doc.clone()];
        variants.push(serde_json::json!({"userId": user, "context": doc}));
        variants.push(serde_json::json!({"userId": "u", "context": {"purchaseIntent": intent}}));
        for body in variants {
            if let Err(e) = rl_offer::parse_select(&body, None, now) {
                prop_assert!(e.status().is_client_error(), "{e:?}");
            }
        }
    }

    /// `GET /recommend/{userId}?k&category&exclude`: a list, or a 4xx naming the parameter.
    #[test]
    fn recommendation_queries(user in ".{0,200}", k in proptest::option::of(".{0,12}"),
                              category in proptest::option::of(".{0,20}"), exclude in proptest::option::of(".{0,60}")) {
        let views = recommendation_api::ViewState::default();
        let params = recommendation_api::Params { k, category, exclude };
        match recommendation_api::answer(&views, &user, &params) {
            Ok(r) => prop_assert!(r.recommendations.len() <= recommendation_api::MAX_K),
            Err(e) => prop_assert!(e.status().is_client_error(), "{e:?}"),
        }
    }
}
