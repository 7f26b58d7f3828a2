//! The kit's consumer loop against a real broker: outputs are produced; poison messages —
//! bytes that are not JSON, JSON of the wrong shape, and a message the handler fails on every
//! time — land in the dead-letter topic with their original bytes after a bounded number of
//! attempts, and the partition keeps flowing past them. An output the producer refuses (too
//! large) dead-letters its message once, with the reason; replicas never write dead letters.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use events::{DeadLetter, DeadLetterKind, Topic, UserFeatures};
use kit::kafka::consumer::ConsumerEnv;
use kit::kafka::{CODECS, ConsumerSpec, Handler, HandlerError, Outbox, Producer, Record, run_consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use testkit::{TestBroker, eventually};
use tokio_util::sync::CancellationToken;

/// What a consumer of service "test" needs, stopping with `shutdown`.
fn consumer_env(
    settings: &kit::kafka::KafkaSettings,
    producer: &Producer,
    shutdown: &CancellationToken,
    name: &str,
) -> ConsumerEnv {
    ConsumerEnv {
        settings: settings.clone(),
        service: "test",
        producer: producer.clone(),
        shutdown: shutdown.clone(),
        ready: kit::http::Health::default().condition(name),
    }
}

/// Turns each `{"userId": ..}` into a feature snapshot; rejects anything else.
struct Echo;

impl Handler for Echo {
    fn handle(&mut self, record: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        let v = record.value()?;
        let user = v["userId"].as_str().ok_or_else(|| HandlerError::malformed("no userId"))?;
        if user == "poison" {
            return Err(HandlerError::Retry(anyhow::anyhow!("the downstream fails on this one every time")));
        }
        // Larger than the broker takes (message.max.bytes, 1 MB): refused by the client.
        let user_id = if user == "huge" { "x".repeat(2_000_000) } else { user.to_owned() };
        out.send(&UserFeatures { user_id, ..Default::default() });
        Ok(())
    }
}

/// Rejects everything it reads.
struct RejectAll;

impl Handler for RejectAll {
    fn handle(&mut self, _record: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        Err(HandlerError::malformed("this reader takes nothing"))
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
    let payloads: [&[u8]; 7] = [
        br#"{"userId":"a"}"#,
        b"\x00garbage",
        br#"{"user":"wrong schema"}"#,
        br#"{"userId":"poison"}"#,
        br#"{"userId":"b"}"#,
        br#"{"userId":"huge"}"#,
        br#"{"userId":"c"}"#,
    ];
    for payload in payloads {
        raw.send(FutureRecord::to(Topic::UserActivity.name()).key("k").payload(payload), Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)?;
    }

    let shutdown = CancellationToken::new();
    let producer = Producer::for_pipeline(&settings)?;
    let env = |name: &str| consumer_env(&settings, &producer, &shutdown, name);
    let main =
        tokio::spawn(run_consumer(env("main"), ConsumerSpec::group("main", [Topic::UserActivity], "test-main"), Echo));
    let features = Collect::default();
    let letters = Collect::default();
    tokio::spawn(run_consumer(env("f"), ConsumerSpec::replica("f", [Topic::UserFeatures]), features.clone()));
    tokio::spawn(run_consumer(env("d"), ConsumerSpec::replica("d", [Topic::DeadLetter]), letters.clone()));
    // A replica of the same topic that refuses every message: it must write no dead letter.
    tokio::spawn(run_consumer(env("r"), ConsumerSpec::replica("r", [Topic::UserActivity]), RejectAll));

    let users = eventually("three feature snapshots", Duration::from_secs(60), || {
        let got = features.0.lock().expect("lock").clone();
        async move { (got.len() >= 3).then_some(got) }
    })
    .await?;
    let users: Vec<String> =
        users.iter().map(|p| serde_json::from_slice::<UserFeatures>(p).expect("features").user_id).collect();
    assert_eq!(users, ["a", "b", "c"], "the partition flows past the refused output");

    eventually("four dead letters", Duration::from_secs(30), || {
        let n = letters.0.lock().expect("lock").len();
        async move { (n >= 4).then_some(()) }
    })
    .await?;
    // Give a misbehaving replica time to add its own.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = letters.0.lock().expect("lock").clone();
    assert_eq!(all.len(), 4, "one letter each, however many attempts, and none from the replica");
    let huge: DeadLetter = serde_json::from_slice(&all[3])?;
    assert_eq!((huge.kind, huge.source.offset), (DeadLetterKind::HandlerFailed, 5));
    assert!(huge.reason.contains("refused"), "{}", huge.reason);
    assert_eq!(huge.original_bytes().as_deref(), Some(&br#"{"userId":"huge"}"#[..]));
    let both = all[..3].to_vec();
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

/// Records from a producer using any of Kafka's codecs are read (zstd is the Java client's
/// usual choice; a consumer built without it stalls on the first such batch, for ever), and
/// the kit's own producer takes every codec that `KAFKA_COMPRESSION` accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_compressed_with_any_kafka_codec_are_read() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let mut sent = Vec::new();
    for codec in CODECS {
        let raw: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .set("compression.type", codec)
            .set("linger.ms", "20")
            .create()?;
        let records: Vec<String> = (0..3).map(|i| format!(r#"{{"userId":"{codec}-{i}"}}"#)).collect();
        let deliveries = records.iter().map(|payload| {
            raw.send(FutureRecord::to(Topic::UserActivity.name()).key(codec).payload(payload), Duration::from_secs(5))
        });
        for delivery in futures::future::join_all(deliveries).await {
            delivery.map_err(|(e, _)| e)?;
        }
        sent.extend(records);
    }
    let shutdown = CancellationToken::new();
    let pipeline = broker.settings();
    let producer = Producer::for_pipeline(&pipeline)?;
    let read = Collect::default();
    let snapshots = Collect::default();
    let env = |name: &str| consumer_env(&pipeline, &producer, &shutdown, name);
    let consumers = [
        tokio::spawn(run_consumer(
            env("main"),
            ConsumerSpec::group("main", [Topic::UserActivity], "test-codecs"),
            read.clone(),
        )),
        tokio::spawn(run_consumer(env("f"), ConsumerSpec::replica("f", [Topic::UserFeatures]), snapshots.clone())),
    ];
    for codec in CODECS {
        let mut settings = broker.settings();
        settings.compression = codec.to_owned();
        let producer = Producer::for_pipeline(&settings)?;
        producer.send(&UserFeatures { user_id: codec.to_owned(), ..Default::default() }, None).await?;
    }

    let got = eventually("every record read", Duration::from_secs(60), || {
        let got = read.0.lock().expect("lock").clone();
        let want = sent.len();
        async move { (got.len() >= want).then_some(got) }
    })
    .await?;
    let mut got: Vec<String> = got.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
    got.sort();
    sent.sort();
    assert_eq!(got, sent, "each record once, whatever its codec");
    let users = eventually("a snapshot from each codec", Duration::from_secs(60), || {
        let got = snapshots.0.lock().expect("lock").clone();
        async move { (got.len() >= CODECS.len()).then_some(got) }
    })
    .await?;
    let mut users: Vec<String> =
        users.iter().map(|p| serde_json::from_slice::<UserFeatures>(p).expect("features").user_id).collect();
    users.sort();
    let mut want = CODECS.map(str::to_owned).to_vec();
    want.sort();
    assert_eq!(users, want);
    // Consumers close before the broker they talk to stops.
    shutdown.cancel();
    for consumer in consumers {
        consumer.await??;
    }
    Ok(())
}

/// Asks to wait once for every message (and for ever for `{"userId":"stuck"}`) before
/// passing it on; counts the waits that ended.
#[derive(Clone, Default)]
struct WaitFirst {
    waited: Arc<Mutex<Vec<i64>>>,
    ended: Arc<AtomicUsize>,
    passed: Collect,
}

impl Handler for WaitFirst {
    fn handle(&mut self, record: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        let stuck = record.value()?["userId"] == "stuck";
        let mut waited = self.waited.lock().expect("lock");
        if stuck || !waited.contains(&record.offset) {
            waited.push(record.offset);
            let ended = Arc::clone(&self.ended);
            return Err(HandlerError::Wait(kit::kafka::Wait::new("a test", async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                ended.fetch_add(1, Ordering::SeqCst);
            })));
        }
        drop(waited);
        self.passed.handle(record, out)
    }
}

/// A handler that asks to wait ([`HandlerError::Wait`]) gets the same message again once the
/// wait is over, and the messages after it stay behind it; one that never stops asking is
/// dead-lettered after a few waits, and the partition moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_waits_for_what_its_handler_waits_for() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let settings = broker.settings();
    let raw: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create()?;
    for user in ["a", "stuck", "b", "c"] {
        let payload = format!(r#"{{"userId":"{user}"}}"#);
        raw.send(FutureRecord::to(Topic::UserActivity.name()).key("k").payload(&payload), Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)?;
    }
    let shutdown = CancellationToken::new();
    let producer = Producer::for_pipeline(&settings)?;
    let env = |name: &str| consumer_env(&settings, &producer, &shutdown, name);
    let handler = WaitFirst::default();
    let letters = Collect::default();
    let main = tokio::spawn(run_consumer(
        env("main"),
        ConsumerSpec::group("main", [Topic::UserActivity], "test-wait"),
        handler.clone(),
    ));
    tokio::spawn(run_consumer(env("d"), ConsumerSpec::replica("d", [Topic::DeadLetter]), letters.clone()));
    let passed = eventually("three messages passed", Duration::from_secs(60), || {
        let got = handler.passed.0.lock().expect("lock").clone();
        async move { (got.len() >= 3).then_some(got) }
    })
    .await?;
    let passed: Vec<String> = passed.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
    assert_eq!(passed, [r#"{"userId":"a"}"#, r#"{"userId":"b"}"#, r#"{"userId":"c"}"#], "each once, in order");
    let letter = eventually("the stuck message dead-lettered", Duration::from_secs(30), || {
        let got = letters.0.lock().expect("lock").first().cloned();
        async move { got }
    })
    .await?;
    let letter: DeadLetter = serde_json::from_slice(&letter)?;
    assert_eq!((letter.kind, letter.source.offset), (DeadLetterKind::HandlerFailed, 1));
    assert!(letter.reason.contains("waiting for a test"), "{}", letter.reason);
    let waits = handler.waited.lock().expect("lock").clone();
    assert_eq!(waits, [0, 1, 1, 1, 1, 2, 3], "one wait each, and the stuck one's until it was given up");
    // Every wait was awaited, except the one that was refused (the fourth of the stuck message).
    assert_eq!(handler.ended.load(Ordering::SeqCst), 6);
    shutdown.cancel();
    main.await??;
    Ok(())
}

/// A consumer that joins two topics per user refuses to start when their partition counts
/// differ, naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_topics_must_be_co_partitioned() -> anyhow::Result<()> {
    let broker = TestBroker::bare().await?;
    let topics = [(Topic::UserFeatures.name().to_owned(), 2), (Topic::ProcessedEvents.name().to_owned(), 3)];
    kit::kafka::admin::ensure_named_topics(&broker.bootstrap(), &topics, 1, Duration::from_secs(30)).await?;
    let settings = broker.settings();
    let env = consumer_env(&settings, &Producer::for_pipeline(&settings)?, &CancellationToken::new(), "joined");
    let spec = ConsumerSpec::group("joined", [Topic::UserFeatures, Topic::ProcessedEvents], "test-joined");
    let outcome = tokio::time::timeout(Duration::from_secs(30), run_consumer(env, spec, RejectAll)).await?;
    let error = format!("{:#}", outcome.expect_err("the consumer must refuse to start"));
    assert!(error.contains("user-features-topic has 2") && error.contains("processed-events-topic has 3"), "{error}");
    Ok(())
}

/// Panics on every message.
struct Boom;

impl Handler for Boom {
    fn handle(&mut self, _record: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        panic!("the handler has a bug");
    }
}

/// A service with one consumer whose handler panics.
struct Panicky;

impl kit::Service for Panicky {
    const NAME: &'static str = "panicky";
    const DEFAULT_PORT: u16 = 0;
    type Config = ();

    fn config(_env: &kit::config::Env) -> Result<(), kit::config::ConfigError> {
        Ok(())
    }

    async fn run((): (), mut ctx: kit::Context) -> anyhow::Result<()> {
        let producer = ctx.pipeline_producer()?;
        ctx.spawn_consumer(&producer, ConsumerSpec::group("boom", [Topic::UserActivity], "test-boom"), Boom);
        ctx.serve(axum::Router::new()).await
    }
}

/// A handler that panics inside a running service ends the service with an error (so that
/// `main` exits non-zero and the supervisor restarts it), instead of leaving a service that
/// still says it is ready while its consumer is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_ends_its_service_with_an_error() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let shutdown = CancellationToken::new();
    let service = kit::service::start::<Panicky>((), broker.settings(), kit::http::Cors::Off, listener, &shutdown);
    let raw: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create()?;
    raw.send(
        FutureRecord::to(Topic::UserActivity.name()).key("k").payload(r#"{"userId":"a"}"#),
        Duration::from_secs(5),
    )
    .await
    .map_err(|(e, _)| e)?;
    let ended = tokio::time::timeout(Duration::from_secs(60), service).await;
    assert!(!shutdown.is_cancelled(), "a failure stops its own service, not the shutdown it was given");
    let error = format!("{:#}", ended??.expect_err("the service must end with an error"));
    assert!(error.contains("consumer boom panicked") && error.contains("the handler has a bug"), "{error}");
    Ok(())
}

/// The broker answers a waiting fetch as soon as a message arrives on any of its partitions,
/// not when `fetch.wait.max.ms` (here 30 s) runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_fetch_is_answered_when_a_message_arrives() -> anyhow::Result<()> {
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    use rdkafka::message::Message as _;
    let broker = TestBroker::start().await?;
    let topic = Topic::UserActivity.name();
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", "test-long-poll")
        .set("fetch.wait.max.ms", "30000")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..Topic::UserActivity.default_partitions() {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let raw: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create()?;
    // Warm up: one message on every partition, so that every partition is in the consumer's
    // next fetch (librdkafka keeps one fetch per broker in flight: a partition that becomes
    // fetchable while a fetch waits joins the next one — on Apache Kafka too).
    let partitions = Topic::UserActivity.default_partitions();
    for p in 0..partitions {
        raw.send(FutureRecord::to(topic).partition(p).key("k").payload("warm-up"), Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)?;
    }
    for _ in 0..partitions {
        tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await??;
    }
    for (n, partition) in [0, 1, 0].into_iter().enumerate() {
        // Let the consumer's fetch be waiting at the broker before the message is produced.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let payload = format!("message {n}");
        raw.send(FutureRecord::to(topic).partition(partition).key("k").payload(&payload), Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)?;
        let msg = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
            .await
            .map_err(|_| anyhow::anyhow!("message {n} was not delivered while the fetch waited"))??;
        assert_eq!((msg.partition(), msg.payload()), (partition, Some(payload.as_bytes())));
    }
    Ok(())
}

/// Counts every message it holds: state that must hold exactly its partitions' messages.
#[derive(Clone, Default)]
struct Tally(Arc<Mutex<std::collections::HashMap<Vec<u8>, u32>>>);

impl Handler for Tally {
    fn handle(&mut self, record: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        *self.0.lock().expect("lock").entry(record.payload.to_vec()).or_default() += 1;
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.0.lock().expect("lock").clear();
        true
    }
}

impl Tally {
    fn snapshot(&self) -> std::collections::HashMap<Vec<u8>, u32> {
        self.0.lock().expect("lock").clone()
    }
}

/// Under the group protocol (`KAFKA_ASSIGNMENT=group`) a restoring consumer's state follows its
/// partitions: a second member takes a share and the first drops that share's state; when the
/// second leaves, the first rebuilds the whole — every message held exactly once throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_members_hold_exactly_the_state_of_their_partitions() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let mut settings = broker.settings();
    settings.assignment = kit::kafka::Assignment::Group;
    let raw: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create()?;
    let send = |from: usize, to: usize| {
        let raw = raw.clone();
        async move {
            for i in from..to {
                let (key, payload) = (format!("user-{i}"), format!("message-{i}"));
                raw.send(
                    FutureRecord::to(Topic::UserActivity.name()).key(&key).payload(&payload),
                    Duration::from_secs(5),
                )
                .await
                .map_err(|(e, _)| e)?;
            }
            anyhow::Ok(())
        }
    };
    send(0, 40).await?;
    let producer = Producer::for_pipeline(&settings)?;
    let member = |tally: &Tally, stop: &CancellationToken| {
        let env = consumer_env(&settings, &producer, stop, "tally");
        let spec = ConsumerSpec::group("tally", [Topic::UserActivity], "test-tally").restoring();
        tokio::spawn(run_consumer(env, spec, tally.clone()))
    };
    let exactly_once = |maps: &[std::collections::HashMap<Vec<u8>, u32>], n: usize| {
        let total: usize = maps.iter().map(|m| m.len()).sum();
        let mut all: Vec<&Vec<u8>> = maps.iter().flat_map(|m| m.keys()).collect();
        all.sort();
        all.dedup();
        total == n && all.len() == n && maps.iter().all(|m| m.values().all(|c| *c == 1))
    };

    let (a, b) = (Tally::default(), Tally::default());
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let first = member(&a, &stop_a);
    eventually("the first member holds everything", Duration::from_secs(60), || {
        let ok = exactly_once(&[a.snapshot()], 40);
        async move { ok.then_some(()) }
    })
    .await?;

    let second = member(&b, &stop_b);
    eventually("the two members share the messages, each once", Duration::from_secs(90), || {
        let (sa, sb) = (a.snapshot(), b.snapshot());
        let ok = !sa.is_empty() && !sb.is_empty() && exactly_once(&[sa, sb], 40);
        async move { ok.then_some(()) }
    })
    .await
    .map_err(|e| e.context(format!("first holds {}, second {}", a.snapshot().len(), b.snapshot().len())))?;

    stop_b.cancel();
    second.await??;
    send(40, 50).await?;
    eventually("the first member holds everything again, once", Duration::from_secs(90), || {
        let ok = exactly_once(&[a.snapshot()], 50);
        async move { ok.then_some(()) }
    })
    .await
    .map_err(|e| e.context(format!("first holds {:?}", a.snapshot().values().sum::<u32>())))?;
    stop_a.cancel();
    first.await??;
    Ok(())
}

/// `KAFKA_ASSIGNMENT=auto` (the default) asks the broker who it is: the embedded broker gets
/// static assignment with its standby lock, since its group coordinator cannot be trusted with
/// a member that dies during a rebalance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_assignment_is_static_on_the_embedded_broker() -> anyhow::Result<()> {
    let broker = TestBroker::bare().await?;
    let mut settings = kit::kafka::KafkaSettings::for_broker(broker.bootstrap());
    assert_eq!(settings.assignment, kit::kafka::Assignment::Auto);
    let settled =
        tokio::time::timeout(Duration::from_secs(30), settings.settle_assignment(&CancellationToken::new())).await?;
    assert_eq!(settled, Some(kit::kafka::Assignment::Static));
    assert!(!settings.uses_group_protocol());
    Ok(())
}

/// Sends `payload` keyed `key` to `topic` as another client would, and waits for the broker
/// to take it.
async fn send_raw(raw: FutureProducer, topic: Topic, key: String, payload: String) -> anyhow::Result<()> {
    raw.send(FutureRecord::to(topic.name()).key(&key).payload(&payload), Duration::from_secs(5))
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// Collects the topic and payload of everything it reads.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(Topic, String)>>>);

impl Handler for Seen {
    fn handle(&mut self, record: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        let payload = String::from_utf8_lossy(record.payload).into_owned();
        self.0.lock().expect("lock").push((record.topic, payload));
        Ok(())
    }
}

impl Seen {
    fn of(&self, topic: Topic) -> Vec<String> {
        self.0.lock().expect("lock").iter().filter(|(t, _)| *t == topic).map(|(_, p)| p.clone()).collect()
    }
}

/// A coalescing consumer that finds several snapshots of a user waiting handles the latest
/// and skips the others; the topics it does not coalesce are handled whole; the skipped
/// messages count as consumed (a member started afterwards in the same group reads none of
/// them again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coalescing_consumer_handles_the_latest_snapshot_per_key() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let settings = broker.settings();
    let raw: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create()?;
    let send = |topic: Topic, key: String, payload: String| send_raw(raw.clone(), topic, key, payload);
    let (users, versions) = (6, 8);
    for v in 0..versions {
        for u in 0..users {
            send(Topic::UserFeatures, format!("user-{u}"), format!("user-{u} version {v}")).await?;
            send(Topic::ProcessedEvents, format!("user-{u}"), format!("user-{u} event {v}")).await?;
        }
    }

    let producer = Producer::for_pipeline(&settings)?;
    let member = |seen: &Seen, stop: &CancellationToken| {
        let env = consumer_env(&settings, &producer, stop, "seen");
        let spec = ConsumerSpec::group("seen", [Topic::UserFeatures, Topic::ProcessedEvents], "test-seen")
            .coalescing([Topic::UserFeatures]);
        tokio::spawn(run_consumer(env, spec, seen.clone()))
    };
    let (first, stop) = (Seen::default(), CancellationToken::new());
    let running = member(&first, &stop);
    let latest: Vec<String> = (0..users).map(|u| format!("user-{u} version {}", versions - 1)).collect();
    eventually("every user's latest snapshot and every event", Duration::from_secs(60), || {
        let (snapshots, events) = (first.of(Topic::UserFeatures), first.of(Topic::ProcessedEvents));
        let done = latest.iter().all(|l| snapshots.contains(l)) && events.len() == users * versions;
        async move { done.then_some(()) }
    })
    .await?;
    // Stopped before asserting: a failed assertion with the consumer still running would
    // hang the test instead of failing it.
    stop.cancel();
    running.await??;
    let snapshots = first.of(Topic::UserFeatures);
    assert!(
        snapshots.len() < users * versions,
        "{} of {} snapshots handled: the waiting ones were not coalesced",
        snapshots.len(),
        users * versions
    );
    for (u, latest) in latest.iter().enumerate() {
        let mine: Vec<&String> = snapshots.iter().filter(|s| s.starts_with(&format!("user-{u} "))).collect();
        assert_eq!(mine.last(), Some(&latest), "the latest is handled last: {mine:?}");
    }
    let mut events = first.of(Topic::ProcessedEvents);
    events.sort();
    events.dedup();
    assert_eq!(events.len(), users * versions, "every event of the topic not coalesced, once");

    let (second, stop) = (Seen::default(), CancellationToken::new());
    let running = member(&second, &stop);
    send(Topic::UserFeatures, "user-0".into(), "after the restart".into()).await?;
    eventually("the message sent after the restart", Duration::from_secs(60), || {
        let got = second.of(Topic::UserFeatures).contains(&"after the restart".to_owned());
        async move { got.then_some(()) }
    })
    .await?;
    stop.cancel();
    running.await??;
    let all = second.0.lock().expect("lock").clone();
    assert_eq!(all, [(Topic::UserFeatures, "after the restart".to_owned())], "nothing read twice");
    Ok(())
}

/// Handles its first two messages at once and each of the others in a second (blocking its
/// thread, as slow work would) until `fast` is set; counts what it handled.
struct Slow {
    fast: Arc<AtomicBool>,
    handled: Arc<AtomicUsize>,
}

impl Handler for Slow {
    fn handle(&mut self, _record: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        if self.handled.load(Ordering::SeqCst) >= 2 && !self.fast.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_secs(1));
        }
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The summed `kafka_consumer_lag` gauges of consumer `name` (read as `bench stack` and the
/// live evaluation read them: `kit::telemetry::consumer_lag`), if it reports any.
fn lag_of(metrics: &str, name: &str) -> Option<f64> {
    let label = format!("consumer=\"{name}\"");
    let gauges: Vec<&str> =
        metrics.lines().filter(|l| l.starts_with("kafka_consumer_lag{") && l.contains(&label)).collect();
    (!gauges.is_empty()).then(|| kit::telemetry::consumer_lag(&gauges.join("\n")))
}

/// Every consumer — of a group or a replica of every partition — reports how many messages of
/// its partitions it has not finished yet (`kafka_consumer_lag`, what `bench stack` and the
/// live evaluation wait on): at least those it has not handled while it works through a
/// backlog, none once it has handled them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_consumer_reports_the_messages_it_has_not_finished() -> anyhow::Result<()> {
    let metrics = kit::http::metrics_handle();
    let broker = TestBroker::start().await?;
    let settings = broker.settings();
    let raw: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create()?;
    // Enough for a minute of slow work: the first report comes long before it is done.
    let messages = 60;
    for i in 0..messages {
        raw.send(FutureRecord::to(Topic::Offers.name()).key("user-1").payload(&format!("{i}")), Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)?;
    }
    let producer = Producer::for_pipeline(&settings)?;
    let fast = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let mut consumers = Vec::new();
    for name in ["lag-group", "lag-replica"] {
        let spec = if name == "lag-group" {
            ConsumerSpec::group(name, [Topic::Offers], "test-lag")
        } else {
            ConsumerSpec::replica(name, [Topic::Offers])
        };
        let handled = Arc::new(AtomicUsize::new(0));
        let slow = Slow { fast: fast.clone(), handled: handled.clone() };
        let running = tokio::spawn(run_consumer(consumer_env(&settings, &producer, &stop, name), spec, slow));
        consumers.push((name, handled, running));
    }
    // (lag reported, messages handled when it was read), per consumer, while they work.
    let working = eventually("each busy consumer to report its lag", Duration::from_secs(60), || {
        let text = metrics.render();
        let seen: Vec<(Option<f64>, usize)> =
            consumers.iter().map(|(name, handled, _)| (lag_of(&text, name), handled.load(Ordering::SeqCst))).collect();
        async move { seen.iter().all(|(lag, _)| lag.is_some()).then_some(seen) }
    })
    .await;
    fast.store(true, Ordering::SeqCst);
    let caught_up = eventually("each consumer to report no lag", Duration::from_secs(60), || {
        let text = metrics.render();
        let done = consumers.iter().all(|(name, _, _)| lag_of(&text, name) == Some(0.0));
        async move { done.then_some(()) }
    })
    .await;
    stop.cancel();
    let names: Vec<&str> = consumers.iter().map(|(name, _, _)| *name).collect();
    for (_, _, running) in consumers {
        running.await??;
    }
    caught_up?;
    for (name, (lag, handled)) in names.iter().zip(working?) {
        let (lag, handled) = (lag.unwrap_or_default(), handled as f64);
        assert!(handled < f64::from(messages), "{name} handled all {handled} before its lag was read");
        assert!(lag >= f64::from(messages) - handled, "{name}: lag {lag} with {handled} of {messages} handled");
    }
    Ok(())
}

/// Handles like [`Seen`], at the pace of a real handler (a fraction of a millisecond each).
#[derive(Clone, Default)]
struct SlowSeen(Seen);

impl Handler for SlowSeen {
    fn handle(&mut self, record: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        std::thread::sleep(Duration::from_micros(200));
        self.0.handle(record, out)
    }
}

/// Traffic spread evenly over many users, a consumer behind by several rounds of them: each
/// user's next snapshot comes a whole round later, so only a look ahead deeper than a round
/// finds anything to skip. The consumer coalesces across its backlog, not only within a few
/// hundred messages, and still handles each user's latest snapshot last.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coalescing_consumer_behind_by_rounds_of_many_users_coalesces_across_them() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let settings = broker.settings();
    let raw: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).set("linger.ms", "5").create()?;
    // 2,000 users, 5 rounds, ~600 bytes a snapshot: 6 MB, three times the queue of a consumer
    // that does not coalesce (`KAFKA_CONSUMER_FETCH_MAX_KB`, 2 MiB).
    let (users, versions) = (2_000, 5);
    let padding = "x".repeat(580);
    let mut sends = Vec::with_capacity(users * versions);
    for v in 0..versions {
        for u in 0..users {
            let (key, payload) = (format!("user-{u}"), format!("user-{u} version {v} {padding}"));
            let raw = raw.clone();
            // Enqueued in this order (each future is polled once, in turn, before any waits).
            sends.push(async move {
                raw.send(
                    FutureRecord::to(Topic::UserFeatures.name()).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
            });
        }
    }
    futures::future::try_join_all(sends).await?;

    let producer = Producer::for_pipeline(&settings)?;
    let (seen, stop) = (SlowSeen::default(), CancellationToken::new());
    let env = consumer_env(&settings, &producer, &stop, "behind");
    let spec = ConsumerSpec::group("behind", [Topic::UserFeatures], "test-behind").coalescing([Topic::UserFeatures]);
    let running = tokio::spawn(run_consumer(env, spec, seen.clone()));
    let latest: Vec<String> = (0..users).map(|u| format!("user-{u} version {} {padding}", versions - 1)).collect();
    eventually("every user's latest snapshot", Duration::from_secs(120), || {
        let snapshots: std::collections::HashSet<String> = seen.0.of(Topic::UserFeatures).into_iter().collect();
        let done = latest.iter().all(|l| snapshots.contains(l));
        async move { done.then_some(()) }
    })
    .await?;
    stop.cancel();
    running.await??;
    let snapshots = seen.0.of(Topic::UserFeatures);
    assert!(
        snapshots.len() <= users * versions / 2,
        "{} of {} snapshots handled: the backlog was not coalesced across rounds of users",
        snapshots.len(),
        users * versions
    );
    for (u, latest) in latest.iter().enumerate() {
        let prefix = format!("user-{u} ");
        let last = snapshots.iter().rfind(|s| s.starts_with(&prefix));
        assert_eq!(last, Some(latest), "user-{u}'s latest snapshot is handled last");
    }
    Ok(())
}

/// Each consumer reports how old the messages it handles are (`consumer_message_age_seconds`:
/// from the time their producer gave them to the handling), so a consumer behind shows how far
/// behind in time, not only in messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_report_the_age_of_what_they_handle() -> anyhow::Result<()> {
    let metrics = kit::http::metrics_handle();
    let broker = TestBroker::start().await?;
    let settings = broker.settings();
    let raw: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create()?;
    let (messages, minute_ago) = (5, chrono::Utc::now().timestamp_millis() - 60_000);
    for i in 0..messages {
        let payload = format!("{i}");
        let record = FutureRecord::to(Topic::Offers.name()).key("user-1").payload(&payload).timestamp(minute_ago);
        raw.send(record, Duration::from_secs(5)).await.map_err(|(e, _)| e)?;
    }
    let producer = Producer::for_pipeline(&settings)?;
    let stop = CancellationToken::new();
    let seen = Collect::default();
    let spec = ConsumerSpec::replica("age-test", [Topic::Offers]);
    let running = tokio::spawn(run_consumer(consumer_env(&settings, &producer, &stop, "age-test"), spec, seen.clone()));
    let handled = eventually("the messages handled", Duration::from_secs(30), || {
        let n = seen.0.lock().expect("lock").len();
        async move { (n == messages).then_some(()) }
    })
    .await;
    stop.cancel();
    running.await??;
    handled?;
    let text = metrics.render();
    // The value of one series, e.g. `_count{consumer="age-test"}`.
    let value = |series: &str| -> Option<f64> {
        let prefix = format!("consumer_message_age_seconds{series} ");
        text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.trim().parse().ok())
    };
    assert_eq!(value(r#"_count{consumer="age-test"}"#), Some(messages as f64), "{text}");
    let sum = value(r#"_sum{consumer="age-test"}"#).unwrap_or_default();
    // A minute old each when given, and handled within seconds of that.
    assert!((60.0 * messages as f64..90.0 * messages as f64).contains(&sum), "sum {sum}: {text}");
    // The buckets reach past a backlog of seconds: a minute-old message is counted as one.
    let bucket = |le: &str| value(&format!(r#"_bucket{{consumer="age-test",le="{le}"}}"#));
    assert_eq!((bucket("30"), bucket("120")), (Some(0.0), Some(messages as f64)), "{text}");
    Ok(())
}

/// Collects the topic and payload of everything it reads, and whether it was a replay.
#[derive(Clone, Default)]
struct Replays(Arc<Mutex<Vec<(Topic, String, bool)>>>);

impl Handler for Replays {
    fn handle(&mut self, record: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError> {
        let payload = String::from_utf8_lossy(record.payload).into_owned();
        self.0.lock().expect("lock").push((record.topic, payload, out.is_replay()));
        Ok(())
    }
}

impl Replays {
    /// The payloads of `topic` read as replays (`true`) or as new messages (`false`), sorted.
    fn of(&self, topic: Topic, replayed: bool) -> Vec<String> {
        let all = self.0.lock().expect("lock");
        let mut out: Vec<String> =
            all.iter().filter(|(t, _, r)| *t == topic && *r == replayed).map(|(_, p, _)| p.clone()).collect();
        out.sort();
        out
    }
}

/// A consumer restoring from some of its topics replays those on start, and resumes the
/// others from their committed offsets with nothing replayed (rl-offer restores its
/// snapshots, not the processed events it learns rewards from elsewhere); one restoring from
/// all of them replays every topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_replays_only_the_topics_it_restores_from() -> anyhow::Result<()> {
    let broker = TestBroker::start().await?;
    let settings = broker.settings();
    let raw: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create()?;
    let send = |topic: Topic, payload: String| send_raw(raw.clone(), topic, payload.clone(), payload);
    let topics = [Topic::UserFeatures, Topic::ProcessedEvents];
    let names = |prefix: &str, n: usize| -> Vec<String> {
        let mut names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
        names.sort();
        names
    };
    for i in 0..8 {
        send(Topic::UserFeatures, format!("snapshot-{i}")).await?;
        send(Topic::ProcessedEvents, format!("event-{i}")).await?;
    }
    let producer = Producer::for_pipeline(&settings)?;
    // Runs a member of the group until it has read `marker` of both topics as new messages.
    let run = |spec: ConsumerSpec, marker: &'static str| {
        let (seen, stop) = (Replays::default(), CancellationToken::new());
        let running =
            tokio::spawn(run_consumer(consumer_env(&settings, &producer, &stop, "replays"), spec, seen.clone()));
        async move {
            for topic in topics {
                send(topic, marker.to_owned()).await?;
            }
            let waited = eventually("the messages sent after the start", Duration::from_secs(60), || {
                let got = topics.iter().all(|t| seen.of(*t, false).contains(&marker.to_owned()));
                async move { got.then_some(()) }
            })
            .await;
            stop.cancel();
            running.await??;
            waited?;
            anyhow::Ok(seen)
        }
    };
    let group = |name| ConsumerSpec::group("replays", topics, name);

    let first = run(group("test-replays").restoring_from([Topic::UserFeatures]), "first").await?;
    assert!(first.of(Topic::UserFeatures, true).is_empty(), "nothing committed yet: nothing to replay");
    let second = run(group("test-replays").restoring_from([Topic::UserFeatures]), "second").await?;
    let mut snapshots = names("snapshot", 8);
    snapshots.push("first".to_owned());
    snapshots.sort();
    assert_eq!(second.of(Topic::UserFeatures, true), snapshots, "the restored topic replayed up to the commit");
    assert_eq!(second.of(Topic::ProcessedEvents, true), Vec::<String>::new(), "the other one not replayed");
    assert_eq!(second.of(Topic::ProcessedEvents, false), ["second"], "and resumed from its commit");

    let third = run(group("test-replays").restoring(), "third").await?;
    snapshots.push("second".to_owned());
    snapshots.sort();
    let mut events = names("event", 8);
    events.extend(["first".to_owned(), "second".to_owned()]);
    events.sort();
    assert_eq!(third.of(Topic::UserFeatures, true), snapshots);
    assert_eq!(third.of(Topic::ProcessedEvents, true), events, "restoring from every topic replays each");
    Ok(())
}
