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

use kv_core::{KvDtype, KvMemory, LayerGroup, PagedStore, SequenceId};

use super::block::{LayerKv, PassLayout};
use super::stream::{self, Run, Stream};
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
    /// The layer groups of this model's paged stores ([`LayerGroup::split`]): one group of
    /// every layer for a model whose layers all see every position; groups of its sliding
    /// layers and of its full ones otherwise (Gemma), each with its own block tables, so the
    /// sliding groups give back the blocks that slide out of their window.
    pub fn paged_layer_groups(&self) -> Vec<LayerGroup> {
        let windows: Vec<Option<usize>> = (0..self.config.num_layers)
            .map(|i| self.config.layer_window(i))
            .collect();
        LayerGroup::split(&windows)
    }

    /// A paged store for this model: `num_blocks` blocks of `block_size` positions, each for
    /// the layers of one group ([`Transformer::paged_layer_groups`]), handed out in `order`,
    /// its block hashes keyed by this model's configuration so that no other model's blocks
    /// are ever taken for its own. A model whose every matrix lives on the host keeps its
    /// keys and values there too ([`KvMemory::Host`]), where its attention reads them in
    /// place; others keep them on the device. Keys and values are `f32`s
    /// ([`Transformer::new_paged_store_in`] narrows them).
    ///
    /// # Panics
    /// If `block_size` is 0.
    pub fn new_paged_store(
        &self,
        num_blocks: usize,
        block_size: usize,
        order: kv_core::BlockOrder,
    ) -> PagedStore<B> {
        self.new_paged_store_in(num_blocks, block_size, order, KvDtype::F32)
            .expect("every store holds f32")
    }

    /// [`Transformer::new_paged_store`] with keys and values stored as `dtype`, or `None` when
    /// the model keeps them on the device, whose pool holds `f32`s only.
    ///
    /// # Panics
    /// If `block_size` is 0.
    pub fn new_paged_store_in(
        &self,
        num_blocks: usize,
        block_size: usize,
        order: kv_core::BlockOrder,
        dtype: KvDtype,
    ) -> Option<PagedStore<B>> {
        let shape = kv_core::LayerShape {
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        };
        let fingerprint = format!("{:?}", self.config);
        let memory = if self.lm_head.is_host() && self.blocks.iter().all(Block::is_host) {
            KvMemory::Host(dtype)
        } else if dtype == KvDtype::F32 {
            KvMemory::Device
        } else {
            return None;
        };
        Some(PagedStore::new_grouped(
            memory,
            &self.paged_layer_groups(),
            shape,
            num_blocks,
            block_size,
            order,
            fingerprint.as_bytes(),
            &self.device,
        ))
    }

    /// Bytes of keys and values one position takes over every layer (f32).
    pub fn kv_bytes_per_position(&self) -> usize {
        self.config.num_layers * self.kv_bytes_per_layer_position()
    }

    /// Bytes of keys and values one position takes in one layer (f32).
    pub fn kv_bytes_per_layer_position(&self) -> usize {
        self.kv_bytes_per_layer_position_in(KvDtype::F32)
    }

    /// Bytes of keys and values one position takes in one layer, stored as `dtype`.
    pub fn kv_bytes_per_layer_position_in(&self, dtype: KvDtype) -> usize {
        let c = &self.config;
        2 * c.num_kv_heads * dtype.row_bytes(c.head_dim)
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
        self.check_layer_patterns(&[AttentionPattern::Causal])?;
        let tokens: Vec<u32> = pieces
            .iter()
            .flat_map(|p| p.tokens.iter().copied())
            .collect();
        let positions: Vec<usize> = pieces
            .iter()
            .flat_map(|p| p.start..p.start + p.tokens.len())
            .collect();
        // Each piece's rows in the batch.
        let rows_of: Vec<Range<usize>> = pieces
            .iter()
            .scan(0, |at, p| {
                let rows = *at..*at + p.tokens.len();
                *at = rows.end;
                Some(rows)
            })
            .collect();
        let rows = tokens.len();
        // Every matrix on the host: the stream stays there, run by run. Otherwise one run.
        let on_host = self.lm_head.is_host() && self.blocks.iter().all(Block::is_host);
        #[allow(clippy::single_range_in_vec_init)] // one run: all the rows
        let runs = if on_host {
            self.runs(rows)
        } else {
            vec![0..rows]
        };
        let layout = PassLayout::new(
            self,
            runs,
            rows_of.clone(),
            |rows| vec![positions[rows].to_vec()],
            true,
        );
        let mut kv = PagedKv {
            store,
            pieces,
            steps: pieces
                .iter()
                .map(|p| {
                    let queries = p.start..p.start + p.tokens.len();
                    ForwardContext::new(
                        queries,
                        None,
                        vec![AttentionPattern::Causal],
                        KeyRotation::AppliedByCaller,
                        on_host,
                    )
                })
                .collect(),
        };

        // The residual stream: all the step's tokens as one sequence `[1, rows, hidden]`.
        let x = self.embed(&[tokens], &[positions])?;
        let mut x: Stream<B> = layout
            .runs
            .iter()
            .map(|run| Run::Device(narrow_run(&x, run)))
            .collect();
        for block in &self.blocks {
            x = block.forward(self, &layout, x, &mut kv)?;
        }

        // The final norm and the LM head over the rows whose logits are wanted.
        let wanted: Vec<usize> = pieces
            .iter()
            .zip(&rows_of)
            .flat_map(|(p, rows)| match p.logits {
                None => 0..0,
                Some(Logits::Last) => rows.end - 1..rows.end,
                Some(Logits::All) => rows.clone(),
            })
            .collect();
        let vocab = self.lm_head.out_features();
        if wanted.is_empty() {
            return Ok(Tensor::zeros([0, vocab], &self.device));
        }
        let x = match stream::join(x, &self.device) {
            Run::Host { values, dims } => {
                let hidden = dims[2];
                let values = wanted
                    .iter()
                    .flat_map(|&row| &values[row * hidden..(row + 1) * hidden])
                    .copied()
                    .collect();
                Run::Host {
                    values,
                    dims: [1, wanted.len(), hidden],
                }
            }
            Run::Device(x) => Run::Device(x.select(1, index_tensor::<B>(&wanted, &self.device))),
        };
        Ok(self.head(x).reshape([wanted.len(), vocab]))
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

/// The ragged pass's keys and values: every piece's sequence in one [`PagedStore`].
struct PagedKv<'s, 'p, B: Backend> {
    store: &'s mut PagedStore<B>,
    pieces: &'p [BatchPiece<'p>],
    /// Each piece's attention context, shared by its layers.
    steps: Vec<ForwardContext<'p, B>>,
}

impl<B: Backend> LayerKv<B> for PagedKv<'_, '_, B> {
    fn attend(
        &mut self,
        model: &Transformer<B>,
        layer: &LayerSpec,
        piece: usize,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 3>> {
        let BatchPiece {
            sequence, start, ..
        } = self.pieces[piece];
        let step = &mut self.steps[piece];
        self.store.write(layer.index, sequence, start, k, v);
        // The positions the layer still holds: all, or a sliding layer's from the first block
        // its window reaches.
        let held = self.store.held_positions(layer.index, sequence);
        // A host store: attention reads the sequence's blocks where they lie, through its
        // block table, with the arithmetic of attention over a dense cache's contiguous keys.
        if let Some(kv) = self.store.host_kv(layer.index, sequence) {
            let positions = KeyPositions::Contiguous(held.clone());
            let pattern = model.layer_pattern(layer, step.cache_pattern(layer.index))?;
            let splits = step.on_host && model.splits_keys(&q, &positions, pattern, step);
            if let Some(visible) = model
                .host_attention_rows(&positions, pattern, step)
                .filter(|_| !splits)
            {
                return Ok(model.attend_host_keys(q, &visible, |_, head| kv.head(head)));
            }
        }
        let (keys, values) = self.store.read(layer.index, sequence);
        let view = KvView {
            keys,
            values,
            positions: KeyPositions::Contiguous(held),
            query_rotary_positions: None,
        };
        model.attend_view(q, view, layer, step)
    }
}
