//! The single-sequence forward pass: a batch of rows at the same positions through a
//! [`ModelCache`]: the embedding, the blocks ([`Block::forward`]), the final norm and the LM
//! head.

use super::block::{LayerKv, PassLayout};
use super::stream::{self, Run, Stream};
use super::*;

impl<B: Backend> Transformer<B> {
    /// [`Transformer::forward`] with no cache: attention over `tokens` alone (positions
    /// `0..seq`, or as `mask` derives them), as a model without a KV cache recomputes every
    /// step.
    ///
    /// ```
    /// # use burn_ndarray::NdArray;
    /// # use kv_model::{Logits, ModelConfig, Transformer};
    /// # let json = serde_json::json!({
    /// #     "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
    /// #     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
    /// # });
    /// # let config = ModelConfig::from_hf_json(&json, "doc").unwrap();
    /// let model = Transformer::<NdArray>::random(&config, 1, &Default::default()).unwrap();
    /// let logits = model.forward_uncached(&[vec![1, 2, 3]], None, Logits::All).unwrap();
    /// assert_eq!(logits.dims(), [1, 3, 64]);
    /// ```
    pub fn forward_uncached(
        &self,
        tokens: &[Vec<u32>],
        mask: Option<&AttentionMask>,
        logits: Logits,
    ) -> Result<Tensor<B, 3>> {
        self.forward::<kv_core::AnyCache<B>>(tokens, mask, None, logits)
    }

    /// One forward pass.
    ///
    /// - `tokens`: `[batch][seq]` ids, every row the same length.
    /// - `mask`: which of the `past + seq` positions of each row are real tokens (1) or padding
    ///   (0), as transformers' `attention_mask`; `None` means no padding. Position ids are
    ///   derived from it as `generate()` does (padding skipped).
    /// - `cache`: the model's cache, holding `past` positions; the new keys and values are
    ///   appended to it. `None` attends over `tokens` alone (positions `0..seq`).
    /// - `logits`: every position, or the last only.
    ///
    /// Returns `[batch, seq or 1, vocab]`.
    ///
    /// # Positions
    /// Every position the model encodes stays below [`ModelConfig::max_positions`]: a sequence
    /// that would pass it is refused ([`ModelError::SequenceTooLong`]) rather than computed
    /// with positions the model never learned. A sink cache that re-rotates its keys encodes
    /// ranks inside the cache instead, so generation through it runs on past that limit
    /// (StreamingLLM); once it is full, new tokens go through it one at a time, each seeing
    /// the sinks and the window before it at ranks `0..sinks + window`.
    pub fn forward<C: KvCache<B>>(
        &self,
        tokens: &[Vec<u32>],
        mask: Option<&AttentionMask>,
        mut cache: Option<&mut ModelCache<B, C>>,
        logits: Logits,
    ) -> Result<Tensor<B, 3>> {
        let (batch, seq) = self.check_tokens(tokens)?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let rotation = cache
            .as_ref()
            .map_or(KeyRotation::AppliedByCaller, |c| c.key_rotation());
        if rotation == KeyRotation::AppliedByCache {
            if mask.is_some() {
                return Err(ModelError::PaddedSink);
            }
            if let Some(cache) = cache.as_deref_mut() {
                if let Some(evicting) = self.forward_evicting(tokens, cache, logits)? {
                    return Ok(evicting);
                }
            }
        }
        let queries = past..past + seq;
        if let Some(mask) = mask {
            if mask.batch() != batch || mask.len() != queries.end {
                return Err(ModelError::MaskShape {
                    rows: mask.batch(),
                    len: mask.len(),
                    batch,
                    expected: queries.end,
                });
            }
        }
        let position_ids = match mask {
            Some(mask) => mask.position_ids(queries.clone()),
            None => vec![queries.clone().collect()],
        };
        if rotation == KeyRotation::AppliedByCaller {
            let max = self.config.max_positions;
            if let Some(&position) = position_ids.iter().flatten().find(|&&p| p >= max) {
                return Err(ModelError::SequenceTooLong { position, max });
            }
        }
        let cache_patterns = match &cache {
            Some(cache) => cache
                .layers()
                .iter()
                .map(KvCache::attention_pattern)
                .collect(),
            None => vec![AttentionPattern::Causal],
        };
        self.check_layer_patterns(&cache_patterns)?;
        let runs = self.runs(seq);
        let on_host = self.runs_on_host(batch * seq, runs.len());
        // One piece: every batch row attends through its own row of the cache at the same
        // positions.
        let layout = PassLayout::new(
            self,
            runs,
            std::iter::once(0..seq).collect(),
            |positions| {
                position_ids
                    .iter()
                    .map(|row| row[positions.clone()].to_vec())
                    .collect()
            },
            rotation == KeyRotation::AppliedByCaller,
        );
        let mut kv = DenseKv {
            cache,
            step: ForwardContext::new(queries, mask, cache_patterns, rotation, on_host),
        };

        // The residual stream `[batch, run, hidden]`, run by run.
        let mut x = self
            .map_runs(&layout.runs, vec![(); layout.runs.len()], |_, run, ()| {
                let ids: Vec<Vec<u32>> =
                    tokens.iter().map(|row| row[run.clone()].to_vec()).collect();
                let positions: Vec<Vec<usize>> = position_ids
                    .iter()
                    .map(|row| row[run.clone()].to_vec())
                    .collect();
                self.embed(&ids, &positions).map(Run::Device)
            })
            .into_iter()
            .collect::<Result<Stream<B>>>()?;
        for block in &self.blocks {
            x = block.forward(self, &layout, x, &mut kv)?;
        }
        let x = match logits {
            Logits::All => stream::join(x, &self.device),
            Logits::Last => {
                let last = x.pop().expect("at least one run");
                let len = last.dims()[1];
                last.positions(len - 1..len)
            }
        };
        Ok(self.head(x))
    }

    /// A forward pass of several tokens through a cache that re-rotates its keys, when they
    /// would evict: the tokens that still fit go in one piece (ranks equal positions there),
    /// the rest one at a time, so that each token sees the sinks and the window before it at
    /// ranks `0..sinks + window`, as StreamingLLM defines it. A piece of several tokens that
    /// evicts would give its later queries ranks past the cache's size and so the wrong
    /// distances to the sinks. `None` when nothing evicts.
    fn forward_evicting<C: KvCache<B>>(
        &self,
        tokens: &[Vec<u32>],
        cache: &mut ModelCache<B, C>,
        logits: Logits,
    ) -> Result<Option<Tensor<B, 3>>> {
        let seq = tokens[0].len();
        let free = cache
            .max_len()
            .map_or(usize::MAX, |max| max.saturating_sub(cache.seq_len()));
        if seq <= free.max(1) {
            return Ok(None);
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < seq {
            let len = if start == 0 { free.max(1) } else { 1 };
            let piece: Vec<Vec<u32>> = tokens
                .iter()
                .map(|row| row[start..start + len].to_vec())
                .collect();
            let last = start + len == seq;
            // With `Logits::Last` only the last piece's row is kept; earlier pieces then
            // compute one row each, not one per position.
            let out = self.forward(&piece, None, Some(&mut *cache), logits)?;
            if logits == Logits::All || last {
                pieces.push(out);
            }
            start += len;
        }
        Ok(Some(Tensor::cat(pieces, 1)))
    }

    /// Whether a forward pass over `rows` new positions in `runs` runs keeps its stream on the
    /// host from end to end ([`crate::host`]): one run, and every matrix (the LM head too) on
    /// the host with few enough rows for the kernels' matrix-vector path. Attention may then
    /// split a decode step's keys over the kernel threads, which are free during it.
    fn runs_on_host(&self, rows: usize, runs: usize) -> bool {
        runs == 1
            && self.lm_head.is_host()
            && self.blocks.iter().all(|block| block.runs_on_host(rows))
    }

    /// The final norm and the LM head over `x` `[batch, n, hidden]`: `[batch, n, vocab]`. On
    /// the host when the LM head lives there (the norm with it, as a decode step computes it,
    /// so a position's logits do not depend on the path its pass took).
    pub(super) fn head(&self, x: Run<B>) -> Tensor<B, 3> {
        let cap = self.config.variations.final_logit_softcap;
        if !self.lm_head.is_host() {
            let logits = self
                .lm_head
                .forward(self.final_norm.forward(x.into_device(&self.device)));
            return match cap {
                Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
                None => logits,
            };
        }
        let [batch, n, hidden] = x.dims();
        let h = self.final_norm.forward_host(&x.into_host(), hidden);
        let vocab = self.lm_head.out_features();
        let mut out = self.lm_head.forward_host(&h, batch * n);
        if let Some(cap) = cap {
            out.iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap);
        }
        host::upload(out, [batch, n, vocab], &self.device)
    }

    /// Checks ids against the vocabulary and rows against each other: `(batch, seq)`.
    fn check_tokens(&self, tokens: &[Vec<u32>]) -> Result<(usize, usize)> {
        let seq = tokens.first().map_or(0, Vec::len);
        if seq == 0 {
            return Err(ModelError::NoTokens);
        }
        for (row, ids) in tokens.iter().enumerate() {
            if ids.len() != seq {
                return Err(ModelError::RaggedRows {
                    row,
                    len: ids.len(),
                    first: seq,
                });
            }
            self.config.check_token_ids(row, ids)?;
        }
        Ok((tokens.len(), seq))
    }

    /// The pattern `layer`'s attention follows: the cache's, narrowed by the layer's own
    /// window.
    pub(super) fn layer_pattern(
        &self,
        layer: &LayerSpec,
        cache: AttentionPattern,
    ) -> Result<AttentionPattern> {
        let Some(layer_window) = layer.window else {
            return Ok(cache);
        };
        match cache {
            AttentionPattern::Causal => Ok(AttentionPattern::SlidingWindow {
                window: layer_window,
            }),
            AttentionPattern::SlidingWindow { window } => Ok(AttentionPattern::SlidingWindow {
                window: window.min(layer_window),
            }),
            AttentionPattern::Sinks { .. } => Err(ModelError::SinkWithModelWindow {
                model_type: self.config.model_type.clone(),
            }),
        }
    }

    /// Checks that every layer can attend through a cache whose layers follow `cache` (one
    /// entry: all of them), before a pass writes anything.
    pub(super) fn check_layer_patterns(&self, cache: &[AttentionPattern]) -> Result<()> {
        for (i, block) in self.blocks.iter().enumerate() {
            let pattern = match cache {
                [one] => *one,
                all => all.get(i).copied().unwrap_or(AttentionPattern::Causal),
            };
            self.layer_pattern(&block.spec, pattern)?;
        }
        Ok(())
    }

    /// Token embeddings, plus learned positions for GPT-2: `[batch, seq, hidden]`.
    pub(super) fn embed(
        &self,
        tokens: &[Vec<u32>],
        position_ids: &[Vec<usize>],
    ) -> Result<Tensor<B, 3>> {
        let (batch, seq) = (tokens.len(), tokens[0].len());
        let hidden = self.config.hidden_size;
        let ids: Vec<usize> = tokens.iter().flatten().map(|&id| id as usize).collect();
        let mut x = self
            .token_embedding
            .rows(&ids, &self.device)
            .reshape([batch, seq, hidden]);
        if let Some(scale) = self.config.variations.embedding_scale {
            x = x.mul_scalar(scale);
        }
        match &self.positions {
            PositionEncoding::Rotary(..) => Ok(x),
            PositionEncoding::Learned(table) => {
                // Positions were checked against the table's length in `forward`.
                let flat: Vec<usize> = position_ids.iter().flatten().copied().collect();
                let rows = position_ids.len();
                let positions = table
                    .clone()
                    .select(0, index_tensor::<B>(&flat, &self.device))
                    .reshape([rows, seq, hidden]);
                Ok(x + positions)
            }
        }
    }
}

/// The single-sequence pass's keys and values: one [`ModelCache`] (a dense cache of any kind
/// per layer) holding every batch row, or none (attention over the new tokens alone).
struct DenseKv<'c, 'm, B: Backend, C: KvCache<B>> {
    cache: Option<&'c mut ModelCache<B, C>>,
    step: ForwardContext<'m, B>,
}

impl<B: Backend, C: KvCache<B>> LayerKv<B> for DenseKv<'_, '_, B, C> {
    fn attend(
        &mut self,
        model: &Transformer<B>,
        layer: &LayerSpec,
        _piece: usize,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 3>> {
        model.attend_through_cache(q, k, v, layer, self.cache.as_deref_mut(), &mut self.step)
    }
}
