//! `retargetiq evaluate-offers`: the offer bandit against the original project's rule engine on
//! the same simulated traffic, with an off-policy estimate from the bandit's decision log.
//!
//! Simulated shoppers reach a retargeting trigger (an abandoned cart, repeated views, a lapse)
//! one after another, 30 s apart. Each shopper has a **hidden response** to each offer that
//! depends on their segment, which the policy cannot see but which goes with their preferred
//! category (which it can): deal seekers (fashion, beauty, electronics) answer a discount,
//! forgetful shoppers (books, toys, home) a reminder — the more so the higher their intent —
//! and shipping-averse ones (grocery, sports) free shipping on small carts. Without an offer a
//! shopper orders with probability 2 % + 10 % × intent + 5 % × their purchase propensity.
//!
//! Both policies see the same triggers, contexts and random draws (common random numbers: a
//! shopper who would order under an offer with probability p orders iff the same uniform draw
//! is below p), so the difference is the policies'. The bandit runs inside the service's own
//! [`rl_offer::Policy`]: its decisions are attributed to orders that arrive an hour later,
//! through the same reward window and attribution code, and it learns as the windows close.
//! From the bandit's log (context, action, propensity, reward) the inverse-propensity-scoring
//! estimate of the rule engine's value is printed next to the rule engine's actual value.

use chrono::{Duration, Utc};
use events::generate::Shopper;
use events::{EventType, OfferAction, ProcessedEvent, ProcessedItem, ProcessedOrder, ProductInfo, SourceRef};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rl_offer::{OfferContext, Policy, net_reward, rules_v1};

/// Options of `retargetiq evaluate-offers`.
#[derive(Debug, Clone, clap::Args)]
pub struct OffersArgs {
    /// Decisions (triggers) to simulate.
    #[arg(long, default_value_t = 50_000)]
    pub decisions: u32,
    /// Simulated shoppers.
    #[arg(long, default_value_t = 5_000)]
    pub shoppers: u32,
    #[arg(long, default_value_t = 5)]
    pub seed: u64,
    /// The bandit's exploration rate (the service's `OFFER_EPSILON`).
    #[arg(long, default_value_t = rl_offer::BanditConfig::default().epsilon)]
    pub epsilon: f64,
}

/// What each policy earned.
#[derive(Debug, Clone)]
pub struct OffersReport {
    pub args: OffersArgs,
    /// Net revenue, EUR.
    pub bandit: f64,
    pub rules: f64,
    /// Net revenue of the best action for every decision (knowing the hidden response).
    pub oracle: f64,
    /// IPS estimate of the rule engine's mean reward per decision from the bandit's log, and
    /// its standard error.
    pub ips_rules: f64,
    pub ips_se: f64,
    /// The self-normalised estimate (SNIPS): lower variance, slightly biased.
    pub snips_rules: f64,
    /// The bandit's share of each action, in [`OfferAction::ALL`] order.
    pub bandit_mix: Vec<(OfferAction, f64)>,
    pub rules_mix: Vec<(OfferAction, f64)>,
    /// The bandit's mean reward per decision over the last quarter of the run.
    pub bandit_last_quarter: f64,
    pub rules_last_quarter: f64,
}

impl OffersReport {
    pub fn gain(&self) -> f64 {
        self.bandit / self.rules - 1.0
    }

    pub fn table(&self) -> String {
        let n = f64::from(self.args.decisions);
        let mix = |m: &[(OfferAction, f64)]| {
            m.iter().map(|(a, s)| format!("{} {:.0} %", a.as_str(), s * 100.0)).collect::<Vec<_>>().join(", ")
        };
        let mut out = format!(
            "{} decisions for {} simulated shoppers; rewards are order amounts net of the offer's cost (EUR)\n\n",
            self.args.decisions, self.args.shoppers
        );
        out += "| policy | cumulative net revenue | per decision | last quarter, per decision | actions |\n";
        out += "|---|---:|---:|---:|---|\n";
        out += &format!(
            "| rule engine (original project) | {:.0} | {:.2} | {:.2} | {} |\n",
            self.rules,
            self.rules / n,
            self.rules_last_quarter,
            mix(&self.rules_mix)
        );
        out += &format!(
            "| LinUCB bandit (rl-offer) | {:.0} | {:.2} | {:.2} | {} |\n",
            self.bandit,
            self.bandit / n,
            self.bandit_last_quarter,
            mix(&self.bandit_mix)
        );
        out += &format!("| oracle (knows the hidden response) | {:.0} | {:.2} | | |\n", self.oracle, self.oracle / n);
        out += &format!(
            "\nbandit vs rule engine: {:+.1} %\noff-policy estimate of the rule engine from the bandit's log: \
             IPS {:.2} ± {:.2} (95 %), SNIPS {:.2}, per decision; actual {:.2}\n",
            self.gain() * 100.0,
            self.ips_rules,
            1.96 * self.ips_se,
            self.snips_rules,
            self.rules / n
        );
        out
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Segment {
    DealSeeker,
    Forgetful,
    ShippingAverse,
}

fn segment(category: &str) -> Segment {
    match category {
        "fashion" | "beauty" | "electronics" => Segment::DealSeeker,
        "books" | "toys" | "home" => Segment::Forgetful,
        _ => Segment::ShippingAverse,
    }
}

/// The hidden probability that the shopper orders within the window after `action`.
fn response(shopper: &Shopper, c: &OfferContext, action: OfferAction) -> f64 {
    let base = 0.02 + 0.10 * c.purchase_intent + 0.05 * shopper.purchase_propensity;
    let uplift = match (segment(shopper.favourite_category), action) {
        (_, OfferAction::NoAction) => 0.0,
        (Segment::DealSeeker, OfferAction::Discount10) => 0.18,
        (Segment::DealSeeker, OfferAction::FreeShipping) => 0.06,
        (Segment::DealSeeker, OfferAction::Reminder) => 0.02,
        (Segment::Forgetful, OfferAction::Reminder) => 0.06 + 0.10 * c.purchase_intent,
        (Segment::Forgetful, OfferAction::Discount10) => 0.04,
        (Segment::Forgetful, OfferAction::FreeShipping) => 0.02,
        (Segment::ShippingAverse, OfferAction::FreeShipping) => {
            if c.cart_value < 60.0 {
                0.15
            } else {
                0.05
            }
        }
        (Segment::ShippingAverse, OfferAction::Discount10) => 0.05,
        (Segment::ShippingAverse, OfferAction::Reminder) => 0.03,
    };
    (base + uplift).min(0.95)
}

/// One simulated trigger.
struct Trigger {
    shopper: usize,
    context: OfferContext,
    amount: f64,
    draw: f64,
}

fn triggers(args: &OffersArgs, shoppers: &[Shopper], rng: &mut StdRng) -> Vec<Trigger> {
    (0..args.decisions)
        .map(|_| {
            let i = rng.random_range(0..shoppers.len());
            let kind = rng.random_range(0..3);
            let cart_value = if kind == 0 { rng.random_range(15.0..200.0_f64).round() } else { 0.0 };
            let context = OfferContext {
                purchase_intent: rng.random(),
                recency: rng.random_range(0.2..1.0),
                activity: rng.random(),
                cart_value,
                days_since_last_visit: if kind == 2 {
                    rng.random_range(14.0..60.0)
                } else {
                    rng.random_range(0.0..5.0)
                },
                category: Some(shoppers[i].favourite_category.to_owned()),
            };
            let amount = if cart_value > 0.0 { cart_value } else { rng.random_range(20.0..120.0_f64).round() };
            Trigger { shopper: i, context, amount, draw: rng.random() }
        })
        .collect()
}

fn order_event(n: usize, user: &str, amount: f64, at: chrono::DateTime<Utc>, decision: &str) -> ProcessedEvent {
    let p = &catalog::Catalog::demo().products()[n % catalog::PRODUCT_COUNT];
    ProcessedEvent {
        schema_version: events::SCHEMA_VERSION,
        event_id: format!("sim-order-{n}"),
        user_id: user.to_owned(),
        session_id: format!("sim-{n}"),
        event_type: EventType::Purchase,
        occurred_at: at,
        processed_at: at,
        correlation_id: String::new(),
        product: None,
        campaign_id: None,
        query: None,
        recommendation_id: None,
        order: Some(ProcessedOrder {
            order_id: format!("sim-order-{n}"),
            amount,
            currency: "EUR".into(),
            items: vec![ProcessedItem {
                product: ProductInfo::from_catalog(catalog::Catalog::demo(), &p.id),
                quantity: 1,
                unit_price: amount,
            }],
            offer_decision_id: Some(decision.to_owned()),
        }),
        source: SourceRef { topic: "simulation".into(), partition: 0, offset: n as i64 },
    }
}

/// Runs the simulation.
pub fn run(args: &OffersArgs) -> anyhow::Result<OffersReport> {
    anyhow::ensure!(args.decisions >= 4 && args.shoppers > 0, "nothing to simulate");
    let mut rng = StdRng::seed_from_u64(args.seed);
    let shoppers: Vec<Shopper> = (1..=args.shoppers).map(|n| Shopper::new("offer", n, &mut rng)).collect();
    let traffic = triggers(args, &shoppers, &mut rng);

    let mut config = rl_offer::Config::default();
    config.bandit.epsilon = args.epsilon;
    let mut policy = Policy::new(config.clone(), StdRng::seed_from_u64(args.seed ^ 0xb4d1));
    let start = Utc::now() - Duration::days(30);
    let spacing = Duration::seconds(30);
    let order_delay = Duration::hours(1);
    // Orders waiting to happen: (time, event).
    let mut orders: std::collections::VecDeque<(chrono::DateTime<Utc>, ProcessedEvent)> = Default::default();

    let (mut bandit, mut rules, mut oracle) = (0.0, 0.0, 0.0);
    // Per decision: the importance-weighted reward, and the weight (for SNIPS).
    let mut ips_terms: Vec<(f64, f64)> = Vec::with_capacity(traffic.len());
    let (mut bandit_late, mut rules_late) = (0.0, 0.0);
    let late_from = traffic.len() * 3 / 4;
    let mut bandit_mix = [0usize; 4];
    let mut rules_mix = [0usize; 4];
    let index = |a: OfferAction| OfferAction::ALL.iter().position(|x| *x == a).unwrap_or(0);
    for (n, t) in traffic.iter().enumerate() {
        let now = start + spacing * n as i32;
        while orders.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, o)) = orders.pop_front() {
                policy.on_order(&o);
            }
        }
        policy.sweep(now);
        let shopper = &shoppers[t.shopper];
        let outcome = |a: OfferAction| {
            let ordered = t.draw < response(shopper, &t.context, a);
            net_reward(a, ordered.then_some(t.amount))
        };

        let d = policy.decide(&shopper.user_id, &t.context, "simulation", now);
        let r = outcome(d.action);
        if t.draw < response(shopper, &t.context, d.action) {
            orders.push_back((
                now + order_delay,
                order_event(n, &shopper.user_id, t.amount, now + order_delay, &d.decision_id),
            ));
        }
        bandit += r;
        bandit_mix[index(d.action)] += 1;

        let (rule_action, _) = rules_v1(&t.context);
        let rr = outcome(rule_action);
        rules += rr;
        rules_mix[index(rule_action)] += 1;
        let weight = if rule_action == d.action { 1.0 / d.propensity } else { 0.0 };
        ips_terms.push((weight * r, weight));
        if n >= late_from {
            bandit_late += r;
            rules_late += rr;
        }

        // The best action in expectation, knowing the hidden response.
        let expected = |a: OfferAction| {
            let p = response(shopper, &t.context, a);
            p * net_reward(a, Some(t.amount)) + (1.0 - p) * net_reward(a, None)
        };
        let best = OfferAction::ALL.into_iter().max_by(|a, b| expected(*a).total_cmp(&expected(*b)));
        oracle += best.map_or(0.0, outcome);
    }
    let n = traffic.len() as f64;
    let ips = ips_terms.iter().map(|t| t.0).sum::<f64>() / n;
    let variance = ips_terms.iter().map(|t| (t.0 - ips).powi(2)).sum::<f64>() / (n - 1.0);
    let weights: f64 = ips_terms.iter().map(|t| t.1).sum();
    let late = (traffic.len() - late_from) as f64;
    let mix = |m: [usize; 4]| OfferAction::ALL.iter().zip(m).map(|(a, c)| (*a, c as f64 / n)).collect();
    Ok(OffersReport {
        args: args.clone(),
        bandit,
        rules,
        oracle,
        ips_rules: ips,
        ips_se: (variance / n).sqrt(),
        snips_rules: if weights > 0.0 { ips * n / weights } else { 0.0 },
        bandit_mix: mix(bandit_mix),
        rules_mix: mix(rules_mix),
        bandit_last_quarter: bandit_late / late,
        rules_last_quarter: rules_late / late,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bandit_beats_the_rules_and_ips_sees_the_rules_value() {
        let report = run(&OffersArgs { decisions: 6_000, shoppers: 2_000, seed: 2, epsilon: 0.05 }).expect("runs");
        println!("{}", report.table());
        assert!(report.gain() > 0.2, "{}", report.table());
        assert!(report.oracle >= report.bandit, "{}", report.table());
        // The estimate is unbiased: the actual value lies within its error bars.
        let actual = report.rules / 6_000.0;
        assert!((report.ips_rules - actual).abs() < 3.0 * report.ips_se, "{}", report.table());
        assert!(report.ips_se > 0.0);
    }
}
