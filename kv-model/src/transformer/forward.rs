//! The forward pass: embedding, the blocks, the final norm and the LM head, on the backend or,
//! for a decode step on a model whose matrices live on the host, on the host.

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
        let cache_pattern = cache
            .as_ref()
            .map_or(AttentionPattern::Causal, |c| c.attention_pattern());
        let runs = self.runs(seq);
        let on_host = self.runs_on_host(batch * seq, runs.len());
        // Rotary angles of the new tokens: computed once per run of positions, laid out for
        // the query heads and for the key heads, and applied to Q and K in every layer.
        let angles = match (&self.positions, rotation) {
            (PositionEncoding::Rotary(rope), KeyRotation::AppliedByCaller) if !on_host => Some(
                runs.iter()
                    .map(|run| {
                        let ids: Vec<Vec<usize>> = position_ids
                            .iter()
                            .map(|row| row[run.clone()].to_vec())
                            .collect();
                        let angles = rope.angles(&ids);
                        (
                            angles.for_heads(self.config.num_heads),
                            angles.for_heads(self.config.num_kv_heads),
                        )
                    })
                    .collect(),
            ),
            _ => None,
        };
        let mut step = ForwardContext {
            queries,
            runs,
            angles,
            position_ids,
            padding: mask,
            pattern: self.pattern(cache_pattern)?,
            rotation,
            on_host,
            plan_memo: None,
        };
        if on_host {
            return self.forward_on_host(tokens, cache, &mut step, logits);
        }

        // The residual stream `[batch, run, hidden]`, run by run: each run its own buffer, so
        // the element-wise ops on it work in place on whole buffers, not on views.
        let runs = step.runs.clone();
        let mut xs = self
            .map_runs(&runs, vec![(); runs.len()], |_, run, ()| {
                let ids: Vec<Vec<u32>> =
                    tokens.iter().map(|row| row[run.clone()].to_vec()).collect();
                let positions: Vec<Vec<usize>> = step
                    .position_ids
                    .iter()
                    .map(|row| row[run.clone()].to_vec())
                    .collect();
                self.embed(&ids, &positions)
            })
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        for (layer, block) in self.blocks.iter().enumerate() {
            // x = x + attention(norm(x)), then x = x + mlp(norm(x)): attention over every new
            // position at once, the rest run by run.
            let attended = self.self_attention(
                &block.attention_norm,
                &block.attention,
                &xs,
                layer,
                cache.as_deref_mut(),
                &mut step,
            )?;
            let inputs = xs.into_iter().zip(attended).collect();
            xs = self.map_runs(&runs, inputs, |_, _, (x, attended)| {
                block.mlp_residual(x + attended, &self.device)
            });
        }
        let x = match logits {
            Logits::All => join_runs(xs, 1),
            Logits::Last => {
                let last = xs.pop().expect("at least one run");
                let len = last.dims()[1];
                last.narrow(1, len - 1, 1)
            }
        };
        if self.lm_head.is_host() {
            // The final norm on the host too, as the decode path computes it, so a position's
            // logits do not depend on the path its pass took.
            let [batch, len, hidden] = x.dims();
            let h = self.final_norm.forward_host(&host::download(x), hidden);
            let vocab = self.lm_head.out_features();
            let out = self.lm_head.forward_host(&h, batch * len);
            return Ok(host::upload(out, [batch, len, vocab], &self.device));
        }
        Ok(self.lm_head.forward(self.final_norm.forward(x)))
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

    /// Whether a forward pass over `rows` new positions in `runs` runs takes
    /// [`Transformer::forward_on_host`]: one run, and every matrix (the LM head too) on the
    /// host with few enough rows for the kernels' matrix-vector path.
    fn runs_on_host(&self, rows: usize, runs: usize) -> bool {
        runs == 1
            && self.lm_head.is_host()
            && self.blocks.iter().all(|block| block.runs_on_host(rows))
    }

    /// [`Transformer::forward`] for a few new tokens (a decode step) on a model whose matrices
    /// live on the host: the residual stream stays in host memory from the embedding to the
    /// logits, and per layer the backend only stores the new keys and values and attends over
    /// the cache (see [`crate::host`]). Same arithmetic as the backend path, value by value.
    fn forward_on_host<C: KvCache<B>>(
        &self,
        tokens: &[Vec<u32>],
        mut cache: Option<&mut ModelCache<B, C>>,
        step: &mut ForwardContext<'_, B>,
        logits: Logits,
    ) -> Result<Tensor<B, 3>> {
        let (batch, seq) = (tokens.len(), tokens[0].len());
        let hidden = self.config.hidden_size;
        // Cosines and sines of every new position: `[rows of positions * seq, head_dim]`,
        // when the model rotates keys itself (a cache that re-rotates them takes K as it is,
        // and Q is rotated at its rank in the cache once the cache has said it).
        let angles = match (&self.positions, step.rotation) {
            (PositionEncoding::Rotary(rope), KeyRotation::AppliedByCaller) => {
                Some(rope.host_angles(&step.position_ids.concat()))
            }
            _ => None,
        };

        // The residual stream, `[batch * seq, hidden]`.
        let mut x = host::download(self.embed(tokens, &step.position_ids)?);
        for (layer, block) in self.blocks.iter().enumerate() {
            // x = x + attention(norm(x))
            let h = block.attention_norm.forward_host(&x, hidden);
            let attended = self.self_attention_on_host(
                &block.attention,
                &h,
                [batch, seq],
                angles.as_ref(),
                layer,
                cache.as_deref_mut(),
                step,
            )?;
            host::add_assign(&mut x, &attended);
            // x = x + mlp(norm(x))
            let h = block.mlp_norm.forward_host(&x, hidden);
            host::add_assign(&mut x, &block.mlp.forward_host(&h, batch * seq));
        }

        // The final norm and the LM head, for the last position of each row or all of them:
        // `[batch, 1 or seq, vocab]`.
        let x = match logits {
            Logits::All => x,
            Logits::Last => x
                .chunks_exact(seq * hidden)
                .flat_map(|row| &row[(seq - 1) * hidden..])
                .copied()
                .collect(),
        };
        let positions = x.len() / (batch * hidden);
        let vocab = self.lm_head.out_features();
        let out = self
            .lm_head
            .forward_host(&self.final_norm.forward_host(&x, hidden), batch * positions);
        Ok(host::upload(out, [batch, positions, vocab], &self.device))
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

    /// The pattern attention must follow: the cache's, narrowed by the model's own window.
    pub(super) fn pattern(&self, cache: AttentionPattern) -> Result<AttentionPattern> {
        let Some(model_window) = self.config.sliding_window else {
            return Ok(cache);
        };
        match cache {
            AttentionPattern::Causal => Ok(AttentionPattern::SlidingWindow {
                window: model_window,
            }),
            AttentionPattern::SlidingWindow { window } => Ok(AttentionPattern::SlidingWindow {
                window: window.min(model_window),
            }),
            AttentionPattern::Sinks { .. } => Err(ModelError::SinkWithModelWindow {
                model_type: self.config.model_type.clone(),
            }),
        }
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
        let x = self
            .token_embedding
            .rows(&ids, &self.device)
            .reshape([batch, seq, hidden]);
        match &self.positions {
            PositionEncoding::Rotary(_) => Ok(x),
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
