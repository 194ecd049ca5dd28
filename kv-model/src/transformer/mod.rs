//! The decoder-only transformer of both families, generic over the backend, with attention
//! through any kv-core cache or none.
//!
//! One forward pass, top to bottom:
//!
//! 1. token embedding (plus learned positions for GPT-2);
//! 2. per block: `x += attention(norm(x))`, then `x += mlp(norm(x))`, where attention projects
//!    Q, K and V in one product, rotates Q and K (rotary models), hands K and V to the layer's
//!    cache, attends over what the cache returns, and projects the heads back to `hidden`;
//! 3. final norm and LM head, for every position or only the last.
//!
//! Where to read it:
//!
//! - `block.rs`: [`Block::forward`], the block once for every pass, and how Q/K/V become
//!   heads;
//! - `forward.rs`: the single-sequence pass over a [`ModelCache`]; `ragged.rs`: the ragged
//!   pass over a [`kv_core::PagedStore`] (an engine's step). Each is one layer loop, differing
//!   only in the layout of its positions and in where keys and values live
//!   ([`block::LayerKv`]);
//! - `attention.rs`: attention over what a cache holds, shared by both;
//! - `stream.rs`: the residual stream, run by run ([`PromptSplit`]), in host memory where the
//!   weights are on the host (kv-kernels) and on the device otherwise.

use std::ops::Range;

use std::sync::Arc;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use kv_core::{
    index_tensor, merge_partial_attention, partial_attention, AttentionMask, AttentionPattern,
    AttentionPlan, Execution, HostAngles, KeyPositions, KeyRotation, KvCache, KvView, ModelCache,
    PartialAttention, RotaryAngles, RotaryTable, SoftCap, DEFAULT_BLOCK_QUERIES,
};
use kv_kernels::{Format, Isa, Matrix, Threads};
use rayon::prelude::*;

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::host;
use crate::layers::{upload, Linear, Mlp, Norm, HOST_KERNEL_MAX_ROWS};
use crate::placement::{WeightDtype, WeightFormat, WeightPlacement};
use crate::weights::{HostTensor, Weights};

mod attention;
mod block;
mod build;
mod context;
mod forward;
mod ragged;
mod runs;
mod stream;

use context::ForwardContext;
pub use ragged::BatchPiece;
use runs::{join_runs, narrow_run};

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

/// How [`Transformer::new_cache`] gives a model's sliding-window layers their caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerCaches {
    /// A ring of the layer's window where the asked kind would hold every position
    /// (transformers' hybrid cache): the same output, and such layers hold their window only.
    #[default]
    Hybrid,
    /// The asked kind on every layer, the sliding ones masked to their window: the same output
    /// with every layer holding every position, to measure what the hybrid cache saves.
    Uniform,
}

impl std::str::FromStr for LayerCaches {
    type Err = String;

    /// `hybrid` or `uniform`.
    ///
    /// ```
    /// use kv_model::LayerCaches;
    ///
    /// assert_eq!("uniform".parse::<LayerCaches>(), Ok(LayerCaches::Uniform));
    /// assert!("ring".parse::<LayerCaches>().is_err());
    /// ```
    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        match text {
            "hybrid" => Ok(LayerCaches::Hybrid),
            "uniform" => Ok(LayerCaches::Uniform),
            other => Err(format!("unknown layer caches `{other}`: hybrid or uniform")),
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
    /// Rotary embeddings applied to queries and keys in every layer: the global table, and
    /// the local one of the sliding layers where the model has one (Gemma 3).
    Rotary(RotaryTable<B>, Option<RotaryTable<B>>),
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

/// Q, K, V and output projections of one layer; the attention between them is the pass's
/// (`block.rs` splits Q/K/V into heads and rotates them, `attention.rs` attends through the
/// pass's keys and values).
#[derive(Debug, Clone)]
struct Attention<B: Backend> {
    /// `[hidden, (heads + 2 * kv_heads) * head_dim]`: Q's columns, then K's, then V's.
    qkv: Linear<B>,
    /// RMSNorm over each query head and each key head before rotary (Qwen3, Gemma 3), with
    /// `[head_dim]` weights.
    qk_norms: Option<(Norm<B>, Norm<B>)>,
    /// `[heads * head_dim, hidden]`.
    output: Linear<B>,
}

impl<B: Backend> Attention<B> {
    /// Whether both projections live on the host (kv-kernels multiplies by them).
    fn is_host(&self) -> bool {
        self.qkv.is_host() && self.output.is_host()
    }
}

/// The factor on the queries after rotary ([`Transformer::query_factor`]).
#[derive(Debug, Clone, PartialEq)]
enum QueryScale {
    /// The same factor on every channel.
    Uniform(f32),
    /// One factor per channel of a head, `[head_dim]`.
    Channels(Vec<f32>),
}

/// What sets one layer apart from the others, as data built from the configuration: the
/// block code ([`Block::forward`]) is the same for every layer and reads its differences here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LayerSpec {
    /// The layer's index: its cache in a [`ModelCache`], its layer of a paged store.
    index: usize,
    /// The model's own attention window on this layer (a sliding layer's
    /// `sliding_window`), or `None` for full causal attention.
    window: Option<usize>,
    /// Whether the layer rotates with the model's local rotary table (Gemma 3's sliding
    /// layers), not the global one.
    local_rope: bool,
}

impl LayerSpec {
    /// Layer `index` of a model configured as `config`.
    fn new(index: usize, config: &ModelConfig) -> Self {
        let window = config.layer_window(index);
        Self {
            index,
            window,
            local_rope: window.is_some() && config.variations.local_rope.is_some(),
        }
    }
}

/// One transformer block (pre-norm): `x += attention(norm(x)); x += mlp(norm(x))`
/// (`block.rs`).
#[derive(Debug, Clone)]
struct Block<B: Backend> {
    spec: LayerSpec,
    attention_norm: Norm<B>,
    attention: Attention<B>,
    /// The norm on attention's output before the residual sum (Gemma's sandwich norms).
    attention_post_norm: Option<Norm<B>>,
    mlp_norm: Norm<B>,
    mlp: Mlp<B>,
    /// The norm on the MLP's output before the residual sum (Gemma's sandwich norms).
    mlp_post_norm: Option<Norm<B>>,
}

impl<B: Backend> Block<B> {
    /// Whether `rows` positions take the host path through this block's position-wise work
    /// (see [`crate::host`]): every product on the host, and few enough rows that the
    /// kernels' matrix-vector path serves them.
    fn runs_on_host(&self, rows: usize) -> bool {
        rows <= HOST_KERNEL_MAX_ROWS && self.is_host()
    }

    /// Whether every matrix of the block lives on the host: then its position-wise work runs
    /// there too (norms, products, activations and residual sums as loops around kv-kernels'
    /// products), and only Q/K/V and the attention output cross between the backend and the
    /// host.
    fn is_host(&self) -> bool {
        self.attention.is_host() && self.mlp.is_host()
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
    /// How [`Transformer::new_cache`] treats sliding-window layers.
    layer_caches: LayerCaches,
    device: B::Device,
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
                        qk_norms: block.attention.qk_norms,
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
    /// # use kv_core::Execution;
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
    /// let a = model.forward_uncached(&prompt, None, Logits::All).unwrap();
    /// let b = parallel.forward_uncached(&prompt, None, Logits::All).unwrap();
    /// a.into_data().assert_approx_eq::<f32>(&b.into_data(), Default::default());
    /// ```
    pub fn with_execution(self, execution: Execution) -> Self {
        Self { execution, ..self }
    }

    /// Where a prompt is computed (see [`Transformer::with_execution`]).
    pub fn execution(&self) -> Execution {
        self.execution
    }

    /// The same model building its caches' sliding-window layers as `layer_caches` says.
    pub fn with_layer_caches(self, layer_caches: LayerCaches) -> Self {
        Self {
            layer_caches,
            ..self
        }
    }

    /// The same model cutting prompts as `split` says (see [`PromptSplit`]).
    pub fn with_prompt_split(self, split: PromptSplit) -> Self {
        Self { split, ..self }
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

    /// The factor on the queries that turns attention's `head_dim^-1/2` scale into the
    /// model's own (`query_pre_attn_scalar^-1/2`), `None` where they agree.
    ///
    /// LongRoPE's attention factor, which transformers puts on the cosines and sines (so on
    /// both the rotated queries and keys), is folded in here as its square: on every channel,
    /// or on the rotated ones only where rotary covers part of each head.
    fn query_factor(&self) -> Option<QueryScale> {
        let c = &self.config;
        let head_dim = c.head_dim as f32;
        let scale = match c.variations.query_pre_attn_scalar {
            Some(scalar) => (head_dim / scalar).sqrt(),
            None => 1.0,
        };
        let rotated = match &c.rope {
            Some(crate::config::RopeConfig {
                scaling:
                    crate::config::RopeScaling::PerFrequency {
                        attention_factor, ..
                    },
                ..
            }) => scale * attention_factor * attention_factor,
            _ => scale,
        };
        match c.variations.rotary_dim {
            Some(rotary) if rotated != scale => {
                // The rotated channels sit at the start of each half ([`build`]'s layout).
                let (half, rot) = (c.head_dim / 2, rotary / 2);
                let channels = (0..c.head_dim)
                    .map(|i| match i % half < rot {
                        true => rotated,
                        false => scale,
                    })
                    .collect();
                Some(QueryScale::Channels(channels))
            }
            _ => (rotated != 1.0).then_some(QueryScale::Uniform(rotated)),
        }
    }

    /// The soft-capping of attention scores (Gemma 2), if the model has one.
    fn attention_cap(&self) -> Option<SoftCap> {
        self.config
            .variations
            .attn_logit_softcap
            .and_then(SoftCap::new)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// A cache for this model: one cache per layer, shaped for its key/value heads, of the
    /// kind `config` names, except on the model's sliding-window layers, which never read
    /// past their window: there a kind that holds every position becomes a ring of
    /// `sliding_window` slots ([`kv_core::CacheConfig::for_window`]), so a Gemma 3 cache
    /// grows at its global layers' rate only (transformers' hybrid cache).
    ///
    /// A sink cache that re-rotates its keys ([`kv_core::SinkPositions::CacheRanks`]) rotates
    /// them with this model's own rotary table, rope scaling included, so its keys and the
    /// model's queries always agree. [`ModelConfig::sink_positions`] names the right choice
    /// for a model; re-rotation is refused for learned positions, for a cache holding more
    /// positions than the model was built for, and on a model with sliding-window layers.
    pub fn new_cache(&self, config: &kv_core::CacheConfig) -> Result<ModelCache<B>> {
        let shape = kv_core::LayerShape {
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        };
        let rotary = match &self.positions {
            PositionEncoding::Rotary(rope, _) => Some(rope),
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
        let configs = (0..self.config.num_layers)
            .map(|layer| match self.config.layer_window(layer) {
                None => Ok(config.clone()),
                Some(_) if self.layer_caches == LayerCaches::Uniform => match config {
                    kv_core::CacheConfig::Sink { .. } => Err(ModelError::SinkWithModelWindow {
                        model_type: self.config.model_type.clone(),
                    }),
                    _ => Ok(config.clone()),
                },
                Some(window) => {
                    config
                        .for_window(window)
                        .ok_or_else(|| ModelError::SinkWithModelWindow {
                            model_type: self.config.model_type.clone(),
                        })
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelCache::per_layer(
            &configs,
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
}
