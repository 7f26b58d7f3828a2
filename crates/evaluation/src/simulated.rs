//! `retargetiq evaluate` without `--events`: offline quality of the recommendations on
//! simulated shoppers, against baselines.
//!
//! Simulated shoppers with known preferences (the same [`Shopper`]s and sessions as
//! `retargetiq simulate`) each browse for a number of days. Their first sessions are replayed,
//! in time order, through the services' own code — the event processor's handler, the
//! feature store, retrieval's model and candidate generation, ranking (learning online from
//! feedback as in the service) and the recommendation API's answer — with messages passed in
//! memory instead of through Kafka, so a run is deterministic for a seed and takes seconds.
//! Their later sessions are held out: a recommendation list is good when it contains what the
//! shopper went on to view, click, cart or buy.
//!
//! Printed for the platform (learning on), the platform with the initial ranking weights
//! (learning off), a most-popular baseline (the products with the most engagement in the
//! training data) and a random baseline (what the original project did): hit rate@k and
//! NDCG@k over every held-out interaction, and again over the products new to the shopper
//! (lists filtered to exclude what the shopper touched in training), where retargeting cannot
//! help. An oracle row — the best sellers of each shopper's hidden favourite category, in the
//! order the simulator draws them — shows the ceiling the simulated behaviour allows.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use events::generate::{Generator, Shopper, Step};
use events::{EventType, ProcessedEvent};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use crate::replay::{Attribution, Platform};

/// Options of `retargetiq evaluate`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvaluateArgs {
    /// Simulated shoppers.
    #[arg(long, default_value_t = 300)]
    pub shoppers: u32,
    /// Sessions per shopper replayed through the platform (one a day).
    #[arg(long, default_value_t = 6)]
    pub train_sessions: u32,
    /// Later sessions per shopper held out as the truth.
    #[arg(long, default_value_t = 1)]
    pub test_sessions: u32,
    /// Length of the recommendation list.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

impl Default for EvaluateArgs {
    fn default() -> Self {
        Self { shoppers: 300, train_sessions: 6, test_sessions: 1, k: 10, seed: 7 }
    }
}

/// Hit rate and NDCG of one method.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scores {
    pub hit_rate: f64,
    pub ndcg: f64,
}

/// One row of the report.
#[derive(Debug, Clone)]
pub struct Row {
    pub method: &'static str,
    /// Over every held-out interaction.
    pub all: Scores,
    /// Over products the shopper had not touched in training.
    pub new: Scores,
}

/// The result of an evaluation.
#[derive(Debug, Clone)]
pub struct Report {
    pub args: EvaluateArgs,
    pub training_events: usize,
    pub users: usize,
    pub model_updates: u64,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn row(&self, method: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.method == method)
    }

    /// The report as JSON: `{"methods": {"<name>": {"hitRate", "ndcg"}}, "users": n}`.
    pub fn json(&self) -> String {
        let methods: serde_json::Map<String, serde_json::Value> = self
            .rows
            .iter()
            .map(|r| (r.method.to_owned(), serde_json::json!({"hitRate": r.all.hit_rate, "ndcg": r.all.ndcg})))
            .collect();
        serde_json::to_string_pretty(&serde_json::json!({"methods": methods, "users": self.users})).unwrap_or_default()
    }

    /// The report as a Markdown table (what the README shows).
    pub fn table(&self) -> String {
        let k = self.args.k;
        let mut out = format!(
            "{} shoppers, {} training sessions each ({} events), {} held-out sessions; {} users scored; \
             ranking took {} online updates\n\n",
            self.args.shoppers,
            self.args.train_sessions,
            self.training_events,
            self.args.test_sessions,
            self.users,
            self.model_updates
        );
        out += &format!(
            "| method | hit rate@{k} | NDCG@{k} | hit rate@{k}, new items | NDCG@{k}, new items |\n|---|---|---|---|---|\n"
        );
        for r in &self.rows {
            out += &format!(
                "| {} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
                r.method, r.all.hit_rate, r.all.ndcg, r.new.hit_rate, r.new.ndcg
            );
        }
        if let (Some(ours), Some(pop)) = (self.row(PLATFORM), self.row(POPULARITY)) {
            out += &format!(
                "\nplatform / popularity: hit rate {:.2}x, NDCG {:.2}x (new items: {:.2}x, {:.2}x)\n",
                ratio(ours.all.hit_rate, pop.all.hit_rate),
                ratio(ours.all.ndcg, pop.all.ndcg),
                ratio(ours.new.hit_rate, pop.new.hit_rate),
                ratio(ours.new.ndcg, pop.new.ndcg),
            );
        }
        out
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::INFINITY }
}

pub const PLATFORM: &str = "platform (online-learned ranking)";
pub const PLATFORM_INITIAL: &str = "platform, initial ranking weights";
pub const POPULARITY: &str = "most popular";
pub const RANDOM: &str = "random";
pub const ORACLE: &str = "oracle (knows the hidden preference)";

/// What one shopper did: in training, and held out.
#[derive(Default)]
struct Truth {
    touched: HashSet<String>,
    held_out: HashSet<String>,
}

/// Runs the evaluation.
pub fn run(args: &EvaluateArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.shoppers > 0 && args.train_sessions > 0 && args.test_sessions > 0, "nothing to evaluate");
    anyhow::ensure!((1..=ranking::MAX_RANKED).contains(&args.k), "k must be from 1 to {}", ranking::MAX_RANKED);
    let (training, truth) = simulate(args);

    // Most popular in training, by engagement.
    let mut engagement: HashMap<String, f64> = HashMap::new();
    let learned =
        Platform::replay(&training, kit::catalog::demo(), ranking::Config::default(), Attribution::ShownList, |e| {
            for (product, weight) in interactions(e) {
                *engagement.entry(product.to_owned()).or_default() += weight;
            }
        })?;
    let initial = Platform::replay(
        &training,
        kit::catalog::demo(),
        ranking::Config { learning_rate: 0.0, ..Default::default() },
        Attribution::ShownList,
        |_| {},
    )?;

    let mut popular: Vec<(String, f64)> = engagement.into_iter().collect();
    popular.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let popular: Vec<String> = popular.into_iter().map(|(p, _)| p).collect();

    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x5eed);
    let products = catalog::Catalog::demo().products();
    let list_len = ranking::MAX_RANKED;
    let mut lists: Vec<(&'static str, Vec<Vec<String>>)> =
        vec![(PLATFORM, vec![]), (PLATFORM_INITIAL, vec![]), (POPULARITY, vec![]), (RANDOM, vec![]), (ORACLE, vec![])];
    let mut users: Vec<&String> = truth.keys().collect();
    users.sort();
    for user in &users {
        lists[0].1.push(learned.recommend(user, list_len)?);
        lists[1].1.push(initial.recommend(user, list_len)?);
        lists[2].1.push(popular.iter().take(list_len).cloned().collect());
        lists[3].1.push(products.choose_multiple(&mut rng, list_len).map(|p| p.id.clone()).collect());
        // The simulator's own favourites: an upper bound no recommender can know.
        let favourite = events::generate::favourite_category(user);
        lists[4].1.push(catalog::Catalog::demo().in_category(favourite).take(list_len).map(|p| p.id.clone()).collect());
    }
    let rows = lists
        .into_iter()
        .map(|(method, lists)| {
            let all = score(users.iter().zip(&lists).map(|(u, l)| (l.as_slice(), &truth[*u].held_out, None)), args.k);
            let new_items: Vec<HashSet<String>> =
                users.iter().map(|u| truth[*u].held_out.difference(&truth[*u].touched).cloned().collect()).collect();
            let new = score(
                users.iter().zip(&lists).zip(&new_items).map(|((u, l), n)| (l.as_slice(), n, Some(&truth[*u].touched))),
                args.k,
            );
            Row { method, all, new }
        })
        .collect();
    Ok(Report {
        args: args.clone(),
        training_events: learned.processed,
        users: users.len(),
        model_updates: learned.model_updates,
        rows,
    })
}

/// The products an event engages with, and how strongly.
pub(crate) fn interactions(e: &ProcessedEvent) -> Vec<(&str, f64)> {
    match &e.order {
        Some(o) => {
            o.items.iter().map(|i| (i.product.product_id.as_str(), EventType::Purchase.engagement_weight())).collect()
        }
        None => e.product.iter().map(|p| (p.product_id.as_str(), e.event_type.engagement_weight())).collect(),
    }
}

/// Hit rate and NDCG at `k` over (list, relevant items, items to filter out of the list);
/// users with nothing relevant are skipped.
pub(crate) fn score<'a>(
    cases: impl Iterator<Item = (&'a [String], &'a HashSet<String>, Option<&'a HashSet<String>>)>,
    k: usize,
) -> Scores {
    let mut lists: Vec<Vec<String>> = Vec::new();
    let mut relevant: Vec<HashSet<&str>> = Vec::new();
    for (list, wanted, filter) in cases.filter(|(_, wanted, _)| !wanted.is_empty()) {
        lists.push(list.iter().filter(|p| filter.is_none_or(|f| !f.contains(*p))).take(k).cloned().collect());
        relevant.push(wanted.iter().map(String::as_str).collect());
    }
    let m = crate::history::metrics(lists.iter().map(Vec::as_slice).zip(&relevant), k);
    Scores { hit_rate: m.hit_rate, ndcg: m.ndcg }
}

/// The simulated traffic: training events in time order, and per shopper what they did.
fn simulate(args: &EvaluateArgs) -> (Vec<Step>, HashMap<String, Truth>) {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut generator = Generator::seeded(args.seed.wrapping_add(1));
    let days = i64::from(args.train_sessions + args.test_sessions);
    let start = Utc::now() - Duration::days(days + 1);
    let mut training: Vec<(DateTime<Utc>, Step)> = Vec::new();
    let mut truth: HashMap<String, Truth> = HashMap::new();
    for n in 1..=args.shoppers {
        let shopper = Shopper::new("eval", n, &mut rng);
        let t = truth.entry(shopper.user_id.clone()).or_default();
        for day in 0..days {
            let at = start + Duration::days(day) + Duration::minutes(rng.random_range(0..20 * 60));
            let held_out = day >= i64::from(args.train_sessions);
            for step in generator.session(&shopper, at) {
                for product in step_products(&step) {
                    if held_out { &mut t.held_out } else { &mut t.touched }.insert(product);
                }
                if !held_out {
                    training.push((step_time(&step), step));
                }
            }
        }
    }
    training.sort_by_key(|(t, _)| *t);
    (training.into_iter().map(|(_, s)| s).collect(), truth)
}

fn step_time(step: &Step) -> DateTime<Utc> {
    match step {
        Step::Activity(a) => a.timestamp,
        Step::Order(o) => o.timestamp,
    }
}

/// The products a step engages with (page views and searches have none).
fn step_products(step: &Step) -> Vec<String> {
    match step {
        Step::Activity(a) if a.event_type != EventType::RemoveFromCart => a.product_id.iter().cloned().collect(),
        Step::Activity(_) => Vec::new(),
        Step::Order(o) => o.items.iter().map(|i| i.product_id.clone()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_computed_as_defined() {
        let list: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let relevant: HashSet<String> = ["b", "z"].map(String::from).into();
        let s = score([(list.as_slice(), &relevant, None)].into_iter(), 3);
        assert_eq!(s.hit_rate, 1.0);
        // One hit at rank 2 of an ideal two hits at ranks 1 and 2.
        let expected = (1.0 / 3f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert!((s.ndcg - expected).abs() < 1e-12, "{}", s.ndcg);
        // Filtering "b" out leaves no hit.
        let filter: HashSet<String> = ["b".to_owned()].into();
        assert_eq!(score([(list.as_slice(), &relevant, Some(&filter))].into_iter(), 3).hit_rate, 0.0);
    }

    #[test]
    fn the_platform_beats_popularity_and_random() {
        let report = run(&EvaluateArgs { shoppers: 60, train_sessions: 4, test_sessions: 1, k: 10, seed: 3 })
            .expect("evaluates");
        println!("{}", report.table());
        let ours = report.row(PLATFORM).expect("row").all;
        let popular = report.row(POPULARITY).expect("row").all;
        let random = report.row(RANDOM).expect("row").all;
        assert!(report.users > 50 && report.training_events > 1_000, "{report:?}");
        assert!(report.model_updates > 0, "ranking learned nothing");
        // The full-size run reaches 1.77x in hit rate (and the oracle 1.92x: docs/quality.md);
        // 60 shoppers are noisier, so the guard is 1.5x here and 2x in NDCG.
        assert!(ours.hit_rate > 1.5 * popular.hit_rate, "{}", report.table());
        assert!(ours.ndcg > 2.0 * popular.ndcg, "{}", report.table());
        assert!(popular.hit_rate > random.hit_rate, "{}", report.table());
    }
}
