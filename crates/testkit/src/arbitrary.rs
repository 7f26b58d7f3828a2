//! Strategies for property tests: JSON documents that mix the names and values the
//! platform's validators know with anything at all.

use proptest::prelude::*;
use serde_json::Value;

/// Names the validators look at, and anything else.
pub fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "eventId",
            "userId",
            "sessionId",
            "eventType",
            "productId",
            "campaignId",
            "recommendationId",
            "query",
            "timestamp",
            "schemaVersion",
            "orderId",
            "items",
            "quantity",
            "unitPrice",
            "amount",
            "currency",
            "offerDecisionId",
        ])
        .prop_map(str::to_owned),
        ".{0,12}",
    ]
}

/// Any JSON document, a few levels deep, with values the validators know among the noise.
pub fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec!["product_view", "click", "P00042", "EUR", "2026-11-25T10:00:00Z", ""])
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
