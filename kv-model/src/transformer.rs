//! The decoder-only transformer of both families, generic over the backend, with attention
//! through any kv-core cache or none.
//!
//! One forward pass, top to bottom:
//!
//! 1. token embedding (plus learned positions for GPT-2);
//! 2. per block: `x += attention(norm(x))`, then `x += mlp(norm(x))`, where attention projects
//!    Q, K and V in one product, rotates Q and K (rotary models), hands K and V to the layer's
//!    cache, and attends over what the cache returns;
//! 3. final norm and LM head, for every position or only the last.

use std::ops::Range;

use std::sync::Arc;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use kv_core::{
    merge_partial_attention, partial_attention, AttentionMask, AttentionPattern, AttentionPlan,
    Execution, KeyPositions, KeyRotation, KvCache, KvView, ModelCache, PartialAttention,
    RotaryAngles, RotaryTable, DEFAULT_BLOCK_QUERIES,
};
use kv_kernels::{attention, Format, Isa, Matrix, Threads};
use rayon::prelude::*;

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::host;
use crate::layers::{upload, Linear, Mlp, Norm, HOST_KERNEL_MAX_ROWS};
use crate::placement::{WeightDtype, WeightFormat, WeightPlacement};
use crate::weights::{HostTensor, Weights};

/// How a forward pass over many new tokens (a prompt) is cut up.
///
/// Attention runs in blocks of queries, each reading only the keys it can see
/// ([`kv_core::AttentionPlan`]); with [`Execution::Parallel`], the position-wise work (norms,
/// projections, rotary, MLP) also runs in runs of positions on rayon's threads. Neither changes
/// the numbers beyond float rounding; the defaults suit CPU prompts of hundreds of tokens, and
/// tests set small values to exercise the cuts on short inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptSplit {
    /// Queries per attention block (at least 1).
    pub queries_per_block: usize,
    /// Fewest positions per run of the position-wise work (at least 1), so each run's matrix
    /// products keep rows enough to run at speed. There are at most two runs per thread.
    pub min_positions_per_run: usize,
}

impl Default for PromptSplit {
    fn default() -> Self {
        Self {
            queries_per_block: DEFAULT_BLOCK_QUERIES,
            min_positions_per_run: 64,
        }
    }
}

/// Which positions to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position: `[batch, seq, vocab]` (scoring a text, checking against a reference).
    All,
    /// The last position only: `[batch, 1, vocab]`. Generation needs no more, and the LM head
    /// is the largest product of a small model, so a prompt should not pay for it per token.
    Last,
}

/// How positions enter the network.
#[derive(Debug, Clone)]
enum PositionEncoding<B: Backend> {
    /// GPT-2: a learned `[max_positions, hidden]` table added to the token embedding.
    Learned(Tensor<B, 2>),
    /// Rotary embeddings applied to queries and keys in every layer.
    Rotary(RotaryTable<B>),
}

/// The token embedding table `[vocab, hidden]`.
#[derive(Debug, Clone)]
enum Embedding<B: Backend> {
    /// On the backend's device; rows are gathered there.
    Device(Tensor<B, 2>),
    /// In host memory in any kv-kernels format (a GGUF's own blocks); the rows a forward pass
    /// needs are widened to f32 and uploaded. With tied embeddings the LM head multiplies by
    /// this same matrix, so the table is held once.
    Host(Arc<Matrix>),
}

impl<B: Backend> Embedding<B> {
    /// Rows `ids` of the table: `[ids.len(), hidden]`.
    fn rows(&self, ids: &[usize], device: &B::Device) -> Tensor<B, 2> {
        match self {
            Embedding::Device(table) => table.clone().select(0, index_tensor::<B>(ids, device)),
            Embedding::Host(table) => {
                let hidden = table.cols();
                let mut values = vec![0.0; ids.len() * hidden];
                for (&id, row) in ids.iter().zip(values.chunks_exact_mut(hidden)) {
                    table.row_to_f32(id, row);
                }
                Tensor::from_data(TensorData::new(values, [ids.len(), hidden]), device)
            }
        }
    }
}

/// Q, K, V and output projections of one layer.
#[derive(Debug, Clone)]
struct Attention<B: Backend> {
    /// `[hidden, (heads + 2 * kv_heads) * head_dim]`: Q's columns, then K's, then V's.
    qkv: Linear<B>,
    /// `[heads * head_dim, hidden]`.
    output: Linear<B>,
}

/// One transformer block (pre-norm).
#[derive(Debug, Clone)]
struct Block<B: Backend> {
    attention_norm: Norm<B>,
    attention: Attention<B>,
    mlp_norm: Norm<B>,
    mlp: Mlp<B>,
}

impl<B: Backend> Block<B> {
    /// Whether `rows` positions take the host path through this block's position-wise work
    /// (see [`crate::host`]): every product on the host, and few enough rows that the
    /// kernels' matrix-vector path serves them.
    fn runs_on_host(&self, rows: usize) -> bool {
        rows <= HOST_KERNEL_MAX_ROWS && self.is_host()
    }

    /// Whether every matrix of the block lives on the host: then a prompt's position-wise work
    /// runs there too, run by run (norms, products, activations and residual sums as loops
    /// around kv-kernels' batched products), and only Q/K/V and the attention output cross
    /// between the backend and the host.
    fn is_host(&self) -> bool {
        self.attention.qkv.is_host() && self.attention.output.is_host() && self.mlp.is_host()
    }
}

/// A decoder-only transformer (GPT-2 or Llama family) on backend `B`.
///
/// ```
/// use burn_ndarray::NdArray;
/// use kv_core::{CacheConfig, ModelCache};
/// use kv_model::{Logits, ModelConfig, Transformer};
///
/// let json = serde_json::json!({
///     "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
///     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
/// });
/// let config = ModelConfig::from_hf_json(&json, "example").unwrap();
/// let device = Default::default();
/// let model = Transformer::<NdArray>::random(&config, 7, &device).unwrap();
///
/// // Prefill three tokens, then decode one, through a dynamic cache.
/// let mut cache: ModelCache<NdArray> = model.new_cache(&CacheConfig::Dynamic { capacity: 16 }).unwrap();
/// let logits = model.forward(&[vec![1, 2, 3]], None, Some(&mut cache), Logits::Last).unwrap();
/// assert_eq!(logits.dims(), [1, 1, config.vocab_size]);
/// let logits = model.forward(&[vec![4]], None, Some(&mut cache), Logits::Last).unwrap();
/// assert_eq!(cache.seq_len(), 4);
/// # let _ = logits;
/// ```
#[derive(Debug, Clone)]
pub struct Transformer<B: Backend> {
    config: ModelConfig,
    /// `[vocab, hidden]`.
    token_embedding: Embedding<B>,
    positions: PositionEncoding<B>,
    blocks: Vec<Block<B>>,
    final_norm: Norm<B>,
    /// `[hidden, vocab]`.
    lm_head: Linear<B>,
    /// Where a prompt's blocks of attention and runs of positions are computed.
    execution: Execution,
    /// How a prompt is cut into blocks and runs.
    split: PromptSplit,
    device: B::Device,
}

/// Where the builder gets each tensor: a file's weights, or random numbers.
trait TensorSource {
    /// The tensor `name` (Hugging Face naming) of `shape`.
    fn tensor(&mut self, name: &str, shape: &[usize], role: Role) -> Result<HostTensor>;

    /// The 2-D tensor `name` of `shape` (PyTorch order) as a matrix in `format`.
    fn matrix(&mut self, name: &str, shape: [usize; 2], format: WeightFormat) -> Result<Matrix> {
        let dense = self.tensor(name, &shape, Role::Matrix)?;
        dense_matrix(name, dense, format.kernel_format().unwrap_or(Format::F32))
    }
}

/// What a tensor is for, which decides how a random model fills it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Matrix,
    Bias,
    NormWeight,
}

impl TensorSource for Weights {
    fn tensor(&mut self, name: &str, shape: &[usize], _role: Role) -> Result<HostTensor> {
        self.take(name, shape)
    }

    fn matrix(&mut self, name: &str, shape: [usize; 2], format: WeightFormat) -> Result<Matrix> {
        self.take_matrix(name, shape, format)
    }
}

/// Deterministic pseudo-random weights (splitmix64): small matrices, zero-mean biases, unit
/// norm weights.
struct RandomSource {
    state: u64,
}

impl RandomSource {
    fn next_unit(&mut self) -> f32 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

impl TensorSource for RandomSource {
    fn tensor(&mut self, _name: &str, shape: &[usize], role: Role) -> Result<HostTensor> {
        let len = shape.iter().product();
        let data = match role {
            Role::NormWeight => vec![1.0; len],
            Role::Matrix => (0..len).map(|_| 0.08 * self.next_unit()).collect(),
            Role::Bias => (0..len).map(|_| 0.02 * self.next_unit()).collect(),
        };
        Ok(HostTensor::new(shape.to_vec(), data))
    }
}

impl<B: Backend> Transformer<B> {
    /// The same model with its projection weights stored as `weights` (see [`WeightDtype`]).
    ///
    /// ```
    /// # use burn_ndarray::NdArray;
    /// # use kv_model::{ModelConfig, Transformer, WeightDtype};
    /// # let json = serde_json::json!({
    /// #     "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
    /// #     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
    /// # });
    /// # let config = ModelConfig::from_hf_json(&json, "doc").unwrap();
    /// let model = Transformer::<NdArray>::random(&config, 1, &Default::default()).unwrap();
    /// // burn-ndarray has no f16 arithmetic: a clear error, not a panic mid-generation.
    /// let err = model.clone().with_weight_dtype(WeightDtype::F16).unwrap_err();
    /// assert!(err.to_string().contains("use f32 weights"));
    /// let model = model.with_weight_dtype(WeightDtype::F32).unwrap();
    /// # let _ = model;
    /// ```
    ///
    /// # Errors
    /// [`ModelError::UnsupportedWeightDtype`] when the backend has no arithmetic in `weights`.
    pub fn with_weight_dtype(self, weights: WeightDtype) -> Result<Self> {
        let dtype = weights.float_dtype();
        if !B::supports_dtype(&self.device, dtype.into()) {
            return Err(ModelError::UnsupportedWeightDtype {
                dtype: weights,
                backend: B::name(&self.device),
            });
        }
        Ok(Self {
            blocks: self
                .blocks
                .into_iter()
                .map(|block| Block {
                    attention: Attention {
                        qkv: block.attention.qkv.with_weight_dtype(dtype),
                        output: block.attention.output.with_weight_dtype(dtype),
                    },
                    mlp: block.mlp.with_weight_dtype(dtype),
                    ..block
                })
                .collect(),
            lm_head: self.lm_head.with_weight_dtype(dtype),
            ..self
        })
    }

    /// The same model computing a prompt on `execution`'s threads: its blocks of attention
    /// queries and its runs of positions ([`PromptSplit`]) one after another
    /// ([`Execution::Sequential`], the default, for GPU backends, which queue the work on the
    /// device either way) or spread over rayon's thread pool ([`Execution::Parallel`], for CPU
    /// backends, whose element-wise and attention kernels run on the calling thread). The
    /// output is the same either way, up to float rounding.
    ///
    /// ```
    /// # use burn_ndarray::NdArray;
    /// # use kv_core::{AnyCache, Execution};
    /// # use kv_model::{Logits, ModelConfig, PromptSplit, Transformer};
    /// # let json = serde_json::json!({
    /// #     "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
    /// #     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
    /// # });
    /// # let config = ModelConfig::from_hf_json(&json, "doc").unwrap();
    /// let model = Transformer::<NdArray>::random(&config, 1, &Default::default()).unwrap();
    /// let split = PromptSplit { queries_per_block: 2, min_positions_per_run: 2 };
    /// let parallel = model.clone().with_execution(Execution::Parallel).with_prompt_split(split);
    /// let prompt = [vec![3, 1, 4, 1, 5, 9, 2, 6]];
    /// let a = model.forward::<AnyCache<NdArray>>(&prompt, None, None, Logits::All).unwrap();
    /// let b = parallel.forward::<AnyCache<NdArray>>(&prompt, None, None, Logits::All).unwrap();
    /// a.into_data().assert_approx_eq::<f32>(&b.into_data(), Default::default());
    /// ```
    pub fn with_execution(self, execution: Execution) -> Self {
        Self { execution, ..self }
    }

    /// Where a prompt is computed (see [`Transformer::with_execution`]).
    pub fn execution(&self) -> Execution {
        self.execution
    }

    /// The same model cutting prompts as `split` says (see [`PromptSplit`]).
    pub fn with_prompt_split(self, split: PromptSplit) -> Self {
        Self { split, ..self }
    }

    /// Builds the model from Hugging Face-named weights, f32 on the device; every tensor's
    /// shape is checked against `config`.
    pub fn from_weights(
        config: &ModelConfig,
        weights: Weights,
        device: &B::Device,
    ) -> Result<Self> {
        Self::from_weights_placed(config, weights, WeightPlacement::default(), device)
    }

    /// [`Transformer::from_weights`] with the matrices placed as `placement` says (on the
    /// device, or on the host in a kv-kernels format, a GGUF's own blocks included).
    pub fn from_weights_placed(
        config: &ModelConfig,
        mut weights: Weights,
        placement: WeightPlacement,
        device: &B::Device,
    ) -> Result<Self> {
        let name = weights.source_name().to_owned();
        config.validate(&name)?;
        let gpt2_prefix = if weights.contains("wte.weight") {
            ""
        } else {
            "transformer."
        };
        build(config, &mut weights, gpt2_prefix, placement, device)
    }

    /// A model of `config`'s shape with deterministic random weights from `seed`: for tests,
    /// and for timing where the real weights cannot be carried.
    pub fn random(config: &ModelConfig, seed: u64, device: &B::Device) -> Result<Self> {
        Self::random_placed(config, seed, WeightPlacement::default(), device)
    }

    /// [`Transformer::random`] with the matrices placed as `placement` says.
    ///
    /// ```
    /// use burn_ndarray::NdArray;
    /// use kv_core::AnyCache;
    /// use kv_model::{Logits, ModelConfig, Transformer, WeightFormat, WeightPlacement};
    ///
    /// let json = serde_json::json!({
    ///     "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
    ///     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64
    /// });
    /// let config = ModelConfig::from_hf_json(&json, "doc").unwrap();
    /// let device = Default::default();
    /// let dense = Transformer::<NdArray>::random(&config, 3, &device).unwrap();
    /// // The same weights on the host, multiplied by kv-kernels in f32: the same logits.
    /// let host = WeightPlacement::Host(WeightFormat::F32);
    /// let kernels = Transformer::<NdArray>::random_placed(&config, 3, host, &device).unwrap();
    /// let ids = [vec![1, 2, 3]];
    /// let a = dense.forward::<AnyCache<NdArray>>(&ids, None, None, Logits::All).unwrap();
    /// let b = kernels.forward::<AnyCache<NdArray>>(&ids, None, None, Logits::All).unwrap();
    /// a.into_data().assert_approx_eq::<f32>(&b.into_data(), Default::default());
    /// ```
    pub fn random_placed(
        config: &ModelConfig,
        seed: u64,
        placement: WeightPlacement,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate("random model")?;
        build(
            config,
            &mut RandomSource { state: seed },
            "transformer.",
            placement,
            device,
        )
    }

    /// Bytes of every layer's projections.
    fn layer_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| {
                b.attention.qkv.weight_bytes()
                    + b.attention.output.weight_bytes()
                    + b.mlp.weight_bytes()
            })
            .sum()
    }

    /// Bytes of weights one decode step reads: every layer's projections and the LM head
    /// (one row of the embedding table aside). On a CPU a step's time is bounded below by
    /// these bytes over the memory bandwidth.
    pub fn step_read_bytes(&self) -> usize {
        self.layer_bytes() + self.lm_head.weight_bytes()
    }

    /// Bytes the projection and embedding weights take where they live (the embedding table
    /// counted once when the LM head shares it).
    pub fn weight_bytes(&self) -> usize {
        let layers = self.layer_bytes();
        let embedding = match &self.token_embedding {
            Embedding::Device(t) => t.shape().num_elements() * t.dtype().size(),
            Embedding::Host(m) => m.byte_len(),
        };
        let shared_head =
            matches!(&self.token_embedding, Embedding::Host(_)) && self.config.tie_word_embeddings;
        layers
            + embedding
            + if shared_head {
                0
            } else {
                self.lm_head.weight_bytes()
            }
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// A cache for this model: one `config` cache per layer, shaped for its key/value heads.
    ///
    /// A sink cache that re-rotates its keys ([`kv_core::SinkPositions::CacheRanks`]) rotates
    /// them with this model's own rotary table, rope scaling included, so its keys and the
    /// model's queries always agree. [`ModelConfig::sink_positions`] names the right choice
    /// for a model; re-rotation is refused for learned positions, and for a cache holding
    /// more positions than the model was built for.
    pub fn new_cache(&self, config: &kv_core::CacheConfig) -> Result<ModelCache<B>> {
        let shape = kv_core::LayerShape {
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        };
        let rotary = match &self.positions {
            PositionEncoding::Rotary(rope) => Some(rope),
            PositionEncoding::Learned(_) => None,
        };
        if let kv_core::CacheConfig::Sink {
            sinks,
            window,
            positions: kv_core::SinkPositions::CacheRanks,
        } = *config
        {
            let max = self.config.max_positions;
            if rotary.is_none() {
                return Err(ModelError::SinkNeedsRotary {
                    model_type: self.config.model_type.clone(),
                    max_positions: max,
                });
            }
            if sinks + window > max {
                return Err(ModelError::CacheLongerThanModel {
                    held: sinks + window,
                    max,
                });
            }
        }
        Ok(ModelCache::new(
            config,
            self.config.num_layers,
            shape,
            rotary,
            &self.device,
        )?)
    }

    /// Number of parameters in the projections and embeddings (norms and biases, which are
    /// tiny, not counted).
    pub fn parameter_count(&self) -> usize {
        let c = &self.config;
        let attention = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
            + c.num_heads * c.head_dim * c.hidden_size;
        let mlp = match c.architecture {
            Architecture::Gpt2 => 2 * c.hidden_size * c.intermediate_size,
            Architecture::Llama => 3 * c.hidden_size * c.intermediate_size,
        };
        let head = if c.tie_word_embeddings {
            0
        } else {
            c.vocab_size * c.hidden_size
        };
        c.vocab_size * c.hidden_size + c.num_layers * (attention + mlp) + head
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
                return Err(ModelError::Input(format!(
                    "attention mask is {}x{}, expected {batch}x{} (batch x past+new)",
                    mask.batch(),
                    mask.len(),
                    queries.end
                )));
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
        let mut step = Step {
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
            let heads = self.attend(block, &xs, layer, cache.as_deref_mut(), &mut step)?;
            // The rest of the block treats each position on its own.
            xs = self.map_runs(&runs, xs, |_, run, x| {
                let heads = narrow_run(&heads, run);
                let [batch, len, hidden] = x.dims();
                if block.is_host() {
                    let out = host::output_and_mlp(
                        &block.attention.output,
                        &block.mlp_norm,
                        &block.mlp,
                        &host::download(heads),
                        &host::download(x),
                        batch * len,
                        hidden,
                    );
                    return host::upload(out, [batch, len, hidden], &self.device);
                }
                let x = block.attention.output.forward(heads) + x;
                let h = block.mlp.forward(block.mlp_norm.forward(x.clone()));
                h + x
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
        step: &mut Step<'_, B>,
        logits: Logits,
    ) -> Result<Tensor<B, 3>> {
        let c = &self.config;
        let (batch, seq) = (tokens.len(), tokens[0].len());
        let (hidden, heads, kv_heads, head_dim) =
            (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
        let rows = batch * seq;
        // The residual stream, `[batch * seq, hidden]`.
        let mut x = host::download(self.embed(tokens, &step.position_ids)?);
        // Cosines and sines of every new position: `[rows of positions * seq, head_dim]`,
        // when the model rotates keys itself (a cache that re-rotates them takes K as it is,
        // and Q is rotated at its rank in the cache once the cache has said it).
        let angles = match (&self.positions, step.rotation) {
            (PositionEncoding::Rotary(rope), KeyRotation::AppliedByCaller) => {
                Some(rope.host_angles(&step.position_ids.concat()))
            }
            _ => None,
        };
        let shared_positions = step.position_ids.len() == 1;
        let to_backend = |values: Vec<f32>, heads: usize| {
            Tensor::<B, 4>::from_data(
                TensorData::new(values, [batch, heads, seq, head_dim]),
                &self.device,
            )
        };
        for (layer, block) in self.blocks.iter().enumerate() {
            // Q, K, V: `[rows, (heads + 2 * kv_heads) * head_dim]`, then per head
            // `[batch, heads or kv_heads, seq, head_dim]`, Q and K rotated.
            let h = block.attention_norm.forward_host(&x, hidden);
            let qkv = block.attention.qkv.forward_host(&h, rows);
            let mut q = host::heads_major(&qkv, [batch, seq], 0, heads, head_dim);
            let mut k = host::heads_major(&qkv, [batch, seq], heads, kv_heads, head_dim);
            let v = host::heads_major(&qkv, [batch, seq], heads + kv_heads, kv_heads, head_dim);
            if let Some(angles) = &angles {
                host::rotate_heads(
                    &mut q,
                    [batch, heads, seq, head_dim],
                    angles,
                    shared_positions,
                );
                host::rotate_heads(
                    &mut k,
                    [batch, kv_heads, seq, head_dim],
                    angles,
                    shared_positions,
                );
            }
            // The backend's part: the cache and attention. `[batch, seq, heads * head_dim]`.
            let attended = self.attend_through_cache(
                to_backend(q, heads),
                to_backend(k, kv_heads),
                to_backend(v, kv_heads),
                layer,
                cache.as_deref_mut(),
                step,
            )?;
            x = host::output_and_mlp(
                &block.attention.output,
                &block.mlp_norm,
                &block.mlp,
                &host::download(attended),
                &x,
                rows,
                hidden,
            );
        }
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

    /// The runs of positions `0..seq` that a forward pass computes apart wherever positions
    /// are independent (norms, projections, rotary, MLP). With [`Execution::Parallel`] and a
    /// prompt of at least two [`PromptSplit::min_positions_per_run`], up to two runs per
    /// thread of rayon's pool, which the threads take in turn; CPU backends run their
    /// element-wise kernels on the calling thread, so this is what puts a prompt's norms and
    /// activations on every core. Otherwise one run of everything.
    fn runs(&self, seq: usize) -> Vec<Range<usize>> {
        let min = self.split.min_positions_per_run.max(1);
        let tasks = (2 * rayon::current_num_threads()).min(seq / min);
        if self.execution != Execution::Parallel || tasks < 2 {
            #[allow(clippy::single_range_in_vec_init)] // one run: all the positions
            return vec![0..seq];
        }
        (0..tasks)
            .map(|i| i * seq / tasks..(i + 1) * seq / tasks)
            .collect()
    }

    /// `f(index, run, input)` for every run and its input, on rayon's threads when there are
    /// several, in run order.
    fn map_runs<I: Send, T: Send>(
        &self,
        runs: &[Range<usize>],
        inputs: Vec<I>,
        f: impl Fn(usize, &Range<usize>, I) -> T + Sync,
    ) -> Vec<T> {
        debug_assert_eq!(runs.len(), inputs.len());
        if runs.len() == 1 {
            return inputs
                .into_iter()
                .map(|input| f(0, &runs[0], input))
                .collect();
        }
        inputs
            .into_par_iter()
            .zip(runs.par_iter())
            .enumerate()
            .with_max_len(1)
            .map(|(i, (input, run))| f(i, run, input))
            .collect()
    }

    /// Checks ids against the vocabulary and rows against each other: `(batch, seq)`.
    fn check_tokens(&self, tokens: &[Vec<u32>]) -> Result<(usize, usize)> {
        let seq = tokens.first().map_or(0, Vec::len);
        if seq == 0 {
            return Err(ModelError::Input(
                "no tokens: pass at least one id per row".into(),
            ));
        }
        for (row, ids) in tokens.iter().enumerate() {
            if ids.len() != seq {
                return Err(ModelError::Input(format!(
                    "row {row} has {} tokens, row 0 has {seq}: pad rows to one length",
                    ids.len()
                )));
            }
            if let Some((position, &id)) = ids
                .iter()
                .enumerate()
                .find(|(_, &id)| id as usize >= self.config.vocab_size)
            {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    row,
                    position,
                    vocab: self.config.vocab_size,
                });
            }
        }
        Ok((tokens.len(), seq))
    }

    /// The pattern attention must follow: the cache's, narrowed by the model's own window.
    fn pattern(&self, cache: AttentionPattern) -> Result<AttentionPattern> {
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
            AttentionPattern::Sinks { .. } => Err(ModelError::Input(format!(
                "a sink cache cannot serve `{}`, which attends over a sliding window of its own; \
                 use a sliding-window cache",
                self.config.model_type
            ))),
        }
    }

    /// Token embeddings, plus learned positions for GPT-2: `[batch, seq, hidden]`.
    fn embed(&self, tokens: &[Vec<u32>], position_ids: &[Vec<usize>]) -> Result<Tensor<B, 3>> {
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

    /// Self-attention of `layer` over the residual stream `xs` (`[batch, run, hidden]` per run,
    /// normed here), through `cache` if any, up to the output projection:
    /// `[batch, seq, heads * head_dim]`.
    fn attend<C: KvCache<B>>(
        &self,
        block: &Block<B>,
        xs: &[Tensor<B, 3>],
        layer: usize,
        cache: Option<&mut ModelCache<B, C>>,
        step: &mut Step<'_, B>,
    ) -> Result<Tensor<B, 3>> {
        let c = &self.config;
        let batch = xs[0].dims()[0];
        let (heads, kv_heads, head_dim) = (c.num_heads, c.num_kv_heads, c.head_dim);
        // Q, K and V, `[batch, heads or kv_heads, run, head_dim]`, rotated where the model
        // rotates keys itself: run by run, then joined along the positions.
        let parts = self.map_runs(&step.runs, xs.to_vec(), |i, run, x| {
            let [_, len, hidden] = x.dims();
            let qkv = if block.is_host() {
                let h = block
                    .attention_norm
                    .forward_host(&host::download(x), hidden);
                let qkv = &block.attention.qkv;
                host::upload(
                    qkv.forward_host(&h, batch * len),
                    [batch, len, qkv.out_features()],
                    &self.device,
                )
            } else {
                block.attention.qkv.forward(block.attention_norm.forward(x))
            };
            let split = |start: usize, heads: usize| {
                contiguous(
                    qkv.clone()
                        .narrow(2, start * head_dim, heads * head_dim)
                        .reshape([batch, run.len(), heads, head_dim])
                        .swap_dims(1, 2),
                )
            };
            let (mut q, mut k, v) = (
                split(0, heads),
                split(heads, kv_heads),
                split(heads + kv_heads, kv_heads),
            );
            if let Some(angles) = &step.angles {
                let (for_queries, for_keys) = &angles[i];
                q = for_queries.apply(q);
                k = for_keys.apply(k);
            }
            (q, k, v)
        });
        let (qs, (ks, vs)): (Vec<_>, (Vec<_>, Vec<_>)) =
            parts.into_iter().map(|(q, k, v)| (q, (k, v))).unzip();
        let (q, k, v) = (join_runs(qs, 2), join_runs(ks, 2), join_runs(vs, 2));
        self.attend_through_cache(q, k, v, layer, cache, step)
    }

    /// Attention of queries `q` `[batch, heads, seq, head_dim]` over the new keys and values
    /// `k`/`v` `[batch, kv_heads, seq, head_dim]` and, through `cache` if any, the ones before
    /// them: stores the new ones, then attends over what the cache holds. Returns
    /// `[batch, seq, heads * head_dim]`, ready for the output projection.
    fn attend_through_cache<C: KvCache<B>>(
        &self,
        mut q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        layer: usize,
        cache: Option<&mut ModelCache<B, C>>,
        step: &mut Step<'_, B>,
    ) -> Result<Tensor<B, 3>> {
        let c = &self.config;
        let batch = q.dims()[0];
        let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
        let rope = match &self.positions {
            PositionEncoding::Rotary(rope) => Some(rope),
            PositionEncoding::Learned(_) => None,
        };
        let cache = match cache {
            // A cache that attends over its own storage (a quantized one: over its codes)
            // does the whole step itself, when plain causal attention is all there is to do
            // (no padding, no window of the model's own, keys rotated here).
            Some(cache)
                if cache.attends_in_place()
                    && step.padding.is_none()
                    && step.pattern == AttentionPattern::Causal
                    && step.rotation == KeyRotation::AppliedByCaller =>
            {
                let [_, _, seq, head_dim] = q.dims();
                let out = cache.update_and_attend(layer, q, k, v)?;
                return Ok(out.swap_dims(1, 2).reshape([batch, seq, heads * head_dim]));
            }
            cache => cache,
        };
        let view = match cache {
            Some(cache) => cache.update(layer, k, v)?,
            None => KvView {
                keys: k,
                values: v,
                positions: KeyPositions::Contiguous(step.queries.clone()),
                query_rotary_positions: None,
            },
        };
        if let (Some(rope), KeyRotation::AppliedByCache) = (rope, step.rotation) {
            // The cache rotates keys at their rank in it; queries go at the matching ranks.
            let ranks = view
                .query_rotary_positions
                .clone()
                .unwrap_or(step.queries.clone());
            q = rope.rotate(q, &[ranks.collect()]);
        }
        if let Some(visible) = self.host_attention_rows(&q, &view, step) {
            return Ok(self.attend_on_host(q, view, &visible));
        }
        if step.on_host && self.splits_keys(&q, &view, step) {
            return self.attend_split_keys(q, view);
        }
        let groups = heads / kv_heads;
        let plan = step.plan_for(
            &view.positions,
            self.split.queries_per_block,
            [batch, kv_heads, groups],
            &self.device,
        )?;
        Ok(plan.attend_merged(q, view.keys, view.values, self.execution)?)
    }

    /// The key slots each new position sees, when a prompt's attention runs on the host
    /// ([`Transformer::attend_on_host`]): the model's matrices live on the host (so its
    /// backend computes there), there is more than one new position (one takes the decode
    /// path), no padding, and every query sees one range of contiguous key positions.
    fn host_attention_rows(
        &self,
        q: &Tensor<B, 4>,
        view: &KvView<B>,
        step: &Step<'_, B>,
    ) -> Option<Vec<Range<usize>>> {
        let KeyPositions::Contiguous(keys) = &view.positions else {
            return None;
        };
        if q.dims()[2] < 2 || step.padding.is_some() || !self.lm_head.is_host() {
            return None;
        }
        step.queries
            .clone()
            .map(|query| step.pattern.visible_slots(query, keys.clone()))
            .collect()
    }

    /// Attention of `q` `[batch, heads, seq, head_dim]` over `view` on the host, through
    /// kv-kernels' attention ([`kv_kernels::attention`]: both products in `gemm`, the softmax
    /// vectorized), `visible[i]` the key slots query `i` sees. Each block of
    /// [`PromptSplit::queries_per_block`] queries of a batch row is one task on `execution`'s
    /// threads (the longest first, since later blocks see more keys), and writes its rows of
    /// every head straight into the output projection's layout: `[batch, seq, heads * head_dim]`.
    ///
    /// A CPU backend's fused attention op walks one query at a time with a scalar `exp`, and
    /// the blocked plan around it slices, masks and joins tensors per block; here a prompt's
    /// queries, keys and values come to host memory once per layer (a few hundred kilobytes
    /// for a 512-token prompt) and the output goes back once.
    fn attend_on_host(
        &self,
        q: Tensor<B, 4>,
        view: KvView<B>,
        visible: &[Range<usize>],
    ) -> Tensor<B, 3> {
        let [batch, heads, seq, head_dim] = q.dims();
        let [_, kv_heads, keys, _] = view.keys.dims();
        let groups = heads / kv_heads;
        let (q, k, v) = (
            host::download(q),
            host::download(view.keys),
            host::download(view.values),
        );
        let width = heads * head_dim;
        let block = self.split.queries_per_block.max(1);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let isa = Isa::best();
        let mut out = vec![0.0f32; batch * seq * width];
        // (batch row, first query, its rows of `out`), the last blocks first.
        let mut tasks: Vec<(usize, usize, &mut [f32])> = out
            .chunks_mut(seq * width)
            .enumerate()
            .flat_map(|(b, rows)| {
                rows.chunks_mut(block * width)
                    .enumerate()
                    .map(move |(i, rows)| (b, i * block, rows))
            })
            .collect();
        tasks.reverse();
        let run = |(b, first, out): (usize, usize, &mut [f32])| {
            let rows = out.len() / width;
            let visible = &visible[first..first + rows];
            let mut scores = Vec::new();
            for h in 0..heads {
                // Query head `h` reads key head `h / groups` (grouped-query attention).
                let q = &q[((b * heads + h) * seq + first) * head_dim..][..rows * head_dim];
                let at = (b * kv_heads + h / groups) * keys * head_dim;
                let kv = at..at + keys * head_dim;
                attention::attend(
                    isa,
                    q,
                    &k[kv.clone()],
                    &v[kv],
                    head_dim,
                    visible,
                    scale,
                    &mut out[h * head_dim..],
                    width,
                    &mut scores,
                );
            }
        };
        match self.execution {
            Execution::Parallel => tasks.into_par_iter().with_max_len(1).for_each(run),
            Execution::Sequential => tasks.into_iter().for_each(run),
        }
        host::upload(out, [batch, seq, width], &self.device)
    }

    /// Whether one query's attention over `view` is split over the kernel threads by keys:
    /// a single new position that sees every key the cache holds (causal pattern, no padding,
    /// contiguous positions), enough keys for each thread's share to pay for its hand-off.
    fn splits_keys(&self, q: &Tensor<B, 4>, view: &KvView<B>, step: &Step<'_, B>) -> bool {
        q.dims()[2] == 1
            && step.padding.is_none()
            && step.pattern == AttentionPattern::Causal
            && matches!(view.positions, KeyPositions::Contiguous(_))
            && view.keys.dims()[2] >= 2 * MIN_KEYS_PER_THREAD
            && Threads::global().count() > 1
    }

    /// Attention of `q` `[batch, heads, 1, head_dim]` over every key of `view`, the keys split
    /// over the kernel threads (whose workers would otherwise wait through attention) and the
    /// parts merged exactly ([`merge_partial_attention`]). Reading the cache is a decode step's
    /// one cost that grows with the context; two threads read it at twice the rate of one.
    /// Returns `[batch, 1, heads * head_dim]`.
    fn attend_split_keys(&self, q: Tensor<B, 4>, view: KvView<B>) -> Result<Tensor<B, 3>> {
        let [batch, heads, _, head_dim] = q.dims();
        let (keys, values) = (view.keys, view.values);
        let parts = Threads::global().split(
            keys.dims()[2],
            MIN_KEYS_PER_THREAD,
            Arc::new(move |range: Range<usize>| {
                let slice = |t: &Tensor<B, 4>| t.clone().narrow(2, range.start, range.len());
                partial_attention(q.clone(), slice(&keys), slice(&values))
            }),
        );
        let parts = parts
            .into_iter()
            .map(|(_, part)| part)
            .collect::<std::result::Result<Vec<PartialAttention<B>>, _>>()?;
        Ok(merge_partial_attention(parts)
            .swap_dims(1, 2)
            .reshape([batch, 1, heads * head_dim]))
    }
}

/// Fewest cached keys a thread takes when a decode step's attention is split by keys
/// ([`Transformer::attend_split_keys`]).
const MIN_KEYS_PER_THREAD: usize = 128;

/// `x` `[batch, heads, seq, head_dim]` with its elements in that order in memory. Q, K and V
/// come out of the fused projection as strided views (`[batch, seq, heads, head_dim]` with two
/// dimensions swapped); element-wise ops on such views take CPU backends' slow strided paths,
/// so for a prompt they are copied once here (reshaping across the swapped dimensions is what
/// makes every backend copy). A single token's view already is in order and is left alone.
fn contiguous<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [batch, heads, seq, head_dim] = x.dims();
    if seq == 1 {
        return x;
    }
    x.reshape([batch, heads, seq * head_dim])
        .reshape([batch, heads, seq, head_dim])
}

/// Positions `run` of `x` `[batch, seq, _]` (`x` itself when the run is all of them).
fn narrow_run<B: Backend>(x: &Tensor<B, 3>, run: &Range<usize>) -> Tensor<B, 3> {
    if run.len() == x.dims()[1] {
        x.clone()
    } else {
        x.clone().narrow(1, run.start, run.len())
    }
}

/// Run outputs joined along `dim`, the positions (one run is returned as it is).
fn join_runs<B: Backend, const D: usize>(mut parts: Vec<Tensor<B, D>>, dim: usize) -> Tensor<B, D> {
    if parts.len() == 1 {
        parts.remove(0)
    } else {
        Tensor::cat(parts, dim)
    }
}

/// What every layer of one forward pass shares.
struct Step<'a, B: Backend> {
    /// Cache positions of the new tokens.
    queries: Range<usize>,
    /// Rotary / learned position of each new token, per batch row (or one shared row).
    position_ids: Vec<Vec<usize>>,
    /// Runs of the new tokens computed apart where positions are independent
    /// ([`Transformer::runs`]).
    runs: Vec<Range<usize>>,
    /// Cosines and sines at `position_ids` for the query heads and for the key heads, run by
    /// run, when the model rotates keys itself.
    angles: Option<Vec<(RotaryAngles<B>, RotaryAngles<B>)>>,
    padding: Option<&'a AttentionMask>,
    pattern: AttentionPattern,
    rotation: KeyRotation,
    /// Whether the pass runs on the host ([`Transformer::forward_on_host`]), with the kernel
    /// threads free to share attention.
    on_host: bool,
    /// The attention plan made for the first layer (its blocks of queries, the keys each
    /// reads, their masks folded for grouped-query attention), reused while the key positions
    /// stay the same.
    plan_memo: Option<(KeyPositions, AttentionPlan<B>)>,
}

impl<B: Backend> Step<'_, B> {
    /// The attention plan over `keys`, in blocks of `block_queries`, for queries laid out
    /// `[batch, kv_heads, groups]`.
    fn plan_for(
        &mut self,
        keys: &KeyPositions,
        block_queries: usize,
        layout: [usize; 3],
        device: &B::Device,
    ) -> Result<&AttentionPlan<B>> {
        let stale = self
            .plan_memo
            .as_ref()
            .is_none_or(|(memo_keys, _)| memo_keys != keys);
        if stale {
            let plan = AttentionPlan::new(
                self.queries.clone(),
                keys,
                self.pattern,
                self.padding,
                block_queries,
                layout,
                device,
            )?;
            self.plan_memo = Some((keys.clone(), plan));
        }
        Ok(&self.plan_memo.as_ref().expect("planned above").1)
    }
}

/// An int index tensor over `indices`.
fn index_tensor<B: Backend>(indices: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let data: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(data, [indices.len()]), device)
}

/// Builds the model from any tensor source, its matrices placed as `placement` says.
fn build<B: Backend>(
    config: &ModelConfig,
    source: &mut dyn TensorSource,
    gpt2_prefix: &str,
    placement: WeightPlacement,
    device: &B::Device,
) -> Result<Transformer<B>> {
    let host = match placement {
        WeightPlacement::Host(format) => Some(format),
        WeightPlacement::Device(_) => None,
    };
    let mut matrices = Matrices {
        source,
        host,
        device,
    };
    let parts = match config.architecture {
        Architecture::Gpt2 => build_gpt2(config, &mut matrices, gpt2_prefix)?,
        Architecture::Llama => build_llama(config, &mut matrices)?,
    };
    let model = Transformer {
        config: config.clone(),
        token_embedding: parts.token_embedding,
        positions: parts.positions,
        blocks: parts.blocks,
        final_norm: parts.final_norm,
        lm_head: parts.lm_head,
        execution: Execution::Sequential,
        split: PromptSplit::default(),
        device: device.clone(),
    };
    match placement {
        WeightPlacement::Device(WeightDtype::F32) | WeightPlacement::Host(_) => Ok(model),
        WeightPlacement::Device(dtype) => model.with_weight_dtype(dtype),
    }
}

/// What a family builder returns.
struct Parts<B: Backend> {
    blocks: Vec<Block<B>>,
    token_embedding: Embedding<B>,
    positions: PositionEncoding<B>,
    final_norm: Norm<B>,
    lm_head: Linear<B>,
}

/// A projection's weight before it becomes a layer: dense `[in, out]` for the device, or a
/// host matrix `[out, in]`.
enum Projection {
    Dense(HostTensor),
    Rows(Matrix),
}

/// The tensor source with the placement: hands out projections and embeddings in the form
/// the model will keep them.
struct Matrices<'a, B: Backend> {
    source: &'a mut dyn TensorSource,
    /// The kv-kernels format, when products run on the host.
    host: Option<WeightFormat>,
    device: &'a B::Device,
}

impl<B: Backend> Matrices<'_, B> {
    /// A dense tensor (norms, biases, position tables).
    fn tensor(&mut self, name: &str, shape: &[usize], role: Role) -> Result<HostTensor> {
        self.source.tensor(name, shape, role)
    }

    /// A PyTorch `nn.Linear` weight stored `[out, in]`.
    fn linear(&mut self, name: &str, inputs: usize, outputs: usize) -> Result<Projection> {
        Ok(match self.host {
            Some(format) => {
                Projection::Rows(self.source.matrix(name, [outputs, inputs], format)?)
            }
            None => Projection::Dense(
                self.source
                    .tensor(name, &[outputs, inputs], Role::Matrix)?
                    .transposed(),
            ),
        })
    }

    /// A GPT-2 Conv1D weight stored `[in, out]`.
    fn conv1d(&mut self, name: &str, inputs: usize, outputs: usize) -> Result<Projection> {
        let dense = self.source.tensor(name, &[inputs, outputs], Role::Matrix)?;
        Ok(match self.host {
            Some(format) => Projection::Rows(dense_matrix(
                name,
                dense.transposed(),
                format.kernel_format().unwrap_or(Format::F32),
            )?),
            None => Projection::Dense(dense),
        })
    }

    /// Projections that share an input, fused into one product (Q/K/V, gate/up).
    fn fuse(&self, parts: Vec<Projection>, name: &str) -> Result<Projection> {
        if let Some(Projection::Dense(_)) = parts.first() {
            let dense: Vec<HostTensor> = parts
                .into_iter()
                .map(|p| match p {
                    Projection::Dense(t) => t,
                    Projection::Rows(_) => unreachable!("one placement per model"),
                })
                .collect();
            return Ok(Projection::Dense(HostTensor::concat_columns(&dense)));
        }
        let mut rows: Vec<Matrix> = parts
            .into_iter()
            .map(|p| match p {
                Projection::Rows(m) => m,
                Projection::Dense(_) => unreachable!("one placement per model"),
            })
            .collect();
        // A file may store the parts in different formats: all take the most precise one.
        let widest = rows
            .iter()
            .map(Matrix::format)
            .max_by_key(|f| precision_rank(*f))
            .expect("at least one part");
        for m in &mut rows {
            if m.format() != widest {
                *m = m.convert(widest);
            }
        }
        Ok(Projection::Rows(Matrix::stack(&rows).map_err(|e| {
            ModelError::Kernel {
                source_name: "model".into(),
                tensor: name.into(),
                source: e,
            }
        })?))
    }

    /// A layer from a projection and its optional `[out]` bias.
    fn layer(&self, weight: Projection, bias: Option<HostTensor>) -> Linear<B> {
        match weight {
            Projection::Dense(w) => Linear::new(w, bias, self.device),
            Projection::Rows(m) => Linear::host(Arc::new(m), bias, self.device),
        }
    }

    /// The token embedding `[vocab, hidden]` and, with tied embeddings, the LM head over the
    /// same values (held once on the host; transposed for the device).
    fn embedding(
        &mut self,
        name: &str,
        vocab: usize,
        hidden: usize,
        untied_head: Option<&str>,
    ) -> Result<(Embedding<B>, Linear<B>)> {
        match self.host {
            Some(format) => {
                let table = Arc::new(self.source.matrix(name, [vocab, hidden], format)?);
                let head = match untied_head {
                    Some(head) => Arc::new(self.source.matrix(head, [vocab, hidden], format)?),
                    None => Arc::clone(&table),
                };
                Ok((
                    Embedding::Host(table),
                    Linear::host(head, None, self.device),
                ))
            }
            None => {
                let table = self.source.tensor(name, &[vocab, hidden], Role::Matrix)?;
                let head = match untied_head {
                    Some(head) => self.source.tensor(head, &[vocab, hidden], Role::Matrix)?,
                    None => table.clone(),
                };
                Ok((
                    Embedding::Device(upload(table, self.device)),
                    Linear::new(head.transposed(), None, self.device),
                ))
            }
        }
    }
}

/// Orders formats from least to most precise.
fn precision_rank(format: Format) -> u8 {
    match format {
        Format::Q4_1 => 0,
        Format::Q8_0 => 1,
        Format::F16 => 2,
        Format::F32 => 3,
    }
}

/// A dense `[rows, cols]` tensor as a matrix in `format`.
fn dense_matrix(name: &str, tensor: HostTensor, format: Format) -> Result<Matrix> {
    Matrix::from_f32(format, tensor.shape[0], tensor.shape[1], &tensor.data).map_err(|e| {
        ModelError::Kernel {
            source_name: "model".into(),
            tensor: name.into(),
            source: e,
        }
    })
}

fn build_gpt2<B: Backend>(
    c: &ModelConfig,
    m: &mut Matrices<'_, B>,
    prefix: &str,
) -> Result<Parts<B>> {
    let hidden = c.hidden_size;
    let device = m.device;
    let layer_norm = |m: &mut Matrices<'_, B>, name: &str| -> Result<Norm<B>> {
        Ok(Norm::Layer {
            weight: upload(
                m.tensor(&format!("{name}.weight"), &[hidden], Role::NormWeight)?,
                device,
            ),
            bias: upload(
                m.tensor(&format!("{name}.bias"), &[hidden], Role::Bias)?,
                device,
            ),
            eps: c.norm_eps,
        })
    };
    let mut norms = Vec::new();
    for i in 0..c.num_layers {
        norms.push((
            layer_norm(m, &format!("{prefix}h.{i}.ln_1"))?,
            layer_norm(m, &format!("{prefix}h.{i}.ln_2"))?,
        ));
    }
    let final_norm = layer_norm(m, &format!("{prefix}ln_f"))?;
    let conv1d = |m: &mut Matrices<'_, B>, name: &str, inputs: usize, outputs: usize| {
        let weight = m.conv1d(&format!("{name}.weight"), inputs, outputs)?;
        let bias = m.tensor(&format!("{name}.bias"), &[outputs], Role::Bias)?;
        Ok::<_, ModelError>(m.layer(weight, Some(bias)))
    };
    let mut blocks = Vec::with_capacity(c.num_layers);
    for (i, (attention_norm, mlp_norm)) in norms.into_iter().enumerate() {
        let p = format!("{prefix}h.{i}");
        blocks.push(Block {
            attention_norm,
            attention: Attention {
                qkv: conv1d(m, &format!("{p}.attn.c_attn"), hidden, 3 * hidden)?,
                output: conv1d(m, &format!("{p}.attn.c_proj"), hidden, hidden)?,
            },
            mlp_norm,
            mlp: Mlp::Gelu {
                fc: conv1d(m, &format!("{p}.mlp.c_fc"), hidden, c.intermediate_size)?,
                proj: conv1d(m, &format!("{p}.mlp.c_proj"), c.intermediate_size, hidden)?,
            },
        });
    }
    let (token_embedding, lm_head) =
        m.embedding(&format!("{prefix}wte.weight"), c.vocab_size, hidden, None)?;
    let wpe = m.tensor(
        &format!("{prefix}wpe.weight"),
        &[c.max_positions, hidden],
        Role::Matrix,
    )?;
    Ok(Parts {
        blocks,
        token_embedding,
        positions: PositionEncoding::Learned(upload(wpe, device)),
        final_norm,
        lm_head,
    })
}

fn build_llama<B: Backend>(c: &ModelConfig, m: &mut Matrices<'_, B>) -> Result<Parts<B>> {
    let hidden = c.hidden_size;
    let device = m.device;
    let rope = c.rope.ok_or_else(|| {
        ModelError::config(&c.model_type, "a Llama-family model needs rope settings")
    })?;
    let rms = |m: &mut Matrices<'_, B>, name: &str| -> Result<Norm<B>> {
        Ok(Norm::Rms {
            weight: upload(m.tensor(name, &[hidden], Role::NormWeight)?, device),
            eps: c.norm_eps,
        })
    };
    let mut norms = Vec::new();
    for i in 0..c.num_layers {
        norms.push((
            rms(m, &format!("model.layers.{i}.input_layernorm.weight"))?,
            rms(
                m,
                &format!("model.layers.{i}.post_attention_layernorm.weight"),
            )?,
        ));
    }
    let final_norm = rms(m, "model.norm.weight")?;
    // One projection: its weight and, if the model has them, its bias.
    let linear = |m: &mut Matrices<'_, B>,
                  name: &str,
                  inputs: usize,
                  outputs: usize,
                  bias: bool|
     -> Result<(Projection, Option<HostTensor>)> {
        let weight = m.linear(&format!("{name}.weight"), inputs, outputs)?;
        let bias = if bias {
            Some(m.tensor(&format!("{name}.bias"), &[outputs], Role::Bias)?)
        } else {
            None
        };
        Ok((weight, bias))
    };
    let (q_out, kv_out) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let mut blocks = Vec::with_capacity(c.num_layers);
    for (i, (attention_norm, mlp_norm)) in norms.into_iter().enumerate() {
        let p = format!("model.layers.{i}");
        let (q, q_bias) = linear(
            m,
            &format!("{p}.self_attn.q_proj"),
            hidden,
            q_out,
            c.qkv_bias,
        )?;
        let (k, k_bias) = linear(
            m,
            &format!("{p}.self_attn.k_proj"),
            hidden,
            kv_out,
            c.qkv_bias,
        )?;
        let (v, v_bias) = linear(
            m,
            &format!("{p}.self_attn.v_proj"),
            hidden,
            kv_out,
            c.qkv_bias,
        )?;
        let (o, o_bias) = linear(
            m,
            &format!("{p}.self_attn.o_proj"),
            q_out,
            hidden,
            c.dense_bias,
        )?;
        let (gate, gate_bias) = linear(
            m,
            &format!("{p}.mlp.gate_proj"),
            hidden,
            c.intermediate_size,
            c.dense_bias,
        )?;
        let (up, up_bias) = linear(
            m,
            &format!("{p}.mlp.up_proj"),
            hidden,
            c.intermediate_size,
            c.dense_bias,
        )?;
        let (down, down_bias) = linear(
            m,
            &format!("{p}.mlp.down_proj"),
            c.intermediate_size,
            hidden,
            c.dense_bias,
        )?;
        let qkv_bias = match (q_bias, k_bias, v_bias) {
            (Some(q), Some(k), Some(v)) => Some(HostTensor::concat(&[q, k, v])),
            _ => None,
        };
        let gate_up_bias = match (gate_bias, up_bias) {
            (Some(g), Some(u)) => Some(HostTensor::concat(&[g, u])),
            _ => None,
        };
        let qkv = m.fuse(vec![q, k, v], &format!("{p}.self_attn.qkv"))?;
        let gate_up = m.fuse(vec![gate, up], &format!("{p}.mlp.gate_up"))?;
        blocks.push(Block {
            attention_norm,
            attention: Attention {
                qkv: m.layer(qkv, qkv_bias),
                output: m.layer(o, o_bias),
            },
            mlp_norm,
            mlp: Mlp::SwiGlu {
                gate_up: m.layer(gate_up, gate_up_bias),
                down: m.layer(down, down_bias),
            },
        });
    }
    let head = (!c.tie_word_embeddings).then_some("lm_head.weight");
    let (token_embedding, lm_head) =
        m.embedding("model.embed_tokens.weight", c.vocab_size, hidden, head)?;
    let rotary = RotaryTable::from_inv_freq(rope.inv_freq(c.head_dim), device)?;
    Ok(Parts {
        blocks,
        token_embedding,
        positions: PositionEncoding::Rotary(rotary),
        final_norm,
        lm_head,
    })
}
