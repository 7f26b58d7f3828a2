//! Fetch as a real long poll: answered as soon as data is there, and otherwise held, at no
//! cost, until a produce to one of its topics wakes it or `max_wait` runs out.
//!
//! Tansu 0.6's own Fetch handler (`tansu-storage` `service/fetch.rs`) ends every pass with a
//! sleep of the remaining wait, even when the pass found data, and otherwise re-queries the
//! storage at intervals. Each hop of a pipeline then costs `fetch.wait.max.ms`, and keeping
//! that low (20 ms) made idle consumers query SQLite hundreds of times a second: one core
//! busy with no traffic. Here each pass is Tansu's handler with `max_wait_ms = 0` (one look,
//! no sleep), and between passes the request waits on a per-topic signal that
//! [`NotifyingProduce`] raises after every successful produce. So latency no longer depends
//! on `fetch.wait.max.ms`.
//!
//! An idle consumer asks the same question again every `max_wait`. Each connection remembers
//! its last empty answer with the produce counters of its topics at the time; while those
//! have not moved, the same request gets the same answer without touching the storage (at
//! most [`REVALIDATE`] old, so that a change no produce signals — records deleted, a topic
//! dropped — is seen in bounded time). With SQLite that is what makes an idle stack quiet.
//! See `docs/broker.md` for the measurements behind this.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tansu_sans_io::fetch_request::FetchTopic;

use futures::future::select_all;
use rama::{Context, Service};
use tansu_sans_io::fetch_response::FetchableTopicResponse;
use tansu_sans_io::{ErrorCode, FetchRequest, FetchResponse, ProduceRequest, ProduceResponse};
use tansu_storage::{Error, FetchService, ProduceService, Storage, TopicId};
use tokio::sync::watch;
use tokio::time::Instant;

/// Per-topic signals: a counter that every produce to the topic advances.
#[derive(Debug, Default)]
pub struct Wakeups {
    topics: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Wakeups {
    /// A receiver that sees every produce to `topic` from now on.
    pub fn subscribe(&self, topic: &str) -> watch::Receiver<u64> {
        let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        match topics.get(topic) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = watch::channel(0);
                topics.insert(topic.to_owned(), sender);
                receiver
            }
        }
    }

    /// Wakes every fetch waiting on `topic`.
    pub fn produced(&self, topic: &str) {
        let topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = topics.get(topic) {
            sender.send_modify(|generation| *generation = generation.wrapping_add(1));
        }
    }

    /// Drops the signal of a topic that turned out not to exist, unless someone waits on it.
    fn forget(&self, topic: &str) {
        let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        if topics.get(topic).is_some_and(|sender| sender.receiver_count() == 0) {
            topics.remove(topic);
        }
    }
}

/// Tansu's produce handler, then a wake-up of the fetches waiting on the produced topics.
#[derive(Debug, Clone)]
pub struct NotifyingProduce {
    pub wakeups: Arc<Wakeups>,
}

impl<G: Storage> Service<G, ProduceRequest> for NotifyingProduce {
    type Response = ProduceResponse;
    type Error = Error;

    async fn serve(&self, ctx: Context<G>, req: ProduceRequest) -> Result<ProduceResponse, Error> {
        let topics: Vec<String> = req.topic_data.iter().flatten().map(|topic| topic.name.clone()).collect();
        let response = ProduceService.serve(ctx, req).await?;
        for topic in &topics {
            self.wakeups.produced(topic);
        }
        Ok(response)
    }
}

/// Longest an empty answer is reused without asking the storage again.
pub const REVALIDATE: Duration = Duration::from_secs(10);

/// The long-polling Fetch handler of one connection (see the module documentation).
#[derive(Debug)]
pub struct LongPollFetch {
    wakeups: Arc<Wakeups>,
    last_empty: Mutex<Option<EmptyAnswer>>,
}

impl LongPollFetch {
    pub fn new(wakeups: Arc<Wakeups>) -> Self {
        Self { wakeups, last_empty: Mutex::new(None) }
    }

    /// The remembered empty answer to `question`, if nothing was produced to its topics since.
    fn reuse(&self, question: &[Position], generations: &[u64]) -> Option<FetchResponse> {
        let last = self.last_empty.lock().unwrap_or_else(PoisonError::into_inner);
        last.as_ref()
            .filter(|l| l.question == question && l.generations == generations && l.at.elapsed() < REVALIDATE)
            .map(|l| l.response.clone())
    }

    fn remember(&self, answer: EmptyAnswer) {
        *self.last_empty.lock().unwrap_or_else(PoisonError::into_inner) = Some(answer);
    }
}

/// A partition a fetch reads and where: (topic name, topic id, partition, offset).
type Position = (Option<String>, Option<[u8; 16]>, i32, i64);

/// What a fetch asks, in a fixed order (librdkafka rotates the order of the partitions from
/// one request to the next, for fairness).
fn question(topics: Option<&[FetchTopic]>) -> Vec<Position> {
    let mut positions: Vec<Position> = topics
        .unwrap_or_default()
        .iter()
        .flat_map(|t| t.partitions.iter().flatten().map(|p| (t.topic.clone(), t.topic_id, p.partition, p.fetch_offset)))
        .collect();
    positions.sort_unstable();
    positions
}

/// An answer with no records, and the produce counters of its topics when it was read.
#[derive(Debug)]
struct EmptyAnswer {
    question: Vec<Position>,
    generations: Vec<u64>,
    response: FetchResponse,
    at: Instant,
}

impl<G: Storage> Service<G, FetchRequest> for LongPollFetch {
    type Response = FetchResponse;
    type Error = Error;

    async fn serve(&self, ctx: Context<G>, req: FetchRequest) -> Result<FetchResponse, Error> {
        let deadline = Instant::now() + Duration::from_millis(u64::try_from(req.max_wait_ms).unwrap_or(0));
        let min_bytes = usize::try_from(req.min_bytes).unwrap_or(0).max(1);
        let names = topic_names(&ctx, &req).await?;
        // Subscribe before the first look, so that a produce between the look and the wait
        // is not missed.
        let mut signals: Vec<watch::Receiver<u64>> = names.iter().map(|name| self.wakeups.subscribe(name)).collect();
        let one_pass = req.max_wait_ms(0);
        let asked = question(one_pass.topics.as_deref());
        loop {
            let generations: Vec<u64> = signals.iter_mut().map(|signal| *signal.borrow_and_update()).collect();
            let response = match self.reuse(&asked, &generations) {
                Some(response) => {
                    tracing::trace!("fetch answered from the last empty pass");
                    response
                }
                None => {
                    tracing::trace!("fetch pass");
                    let response = FetchService.serve(ctx.clone(), one_pass.clone()).await?;
                    let (bytes, errors) = summary(response.responses.as_deref().unwrap_or_default());
                    if bytes == 0 && !errors {
                        self.remember(EmptyAnswer {
                            question: asked.clone(),
                            generations,
                            response: response.clone(),
                            at: Instant::now(),
                        });
                    }
                    response
                }
            };
            let (bytes, errors) = summary(response.responses.as_deref().unwrap_or_default());
            if bytes >= min_bytes || errors || signals.is_empty() || Instant::now() >= deadline {
                if errors {
                    drop(signals);
                    for name in &names {
                        self.wakeups.forget(name);
                    }
                }
                return Ok(response);
            }
            let woken = select_all(signals.iter_mut().map(|signal| Box::pin(signal.changed())));
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                // Nothing was produced: answer with the empty pass, as the wait ran out.
                return Ok(response);
            }
        }
    }
}

/// The names of the topics a fetch asks for (a request may name them by id only).
async fn topic_names<G: Storage>(ctx: &Context<G>, req: &FetchRequest) -> Result<Vec<String>, Error> {
    let mut names = Vec::new();
    for topic in req.topics.iter().flatten() {
        match &topic.topic {
            Some(name) => names.push(name.clone()),
            None => {
                let metadata = ctx.state().metadata(Some(&[TopicId::from(topic)])).await?;
                names.extend(metadata.topics().iter().filter_map(|t| t.name.clone()));
            }
        }
    }
    names.sort_unstable();
    names.dedup();
    Ok(names)
}

/// The record bytes a fetch pass found, and whether any partition answered with an error
/// (an unknown topic, an offset out of range: the client must hear of it at once).
fn summary(topics: &[FetchableTopicResponse]) -> (usize, bool) {
    let mut bytes = 0;
    let mut errors = false;
    for partition in topics.iter().flat_map(|t| t.partitions.iter().flatten()) {
        errors |= partition.error_code != i16::from(ErrorCode::None);
        bytes += partition
            .records
            .iter()
            .flat_map(|frame| &frame.batches)
            .map(|batch| batch.record_data.len())
            .sum::<usize>();
    }
    (bytes, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_produce_wakes_only_the_subscribers_of_its_topic() {
        let wakeups = Wakeups::default();
        let mut a = wakeups.subscribe("a");
        let mut b = wakeups.subscribe("b");
        wakeups.produced("a");
        assert!(a.has_changed().expect("open"));
        assert!(!b.has_changed().expect("open"));
        a.borrow_and_update();
        assert!(tokio::time::timeout(Duration::from_millis(20), b.changed()).await.is_err());
    }

    #[test]
    fn a_produce_to_a_topic_nobody_waits_on_keeps_nothing() {
        let wakeups = Wakeups::default();
        wakeups.produced("nobody");
        assert!(wakeups.topics.lock().expect("lock").is_empty());
        drop(wakeups.subscribe("gone"));
        wakeups.forget("gone");
        assert!(wakeups.topics.lock().expect("lock").is_empty());
    }
}
