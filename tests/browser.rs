//! The UI in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`),
//! driven over WebDriver, against the whole fleet on a real broker. Screenshots of every page
//! are kept in `artifacts/screenshots/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use e2e::Fleet;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use testkit::eventually;

const PATIENCE: Duration = Duration::from_secs(60);

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../artifacts/screenshots");
    std::fs::create_dir_all(&dir).expect("an artifacts directory");
    dir
}

async fn screenshot(browser: &Client, name: &str) -> anyhow::Result<()> {
    let png = browser.screenshot().await?;
    std::fs::write(screenshots().join(format!("{name}.png")), png)?;
    Ok(())
}

async fn text_of(browser: &Client, css: &str) -> Option<String> {
    browser.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

/// chromedriver on a free port, and a headless Chromium session through it.
async fn browser() -> anyhow::Result<(tokio::process::Child, Client)> {
    // The dependency graph enables two TLS back ends; pick one (WebDriver here is plain HTTP).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let driver = ["chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| std::process::Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
        .ok_or_else(|| anyhow::anyhow!("chromedriver not found: install Debian's chromium and chromium-driver"))?;
    let port = testkit::free_port()?;
    let child = tokio::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-dev-shm-usage", "--window-size=1400,1100"]}),
    );
    let url = format!("http://127.0.0.1:{port}");
    let client = eventually("chromedriver to start a session", Duration::from_secs(30), || {
        let (caps, url) = (caps.clone(), url.clone());
        async move { ClientBuilder::rustls().ok()?.capabilities(caps).connect(&url).await.ok() }
    })
    .await?;
    Ok((child, client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ui_in_a_real_browser() -> anyhow::Result<()> {
    let fleet = Fleet::start().await?;
    let (_driver, browser) = browser().await?;
    let ui = |path: &str| fleet.url("frontend-ui", path);

    // The dashboard renders, with its figures and a live feed that connects.
    browser.goto(&ui("/")).await?;
    assert_eq!(browser.title().await?, "Dashboard · RetargetIQ");
    let events_before: u64 = text_of(&browser, "#kpi-events").await.and_then(|t| t.parse().ok()).unwrap_or(u64::MAX);
    assert!(events_before < u64::MAX, "the events tile shows a number");
    eventually("the live feed to connect", PATIENCE, || async {
        text_of(&browser, "#live-status").await.filter(|s| s == "live")
    })
    .await?;

    // An event sent by someone else appears in the feed without a reload.
    let post = json!({"userId": "browser-live-<b>", "eventType": "product_view", "productId": "P00042"});
    let resp = fleet.http().post(fleet.url("user-activity", "/api/users/activity")).json(&post).send().await?;
    assert_eq!(resp.status().as_u16(), 202);
    let row = eventually("the event in the live feed", PATIENCE, || async {
        text_of(&browser, "#live-feed").await.filter(|t| t.contains("browser-live-<b>"))
    })
    .await?;
    assert!(row.contains("product_view"), "{row}");
    // It was escaped, not interpreted: no <b> element in the feed.
    assert!(browser.find(Locator::Css("#live-feed b")).await.is_err(), "user input must not become markup");
    screenshot(&browser, "dashboard-live").await?;

    // The simulate button goes through the real ingestion API: its events reach the feed and
    // the figures grow without touching the page.
    browser.find(Locator::Id("simulate-session")).await?.click().await?;
    let user = eventually("the simulated user's link", PATIENCE, || async {
        text_of(&browser, "#simulated-user").await.map(|t| t.trim_start_matches("Explore ").to_owned())
    })
    .await?;
    assert!(text_of(&browser, "#flash").await.is_some_and(|f| f.contains("live feed")));
    eventually("the simulated session in the live feed", PATIENCE, || async {
        text_of(&browser, "#live-feed").await.filter(|t| t.contains(&format!("{user} · add_to_cart")))
    })
    .await?;
    let grown = eventually("the events tile to grow", PATIENCE, || async {
        text_of(&browser, "#kpi-events").await.and_then(|t| t.parse::<u64>().ok()).filter(|n| *n >= events_before + 6)
    })
    .await?;
    assert!(grown >= events_before + 6, "a session is at least five events, plus the live one");
    screenshot(&browser, "dashboard").await?;

    // Other windows.
    browser.find(Locator::Id("window-all")).await?.click().await?;
    eventually("the all-time figures", PATIENCE, || async {
        text_of(&browser, "#windows strong").await.filter(|t| t == "all time")
    })
    .await?;

    // The user explorer: recent events, recommendations with sources, the explanation.
    browser.goto(&ui(&format!("/users/{user}"))).await?;
    eventually("the user's recommendations", PATIENCE, || async {
        let ok = browser.find(Locator::Css("#recommendations tr.rec")).await.is_ok()
            && browser.find(Locator::Css("#recent-events tr.recent")).await.is_ok();
        if ok {
            Some(())
        } else {
            browser.refresh().await.ok()?;
            None
        }
    })
    .await?;
    assert!(text_of(&browser, "#recent-events").await.is_some_and(|t| t.contains("add_to_cart")));
    assert!(text_of(&browser, "#explanation").await.is_some_and(|t| t.contains("category_affinity")));
    screenshot(&browser, "user").await?;

    // Searching for a user from the header.
    browser.goto(&ui("/")).await?;
    let search = browser.find(Locator::Id("user-search")).await?;
    search.send_keys("browser-live-<b>").await?;
    search.send_keys("\n").await?;
    eventually("the searched user's page", PATIENCE, || async {
        text_of(&browser, "#user-title").await.filter(|t| t == "browser-live-<b>")
    })
    .await?;

    // The dead-letter view shows why an event was rejected.
    let raw: rdkafka::producer::FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", fleet.broker.bootstrap()).create()?;
    raw.send(
        rdkafka::producer::FutureRecord::to("user-activity-topic").key("x").payload("<not json>"),
        Duration::from_secs(5),
    )
    .await
    .map_err(|(e, _)| e)?;
    browser.goto(&ui("/dead-letters")).await?;
    eventually("the dead letter with its reason", PATIENCE, || async {
        let t = text_of(&browser, "main").await?;
        if t.contains("not JSON") {
            Some(())
        } else {
            browser.refresh().await.ok()?;
            None
        }
    })
    .await?;
    screenshot(&browser, "dead-letters").await?;

    // A shop's own page calls the APIs from the browser (CORS): from the allowed origin it
    // sends JSON events, reads the answers (a refusal too) and the recommendations; the same
    // page from an origin not allowed can do neither.
    let calls_from = |page: String| {
        let (browser, args) = (
            &browser,
            vec![
                json!(fleet.url("user-activity", "/api/users/activity")),
                json!(fleet.url("recommendation-api", "/recommend/page-shopper?k=3")),
            ],
        );
        async move {
            browser.goto(&page).await?;
            anyhow::Ok(browser.execute_async(CALL_THE_APIS, args).await?)
        }
    };
    let from_the_page = calls_from(format!("{}/", fleet.allowed_origin)).await?;
    assert_eq!(from_the_page["event"]["status"], 202, "{from_the_page}");
    assert_eq!(from_the_page["event"]["body"]["accepted"], 1, "{from_the_page}");
    assert_eq!(from_the_page["refused"]["status"], 400, "{from_the_page}");
    assert_eq!(from_the_page["refused"]["body"]["field"], "eventType", "{from_the_page}");
    assert_eq!(from_the_page["recommend"]["status"], 200, "{from_the_page}");
    assert_eq!(from_the_page["recommend"]["body"]["recommendations"].as_array().map(Vec::len), Some(3));
    let elsewhere = fleet.url("frontend-ui", "/");
    assert_ne!(url_origin(&elsewhere), fleet.allowed_origin);
    let not_allowed = calls_from(elsewhere).await?;
    for call in ["event", "refused", "recommend"] {
        assert!(not_allowed[call]["blocked"].is_string(), "{call} from another origin: {not_allowed}");
    }
    // And the other origin's event was never sent: a marker for the same shopper, sent after
    // it (same key, same partition, so counted after anything sent before), is counted beside
    // the allowed page's one view and no second view.
    let marker = json!({"userId": "page-shopper", "eventType": "page_view"});
    let resp = fleet.http().post(fleet.url("user-activity", "/api/users/activity")).json(&marker).send().await?;
    assert_eq!(resp.status().as_u16(), 202);
    let counts = eventually("the marker counted", PATIENCE, || async {
        let user: serde_json::Value = fleet
            .http()
            .get(fleet.url("analytics", "/api/analytics/user/page-shopper"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (user["counts"]["pageViews"] == 1).then(|| user["counts"].clone())
    })
    .await?;
    assert_eq!(counts["productViews"], 1, "only the allowed page's view: {counts}");

    browser.close().await?;
    fleet.stop().await
}

/// `scheme://host:port` of a URL.
fn url_origin(url: &str) -> String {
    url.splitn(4, '/').take(3).collect::<Vec<_>>().join("/")
}

/// A page's script sending an event as JSON (which needs a preflight), an invalid one, and
/// asking for recommendations; each call's status and body, or `blocked` when the browser
/// refused it.
const CALL_THE_APIS: &str = r"
const [ingest, recommend, done] = arguments;
const call = async (url, init) => {
  try {
    const r = await fetch(url, init);
    return {status: r.status, body: await r.json()};
  } catch (e) {
    return {blocked: String(e)};
  }
};
const post = (event) => ({
  method: 'POST',
  headers: {'Content-Type': 'application/json', 'X-Correlation-Id': 'from-a-page'},
  body: JSON.stringify(event),
});
Promise.all([
  call(ingest, post({userId: 'page-shopper', eventType: 'product_view', productId: 'P00042'})),
  call(ingest, post({userId: 'page-shopper', eventType: 'teleport'})),
  call(recommend),
]).then(([event, refused, recommend]) => done({event, refused, recommend}));
";
