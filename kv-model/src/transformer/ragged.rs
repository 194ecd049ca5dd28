//! One forward pass over a ragged batch: new tokens of many sequences at different positions
//! (a few prompt chunks, many single decode tokens), their keys and values in one
//! [`PagedStore`].
//!
//! This is the step of an engine that batches requests continuously (vLLM's, Orca's
//! "iteration-level scheduling"). The position-wise work (embedding, norms, projections, MLP,
//! LM head) does not care which sequence a token belongs to, so every new token of the step is
//! one row of one matrix and the weights are read once per step, not once per sequence: that
//! is where batching wins on a memory-bound decode. Attention is the one part that does care;
//! it runs piece by piece, each over its own sequence's keys read through its block table.
//! Logits are computed only for the rows that will be sampled.
//!
//! The arithmetic per piece is the single-sequence pass's: the same attention functions over
//! the same keys, and products whose rows do not depend on each other, so a request's tokens
//! are those it gets alone (up to float rounding where a product's kernel changes with the
//! number of rows).

use kv_core::{PagedStore, SequenceId};

use super::*;

/// The new tokens of one sequence in a ragged batch ([`Transformer::forward_ragged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPiece<'a> {
    /// The sequence, held in the store.
    pub sequence: SequenceId,
    /// Its new tokens (a prompt chunk, or the one token a decode step feeds).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` in the sequence; `start + tokens.len()` positions must be
    /// reserved in the store ([`PagedStore::reserve`]).
    pub start: usize,
    /// Which of the piece's positions get logits; `None` for none (a prompt chunk with more
    /// to come).
    pub logits: Option<Logits>,
}

impl<'a> BatchPiece<'a> {
    /// A decode step's piece: one token at `position`, its logits wanted.
    pub fn decode(sequence: SequenceId, token: &'a [u32], position: usize) -> Self {
        Self {
            sequence,
            tokens: token,
            start: position,
            logits: Some(Logits::Last),
        }
    }
}

impl<B: Backend> Transformer<B> {
    /// A paged store for this model: `num_blocks` blocks of `block_size` positions for every
    /// layer, handed out in `order`, its block hashes keyed by this model's configuration so
    /// that no other model's blocks are ever taken for its own.
    ///
    /// # Panics
    /// If `block_size` is 0.
    pub fn new_paged_store(
        &self,
        num_blocks: usize,
        block_size: usize,
        order: kv_core::BlockOrder,
    ) -> PagedStore<B> {
        let shape = kv_core::LayerShape {
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        };
        let fingerprint = format!("{:?}", self.config);
        PagedStore::new(
            self.config.num_layers,
            shape,
            num_blocks,
            block_size,
            order,
            fingerprint.as_bytes(),
            &self.device,
        )
    }

    /// Bytes of keys and values one position takes over every layer (f32).
    pub fn kv_bytes_per_position(&self) -> usize {
        let c = &self.config;
        2 * c.num_layers * c.num_kv_heads * c.head_dim * std::mem::size_of::<f32>()
    }

    /// One forward pass over `pieces`, each the new tokens of one sequence of `store` at its
    /// own positions: their keys and values are written into the store, each piece attends
    /// over its sequence's keys (causal, and the model's own window where it has one), and
    /// the logits asked for come back as one matrix `[rows, vocab]`, the pieces' rows in
    /// order (one per [`Logits::Last`], one per token for [`Logits::All`]).
    ///
    /// ```
    /// use burn_ndarray::NdArray;
    /// use kv_core::BlockOrder;
    /// use kv_model::{BatchPiece, Logits, ModelConfig, Transformer};
    ///
    /// # let json = serde_json::json!({
    /// #     "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
    /// #     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
    /// # });
    /// # let config = ModelConfig::from_hf_json(&json, "doc").unwrap();
    /// let model = Transformer::<NdArray>::random(&config, 1, &Default::default()).unwrap();
    /// let mut store = model.new_paged_store(32, 4, BlockOrder::Ascending);
    /// // Two prompts of different lengths in one pass.
    /// let (a, b) = ([1, 2, 3, 4, 5], [6, 7]);
    /// let (ia, _) = store.add_sequence(&a);
    /// let (ib, _) = store.add_sequence(&b);
    /// store.reserve(ia, &a).unwrap();
    /// store.reserve(ib, &b).unwrap();
    /// let pieces = [
    ///     BatchPiece { sequence: ia, tokens: &a, start: 0, logits: Some(Logits::Last) },
    ///     BatchPiece { sequence: ib, tokens: &b, start: 0, logits: Some(Logits::All) },
    /// ];
    /// let logits = model.forward_ragged(&mut store, &pieces).unwrap();
    /// assert_eq!(logits.dims(), [3, 64]);
    /// ```
    ///
    /// # Errors
    /// A piece with no tokens, ids outside the vocabulary, a position past the model's, a
    /// sequence the store does not hold or positions it has not reserved.
    pub fn forward_ragged(
        &self,
        store: &mut PagedStore<B>,
        pieces: &[BatchPiece<'_>],
    ) -> Result<Tensor<B, 2>> {
        self.check_pieces(store, pieces)?;
        let c = &self.config;
        let (heads, kv_heads, head_dim) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let pattern = self.pattern(AttentionPattern::Causal)?;
        let tokens: Vec<u32> = pieces
            .iter()
            .flat_map(|p| p.tokens.iter().copied())
            .collect();
        let positions: Vec<usize> = pieces
            .iter()
            .flat_map(|p| p.start..p.start + p.tokens.len())
            .collect();
        // Row offset of each piece in the batch matrix.
        let offsets: Vec<usize> = pieces
            .iter()
            .scan(0, |at, p| {
                let offset = *at;
                *at += p.tokens.len();
                Some(offset)
            })
            .collect();
        let rows = tokens.len();
        let on_host = self.lm_head.is_host() && self.blocks.iter().all(Block::is_host);
        // What attention needs per piece, shared by every layer (its attention plan too).
        let mut steps: Vec<ForwardContext<'_, B>> = pieces
            .iter()
            .map(|p| ForwardContext {
                queries: p.start..p.start + p.tokens.len(),
                position_ids: vec![(p.start..p.start + p.tokens.len()).collect()],
                // One run: the whole piece.
                runs: std::iter::once(0..p.tokens.len()).collect(),
                angles: None,
                padding: None,
                pattern,
                rotation: KeyRotation::AppliedByCaller,
                on_host,
                plan_memo: None,
            })
            .collect();
        let rope = match &self.positions {
            PositionEncoding::Rotary(rope) => Some(rope),
            PositionEncoding::Learned(_) => None,
        };
        // Per piece: stores its new keys and values and attends over all of its sequence's;
        // `q`, `k`, `v` are `[1, heads or kv_heads, n, head_dim]`, rotated.
        let mut attend = |layer: usize,
                          i: usize,
                          q: Tensor<B, 4>,
                          k: Tensor<B, 4>,
                          v: Tensor<B, 4>|
         -> Result<Tensor<B, 3>> {
            let piece = &pieces[i];
            store.write(layer, piece.sequence, piece.start, k, v);
            let (keys, values) = store.read(layer, piece.sequence);
            let held = keys.dims()[2];
            let view = KvView {
                keys,
                values,
                positions: KeyPositions::Contiguous(0..held),
                query_rotary_positions: None,
            };
            self.attend_view(q, view, &mut steps[i])
        };

        // The residual stream: all the step's tokens as one sequence.
        let x = self.embed(&[tokens], &[positions])?;
        let x = if on_host {
            // Rotary angles of each piece's positions, `[n, head_dim]`.
            let angles: Vec<Option<HostAngles>> = pieces
                .iter()
                .map(|p| {
                    rope.map(|r| {
                        r.host_angles(&(p.start..p.start + p.tokens.len()).collect::<Vec<_>>())
                    })
                })
                .collect();
            let hidden = c.hidden_size;
            let runs = self.runs(rows);
            let mut x = host::download(x);
            for (layer, block) in self.blocks.iter().enumerate() {
                // x = x + attention(norm(x)): Q/K/V for every row at once.
                let qkv = self.host_rows(&runs, &x, hidden, |x, n| {
                    block
                        .attention
                        .qkv
                        .forward_host(&block.attention_norm.forward_host(x, hidden), n)
                });
                let width = qkv.len() / rows;
                let mut attended = vec![0.0f32; rows * heads * head_dim];
                for (i, piece) in pieces.iter().enumerate() {
                    let n = piece.tokens.len();
                    let fused = &qkv[offsets[i] * width..(offsets[i] + n) * width];
                    let split = |first: usize, count: usize| {
                        host::heads_major(fused, [1, n], first, count, head_dim)
                    };
                    let (mut q, mut k, v) = (
                        split(0, heads),
                        split(heads, kv_heads),
                        split(heads + kv_heads, kv_heads),
                    );
                    if let Some(angles) = &angles[i] {
                        host::rotate_heads(&mut q, [1, heads, n, head_dim], angles, true);
                        host::rotate_heads(&mut k, [1, kv_heads, n, head_dim], angles, true);
                    }
                    let tensor = |values: Vec<f32>, count: usize| {
                        Tensor::<B, 4>::from_data(
                            TensorData::new(values, [1, count, n, head_dim]),
                            &self.device,
                        )
                    };
                    let out = attend(
                        layer,
                        i,
                        tensor(q, heads),
                        tensor(k, kv_heads),
                        tensor(v, kv_heads),
                    )?;
                    attended[offsets[i] * heads * head_dim..][..n * heads * head_dim]
                        .copy_from_slice(&host::download(out));
                }
                let out = self.host_rows(&runs, &attended, heads * head_dim, |h, n| {
                    block.attention.output.forward_host(h, n)
                });
                host::add_assign(&mut x, &out);
                // x = x + mlp(norm(x))
                let out = self.host_rows(&runs, &x, hidden, |x, n| {
                    block
                        .mlp
                        .forward_host(&block.mlp_norm.forward_host(x, hidden), n)
                });
                host::add_assign(&mut x, &out);
            }
            host::upload(x, [1, rows, hidden], &self.device)
        } else {
            let mut x = x;
            for (layer, block) in self.blocks.iter().enumerate() {
                // x = x + attention(norm(x))
                let qkv = block
                    .attention
                    .qkv
                    .forward(block.attention_norm.forward(x.clone()));
                let mut attended = Vec::with_capacity(pieces.len());
                for (i, piece) in pieces.iter().enumerate() {
                    let n = piece.tokens.len();
                    let fused = qkv.clone().narrow(1, offsets[i], n);
                    let split = |first: usize, count: usize| {
                        fused
                            .clone()
                            .narrow(2, first * head_dim, count * head_dim)
                            .reshape([1, n, count, head_dim])
                            .swap_dims(1, 2)
                    };
                    let (mut q, mut k, v) = (
                        split(0, heads),
                        split(heads, kv_heads),
                        split(heads + kv_heads, kv_heads),
                    );
                    if let Some(rope) = rope {
                        let angles = rope.angles(&[(piece.start..piece.start + n).collect()]);
                        q = angles.for_heads(heads).apply(q);
                        k = angles.for_heads(kv_heads).apply(k);
                    }
                    attended.push(attend(layer, i, q, k, v)?);
                }
                x = x + block.attention.output.forward(Tensor::cat(attended, 1));
                // x = x + mlp(norm(x))
                x = block.mlp_residual(x, &self.device);
            }
            x
        };

        // The final norm and the LM head over the rows whose logits are wanted.
        let wanted: Vec<usize> = pieces
            .iter()
            .zip(&offsets)
            .flat_map(|(p, &at)| match p.logits {
                None => 0..0,
                Some(Logits::Last) => at + p.tokens.len() - 1..at + p.tokens.len(),
                Some(Logits::All) => at..at + p.tokens.len(),
            })
            .collect();
        let vocab = self.lm_head.out_features();
        if wanted.is_empty() {
            return Ok(Tensor::zeros([0, vocab], &self.device));
        }
        let x = x
            .select(1, index_tensor::<B>(&wanted, &self.device))
            .reshape([1, wanted.len(), c.hidden_size]);
        let logits = if self.lm_head.is_host() {
            let hidden = c.hidden_size;
            let h = self.final_norm.forward_host(&host::download(x), hidden);
            host::upload(
                self.lm_head.forward_host(&h, wanted.len()),
                [1, wanted.len(), vocab],
                &self.device,
            )
        } else {
            self.lm_head.forward(self.final_norm.forward(x))
        };
        Ok(logits.reshape([wanted.len(), vocab]))
    }

    /// `f(rows, n)` over `x`'s rows of `width` values, run by run on rayon's threads (see
    /// [`Transformer::runs`]), the outputs joined in row order.
    fn host_rows(
        &self,
        runs: &[Range<usize>],
        x: &[f32],
        width: usize,
        f: impl Fn(&[f32], usize) -> Vec<f32> + Sync,
    ) -> Vec<f32> {
        self.map_runs(runs, vec![(); runs.len()], |_, run, ()| {
            f(&x[run.start * width..run.end * width], run.len())
        })
        .concat()
    }

    /// Checks each piece: tokens, ids, positions inside the model's and reserved in `store`.
    fn check_pieces(&self, store: &PagedStore<B>, pieces: &[BatchPiece<'_>]) -> Result<()> {
        if pieces.is_empty() {
            return Err(ModelError::NoTokens);
        }
        for (i, piece) in pieces.iter().enumerate() {
            if let Some(first) = pieces[..i]
                .iter()
                .position(|p| p.sequence == piece.sequence)
            {
                return Err(ModelError::RepeatedSequence {
                    first,
                    piece: i,
                    sequence: piece.sequence.0,
                });
            }
            if piece.tokens.is_empty() {
                return Err(ModelError::NoTokens);
            }
            self.config.check_token_ids(i, piece.tokens)?;
            let end = piece.start + piece.tokens.len();
            let max = self.config.max_positions;
            if end > max {
                return Err(ModelError::SequenceTooLong {
                    position: max.max(piece.start),
                    max,
                });
            }
            if !store.contains(piece.sequence) {
                return Err(kv_core::CacheError::UnknownSequence {
                    id: piece.sequence.0,
                }
                .into());
            }
            let held = store.len(piece.sequence);
            if end > held {
                return Err(ModelError::UnreservedPositions {
                    piece: i,
                    start: piece.start,
                    end,
                    held,
                });
            }
        }
        Ok(())
    }
}
