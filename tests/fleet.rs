//! End to end, on a real broker: what a user of the platform would check after sending
//! activity and an order over HTTP.

use std::time::Duration;

use e2e::Fleet;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use testkit::eventually;

const USER: &str = "e2e-shopper";
const PATIENCE: Duration = Duration::from_secs(60);

async fn get_json(fleet: &Fleet, service: &str, path: &str) -> Option<Value> {
    let resp = fleet.http().get(fleet.url(service, path)).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

async fn post(fleet: &Fleet, service: &str, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    let resp = fleet.http().post(fleet.url(service, path)).json(body).send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn activity_and_orders_flow_to_recommendations_analytics_features_and_ui() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let catalog = catalog_books();

    // A shopper browses three books and puts the last one in the cart; the first event is
    // sent twice (a client retry with the same eventId).
    let events: Vec<Value> = catalog
        .iter()
        .take(3)
        .enumerate()
        .map(|(i, id)| json!({"eventId": format!("e2e-view-{i}"), "userId": USER, "eventType": "product_view", "productId": id}))
        .chain([json!({"eventId": "e2e-cart", "userId": USER, "eventType": "add_to_cart", "productId": catalog[2]})])
        .collect();
    let (status, body) = post(&fleet, "user-activity", "/api/users/activity", &Value::Array(events.clone())).await?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["eventIds"].as_array().map(Vec::len), Some(4));
    let (status, _) = post(&fleet, "user-activity", "/api/users/activity", &events[0]).await?;
    assert_eq!(status, 202, "a retry is accepted");

    // Another shopper buys the first book (so the first shopper's book has a buyer).
    let price = catalog_price(&catalog[3]);
    let order = json!({"eventId": "e2e-order", "orderId": "o-1", "userId": "e2e-buyer",
        "items": [{"productId": catalog[3], "quantity": 2, "unitPrice": price}], "amount": 2.0 * price});
    let (status, body) = post(&fleet, "order", "/api/orders/place", &order).await?;
    assert_eq!(status, 202, "{body}");

    // An empty body publishes a random, realistic event.
    let (status, body) = post(&fleet, "user-activity", "/api/users/activity", &json!({})).await?;
    assert_eq!(status, 202, "{body}");

    // Invalid input is a 4xx naming the field, and nothing reaches the topic.
    let (status, body) =
        post(&fleet, "user-activity", "/api/users/activity", &json!({"userId": USER, "eventType": "teleport"})).await?;
    assert_eq!((status, body["field"].as_str()), (400, Some("eventType")), "{body}");
    let (status, body) = post(
        &fleet,
        "order",
        "/api/orders/place",
        &json!({"userId": "x", "items": [{"productId": catalog[0], "quantity": 1, "unitPrice": 1.0}], "amount": 5.0}),
    )
    .await?;
    assert_eq!((status, body["field"].as_str()), (400, Some("amount")), "{body}");

    // A foreign producer writes garbage straight into the topic: it becomes a dead letter.
    let raw: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", fleet.broker.bootstrap()).create()?;
    raw.send(FutureRecord::to("user-activity-topic").key(USER).payload("{not json"), Duration::from_secs(5))
        .await
        .map_err(|(e, _)| e)?;

    // Recommendations: known (not cold start), mostly books, led by what the shopper looked at.
    let recs = eventually("personal recommendations", PATIENCE, || async {
        get_json(&fleet, "recommendation-api", &format!("/recommend/{USER}?k=10"))
            .await
            .filter(|r| r["coldStart"] == false && r["recommendations"].as_array().is_some_and(|a| a.len() == 10))
    })
    .await?;
    let items = recs["recommendations"].as_array().cloned().unwrap_or_default();
    let books = items.iter().filter(|i| i["category"] == "books").count();
    assert!(books >= 6, "most recommendations should be books: {recs}");
    let viewed_in_top: Vec<_> = items
        .iter()
        .take(5)
        .filter(|i| catalog[..3].contains(&i["itemId"].as_str().unwrap_or("").to_owned()))
        .collect();
    assert!(!viewed_in_top.is_empty(), "retargeting puts a viewed book in the top 5: {recs}");
    assert!(recs["requestId"].as_str().is_some_and(|s| !s.is_empty()));

    // A new view changes the recommendations: the list is re-ranked after the view, and the
    // shopper's toys now show up. (How long that takes is measured by the benchmarks; here
    // it is only printed.)
    let time = |r: &Value| r["generatedAt"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
    let before = time(&recs).expect("generatedAt");
    let toy = catalog::Catalog::demo().in_category("toys").nth(5).expect("a toy").id.clone();
    let viewed_at = std::time::Instant::now();
    let view = json!({"userId": USER, "eventType": "product_view", "productId": toy});
    let (status, body) = post(&fleet, "user-activity", "/api/users/activity", &view).await?;
    assert_eq!(status, 202, "{body}");
    let after = eventually("recommendations updated by the view", PATIENCE, || async {
        get_json(&fleet, "recommendation-api", &format!("/recommend/{USER}?k=50"))
            .await
            .filter(|r| time(r).is_some_and(|t| t > before))
    })
    .await?;
    eprintln!("a view changed the recommendations after {:?} (polling every 100 ms)", viewed_at.elapsed());
    let ranked: Vec<&str> =
        after["recommendations"].as_array().into_iter().flatten().filter_map(|i| i["itemId"].as_str()).collect();
    assert!(ranked.contains(&toy.as_str()), "the viewed toy is a candidate now: {after}");

    // Unknown users get a cold-start list, not an error.
    let cold = get_json(&fleet, "recommendation-api", "/recommend/nobody-at-all?k=3").await.expect("cold start answer");
    assert_eq!((cold["coldStart"].as_bool(), cold["recommendations"].as_array().map(Vec::len)), (Some(true), Some(3)));

    // Analytics counts the events exactly once despite the retry.
    let user_stats = eventually("analytics for the shopper", PATIENCE, || async {
        get_json(&fleet, "analytics", &format!("/api/analytics/user/{USER}"))
            .await
            .filter(|u| u["counts"]["addToCart"] == 1 && u["counts"]["productViews"].as_u64() >= Some(4))
    })
    .await?;
    // Three books and the toy; the retried book view counts once.
    assert_eq!(user_stats["counts"]["productViews"], 4, "the retried event counts once: {user_stats}");
    let summary = eventually("the order in the summary", PATIENCE, || async {
        get_json(&fleet, "analytics", "/api/analytics/summary").await.filter(|s| s["orders"] == 1)
    })
    .await?;
    assert!(summary["totals"]["productViews"].as_u64() >= Some(3), "{summary}");
    assert!((summary["revenue"].as_f64().unwrap_or(0.0) - 2.0 * price).abs() < 0.01, "{summary}");

    // Features.
    let features = get_json(&fleet, "feature-store", &format!("/features/{USER}")).await.expect("features");
    assert_eq!(features["cart"], json!([catalog[2]]));
    assert_eq!(features["recentlyViewed"], json!([toy, catalog[2], catalog[1], catalog[0]]));
    assert_eq!(features["windows"]["last1h"]["productViews"], 4, "{features}");
    assert_eq!(features["session"]["currentEvents"], 5, "{features}");
    assert_eq!(features["preferredCategory"], "books");
    assert!(features["updatedAt"].as_str().is_some());
    let resp = fleet.http().get(fleet.url("feature-store", "/features/nobody-at-all")).send().await?;
    assert_eq!(resp.status().as_u16(), 404);

    // Candidates carry their sources; the ranked list explains its scores.
    let candidates = get_json(&fleet, "retrieval", &format!("/retrieve/{USER}")).await.expect("candidates");
    assert!(candidates["candidates"].as_array().is_some_and(|c| c.iter().any(|c| c["source"] == "retargeting")));
    let ranked = get_json(&fleet, "ranking", &format!("/rank/{USER}")).await.expect("ranked");
    assert!(ranked["items"][0]["contributions"].as_object().is_some_and(|c| !c.is_empty()), "{ranked}");

    // A user id in a path follows the rules of an event's userId: trimmed (ingestion stored
    // the trimmed id, so that is what is found), and an id no event could carry is a 400.
    let padded = get_json(&fleet, "recommendation-api", &format!("/recommend/%20{USER}%09?k=3")).await;
    assert_eq!(
        padded.as_ref().map(|r| (r["userId"].clone(), r["coldStart"].clone())),
        Some((json!(USER), json!(false)))
    );
    let padded = get_json(&fleet, "feature-store", &format!("/features/%20{USER}%20")).await;
    assert_eq!(padded.map(|f| f["cart"].clone()), Some(json!([catalog[2]])));
    let overlong = "u".repeat(events::validate::MAX_ID_LEN + 1);
    for (service, path) in [
        ("recommendation-api", "/recommend/"),
        ("feature-store", "/features/"),
        ("analytics", "/api/analytics/user/"),
        ("retrieval", "/retrieve/"),
        ("ranking", "/rank/"),
        ("rl-offer", "/offer/"),
    ] {
        for bad in [overlong.as_str(), "%20%20", "u%011"] {
            let resp = fleet.http().get(fleet.url(service, &format!("{path}{bad}"))).send().await?;
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            assert_eq!((status, body["field"].as_str()), (400, Some("userId")), "{service} {path}{bad}: {body}");
        }
    }

    // Offers: decide now through the API; the recommendation API shows the current offer.
    let (status, decision) = post(
        &fleet,
        "rl-offer",
        "/offer/select",
        &json!({"userId": USER, "context": {"purchaseIntent": 0.9, "recency": 1.0}}),
    )
    .await?;
    assert_eq!(
        (status, decision["policy"].as_str(), decision["trigger"].as_str()),
        (200, Some("linucb-v1"), Some("api"))
    );
    assert!(decision["propensity"].as_f64().is_some_and(|p| p > 0.0 && p <= 1.0), "{decision}");
    assert!(decision["explanation"].as_str().is_some_and(|e| e.contains("LinUCB")), "{decision}");
    let decision_id = decision["decisionId"].clone();
    eventually("the offer in the recommendation response", PATIENCE, || async {
        get_json(&fleet, "recommendation-api", &format!("/recommend/{USER}"))
            .await
            .filter(|r| r["offer"]["decisionId"] == decision_id)
    })
    .await?;
    // An order naming the decision is its reward: the policy learns from it.
    let order = json!({"userId": USER, "offerDecisionId": decision_id,
        "items": [{"productId": catalog[2], "quantity": 1, "unitPrice": catalog_price(&catalog[2])}],
        "amount": catalog_price(&catalog[2])});
    let (status, body) = post(&fleet, "order", "/api/orders/place", &order).await?;
    assert_eq!(status, 202, "{body}");
    eventually("the offer's reward learned", PATIENCE, || async {
        get_json(&fleet, "rl-offer", "/api/offers/policy").await.filter(|p| p["converted"] == 1 && p["learned"] == 1)
    })
    .await?;

    // The dead letter, with the original payload and the reason.
    let letters = eventually("the dead letter", PATIENCE, || async {
        get_json(&fleet, "event-processor", "/api/dead-letters")
            .await
            .filter(|l| l.as_array().is_some_and(|a| !a.is_empty()))
    })
    .await?;
    assert_eq!(letters[0]["payload"], "{not json");
    assert_eq!(letters[0]["source"]["topic"], "user-activity-topic");
    assert!(letters[0]["reason"].as_str().is_some_and(|r| r.contains("JSON")), "{letters}");

    // The dead-letter tool lists it, and replays the original bytes to the source topic: they
    // are rejected again, from a new offset.
    let bootstrap = fleet.broker.bootstrap();
    let listed = retargetiq::dead_letters::list(&bootstrap).await?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(retargetiq::dead_letters::replay(&bootstrap, &["no-such-id".to_owned()], false).await.is_err());
    assert_eq!(retargetiq::dead_letters::replay(&bootstrap, &[listed[0].dead_letter_id.clone()], false).await?, 1);
    let again = eventually("the replayed message's dead letter", PATIENCE, || async {
        get_json(&fleet, "event-processor", "/api/dead-letters")
            .await
            .filter(|l| l.as_array().is_some_and(|a| a.len() == 2))
    })
    .await?;
    assert_eq!(again[0]["payload"], "{not json");
    assert_ne!(again[0]["source"]["offset"], again[1]["source"]["offset"], "{again}");

    // The same through the processor's operations endpoint, which needs the token.
    let replay = fleet.url("event-processor", "/api/dead-letters/replay");
    let body = json!({"ids": [listed[0].dead_letter_id]});
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(status(fleet.http().post(&replay).json(&body).send().await?), 401, "no token");
    let wrong = fleet.http().post(&replay).bearer_auth("not-the-operations-token").json(&body).send().await?;
    assert_eq!(status(wrong), 401, "wrong token");
    let bad = fleet.http().post(&replay).bearer_auth(e2e::OPS_TOKEN).json(&json!({"ids": ["nope"]})).send().await?;
    assert_eq!(status(bad), 400, "unknown id");
    let ok = fleet.http().post(&replay).bearer_auth(e2e::OPS_TOKEN).json(&body).send().await?;
    assert_eq!(ok.json::<Value>().await?["replayed"], 1);
    eventually("the third dead letter", PATIENCE, || async {
        get_json(&fleet, "event-processor", "/api/dead-letters")
            .await
            .filter(|l| l.as_array().is_some_and(|a| a.len() == 3))
    })
    .await?;

    // Resetting a user's features needs the token too.
    let reset = fleet.url("feature-store", "/features/e2e-buyer");
    assert_eq!(status(fleet.http().delete(&reset).send().await?), 401);
    assert_eq!(status(fleet.http().delete(&reset).bearer_auth(e2e::OPS_TOKEN).send().await?), 204);
    assert_eq!(status(fleet.http().get(&reset).send().await?), 404);

    // The UI answers with the live figures and the shopper's page.
    // (Two orders by now: the other shopper's and the one that rewarded the offer.)
    let url = fleet.url("frontend-ui", "/");
    let html = eventually("the dashboard with both orders", PATIENCE, || async {
        let html = fleet.http().get(&url).send().await.ok()?.text().await.ok()?;
        html.contains("id=\"kpi-orders\">2<").then_some(html)
    })
    .await?;
    assert!(html.contains("id=\"kpi-events\""), "{html}");
    let html = fleet.http().get(fleet.url("frontend-ui", &format!("/users/{USER}"))).send().await?.text().await?;
    assert!(html.contains("class=\"rec\"") && html.contains(&catalog[2]), "{html}");

    // The ingestion services describe themselves.
    for (service, path) in [("user-activity", "/api/users/activity"), ("order", "/api/orders/place")] {
        let doc = get_json(&fleet, service, "/openapi.json").await.expect("an OpenAPI document");
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["paths"][path]["post"]["responses"]["202"].is_object(), "{doc}");
    }

    // Every service exposes Prometheus metrics.
    let metrics = fleet.http().get(fleet.url("event-processor", "/metrics")).send().await?.text().await?;
    assert!(metrics.contains("consumer_messages_total"), "{metrics}");

    fleet.stop().await
}

/// Book ids from the catalog: the first three the shopper views, the fourth bought by someone else.
fn catalog_books() -> Vec<String> {
    catalog::Catalog::demo().in_category("books").skip(5).take(4).map(|p| p.id.clone()).collect()
}

fn catalog_price(id: &str) -> f64 {
    catalog::Catalog::demo().get(id).map_or(0.0, |p| p.price)
}

/// A client's `eventId` is unique only for its user: two shoppers whose apps both number
/// their events from "1" send two events each, and a retry of one of them still counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_users_may_send_the_same_client_event_id() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let books = catalog_books();
    let (ann, bob) = ("same-id-ann", "same-id-bob");
    for user in [ann, bob] {
        let events = json!([
            {"eventId": "1", "userId": user, "eventType": "product_view", "productId": books[0]},
            {"eventId": "e-1", "userId": user, "eventType": "add_to_cart", "productId": books[1]},
        ]);
        let (status, body) = post(&fleet, "user-activity", "/api/users/activity", &events).await?;
        assert_eq!(status, 202, "{body}");
    }
    // Ann's app retries her first event.
    let retry = json!({"eventId": "1", "userId": ann, "eventType": "product_view", "productId": books[0]});
    let (status, body) = post(&fleet, "user-activity", "/api/users/activity", &retry).await?;
    assert_eq!(status, 202, "{body}");
    let order = |user: &str| {
        let price = catalog_price(&books[1]);
        json!({"eventId": "o-1", "orderId": "o-1", "userId": user,
            "items": [{"productId": books[1], "quantity": 1, "unitPrice": price}], "amount": price})
    };
    for user in [ann, bob] {
        let (status, body) = post(&fleet, "order", "/api/orders/place", &order(user)).await?;
        assert_eq!(status, 202, "{body}");
    }

    for user in [ann, bob] {
        let stats = eventually(&format!("analytics for {user}"), PATIENCE, || async {
            get_json(&fleet, "analytics", &format!("/api/analytics/user/{user}"))
                .await
                .filter(|u| u["counts"]["addToCart"] == 1 && u["counts"]["purchases"] == 1)
        })
        .await?;
        assert_eq!(stats["counts"]["productViews"], 1, "{user}: {stats}");
        let features = eventually(&format!("features of {user}"), PATIENCE, || async {
            get_json(&fleet, "feature-store", &format!("/features/{user}"))
                .await
                .filter(|f| f["counts"]["purchases"] == 1)
        })
        .await?;
        assert_eq!(features["counts"]["productViews"], 1, "{user}: {features}");
        assert_eq!(features["counts"]["addToCart"], 1, "{user}: {features}");
    }
    let summary = eventually("both orders in the summary", PATIENCE, || async {
        get_json(&fleet, "analytics", "/api/analytics/summary").await.filter(|s| s["orders"] == 2)
    })
    .await?;
    assert_eq!(summary["totals"]["productViews"], 2, "{summary}");
    fleet.stop().await
}

async fn put_products(fleet: &Fleet, products: Value) -> anyhow::Result<()> {
    let resp = fleet.http().put(fleet.url("user-activity", "/api/catalog/products")).json(&products).send().await?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    anyhow::ensure!(status == 202, "PUT /api/catalog/products answered {status}: {body}");
    Ok(())
}

/// A shop's own catalog: its product ids are accepted, a product that arrives after its first
/// events is enriched from then on, and price changes and withdrawals reach the recommendation
/// response live, with no restart and no new event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shops_own_catalog_flows_live_through_the_pipeline() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let user = "shop-customer";
    put_products(
        &fleet,
        json!([{"productId": "SKU-RED-SHOE-42", "name": "Red shoe", "category": "shoes", "price": 59.9, "brand": "Acme"},
               {"productId": "SKU-BLUE-SHOE-43", "name": "Blue shoe", "category": "shoes", "price": 20.0}]),
    )
    .await?;
    let view = |id: &str, product: &str| json!({"eventId": id, "userId": user, "eventType": "product_view", "productId": product});

    // A product the catalog does not have yet: accepted, enriched as unknown, counted.
    let (status, body) = post(&fleet, "user-activity", "/api/users/activity", &view("v1", "SKU-LATE-BOOT")).await?;
    assert_eq!(status, 202, "{body}");
    eventually("the unknown product counted", PATIENCE, || async {
        let stats = get_json(&fleet, "event-processor", "/api/processor/stats").await?;
        (stats["unknownProducts"].as_u64() >= Some(1)).then_some(())
    })
    .await?;
    // ... and shown: analytics counts it for the dashboard's tile.
    eventually("the unknown product in analytics", PATIENCE, || async {
        let summary = get_json(&fleet, "analytics", "/api/analytics/summary").await?;
        (summary["windows"]["all"]["unknownProductEvents"].as_u64() >= Some(1)).then_some(())
    })
    .await?;
    let features = eventually("the first view in the features", PATIENCE, || async {
        get_json(&fleet, "feature-store", &format!("/features/{user}"))
            .await
            .filter(|f| f["counts"]["productViews"] == 1)
    })
    .await?;
    assert_eq!(features["categoryAffinity"], json!({}), "an unknown product has no category: {features}");

    // The product arrives; the next events are enriched from it.
    put_products(
        &fleet,
        json!([{"productId": "SKU-LATE-BOOT", "name": "Late boot", "category": "boots", "price": 80.0}]),
    )
    .await?;
    let (status, body) = post(
        &fleet,
        "user-activity",
        "/api/users/activity",
        &json!([view("v2", "SKU-LATE-BOOT"), view("v3", "SKU-RED-SHOE-42")]),
    )
    .await?;
    assert_eq!(status, 202, "{body}");
    eventually("boots and shoes in the affinities", PATIENCE, || async {
        let f = get_json(&fleet, "feature-store", &format!("/features/{user}")).await?;
        (f["categoryAffinity"].get("boots").is_some() && f["categoryAffinity"].get("shoes").is_some()).then_some(())
    })
    .await?;

    // Retrieval and the recommendation response know the shop's products.
    eventually("the shop's products among the candidates", PATIENCE, || async {
        let c = get_json(&fleet, "retrieval", &format!("/retrieve/{user}")).await?;
        let ids: Vec<&str> = c["candidates"].as_array()?.iter().filter_map(|c| c["productId"].as_str()).collect();
        (ids.contains(&"SKU-RED-SHOE-42") && ids.contains(&"SKU-LATE-BOOT")).then_some(())
    })
    .await?;
    let shown = |price: Option<f64>| {
        let fleet = &fleet;
        async move {
            let r = get_json(fleet, "recommendation-api", &format!("/recommend/{user}?k=5")).await?;
            let red = r["recommendations"].as_array()?.iter().find(|i| i["itemId"] == "SKU-RED-SHOE-42").cloned();
            match (price, red) {
                (Some(p), Some(item)) if item["price"].as_f64() == Some(p) && item["name"] == "Red shoe" => Some(()),
                (None, None) if r["coldStart"] == false => Some(()),
                _ => None,
            }
        }
    };
    eventually("the red shoe recommended at its price", PATIENCE, || shown(Some(59.9))).await?;

    // A price change reaches the response with no new event; a withdrawn product leaves it.
    put_products(
        &fleet,
        json!([{"productId": "SKU-RED-SHOE-42", "name": "Red shoe", "category": "shoes", "price": 49.9}]),
    )
    .await?;
    eventually("the new price in the response", PATIENCE, || shown(Some(49.9))).await?;
    put_products(
        &fleet,
        json!([{"productId": "SKU-RED-SHOE-42", "name": "Red shoe", "category": "shoes", "price": 49.9, "available": false}]),
    )
    .await?;
    eventually("the withdrawn product out of the response", PATIENCE, || shown(None)).await?;

    // Bad products are a 400 naming the element and the field; nothing reaches the topic.
    let resp = fleet
        .http()
        .put(fleet.url("user-activity", "/api/catalog/products"))
        .json(&json!([{"productId": "ok", "name": "n", "category": "c", "price": 1}, {"productId": "x", "name": "n", "category": "c", "price": -3}]))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(resp.json::<Value>().await?["field"], "[1].price");

    // `retargetiq catalog import`: good lines go in (in batches), bad ones are reported by
    // line number, and the imported products reach the services. The file starts with a
    // byte-order mark, as spreadsheets and some editors write it.
    let file = std::env::temp_dir().join(format!("catalog-import-{}.jsonl", std::process::id()));
    std::fs::write(
        &file,
        [
            "\u{feff}{\"productId\":\"IMP-1\",\"name\":\"Imported one\",\"category\":\"imports\",\"price\":10}",
            "",
            r#"{"productId":"IMP-2","name":"Imported two","category":"imports","price":-1}"#,
            "not json",
            r#"{"productId":"IMP-3","name":"Imported three","category":"imports","price":12.5}"#,
            r#"{"productId":"IMP-4","name":"Imported four","category":"imports","price":13}"#,
            r#"{"productId":"IMP-5","name":"Imported five","category":"imports","price":14,"price":1}"#,
        ]
        .join("\n"),
    )?;
    let args = retargetiq::catalog_import::ImportArgs {
        file: file.clone(),
        url: format!("http://{}", fleet.addrs["user-activity"]),
        batch: 2,
    };
    let summary = retargetiq::catalog_import::run(&args).await?;
    std::fs::remove_file(&file)?;
    assert_eq!((summary.lines, summary.accepted), (6, 3), "{}", summary.report());
    let lines: Vec<u64> = summary.rejected.iter().map(|(line, _)| *line).collect();
    assert_eq!(lines, [3, 4, 7], "{}", summary.report());
    assert!(summary.rejected[0].1.contains("price"), "{}", summary.report());
    assert!(summary.rejected[2].1.contains(r#"the key "price" is given twice"#), "{}", summary.report());
    eventually("the imported category in the recommendation API", PATIENCE, || async {
        let r = get_json(&fleet, "recommendation-api", "/recommend/someone-new?category=imports").await?;
        (r["recommendations"].as_array()?.len() == 3).then_some(())
    })
    .await?;

    // `retargetiq events import` of a REES46 file (a line out of time order, so it is sorted):
    // its products go to the catalog, its views, carts and purchases through the ingestion
    // APIs in time order; a second import stores nothing twice.
    let history = std::env::temp_dir().join(format!("events-import-{}.csv", std::process::id()));
    std::fs::write(
        &history,
        "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n\
         2019-10-01 02:03:00 UTC,view,5002,7,appliances.kettle,,12.00,r46-user,s1\n\
         2019-10-01 02:00:00 UTC,view,5001,7,appliances.kettle,acme,30.50,r46-user,s1\n\
         2019-10-01 02:01:00 UTC,cart,5001,7,appliances.kettle,acme,30.50,r46-user,s1\n\
         2019-10-01 02:02:00 UTC,purchase,5001,7,appliances.kettle,acme,30.50,r46-user,s1\n\
         garbage line\n",
    )?;
    let args = retargetiq::events_import::ImportArgs {
        file: history.clone(),
        format: evaluation::history::Format::Rees46,
        rate: 0.0,
        batch: 500,
        user_activity_url: format!("http://{}", fleet.addrs["user-activity"]),
        order_url: format!("http://{}", fleet.addrs["order"]),
    };
    for _ in 0..2 {
        let summary = retargetiq::events_import::run(&args).await?;
        assert_eq!(
            (summary.products, summary.activity, summary.orders, summary.skipped),
            (2, 3, 1, 1),
            "{}",
            summary.report()
        );
    }
    std::fs::remove_file(&history)?;
    let stats = eventually("the imported history in analytics", PATIENCE, || async {
        get_json(&fleet, "analytics", "/api/analytics/user/r46-user").await.filter(|u| u["orders"] == 1)
    })
    .await?;
    assert_eq!(
        (stats["counts"]["productViews"].as_u64(), stats["counts"]["addToCart"].as_u64()),
        (Some(2), Some(1)),
        "{stats}"
    );
    assert!((stats["revenue"].as_f64().unwrap_or(0.0) - 30.5).abs() < 1e-9, "{stats}");
    fleet.stop().await
}

/// A catalog feed written straight to `catalog-topic` (as a shop's own catalog pipeline may),
/// then, once the broker has it, events for its products through the API: each event is
/// enriched from the feed, though the processor's catalog consumer is still applying the feed
/// when the event reaches the processor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_sent_after_its_product_is_enriched_from_it() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    // The feed reaches the broker in a few large batches, at about the same moment.
    let settings = kit::kafka::KafkaSettings { linger: Duration::from_secs(1), ..fleet.broker.settings() };
    let producer = kit::kafka::Producer::for_pipeline(&settings)?;
    let now = chrono::Utc::now();
    let feed: Vec<events::CatalogProduct> = (0..20_000)
        .map(|i| {
            let product = catalog::Product {
                id: format!("FEED-{i}"),
                name: format!("Feed product {i}"),
                category: format!("feed-{}", i % 8),
                price: 10.0 + f64::from(i % 50),
                brand: None,
                available: true,
                popularity: 0.0,
            };
            events::CatalogProduct::of(&product, now)
        })
        .collect();
    for sent in futures::future::join_all(feed.iter().map(|p| producer.send(p, None))).await {
        sent?;
    }
    let view = json!({"eventId": "feed-view", "userId": "feed-shopper", "eventType": "product_view", "productId": "FEED-19999"});
    let (status, body) = post(&fleet, "user-activity", "/api/users/activity", &view).await?;
    assert_eq!(status, 202, "{body}");
    let stats = eventually("the event processed", PATIENCE, || async {
        get_json(&fleet, "event-processor", "/api/processor/stats").await.filter(|s| s["processed"] == 1)
    })
    .await?;
    assert_eq!(stats["unknownProducts"], 0, "the event was enriched as an unknown product: {stats}");
    fleet.stop().await
}

/// `retargetiq evaluate --live`: a small REES46-style history goes through the running fleet's
/// APIs, each returning user's list comes from `GET /recommend`, and the figures agree with
/// the in-memory replay of the same events computed in the same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_live_evaluation_scores_the_running_stack_like_the_replay() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let mut lines =
        vec!["event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session".to_owned()];
    for u in 0..30 {
        let (user, session) = (format!("live-eval-{u}"), format!("les-{u}"));
        // Three phones viewed in one session; the first viewed twice (the one they come back to).
        for (minute, phone) in [(0, 10 + u % 7), (1, 20 + u % 5), (2, 10 + u % 7), (3, 30 + u % 3)] {
            lines.push(format!(
                "2019-10-01 02:{minute:02}:00 UTC,view,LIVE-{phone},1,electronics.smartphone,acme,{}.5,{user},{session}",
                100 + phone
            ));
        }
        lines.push(format!(
            "2019-10-01 02:50:00 UTC,view,LIVE-{},1,electronics.smartphone,acme,110.5,{user},{session}-later",
            10 + u % 7
        ));
    }
    let file = std::env::temp_dir().join(format!("live-eval-{}.csv", std::process::id()));
    std::fs::write(&file, lines.join("\n"))?;
    let options = evaluation::history::Options {
        events: file.clone(),
        format: evaluation::history::Format::Rees46,
        holdout_hours: 0.05,
        k: 10,
        validation: false,
    };
    let stack = evaluation::live::Stack {
        endpoints: evaluation::import::Endpoints {
            user_activity: fleet.url("user-activity", ""),
            order: fleet.url("order", ""),
        },
        recommend: fleet.url("recommendation-api", ""),
        metrics: fleet.addrs.keys().map(|service| fleet.url(service, "/metrics")).collect(),
        patience: Duration::from_secs(120),
    };
    let report = evaluation::live::run(&options, &stack).await?;
    std::fs::remove_file(&file)?;
    let live = report.methods[evaluation::history::PLATFORM];
    let replayed = report.methods[evaluation::live::PLATFORM_REPLAYED];
    assert_eq!((report.users, report.training_events), (30, 120), "{}", report.markdown());
    // Everyone came back to the phone they viewed twice: both find it.
    assert_eq!(replayed.hit_rate, 1.0, "{}", report.markdown());
    assert_eq!(live.hit_rate, 1.0, "{}", report.markdown());
    assert!((live.mrr - replayed.mrr).abs() < 0.1, "{}", report.markdown());
    fleet.stop().await
}
