//! The embedded broker answers fetches near the end of a partition from the tail it keeps in
//! memory (`broker::tail`), and everything else from its storage. Whatever way a message is
//! read, a consumer gets exactly what was produced: every message once, in order, at
//! contiguous offsets, with its key, value and headers — whether it follows the partition
//! live, starts from the beginning of a log longer than the tail, or reads a topic that was
//! deleted and created again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

/// What a consumer read: per partition, (offset, key, value, header `n`).
type Read = BTreeMap<i32, Vec<(i64, String, Vec<u8>, String)>>;

/// Reads `partitions` of `topic` from the beginning until `expected` messages arrived.
fn read_all(bootstrap: &str, topic: &str, partitions: i32, expected: usize) -> anyhow::Result<Read> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{}", uuid_ish()))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut read = Read::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while read.values().map(Vec::len).sum::<usize>() < expected {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "read {} of {expected}",
            read.values().map(Vec::len).sum::<usize>()
        );
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m?;
            let header = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "n").and_then(|h| h.value.map(<[u8]>::to_vec)))
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default();
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            read.entry(m.partition()).or_default().push((
                m.offset(),
                key,
                m.payload().unwrap_or_default().to_vec(),
                header,
            ));
        }
    }
    Ok(read)
}

fn uuid_ish() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// The value of message `i`: about 1 KB, different for every message.
fn value(i: usize) -> Vec<u8> {
    format!("{i:08}-").repeat(110).into_bytes()
}

/// Produces messages `range` to `topic`, one after the other, keyed over 50 keys, each with
/// header `n` = its number.
async fn produce(producer: &FutureProducer, topic: &str, range: std::ops::Range<usize>) -> anyhow::Result<()> {
    for i in range {
        let (key, value) = (format!("k{}", i % 50), value(i));
        let headers = OwnedHeaders::new().insert(Header { key: "n", value: Some(&i.to_string()) });
        producer
            .send(FutureRecord::to(topic).key(&key).payload(&value).headers(headers), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce {i}: {e}"))?;
    }
    Ok(())
}

/// Every message of `0..n` exactly once, in order per partition, at contiguous offsets from 0,
/// with the key, value and header it was produced with.
fn check(read: &Read, n: usize) {
    let mut seen = vec![false; n];
    for (partition, messages) in read {
        for (k, (offset, key, payload, header)) in messages.iter().enumerate() {
            assert_eq!(*offset, k as i64, "partition {partition}: offsets contiguous from 0");
            let i: usize = header.parse().expect("header n");
            assert!(!seen[i], "message {i} read twice");
            seen[i] = true;
            assert_eq!(key, &format!("k{}", i % 50), "key of message {i}");
            assert!(*payload == value(i), "value of message {i}");
        }
        let order: Vec<usize> = messages.iter().map(|m| m.3.parse().expect("n")).collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        // Messages were produced one after the other (each send awaited), so a partition
        // holds them in production order.
        assert_eq!(order, sorted, "partition {partition}: in production order");
    }
    assert!(seen.iter().all(|s| *s), "every message read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_read_as_produced_from_the_tail_or_the_storage() -> anyhow::Result<()> {
    kit::telemetry::init(kit::telemetry::LogFormat::Text);
    // The broker takes its SQLite file relative to the current directory (the crate's, in a
    // test): the files are removed at the end, and ignored by git (`*.tail-test.db*`,
    // `*.tail-test.logs`, `*.tail-test.lock`).
    let db = format!("{}.tail-test.db", uuid_ish());
    let remove = |db: &str| {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{db}{suffix}"));
        }
        let storage = broker::Storage::Sqlite(db.to_owned());
        if let Some(logs) = storage.logs_dir() {
            let _ = std::fs::remove_dir_all(logs);
        }
        if let Some(lock) = storage.lock_file() {
            let _ = std::fs::remove_file(lock);
        }
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], testkit::free_port()?));
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    // Tails of 1 MiB in all, less than the messages below (the default budget would hold them).
    let options = broker::Options { tail_bytes: Some(1 << 20), ..broker::Options::default() };
    broker::spawn_dedicated_with(addr, broker::Storage::Sqlite(db.clone()), options, shutdown.clone()).await?;
    let bootstrap = addr.to_string();
    let topic = "tail-test";
    kit::kafka::admin::ensure_named_topics(&bootstrap, &[(topic.to_owned(), 2)], 1, Duration::from_secs(30)).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("compression.type", "none")
        .set("linger.ms", "0")
        .create()?;

    // A reader following the partitions live, from before the first message: it reads at
    // the end of each partition, which the tail answers.
    let (live_bootstrap, live_topic) = (bootstrap.clone(), topic.to_owned());
    let live = tokio::task::spawn_blocking(move || read_all(&live_bootstrap, &live_topic, 2, 3_000));

    // 3,000 messages of ~1 KB over two partitions: ~3 MB, more than the tails keep.
    produce(&producer, topic, 0..3_000).await?;
    check(&live.await??, 3_000);
    // From the beginning: the first part of each partition is only in the storage.
    let b = bootstrap.clone();
    check(&tokio::task::spawn_blocking(move || read_all(&b, topic, 2, 3_000)).await??, 3_000);

    // Deleted and created again: nothing of the old topic comes back, and the other topics
    // stay (Tansu's SQLite engine deleted every topic's row with the one named).
    let kept = "tail-kept";
    kit::kafka::admin::ensure_named_topics(&bootstrap, &[(kept.to_owned(), 2)], 1, Duration::from_secs(30)).await?;
    produce(&producer, kept, 0..10).await?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", &bootstrap).create()?;
    for r in admin.delete_topics(&[topic], &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("deleting {t}: {e}"))?;
    }
    let b = bootstrap.clone();
    check(&tokio::task::spawn_blocking(move || read_all(&b, kept, 2, 10)).await??, 10);

    // Deleting records is refused, partition by partition, and the broker stays up (Tansu's
    // engines panicked, which ended the broker).
    let mut below = TopicPartitionList::new();
    below.add_partition_offset(kept, 0, Offset::Offset(1))?;
    below.add_partition_offset(kept, 1, Offset::Offset(1))?;
    let refused = admin.delete_records(&below, &AdminOptions::new()).await?;
    let errors: Vec<String> = refused.elements().iter().map(|e| format!("{:?}", e.error())).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().all(|e| e.contains("PolicyViolation")), "{errors:?}");
    let b = bootstrap.clone();
    check(&tokio::task::spawn_blocking(move || read_all(&b, kept, 2, 10)).await??, 10);
    kit::kafka::admin::ensure_named_topics(&bootstrap, &[(topic.to_owned(), 2)], 1, Duration::from_secs(30)).await?;
    produce(&producer, topic, 0..10).await?;
    let b = bootstrap.clone();
    let again = tokio::task::spawn_blocking(move || read_all(&b, topic, 2, 10)).await??;
    check(&again, 10);
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    remove(&db);
    Ok(())
}
