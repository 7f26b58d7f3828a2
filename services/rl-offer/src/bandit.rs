//! The offer policy: a LinUCB contextual bandit (Li et al., 2010, "disjoint" model: one ridge
//! regression per action) with an ε-greedy floor, so every action keeps a known, non-zero
//! probability — the logged propensity that makes off-policy evaluation possible.
//!
//! For context vector `x` and action `a` the model predicts the reward `θₐ·x` with
//! `θₐ = Aₐ⁻¹ bₐ` (`Aₐ = λI + Σ x xᵀ`, `bₐ = Σ r x` over that action's past decisions) and an
//! uncertainty `√(xᵀ Aₐ⁻¹ x)`. With probability 1 − ε it picks the action with the highest
//! `prediction + α · uncertainty` (optimism drives exploration of actions it knows little
//! about); with probability ε it picks uniformly. `Aₐ⁻¹` is kept directly and updated with the
//! Sherman–Morrison formula, so a decision and an update each cost O(d²) for d features.

use events::OfferAction;
use rand::Rng;
use serde::Serialize;

/// Rewards are net revenue in EUR divided by this, so the regressions see values near 1.
pub const REWARD_SCALE: f64 = 100.0;

/// Exploration settings.
#[derive(Debug, Clone, Copy)]
pub struct BanditConfig {
    /// Probability of a uniformly random action.
    pub epsilon: f64,
    /// Weight of the uncertainty bonus.
    pub alpha: f64,
}

impl Default for BanditConfig {
    fn default() -> Self {
        Self { epsilon: 0.05, alpha: 0.5 }
    }
}

/// One action's ridge regression.
#[derive(Debug, Clone)]
struct Arm {
    a_inv: Vec<f64>,
    b: Vec<f64>,
    pulls: u64,
    reward_sum: f64,
}

impl Arm {
    fn new(d: usize) -> Self {
        let mut a_inv = vec![0.0; d * d];
        for i in 0..d {
            a_inv[i * d + i] = 1.0;
        }
        Self { a_inv, b: vec![0.0; d], pulls: 0, reward_sum: 0.0 }
    }

    fn d(&self) -> usize {
        self.b.len()
    }

    /// `A⁻¹ x`.
    fn a_inv_x(&self, x: &[f64]) -> Vec<f64> {
        let d = self.d();
        (0..d).map(|i| (0..d).map(|j| self.a_inv[i * d + j] * x[j]).sum()).collect()
    }

    /// (predicted reward, uncertainty).
    fn estimate(&self, x: &[f64]) -> (f64, f64) {
        let ax = self.a_inv_x(x);
        let mean: f64 = ax.iter().zip(&self.b).map(|(a, b)| a * b).sum();
        let var: f64 = ax.iter().zip(x).map(|(a, x)| a * x).sum();
        (mean, var.max(0.0).sqrt())
    }

    fn learn(&mut self, x: &[f64], reward: f64) {
        let d = self.d();
        let ax = self.a_inv_x(x);
        let denom = 1.0 + ax.iter().zip(x).map(|(a, x)| a * x).sum::<f64>();
        for i in 0..d {
            for j in 0..d {
                self.a_inv[i * d + j] -= ax[i] * ax[j] / denom;
            }
        }
        for (bi, xi) in self.b.iter_mut().zip(x) {
            *bi += reward * xi;
        }
        self.pulls += 1;
        self.reward_sum += reward;
    }
}

/// The policy's view of one action for one context.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ActionScore {
    pub action: OfferAction,
    /// Predicted net revenue, EUR.
    pub expected: f64,
    /// Uncertainty bonus, EUR.
    pub bonus: f64,
}

/// A choice and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub action: OfferAction,
    /// Probability that the policy picks this action in this context.
    pub propensity: f64,
    pub explored: bool,
    pub scores: Vec<ActionScore>,
}

impl Choice {
    /// The choice in words, for the decision log and the UI.
    pub fn explanation(&self) -> String {
        let mut s = if self.explored {
            format!("explored: {} chosen at random (ε-greedy)", self.action.as_str())
        } else {
            format!("{} has the highest expected net revenue plus uncertainty bonus", self.action.as_str())
        };
        s += "; LinUCB per action (expected EUR + bonus):";
        for sc in &self.scores {
            s += &format!(" {} {:.2}+{:.2}", sc.action.as_str(), sc.expected, sc.bonus);
        }
        s
    }
}

/// Per-action statistics, for the API and the UI.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ArmStats {
    pub action: OfferAction,
    pub decisions_learned: u64,
    /// Mean observed net revenue per decision, EUR.
    pub mean_reward: f64,
}

/// The contextual bandit over [`OfferAction::ALL`].
#[derive(Debug, Clone)]
pub struct Bandit {
    config: BanditConfig,
    arms: Vec<(OfferAction, Arm)>,
}

impl Bandit {
    pub fn new(dimensions: usize, config: BanditConfig) -> Self {
        Self { config, arms: OfferAction::ALL.iter().map(|a| (*a, Arm::new(dimensions))).collect() }
    }

    /// Every action's estimate for `x`, in [`OfferAction::ALL`] order.
    pub fn scores(&self, x: &[f64]) -> Vec<ActionScore> {
        self.arms
            .iter()
            .map(|(action, arm)| {
                let (mean, sd) = arm.estimate(x);
                ActionScore {
                    action: *action,
                    expected: mean * REWARD_SCALE,
                    bonus: self.config.alpha * sd * REWARD_SCALE,
                }
            })
            .collect()
    }

    /// The action the policy prefers without exploring (ties go to the cheaper action,
    /// earlier in [`OfferAction::ALL`]).
    pub fn greedy(&self, x: &[f64]) -> OfferAction {
        best(&self.scores(x))
    }

    /// The probability that [`Bandit::choose`] picks `action` for `x`.
    pub fn propensity(&self, x: &[f64], action: OfferAction) -> f64 {
        let k = self.arms.len() as f64;
        let explore = self.config.epsilon / k;
        if self.greedy(x) == action { 1.0 - self.config.epsilon + explore } else { explore }
    }

    /// Picks an action for context `x`.
    pub fn choose(&self, x: &[f64], rng: &mut impl Rng) -> Choice {
        let scores = self.scores(x);
        let greedy = best(&scores);
        let explored = rng.random_bool(self.config.epsilon.clamp(0.0, 1.0));
        let action = if explored { OfferAction::ALL[rng.random_range(0..OfferAction::ALL.len())] } else { greedy };
        let k = self.arms.len() as f64;
        let explore = self.config.epsilon / k;
        let propensity = if action == greedy { 1.0 - self.config.epsilon + explore } else { explore };
        Choice { action, propensity, explored: explored && action != greedy, scores }
    }

    /// Learns the net revenue (EUR) that `action` earned in context `x`.
    pub fn learn(&mut self, x: &[f64], action: OfferAction, reward_eur: f64) {
        if let Some((_, arm)) = self.arms.iter_mut().find(|(a, _)| *a == action) {
            arm.learn(x, reward_eur / REWARD_SCALE);
        }
    }

    pub fn stats(&self) -> Vec<ArmStats> {
        self.arms
            .iter()
            .map(|(action, arm)| ArmStats {
                action: *action,
                decisions_learned: arm.pulls,
                mean_reward: if arm.pulls == 0 { 0.0 } else { arm.reward_sum * REWARD_SCALE / arm.pulls as f64 },
            })
            .collect()
    }
}

fn best(scores: &[ActionScore]) -> OfferAction {
    let mut best = scores[0];
    for s in &scores[1..] {
        if s.expected + s.bonus > best.expected + best.bonus + 1e-12 {
            best = *s;
        }
    }
    best.action
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn it_learns_which_action_pays_in_which_context() {
        // Two contexts: in the first a reminder earns 30 EUR and the rest nothing; in the
        // second a discount earns 20 EUR.
        let mut bandit = Bandit::new(3, BanditConfig::default());
        let mut rng = StdRng::seed_from_u64(1);
        let contexts = [[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]];
        let pays = |i: usize, a: OfferAction| match (i, a) {
            (0, OfferAction::Reminder) => 30.0,
            (1, OfferAction::Discount10) => 20.0,
            _ => 0.0,
        };
        let mut late_reward = 0.0;
        for n in 0..2_000 {
            let i = n % 2;
            let c = bandit.choose(&contexts[i], &mut rng);
            assert!(c.propensity > 0.0 && c.propensity <= 1.0);
            let r = pays(i, c.action);
            if n >= 1_000 {
                late_reward += r;
            }
            bandit.learn(&contexts[i], c.action, r);
        }
        assert_eq!(bandit.greedy(&contexts[0]), OfferAction::Reminder);
        assert_eq!(bandit.greedy(&contexts[1]), OfferAction::Discount10);
        // Mostly exploiting by now: near the best possible 25 EUR per decision.
        assert!(late_reward / 1_000.0 > 22.0, "{}", late_reward / 1_000.0);
        let p = bandit.propensity(&contexts[0], OfferAction::Reminder);
        assert!((p - (1.0 - 0.05 + 0.05 / 4.0)).abs() < 1e-12);
        assert!((bandit.propensity(&contexts[0], OfferAction::NoAction) - 0.05 / 4.0).abs() < 1e-12);
        let c = bandit.choose(&contexts[0], &mut rng);
        assert!(c.explanation().contains("REMINDER"), "{}", c.explanation());
    }

    #[test]
    fn sherman_morrison_matches_the_definition() {
        // After learning x = (1, 2), A = I + x xᵀ = [[2, 2], [2, 5]], so A⁻¹ = [[5, -2], [-2, 2]] / 6.
        let mut arm = Arm::new(2);
        arm.learn(&[1.0, 2.0], 1.0);
        let expected = [5.0 / 6.0, -2.0 / 6.0, -2.0 / 6.0, 2.0 / 6.0];
        for (a, e) in arm.a_inv.iter().zip(expected) {
            assert!((a - e).abs() < 1e-12, "{:?}", arm.a_inv);
        }
    }
}
