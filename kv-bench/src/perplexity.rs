//! Teacher-forced scoring of a long text, as llama.cpp's `llama-perplexity` reports it:
//! perplexity overall and per segment, and, against a base model's distributions, the mean
//! KL divergence and the share of positions whose top-1 token is the base's ("same top p").
//!
//! The text goes through the model in chunks of a cache, each chunk's logits scoring the token
//! after each of its positions, so the whole text is one sequence (no restart per window).
//! Position `i`'s logits predict token `i + 1`; the first token is never scored. The cache may
//! be of any kind: streamed through a window, a sink cache or a quantized cache, the text
//! measures what each costs in quality the way StreamingLLM and KIVI measured it.

use burn::tensor::{backend::Backend, Tensor};
use kv_core::{CacheConfig, CacheKind, CacheSizes, CacheSpec};
use kv_model::{Logits, ModelError, Transformer};
use serde::Serialize;

/// One position's log-probabilities, from logits (a numerically stable log-softmax in f64).
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|&v| v as f64 - log_sum).collect()
}

/// `KL(base || other)` between two distributions given as log-probabilities.
///
/// ```
/// use kv_bench::perplexity::{kl_divergence, log_softmax};
/// let p = log_softmax(&[1.0, 2.0, 3.0]);
/// assert!(kl_divergence(&p, &p).abs() < 1e-12);
/// assert!(kl_divergence(&p, &log_softmax(&[3.0, 2.0, 1.0])) > 0.0);
/// ```
pub fn kl_divergence(base: &[f64], other: &[f64]) -> f64 {
    base.iter()
        .zip(other)
        .map(|(&p, &q)| p.exp() * (p - q))
        .sum()
}

fn argmax(values: &[f64]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// Scores `tokens` with `model` through a `cache` of any kind (and, in the same pass, `base`
/// through a dynamic cache, for the KL divergence and same-top-1 share), feeding chunks of
/// `chunk` positions: the text streams through the cache as it would in generation, so a
/// window or sink cache never holds more than its budget between chunks, and each query sees
/// only what the kind keeps. Returns the score (segments of `segment` positions, curve bins of
/// `bin`) and the model's cache bytes at the end.
pub fn score<B: Backend>(
    model: &Transformer<B>,
    cache: &CacheConfig,
    base: Option<&Transformer<B>>,
    tokens: &[u32],
    chunk: usize,
    bins: Bins,
) -> Result<(Score, usize), ModelError> {
    let mut model_cache = model.new_cache(cache)?;
    let dense = CacheConfig::Dynamic {
        capacity: tokens.len(),
    };
    let mut base_cache = base.map(|b| b.new_cache(&dense)).transpose()?;
    let mut scorer = Scorer::default();
    let scored = tokens.len().saturating_sub(1);
    let mut start = 0;
    while start < scored {
        let end = (start + chunk.max(1)).min(scored);
        let ids = [tokens[start..end].to_vec()];
        let rows = log_rows(model.forward(&ids, None, Some(&mut model_cache), Logits::All)?);
        let base_rows = match (base, base_cache.as_mut()) {
            (Some(b), Some(c)) => Some(log_rows(b.forward(&ids, None, Some(c), Logits::All)?)),
            _ => None,
        };
        for (i, row) in rows.iter().enumerate() {
            let base_row = base_rows.as_ref().map(|r| r[i].as_slice());
            scorer.add(row, tokens[start + i + 1], base_row);
        }
        start = end;
    }
    Ok((scorer.finish(bins), model_cache.memory_bytes()))
}

/// How a [`Score`] groups its positions: `segment` positions per reported perplexity, `curve`
/// positions per point of the log-perplexity curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bins {
    /// Positions per [`Segment`].
    pub segment: usize,
    /// Positions per point of [`Score::curve`].
    pub curve: usize,
}

/// A cache kind to stream a text through, as `kv-bench perplexity --cache` names it.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheRun {
    /// What the tables and the plot call it: `dynamic`, `sliding 256`, `sink 4+252`, `int8`.
    pub label: String,
    /// The cache.
    pub config: CacheConfig,
}

impl CacheRun {
    /// The run for `spec` (`dynamic`, `sliding[:W]`, `sink[:S+W]`, `int8`, `int4`). A bare
    /// `sliding` holds `budget` positions, a bare `sink` holds `sinks` sinks and
    /// `budget - sinks` window positions, so both spend the same memory; `sink_positions` is
    /// where the model needs a sink cache's keys ([`kv_model::ModelConfig::sink_positions`]).
    ///
    /// ```
    /// use kv_bench::perplexity::CacheRun;
    /// use kv_core::{CacheConfig, SinkPositions};
    ///
    /// let run = CacheRun::new("sink".parse().unwrap(), 256, 4, SinkPositions::CacheRanks).unwrap();
    /// assert_eq!(run.label, "sink 4+252");
    /// let run = CacheRun::new("sliding:128".parse().unwrap(), 256, 4, SinkPositions::CacheRanks).unwrap();
    /// assert_eq!(run.config, CacheConfig::SlidingWindow { window: 128 });
    /// assert!(CacheRun::new("static".parse().unwrap(), 256, 4, SinkPositions::CacheRanks).is_err());
    /// ```
    pub fn new(
        spec: CacheSpec,
        budget: usize,
        sinks: usize,
        sink_positions: kv_core::SinkPositions,
    ) -> Result<Self, String> {
        let sinks = spec.sinks.unwrap_or(sinks);
        let window = match (spec.kind, spec.window) {
            (_, Some(window)) => window,
            (CacheKind::Sink, None) if budget > sinks => budget - sinks,
            (CacheKind::Sink, None) => {
                return Err(format!(
                    "--cache sink: a budget of {budget} positions leaves no window after \
                     {sinks} sinks"
                ))
            }
            (_, None) => budget,
        };
        if spec.kind == CacheKind::Static {
            return Err(
                "--cache static: a text streams through dynamic, sliding, sink, int8 or int4 \
                 (a static cache is a dynamic one, preallocated)"
                    .to_string(),
            );
        }
        let sizes = CacheSizes {
            capacity: 256,
            max_batch: 1,
            max_len: budget,
            window,
            sinks,
            sink_positions,
        };
        let config = spec.config(&sizes).map_err(|e| e.to_string())?;
        let label = match &config {
            CacheConfig::SlidingWindow { window } => format!("sliding {window}"),
            CacheConfig::Sink { sinks, window, .. } => format!("sink {sinks}+{window}"),
            other => other.kind().name().to_string(),
        };
        Ok(Self { label, config })
    }

    /// Whether the positions the model sees through this cache stay inside the cache (a sink
    /// cache that re-rotates its keys), so the text may run past the model's context.
    pub fn runs_past_the_context(&self) -> bool {
        self.config.bounds_positions()
    }
}

/// `[1, seq, vocab]` logits as log-probability rows.
fn log_rows<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<f64>> {
    let [_, seq, vocab] = logits.dims();
    let values = logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 after convert");
    (0..seq)
        .map(|i| log_softmax(&values[i * vocab..(i + 1) * vocab]))
        .collect()
}

/// Perplexity over a segment of scored positions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Segment {
    /// First scored position.
    pub start: usize,
    /// Positions scored.
    pub tokens: usize,
    /// `exp(mean NLL)` over them.
    pub perplexity: f64,
}

/// What scoring a text with one model found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Score {
    /// Positions scored (the text's tokens less one).
    pub tokens: usize,
    /// `exp(mean NLL)`.
    pub perplexity: f64,
    /// Mean negative log-likelihood, in nats.
    pub mean_nll: f64,
    /// Per segment of `segment` positions.
    pub segments: Vec<Segment>,
    /// Mean `KL(base || this)`, when a base was given.
    pub kl_divergence: Option<f64>,
    /// Share of positions whose most likely token is the base's.
    pub same_top1: Option<f64>,
    /// Positions per point of `curve`.
    pub curve_bin: usize,
    /// Mean NLL (log-perplexity) of each run of `curve_bin` scored positions, in order: the
    /// curve StreamingLLM plots against position.
    pub curve: Vec<f64>,
}

/// Running sums for a [`Score`].
#[derive(Debug, Default)]
pub struct Scorer {
    nll: Vec<f64>,
    kl_sum: f64,
    same: usize,
    compared: usize,
}

impl Scorer {
    /// Adds position `i`'s row, predicting `next`, with the base's row at the same position
    /// if there is one.
    pub fn add(&mut self, row: &[f64], next: u32, base: Option<&[f64]>) {
        self.nll.push(-row[next as usize]);
        if let Some(base) = base {
            self.kl_sum += kl_divergence(base, row);
            self.same += usize::from(argmax(base) == argmax(row));
            self.compared += 1;
        }
    }

    /// The score, grouped as `bins` says.
    pub fn finish(self, bins: Bins) -> Score {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let mean_nll = mean(&self.nll);
        let segment = bins.segment;
        let curve_bin = bins.curve.max(1);
        let curve = self.nll.chunks(curve_bin).map(mean).collect();
        let segments = self
            .nll
            .chunks(segment.max(1))
            .enumerate()
            .map(|(i, part)| Segment {
                start: i * segment.max(1),
                tokens: part.len(),
                perplexity: mean(part).exp(),
            })
            .collect();
        let compared = self.compared.max(1) as f64;
        Score {
            tokens: self.nll.len(),
            perplexity: mean_nll.exp(),
            mean_nll,
            segments,
            kl_divergence: (self.compared > 0).then(|| self.kl_sum / compared),
            same_top1: (self.compared > 0).then(|| self.same as f64 / compared),
            curve_bin,
            curve,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_sums_to_one_and_survives_large_logits() {
        let row = log_softmax(&[1000.0, 1000.0, 0.0]);
        let total: f64 = row.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!((row[0] - 0.5f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn a_uniform_model_has_the_vocabulary_as_perplexity() {
        let mut scorer = Scorer::default();
        let uniform = log_softmax(&[0.0; 8]);
        for next in [1, 5, 7, 0] {
            scorer.add(&uniform, next, Some(&uniform));
        }
        let score = scorer.finish(Bins {
            segment: 2,
            curve: 3,
        });
        assert!((score.perplexity - 8.0).abs() < 1e-9);
        assert_eq!(score.segments.len(), 2);
        assert_eq!(score.curve.len(), 2);
        assert!((score.curve[0] - 8f64.ln()).abs() < 1e-12);
        assert_eq!(score.kl_divergence, Some(0.0));
        assert_eq!(score.same_top1, Some(1.0));
    }

    #[test]
    fn kl_and_top1_see_a_different_model() {
        let base = log_softmax(&[3.0, 0.0, 0.0]);
        let other = log_softmax(&[0.0, 3.0, 0.0]);
        let mut scorer = Scorer::default();
        scorer.add(&other, 1, Some(&base));
        let score = scorer.finish(Bins {
            segment: 512,
            curve: 64,
        });
        assert!(score.kl_divergence.unwrap() > 1.0);
        assert_eq!(score.same_top1, Some(0.0));
        assert!((score.mean_nll + other[1]).abs() < 1e-12);
    }
}
