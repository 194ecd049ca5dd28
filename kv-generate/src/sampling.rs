//! Choosing the next token from logits: penalties, temperature, top-k, top-p and min-p
//! filtering, then a seeded draw (or the argmax when greedy).
//!
//! The processing runs on the host over one row of logits, in the order transformers applies
//! the same processors: repetition penalty, frequency and presence penalties, temperature,
//! top-k, top-p, min-p.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{GenerateError, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// `None`: greedy (argmax). `Some(t)`: sample from `softmax(logits / t)`; `t > 0`.
    pub temperature: Option<f32>,
    /// Keep only the `k` most likely tokens (`k >= 1`).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probabilities sum to at least `p`, `0 < p <= 1`.
    pub top_p: Option<f32>,
    /// Drop tokens less likely than `min_p` times the most likely one, `0 <= min_p <= 1`.
    pub min_p: Option<f32>,
    /// Divide positive logits (multiply negative ones) of tokens already in the sequence by
    /// this (`> 0`; 1 is off), as transformers' `repetition_penalty`.
    pub repetition_penalty: f32,
    /// Subtract `count * frequency_penalty` from each seen token's logit.
    pub frequency_penalty: f32,
    /// Subtract `presence_penalty` from each seen token's logit once.
    pub presence_penalty: f32,
    /// Seed of the random draws: the same seed gives the same tokens on the same backend.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingConfig {
    /// Argmax, no penalties.
    pub fn greedy() -> Self {
        Self {
            temperature: None,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }

    /// Whether any penalty (repetition, frequency, presence) is on.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }

    /// Checks every parameter's range.
    ///
    /// ```
    /// use kv_generate::SamplingConfig;
    ///
    /// let bad = SamplingConfig { temperature: Some(-1.0), ..SamplingConfig::greedy() };
    /// assert!(bad.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(GenerateError::InvalidSampling(m));
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t > 0.0) {
                return fail(format!(
                    "temperature must be positive, got {t} (use greedy for 0)"
                ));
            }
        }
        if self.top_k == Some(0) {
            return fail("top-k must be at least 1".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return fail(format!("top-p must be in (0, 1], got {p}"));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return fail(format!("min-p must be in [0, 1], got {p}"));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return fail(format!(
                "repetition penalty must be positive, got {}",
                self.repetition_penalty
            ));
        }
        if !self.frequency_penalty.is_finite() || !self.presence_penalty.is_finite() {
            return fail("frequency and presence penalties must be finite".into());
        }
        Ok(())
    }

    /// Whether the choice is the plain argmax of the logits.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_none()
            && self.repetition_penalty == 1.0
            && self.frequency_penalty == 0.0
            && self.presence_penalty == 0.0
    }
}

/// A [`SamplingConfig`] with its random state.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler; errors if a parameter is out of range.
    pub fn new(config: SamplingConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// Whether [`Sampler::sample`] reads its `context` (only the penalties do), so a caller
    /// can skip assembling it.
    pub fn uses_context(&self) -> bool {
        self.config.has_penalties()
    }

    /// The next token after `context` (prompt and generated tokens, for the penalties), from
    /// one row of logits.
    ///
    /// ```
    /// use kv_generate::{Sampler, SamplingConfig};
    ///
    /// let mut greedy = Sampler::new(SamplingConfig::greedy()).unwrap();
    /// assert_eq!(greedy.sample(&[0.1, 2.0, -1.0], &[]), 1);
    /// ```
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        self.apply_penalties(&mut logits, context);
        let Some(temperature) = self.config.temperature else {
            return argmax(&logits);
        };
        logits.iter_mut().for_each(|l| *l /= temperature);
        // Softmax over the survivors, then one draw.
        let p = self.softmax(&logits);
        self.draw(&p)
    }

    /// The distribution [`Sampler::sample`] draws from after `context`: `(id, probability)`
    /// of the tokens the penalties, temperature and filters leave, most likely first, summing
    /// to 1. For a greedy sampler, the argmax with probability 1.
    ///
    /// ```
    /// use kv_generate::{Sampler, SamplingConfig};
    ///
    /// let config = SamplingConfig { temperature: Some(1.0), top_k: Some(2), ..SamplingConfig::greedy() };
    /// let p = Sampler::new(config).unwrap().distribution(&[0.0, 2.0, 2.0f32.ln() + 2.0], &[]);
    /// assert_eq!((p[0].0, p[1].0), (2, 1)); // token 0 filtered out by top-k
    /// assert!((p[0].1 - 2.0 / 3.0).abs() < 1e-6 && (p[1].1 - 1.0 / 3.0).abs() < 1e-6);
    /// ```
    pub fn distribution(&self, logits: &[f32], context: &[u32]) -> Vec<(u32, f64)> {
        let mut logits = logits.to_vec();
        self.apply_penalties(&mut logits, context);
        let Some(temperature) = self.config.temperature else {
            return vec![(argmax(&logits), 1.0)];
        };
        logits.iter_mut().for_each(|l| *l /= temperature);
        self.softmax(&logits)
    }

    /// The filters' survivors among tempered `logits`, with their softmax probabilities.
    fn softmax(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let candidates = self.filter(logits);
        let max = candidates
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = candidates
            .iter()
            .map(|c| f64::from((c.1 - max).exp()))
            .collect();
        let total: f64 = weights.iter().sum();
        candidates
            .iter()
            .zip(weights)
            .map(|(c, w)| (c.0, w / total))
            .collect()
    }

    /// One draw from `weights` (`(id, weight)`, not necessarily normalised; the last id when
    /// rounding leaves the draw past the end).
    pub fn draw(&mut self, weights: &[(u32, f64)]) -> u32 {
        let total: f64 = weights.iter().map(|w| w.1).sum();
        let mut target = self.rng.random::<f64>() * total;
        for &(id, weight) in weights {
            target -= weight;
            if target <= 0.0 {
                return id;
            }
        }
        weights.last().map_or(0, |w| w.0)
    }

    /// A uniform draw in `[0, 1)` from the sampler's random state.
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    fn apply_penalties(&self, logits: &mut [f32], context: &[u32]) {
        let c = &self.config;
        if !self.uses_context() {
            return;
        }
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &id in context {
            *counts.entry(id).or_default() += 1;
        }
        for (&id, &count) in &counts {
            let Some(logit) = logits.get_mut(id as usize) else {
                continue;
            };
            if c.repetition_penalty != 1.0 {
                *logit = if *logit > 0.0 {
                    *logit / c.repetition_penalty
                } else {
                    *logit * c.repetition_penalty
                };
            }
            *logit -= count as f32 * c.frequency_penalty + c.presence_penalty;
        }
    }

    /// `(id, logit)` of the tokens top-k, top-p and min-p keep, most likely first.
    fn filter(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = self.config.top_k {
            candidates.truncate(k);
        }
        if self.config.top_p.is_some() || self.config.min_p.is_some() {
            let max = candidates.first().map_or(0.0, |c| c.1);
            let probs: Vec<f32> = candidates.iter().map(|c| (c.1 - max).exp()).collect();
            let total: f32 = probs.iter().sum();
            let mut keep = candidates.len();
            if let Some(p) = self.config.top_p {
                let mut cumulative = 0.0;
                for (i, prob) in probs.iter().enumerate() {
                    cumulative += prob / total;
                    if cumulative >= p {
                        keep = keep.min(i + 1);
                        break;
                    }
                }
            }
            if let Some(min_p) = self.config.min_p {
                // probs[0] is the most likely token's (unnormalised) probability.
                let floor = min_p * probs[0];
                keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
            }
            candidates.truncate(keep);
        }
        candidates
    }
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(config: SamplingConfig) -> Sampler {
        Sampler::new(config).unwrap()
    }

    fn sampled(config: SamplingConfig, logits: &[f32], draws: usize) -> Vec<u32> {
        let mut s = sampler(config);
        (0..draws).map(|_| s.sample(logits, &[])).collect()
    }

    #[test]
    fn invalid_settings_are_errors() {
        let g = SamplingConfig::greedy;
        for bad in [
            SamplingConfig {
                temperature: Some(0.0),
                ..g()
            },
            SamplingConfig {
                temperature: Some(-0.5),
                ..g()
            },
            SamplingConfig {
                temperature: Some(f32::NAN),
                ..g()
            },
            SamplingConfig {
                top_k: Some(0),
                ..g()
            },
            SamplingConfig {
                top_p: Some(0.0),
                ..g()
            },
            SamplingConfig {
                top_p: Some(1.5),
                ..g()
            },
            SamplingConfig {
                min_p: Some(-0.1),
                ..g()
            },
            SamplingConfig {
                repetition_penalty: 0.0,
                ..g()
            },
        ] {
            assert!(Sampler::new(bad.clone()).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_draws() {
        let config = SamplingConfig {
            temperature: Some(1.0),
            seed: 42,
            ..SamplingConfig::greedy()
        };
        let logits = [0.0, 0.5, 1.0, 1.5, 0.2];
        let a = sampled(config.clone(), &logits, 50);
        assert_eq!(a, sampled(config.clone(), &logits, 50));
        let other = sampled(SamplingConfig { seed: 43, ..config }, &logits, 50);
        assert_ne!(a, other);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.3, 2.0, 1.9, -1.0];
        let t = Some(5.0);
        let k1 = SamplingConfig {
            temperature: t,
            top_k: Some(1),
            ..SamplingConfig::greedy()
        };
        assert!(sampled(k1, &logits, 30).iter().all(|&id| id == 1));
        let p = SamplingConfig {
            temperature: t,
            top_p: Some(1e-6),
            ..SamplingConfig::greedy()
        };
        assert!(sampled(p, &logits, 30).iter().all(|&id| id == 1));
    }

    #[test]
    fn filters_keep_exactly_the_documented_sets() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let all = SamplingConfig {
            temperature: Some(1.0),
            ..SamplingConfig::greedy()
        };
        let kept = |config: SamplingConfig| -> Vec<u32> {
            let mut ids: Vec<u32> = sampler(config)
                .filter(&logits)
                .iter()
                .map(|c| c.0)
                .collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(
            kept(SamplingConfig {
                top_k: Some(2),
                ..all.clone()
            }),
            vec![2, 3]
        );
        // softmax([0,1,2,3]) = [0.032, 0.087, 0.237, 0.644]: 0.644 + 0.237 >= 0.8.
        assert_eq!(
            kept(SamplingConfig {
                top_p: Some(0.8),
                ..all.clone()
            }),
            vec![2, 3]
        );
        assert_eq!(
            kept(SamplingConfig {
                top_p: Some(0.9),
                ..all.clone()
            }),
            vec![1, 2, 3]
        );
        // min-p 0.3: keep p >= 0.3 * 0.644 = 0.193.
        assert_eq!(
            kept(SamplingConfig {
                min_p: Some(0.3),
                ..all
            }),
            vec![2, 3]
        );
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with probabilities 0.27 and 0.73 (logits 0 and 1).
        let config = SamplingConfig {
            temperature: Some(1.0),
            seed: 7,
            ..SamplingConfig::greedy()
        };
        let draws = sampled(config, &[0.0, 1.0], 4000);
        let ones = draws.iter().filter(|&&id| id == 1).count() as f64 / 4000.0;
        assert!((ones - 0.731).abs() < 0.03, "{ones}");
    }

    #[test]
    fn penalties_push_seen_tokens_down() {
        let logits = [2.0, 1.9, -1.0];
        let rep = SamplingConfig {
            repetition_penalty: 1.5,
            ..SamplingConfig::greedy()
        };
        // 2.0 / 1.5 = 1.33 < 1.9: token 1 wins once token 0 was seen.
        assert_eq!(sampler(rep.clone()).sample(&logits, &[0]), 1);
        assert_eq!(sampler(rep).sample(&logits, &[]), 0);
        let freq = SamplingConfig {
            frequency_penalty: 0.05,
            ..SamplingConfig::greedy()
        };
        assert_eq!(sampler(freq.clone()).sample(&logits, &[0]), 0); // 1.95 > 1.9
        assert_eq!(sampler(freq).sample(&logits, &[0, 0, 0]), 1); // 1.85 < 1.9
        let presence = SamplingConfig {
            presence_penalty: 0.2,
            ..SamplingConfig::greedy()
        };
        assert_eq!(sampler(presence).sample(&logits, &[0]), 1);
    }
}

/// The log-probability of a chosen token and of the most likely alternatives, from the
/// model's raw logits (before penalties, temperature and filtering, as OpenAI's `logprobs`
/// report them).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The `top` most likely tokens and theirs, most likely first.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// `token`'s log-probability under `softmax(logits)`, and the `top` most likely tokens'.
    ///
    /// ```
    /// use kv_generate::TokenLogprobs;
    ///
    /// let lp = TokenLogprobs::new(&[0.0, 0.0, f32::NEG_INFINITY], 1, 1);
    /// assert!((lp.logprob - 0.5f32.ln()).abs() < 1e-6);
    /// assert_eq!(lp.top.len(), 1);
    /// ```
    pub fn new(logits: &[f32], token: u32, top: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
        let log_total = max + sum.ln() as f32;
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
        if top > 0 {
            for (i, &l) in logits.iter().enumerate() {
                if best.len() == top && l <= best[top - 1].1 {
                    continue;
                }
                let at = best.partition_point(|&(_, b)| b >= l);
                best.insert(at, (i as u32, l));
                best.truncate(top);
            }
        }
        Self {
            token,
            logprob: logits[token as usize] - log_total,
            top: best.into_iter().map(|(i, l)| (i, l - log_total)).collect(),
        }
    }
}
