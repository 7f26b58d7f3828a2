//! The kit's consumer loop against a real broker: outputs are produced; poison messages —
//! bytes that are not JSON, JSON of the wrong shape, and a message the handler fails on every
//! time — land in the dead-letter topic with their original bytes after a bounded number of
//! attempts, and the partition keeps flowing past them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use events::{DeadLetter, DeadLetterKind, Topic, UserFeatures};
use kit::kafka::consumer::ConsumerEnv;
use kit::kafka::{ConsumerSpec, Handler, HandlerError, Outbox, Producer, Record, run_consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use testkit::{TestBroker, eventually};
use tokio_util::sync::CancellationToken;

/// Turns each `{"userId": ..}` into a feature snapshot; rejects anything else.
struct Echo;

impl Handler for Echo {
    fn handle(&mut self, record: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        let v = record.value()?;
        let user = v["userId"].as_str().ok_or_else(|| HandlerError::malformed("no userId"))?;
        if user == "poison" {
            return Err(HandlerError::Retry(anyhow::anyhow!("the downstream fails on this one every time")));
        }
        out.send(&UserFeatures { user_id: user.to_owned(), ..Default::default() });
        Ok(())
    }
}

/// Collects everything it reads.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<Vec<u8>>>>);

impl Handler for Collect {
    fn handle(&mut self, record: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        self.0.lock().expect("lock").push(record.payload.to_vec());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outputs_and_dead_letters_flow_through_a_real_broker() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let settings = broker.settings();
    let raw: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create()?;
    let payloads: [&[u8]; 5] = [
        br#"{"userId":"a"}"#,
        b"\x00garbage",
        br#"{"user":"wrong schema"}"#,
        br#"{"userId":"poison"}"#,
        br#"{"userId":"b"}"#,
    ];
    for payload in payloads {
        raw.send(FutureRecord::to(Topic::UserActivity.name()).key("k").payload(payload), Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)?;
    }

    let shutdown = CancellationToken::new();
    let producer = Producer::for_pipeline(&settings)?;
    let env = |name: &str| ConsumerEnv {
        settings: settings.clone(),
        service: "test",
        producer: producer.clone(),
        shutdown: shutdown.clone(),
        ready: kit::http::Health::default().condition(name),
    };
    let main =
        tokio::spawn(run_consumer(env("main"), ConsumerSpec::group("main", [Topic::UserActivity], "test-main"), Echo));
    let features = Collect::default();
    let letters = Collect::default();
    tokio::spawn(run_consumer(env("f"), ConsumerSpec::replica("f", [Topic::UserFeatures]), features.clone()));
    tokio::spawn(run_consumer(env("d"), ConsumerSpec::replica("d", [Topic::DeadLetter]), letters.clone()));

    let users = eventually("two feature snapshots", Duration::from_secs(60), || {
        let got = features.0.lock().expect("lock").clone();
        async move { (got.len() >= 2).then_some(got) }
    })
    .await?;
    let users: Vec<String> =
        users.iter().map(|p| serde_json::from_slice::<UserFeatures>(p).expect("features").user_id).collect();
    assert_eq!(users.len(), 2);
    assert!(users.contains(&"a".to_owned()) && users.contains(&"b".to_owned()), "{users:?}");

    let both = eventually("three dead letters", Duration::from_secs(30), || {
        let got = letters.0.lock().expect("lock").clone();
        async move { (got.len() >= 3).then_some(got) }
    })
    .await?;
    assert_eq!(both.len(), 3, "one letter each, however many attempts");
    let schema: DeadLetter = serde_json::from_slice(&both[1])?;
    assert_eq!((schema.kind, schema.source.offset), (DeadLetterKind::Malformed, 2));
    assert!(schema.reason.contains("userId"), "{}", schema.reason);
    let failed: DeadLetter = serde_json::from_slice(&both[2])?;
    assert_eq!(failed.kind, DeadLetterKind::HandlerFailed);
    assert_eq!(failed.source.offset, 3);
    assert_eq!(failed.original_bytes().as_deref(), Some(&br#"{"userId":"poison"}"#[..]));
    assert!(failed.reason.contains("every time"), "{}", failed.reason);
    let letter: DeadLetter = serde_json::from_slice(&both[0])?;
    assert_eq!(letter.kind, DeadLetterKind::Malformed);
    assert_eq!(letter.source.topic, "user-activity-topic");
    assert_eq!(letter.source.offset, 1);
    assert_eq!(letter.original_bytes().as_deref(), Some(&b"\x00garbage"[..]));
    assert_eq!(letter.key, "k");

    shutdown.cancel();
    main.await??;
    Ok(())
}
