//! Beam search as Hugging Face transformers defines it (`generate(num_beams=..)`), through any
//! cache: the running beams are batch rows, and each step the cache keeps the rows of the
//! beams that survive ([`kv_core::ModelCache::select_batch`], a row may repeat), so no prefix
//! is ever recomputed.
//!
//! One step, with `B` beams, `V` tokens and `K = (1 + eos ids) * B` (at least `2B`):
//!
//! 1. Every running beam's score plus the log-softmax of its next-token logits gives `B * V`
//!    candidates; keep the best `K`, best first.
//! 2. A candidate ending in EOS, or reaching `max_new_tokens`, is finished. A finished candidate
//!    ranked among the first `B` joins the finished hypotheses with score
//!    `sum of log-probabilities / generated_len ^ length_penalty`; only the best `B` hypotheses
//!    are kept. (Having looked at `K` candidates guarantees `B` unfinished ones.)
//! 3. The best `B` unfinished candidates are the next running beams.
//! 4. Stop at `max_new_tokens`; or when `B` hypotheses are finished and the best running beam
//!    cannot beat the worst of them ([`EarlyStopping`] says how that is judged); or, with
//!    [`EarlyStopping::WhenFull`], as soon as `B` hypotheses are finished.
//!
//! The hypotheses come back best first; transformers calls their scores `sequences_scores`.

use std::str::FromStr;
use std::time::Instant;

use burn::tensor::backend::Backend;
use kv_model::{Logits, SpecialTokens};

use crate::error::{GenerateError, Result};
use crate::generate::{host_rows, CacheChoice, FinishReason, GenerationConfig, Generator, Timings};

/// When beam search may stop before `max_new_tokens` (transformers' `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `early_stopping=True`: as soon as `num_beams` hypotheses are finished.
    WhenFull,
    /// `early_stopping=False` (the default): when `num_beams` hypotheses are finished and the
    /// best running beam, scored at its current length, is not better than the worst of them.
    #[default]
    Heuristic,
    /// `early_stopping="never"`: as [`EarlyStopping::Heuristic`], but with a positive length
    /// penalty the running beam is scored at `max_new_tokens`, the best it could still reach
    /// (the canonical beam search, given `length_penalty` 0).
    Never,
}

impl EarlyStopping {
    /// transformers' spelling: `true`, `false` or `never`.
    pub fn name(self) -> &'static str {
        match self {
            EarlyStopping::WhenFull => "true",
            EarlyStopping::Heuristic => "false",
            EarlyStopping::Never => "never",
        }
    }
}

impl FromStr for EarlyStopping {
    type Err = GenerateError;

    /// `true`, `false` or `never`, as transformers spells them.
    ///
    /// ```
    /// use kv_generate::EarlyStopping;
    ///
    /// assert_eq!("never".parse::<EarlyStopping>().unwrap(), EarlyStopping::Never);
    /// assert!("sometimes".parse::<EarlyStopping>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "true" => Ok(EarlyStopping::WhenFull),
            "false" => Ok(EarlyStopping::Heuristic),
            "never" => Ok(EarlyStopping::Never),
            other => Err(GenerateError::InvalidRequest(format!(
                "early stopping is true, false or never, not {other:?}"
            ))),
        }
    }
}

/// How beams are searched; the rest (length, EOS, cache) comes from [`GenerationConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct BeamSearchConfig {
    /// Beams kept at each step (`>= 1`; 1 is greedy search with scores).
    pub num_beams: usize,
    /// Hypotheses returned, best first (`1..=num_beams`).
    pub num_return_sequences: usize,
    /// Exponent of the generated length that divides a finished hypothesis's log-probability:
    /// above 0 favours longer hypotheses, below 0 shorter ones.
    pub length_penalty: f32,
    /// When the search may stop early.
    pub early_stopping: EarlyStopping,
}

impl Default for BeamSearchConfig {
    /// transformers' defaults for `num_beams=4`.
    fn default() -> Self {
        Self {
            num_beams: 4,
            num_return_sequences: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
        }
    }
}

/// One finished hypothesis.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// The generated ids (an EOS that finished it is included).
    pub generated_ids: Vec<u32>,
    /// The generated text (special tokens skipped), when there is a tokenizer.
    pub text: Option<String>,
    /// Sum of the tokens' log-probabilities divided by `generated_len ^ length_penalty`.
    pub score: f32,
    /// [`FinishReason::Eos`] or [`FinishReason::Length`].
    pub finish_reason: FinishReason,
}

/// The result of [`Generator::beam_search`].
#[derive(Debug, Clone, PartialEq)]
pub struct BeamGeneration {
    /// The prompt's ids.
    pub prompt_ids: Vec<u32>,
    /// `num_return_sequences` hypotheses, best first.
    pub sequences: Vec<Hypothesis>,
    /// Time spent; `generated` counts search steps (each feeds one token per running beam).
    pub timings: Timings,
    /// Cache bytes at the end of the search (0 without a cache).
    pub cache_bytes: usize,
    /// The cache kind's name.
    pub cache_kind: &'static str,
}

/// A running beam: its tokens so far and their summed log-probability.
#[derive(Debug, Clone)]
struct Beam {
    tokens: Vec<u32>,
    score: f32,
}

/// A one-token extension of a running beam.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    /// Index of the running beam it extends (its batch row).
    beam: usize,
    token: u32,
    /// The beam's score plus the token's log-probability.
    score: f32,
}

impl<B: Backend> Generator<'_, B> {
    /// Beam search from one prompt; see the [module docs](crate::beam) for the algorithm.
    /// `config.sampling` must be greedy and `config.stop_strings` empty: beam search chooses
    /// by score alone.
    ///
    /// ```
    /// use burn_ndarray::NdArray;
    /// use kv_generate::{BeamSearchConfig, EosPolicy, GenerationConfig, Generator};
    /// use kv_model::{ModelConfig, Transformer};
    ///
    /// let json = serde_json::json!({
    ///     "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
    ///     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
    /// });
    /// let config = ModelConfig::from_hf_json(&json, "example").unwrap();
    /// let model = Transformer::<NdArray>::random(&config, 1, &Default::default()).unwrap();
    /// let generator = Generator::new(&model, None);
    /// let settings = GenerationConfig { max_new_tokens: 6, eos: EosPolicy::Ignore, ..Default::default() };
    /// let beams = BeamSearchConfig { num_beams: 3, num_return_sequences: 2, ..Default::default() };
    /// let out = generator.beam_search(&[1, 2, 3], &settings, &beams).unwrap();
    /// assert_eq!(out.sequences.len(), 2);
    /// assert!(out.sequences[0].score >= out.sequences[1].score);
    /// ```
    pub fn beam_search(
        &self,
        prompt: &[u32],
        config: &GenerationConfig,
        beams: &BeamSearchConfig,
    ) -> Result<BeamGeneration> {
        self.check_beam_search(prompt, config, beams)?;
        let eos = self.eos_ids(&config.eos);
        let num_beams = beams.num_beams;
        // Candidates kept per step: enough that `num_beams` of them do not end in EOS.
        let keep = (1 + eos.len()).max(2) * num_beams;
        let start = Instant::now();

        // The prompt once, as one row; the first step's beams all extend it.
        let mut cache = match &config.cache {
            CacheChoice::None => None,
            CacheChoice::Cache(kind) => Some(self.model.new_cache(kind)?),
        };
        let output = match &mut cache {
            Some(cache) => {
                self.model
                    .forward(&[prompt.to_vec()], None, Some(cache), Logits::Last)?
            }
            None => self
                .model
                .forward_uncached(&[prompt.to_vec()], None, Logits::Last)?,
        };
        let mut logits = host_rows(output);
        let prefill = start.elapsed();

        let decode_start = Instant::now();
        let mut step_start = decode_start;
        let mut step_latencies = Vec::new();
        let mut running = vec![Beam {
            tokens: Vec::new(),
            score: 0.0,
        }];
        let mut finished: Vec<(Beam, FinishReason, f32)> = Vec::new();
        let mut steps = 0;
        for step in 0..config.max_new_tokens {
            steps = step + 1;
            let generated_len = step + 1;
            let last_step = generated_len == config.max_new_tokens;
            let candidates = best_candidates(&running, &logits, keep);

            // Finished candidates among the first `num_beams` become hypotheses.
            let penalty = (generated_len as f32).powf(beams.length_penalty);
            for candidate in candidates.iter().take(num_beams) {
                let ends_in_eos = eos.contains(&candidate.token);
                if ends_in_eos || last_step {
                    let reason = if ends_in_eos {
                        FinishReason::Eos
                    } else {
                        FinishReason::Length
                    };
                    let beam = extend(&running, candidate);
                    finished.push((beam, reason, candidate.score / penalty));
                }
            }
            finished.sort_by(|a, b| b.2.total_cmp(&a.2));
            finished.truncate(num_beams);
            if last_step {
                break;
            }

            // The best unfinished candidates run on.
            let next: Vec<Candidate> = candidates
                .iter()
                .filter(|c| !eos.contains(&c.token))
                .take(num_beams)
                .copied()
                .collect();
            running = next.iter().map(|c| extend(&running, c)).collect();
            if self.search_is_done(&running, &finished, generated_len, config, beams) {
                break;
            }

            // Keep the cache rows of the surviving beams, and feed their new tokens.
            let rows: Vec<usize> = next.iter().map(|c| c.beam).collect();
            let output = match &mut cache {
                Some(cache) => {
                    cache.select_batch(&rows)?;
                    let input: Vec<Vec<u32>> = next.iter().map(|c| vec![c.token]).collect();
                    self.model
                        .forward(&input, None, Some(cache), Logits::Last)?
                }
                None => {
                    let input: Vec<Vec<u32>> = running
                        .iter()
                        .map(|beam| [prompt, beam.tokens.as_slice()].concat())
                        .collect();
                    self.model.forward_uncached(&input, None, Logits::Last)?
                }
            };
            logits = host_rows(output);
            step_latencies.push(step_start.elapsed());
            step_start = Instant::now();
        }

        let sequences = finished
            .into_iter()
            .take(beams.num_return_sequences)
            .map(|(beam, finish_reason, score)| {
                let text = self
                    .tokenizer
                    .map(|t| t.decode(&beam.tokens, SpecialTokens::Skip))
                    .transpose()?;
                Ok(Hypothesis {
                    generated_ids: beam.tokens,
                    text,
                    score,
                    finish_reason,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BeamGeneration {
            prompt_ids: prompt.to_vec(),
            sequences,
            timings: Timings {
                prefill,
                decode: decode_start.elapsed(),
                generated: steps,
                step_latencies,
            },
            cache_bytes: cache.as_ref().map_or(0, |c| c.memory_bytes()),
            cache_kind: config.cache.name(),
        })
    }

    /// Whether the search stops after a step that left `running` (best first) and `finished`
    /// (best first), `generated_len` tokens in.
    fn search_is_done(
        &self,
        running: &[Beam],
        finished: &[(Beam, FinishReason, f32)],
        generated_len: usize,
        config: &GenerationConfig,
        beams: &BeamSearchConfig,
    ) -> bool {
        if finished.len() < beams.num_beams {
            return false;
        }
        if beams.early_stopping == EarlyStopping::WhenFull {
            return true;
        }
        // The best score the best running beam could still be given.
        let best_len = if beams.early_stopping == EarlyStopping::Never && beams.length_penalty > 0.0
        {
            config.max_new_tokens
        } else {
            generated_len
        };
        let best_possible = running[0].score / (best_len as f32).powf(beams.length_penalty);
        let worst_finished = finished[finished.len() - 1].2;
        best_possible <= worst_finished
    }

    fn check_beam_search(
        &self,
        prompt: &[u32],
        config: &GenerationConfig,
        beams: &BeamSearchConfig,
    ) -> Result<()> {
        let invalid = |m: String| Err(GenerateError::InvalidRequest(m));
        if beams.num_beams == 0 {
            return invalid("num_beams must be at least 1".into());
        }
        if !(1..=beams.num_beams).contains(&beams.num_return_sequences) {
            return invalid(format!(
                "num_return_sequences must be between 1 and num_beams ({}), got {}",
                beams.num_beams, beams.num_return_sequences
            ));
        }
        if !beams.length_penalty.is_finite() {
            return invalid(format!(
                "length_penalty must be finite, got {}",
                beams.length_penalty
            ));
        }
        let vocab = self.model.config().vocab_size;
        if 2 * beams.num_beams > vocab {
            return invalid(format!(
                "{} beams need at least {} candidate tokens, and the vocabulary has {vocab}",
                beams.num_beams,
                2 * beams.num_beams
            ));
        }
        if config.sampling.temperature.is_some() || config.sampling.has_penalties() {
            return invalid(
                "beam search chooses by score: temperature and penalties do not apply".into(),
            );
        }
        if !config.stop_strings.is_empty() {
            return invalid("beam search does not take stop strings".into());
        }
        self.check(&[prompt.to_vec()], config)?;
        self.check_static_fits(prompt.len(), beams.num_beams, config)
    }
}

/// The `keep` best one-token extensions of `running`, best first (ties: lower beam, then lower
/// token id). `logits[b]` are beam `b`'s next-token logits.
fn best_candidates(running: &[Beam], logits: &[Vec<f32>], keep: usize) -> Vec<Candidate> {
    let mut candidates: Vec<Candidate> = running
        .iter()
        .zip(logits)
        .enumerate()
        .flat_map(|(beam, (b, row))| {
            log_softmax(row)
                .into_iter()
                .enumerate()
                .map(move |(token, lp)| Candidate {
                    beam,
                    token: token as u32,
                    score: b.score + lp,
                })
        })
        .collect();
    let order = |a: &Candidate, b: &Candidate| {
        b.score
            .total_cmp(&a.score)
            .then(a.beam.cmp(&b.beam))
            .then(a.token.cmp(&b.token))
    };
    if candidates.len() > keep {
        candidates.select_nth_unstable_by(keep - 1, order);
        candidates.truncate(keep);
    }
    candidates.sort_by(order);
    candidates
}

/// `candidate`'s beam with its token appended and its score.
fn extend(running: &[Beam], candidate: &Candidate) -> Beam {
    let mut tokens = running[candidate.beam].tokens.clone();
    tokens.push(candidate.token);
    Beam {
        tokens,
        score: candidate.score,
    }
}

/// `log(softmax(row))`, summed in f64 for accuracy.
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
    let log_sum = sum.ln() as f32;
    row.iter().map(|&x| x - max - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_exponentiates_to_one() {
        let lp = log_softmax(&[1.0, 2.0, 3.0, -50.0]);
        let total: f32 = lp.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(lp[2] > lp[1] && lp[1] > lp[0]);
    }

    #[test]
    fn candidates_rank_across_beams_by_accumulated_score() {
        let running = vec![
            Beam {
                tokens: vec![7],
                score: -1.0,
            },
            Beam {
                tokens: vec![8],
                score: -0.1,
            },
        ];
        // Both rows put most mass on token 0; beam 1 starts higher, so it leads.
        let logits = vec![vec![5.0, 0.0, 0.0], vec![5.0, 1.0, 0.0]];
        let best = best_candidates(&running, &logits, 3);
        let picked: Vec<(usize, u32)> = best.iter().map(|c| (c.beam, c.token)).collect();
        assert_eq!(picked, vec![(1, 0), (0, 0), (1, 1)]);
        assert!(best.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn early_stopping_parses_transformers_spelling() {
        for mode in [
            EarlyStopping::WhenFull,
            EarlyStopping::Heuristic,
            EarlyStopping::Never,
        ] {
            assert_eq!(mode.name().parse::<EarlyStopping>().unwrap(), mode);
        }
        assert!("True".parse::<EarlyStopping>().is_err());
    }
}
