//! Model configuration: what a Hugging Face `config.json` or GGUF metadata says about the
//! network's shape, read into one struct for both families.

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

/// The two architecture families this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// GPT-2: learned positions, LayerNorm, GELU (tanh), fused QKV, tied LM head.
    Gpt2,
    /// Llama, and the networks that differ from it only in data ([`Variations`]): Mistral,
    /// Qwen2, Qwen3, Phi-3, Gemma 2 and Gemma 3. RoPE, RMSNorm, a gated MLP, grouped-query attention.
    Llama,
}

/// The model types [`ModelConfig::from_hf_json`] and GGUF files may name, for errors.
pub const SUPPORTED_MODEL_TYPES: &str =
    "gpt2, llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text (gemma3)";

/// Which keys a layer's queries see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerAttention {
    /// Every earlier position (causal).
    Full,
    /// The last [`ModelConfig::sliding_window`] positions, the query's own included.
    Sliding,
}

/// The activation of a gated MLP, `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatedActivation {
    /// SiLU (SwiGLU: Llama, Mistral, Qwen).
    Silu,
    /// GELU with the tanh approximation (GeGLU: Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// What sets a Llama-family network apart from Llama itself, as data the one transformer
/// reads layer by layer (Llama's values are the [`Default`]).
///
/// | | Qwen3 | Gemma 2 | Gemma 3 | Phi-3 |
/// |---|---|---|---|---|
/// | `qk_norm` | yes | | yes | |
/// | `sandwich_norms` | | yes | yes | |
/// | `norm_weight_offset` | | 1 | 1 | |
/// | `activation` | SiLU | GELU (tanh) | GELU (tanh) | SiLU |
/// | `embedding_scale` | | √hidden | √hidden | |
/// | `query_pre_attn_scalar` | | from the config | from the config | |
/// | `local_rope` | | | base 10,000 on sliding layers | |
/// | `attn_logit_softcap` | | 50 | | |
/// | `final_logit_softcap` | | 30 | | |
/// | `fused_projections` | | | | yes |
#[derive(Debug, Clone, PartialEq)]
pub struct Variations {
    /// RMSNorm over each head of the queries and keys, before rotary (Qwen3, Gemma 3):
    /// weights `self_attn.q_norm` and `self_attn.k_norm`, `[head_dim]`.
    pub qk_norm: bool,
    /// Norms on the outputs of attention and of the MLP too, before each residual sum
    /// (Gemma): four norms per block.
    pub sandwich_norms: bool,
    /// Added to every RMSNorm weight at load: Gemma's checkpoints store `w` and scale by
    /// `1 + w` (GGUF files store the sum already, so theirs is 0).
    pub norm_weight_offset: f32,
    /// The gated MLP's activation.
    pub activation: GatedActivation,
    /// Factor on the token embeddings (Gemma: √hidden).
    pub embedding_scale: Option<f32>,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2` instead of
    /// `head_dim^-1/2` (Gemma).
    pub query_pre_attn_scalar: Option<f32>,
    /// Rotary settings of the sliding-window layers, where they differ from the global
    /// layers' (Gemma 3: base 10,000).
    pub local_rope: Option<RopeConfig>,
    /// `cap * tanh(logits / cap)` on the output logits (Gemma 2's `final_logit_softcapping`).
    pub final_logit_softcap: Option<f32>,
    /// `cap * tanh(score / cap)` on every attention score before the softmax (Gemma 2's
    /// `attn_logit_softcapping`).
    pub attn_logit_softcap: Option<f32>,
    /// Q/K/V stored as one `qkv_proj` and gate/up as one `gate_up_proj` (Phi-3).
    pub fused_projections: bool,
    /// Rotary on the first `rotary_dim` channels of each head only, the rest passed through
    /// unrotated (`partial_rotary_factor`: Phi-4-mini rotates 96 of 128). `None`: every channel.
    pub rotary_dim: Option<usize>,
}

impl Default for Variations {
    fn default() -> Self {
        Self {
            qk_norm: false,
            sandwich_norms: false,
            norm_weight_offset: 0.0,
            activation: GatedActivation::Silu,
            embedding_scale: None,
            query_pre_attn_scalar: None,
            local_rope: None,
            final_logit_softcap: None,
            attn_logit_softcap: None,
            fused_projections: false,
            rotary_dim: None,
        }
    }
}

/// How rotary frequencies are rescaled for long contexts (`rope_type` in transformers).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`default`).
    None,
    /// Every frequency divided by `factor` (`linear`).
    Linear {
        /// Divisor of every frequency.
        factor: f32,
    },
    /// Llama 3.1's scheme (`llama3`): low frequencies divided by `factor`, high ones kept, and
    /// a smooth blend between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f32,
        /// Wavelengths above `original_max_positions / low_freq_factor` are scaled.
        low_freq_factor: f32,
        /// Wavelengths below `original_max_positions / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// Context length the model was trained with.
        original_max_positions: usize,
    },
    /// Each frequency divided by its own factor, and the rotated queries and keys scaled by
    /// `attention_factor` (LongRoPE's `short_factor` in Phi-3; its cosines and sines carry the
    /// factor in transformers).
    PerFrequency {
        /// One divisor per frequency, `head_dim / 2` of them.
        factors: Vec<f32>,
        /// Factor on the rotated queries and keys (so `attention_factor²` on their scores).
        attention_factor: f32,
    },
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base of the frequencies (`rope_theta`).
    pub theta: f32,
    /// Long-context rescaling.
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// The `head_dim / 2` inverse frequencies, computed in f32 as transformers does.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base = kv_core::rope_inverse_frequencies(head_dim, self.theta);
        match &self.scaling {
            RopeScaling::None => base,
            RopeScaling::PerFrequency { factors, .. } => {
                base.iter().zip(factors).map(|(f, d)| f / d).collect()
            }
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => {
                let old = original_max_positions as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f32::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Everything the transformer needs to know about its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which network.
    pub architecture: Architecture,
    /// The name it was given (`model_type` or `general.architecture`), for messages.
    pub model_type: String,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (fewer than `num_heads` for grouped-query attention).
    pub num_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Positions the model was built for. For GPT-2 a hard limit (learned positions); for
    /// rotary models only a hint.
    pub max_positions: usize,
    /// Epsilon of LayerNorm or RMSNorm.
    pub norm_eps: f32,
    /// Rotary settings; `None` for GPT-2.
    pub rope: Option<RopeConfig>,
    /// Whether the Q, K and V projections have biases (GPT-2 and Qwen2 do).
    pub qkv_bias: bool,
    /// Whether the output projection and MLP have biases (GPT-2 does).
    pub dense_bias: bool,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Sliding-window attention: each query of a [`LayerAttention::Sliding`] layer sees this
    /// many keys, its own included.
    pub sliding_window: Option<usize>,
    /// Each layer's attention, `num_layers` entries: all sliding for Mistral with a window,
    /// five sliding to one full for Gemma 3, all full otherwise.
    pub layer_attention: Vec<LayerAttention>,
    /// How the network differs from Llama (the default for GPT-2 and Llama).
    pub variations: Variations,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Refuses the first id of `ids` (batch row `row`) outside the vocabulary, with its row,
    /// position and the vocabulary's size.
    ///
    /// ```
    /// use kv_model::{ModelConfig, ModelError};
    ///
    /// let json = serde_json::json!({
    ///     "model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_layer": 1, "n_head": 2,
    ///     "n_positions": 32
    /// });
    /// let config = ModelConfig::from_hf_json(&json, "example").unwrap();
    /// assert!(config.check_token_ids(0, &[1, 49]).is_ok());
    /// assert!(matches!(
    ///     config.check_token_ids(2, &[1, 50]),
    ///     Err(ModelError::TokenOutOfRange { id: 50, row: 2, position: 1, vocab: 50 })
    /// ));
    /// ```
    pub fn check_token_ids(&self, row: usize, ids: &[u32]) -> Result<()> {
        let vocab = self.vocab_size;
        match ids.iter().position(|&id| id as usize >= vocab) {
            Some(position) => Err(ModelError::TokenOutOfRange {
                id: ids[position],
                row,
                position,
                vocab,
            }),
            None => Ok(()),
        }
    }

    /// Where a sink cache for this model keeps its keys: re-rotated at their rank in the
    /// cache for rotary models (StreamingLLM), at their text positions for learned ones.
    ///
    /// ```
    /// use kv_core::SinkPositions;
    /// use kv_model::ModelConfig;
    ///
    /// let gpt2 = serde_json::json!({
    ///     "model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_layer": 1, "n_head": 2,
    ///     "n_positions": 32
    /// });
    /// let config = ModelConfig::from_hf_json(&gpt2, "example").unwrap();
    /// assert_eq!(config.sink_positions(), SinkPositions::TextPositions);
    /// ```
    pub fn sink_positions(&self) -> kv_core::SinkPositions {
        match self.rope {
            Some(_) => kv_core::SinkPositions::CacheRanks,
            None => kv_core::SinkPositions::TextPositions,
        }
    }

    /// Reads a Hugging Face `config.json` (transformers v4 or v5 style).
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_hf_json(&value, &path.display().to_string())
    }

    /// Reads a parsed Hugging Face config; `source_name` is used in error messages.
    ///
    /// ```
    /// use kv_model::{Architecture, ModelConfig};
    ///
    /// let json = serde_json::json!({
    ///     "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
    ///     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    ///     "intermediate_size": 128, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    ///     "rope_theta": 10000.0
    /// });
    /// let config = ModelConfig::from_hf_json(&json, "example").unwrap();
    /// assert_eq!(config.architecture, Architecture::Llama);
    /// assert_eq!(config.head_dim, 16);
    /// ```
    pub fn from_hf_json(json: &Value, source_name: &str) -> Result<Self> {
        let fields = Fields { json, source_name };
        let model_type = fields.string("model_type")?;
        let config = match model_type.as_str() {
            "gpt2" => fields.gpt2(model_type)?,
            "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" => fields.llama(model_type)?,
            "gemma2" | "gemma3_text" | "gemma3" => fields.gemma(model_type)?,
            _ => {
                return Err(ModelError::UnsupportedArchitecture {
                    source_name: source_name.into(),
                    architecture: model_type,
                })
            }
        };
        config.validate(source_name)?;
        Ok(config)
    }

    /// Checks that the sizes fit together.
    pub fn validate(&self, source_name: &str) -> Result<()> {
        let fail = |message: String| Err(ModelError::config(source_name, message));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return fail(format!(
                "vocab_size ({}), hidden_size ({}) and num_layers ({}) must be positive",
                self.vocab_size, self.hidden_size, self.num_layers
            ));
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return fail(format!(
                "num_heads ({}) must be a positive multiple of num_kv_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || (self.rope.is_some() && !self.head_dim.is_multiple_of(2)) {
            return fail(format!(
                "head_dim ({}) must be positive, and even for rotary models",
                self.head_dim
            ));
        }
        if self.architecture == Architecture::Gpt2
            && self.num_heads * self.head_dim != self.hidden_size
        {
            return fail(format!(
                "GPT-2 needs n_embd ({}) divisible by n_head ({})",
                self.hidden_size, self.num_heads
            ));
        }
        if self.sliding_window == Some(0) {
            return fail("sliding_window must be positive".into());
        }
        if let Some(rotary) = self.variations.rotary_dim {
            if rotary == 0 || rotary % 2 != 0 || rotary > self.head_dim {
                return fail(format!(
                    "a rotary part of {rotary} channels in heads of {}: it must be even, \
                     positive and at most the head",
                    self.head_dim
                ));
            }
        }
        if let Some(RopeConfig {
            scaling: RopeScaling::PerFrequency { factors, .. },
            ..
        }) = &self.rope
        {
            let rotary = self.rotary_dim();
            if factors.len() != rotary / 2 {
                return fail(format!(
                    "{} rope factors for {rotary} rotated channels per head (one per frequency: {})",
                    factors.len(),
                    rotary / 2
                ));
            }
        }
        if self.layer_attention.len() != self.num_layers {
            return fail(format!(
                "{} layer types for {} layers",
                self.layer_attention.len(),
                self.num_layers
            ));
        }
        if self.sliding_window.is_none() && self.layer_attention.contains(&LayerAttention::Sliding)
        {
            return fail("sliding layers need `sliding_window`".into());
        }
        let caps = [
            ("attn_logit_softcapping", self.variations.attn_logit_softcap),
            (
                "final_logit_softcapping",
                self.variations.final_logit_softcap,
            ),
        ];
        for (field, cap) in caps {
            if let Some(cap) = cap.filter(|cap| kv_core::SoftCap::new(*cap).is_none()) {
                return fail(format!(
                    "{field} is {cap}; a cap must be positive and finite"
                ));
            }
        }
        Ok(())
    }

    /// Channels of each head that rotary rotates: [`Variations::rotary_dim`], or every one.
    pub fn rotary_dim(&self) -> usize {
        self.variations.rotary_dim.unwrap_or(self.head_dim)
    }

    /// The attention window of layer `layer`: `Some(sliding_window)` on a sliding layer,
    /// `None` (full causal attention) on the others.
    ///
    /// ```
    /// use kv_model::ModelConfig;
    ///
    /// let json = serde_json::json!({
    ///     "model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32,
    ///     "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1,
    ///     "head_dim": 16, "intermediate_size": 64, "sliding_window": 4,
    ///     "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
    ///                     "sliding_attention", "sliding_attention", "full_attention"]
    /// });
    /// let config = ModelConfig::from_hf_json(&json, "example").unwrap();
    /// assert_eq!(config.layer_window(0), Some(4));
    /// assert_eq!(config.layer_window(5), None);
    /// ```
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        match self.layer_attention.get(layer) {
            Some(LayerAttention::Sliding) => self.sliding_window,
            _ => None,
        }
    }
}

/// Typed access to a config's JSON fields, with errors naming the file and field.
struct Fields<'a> {
    json: &'a Value,
    source_name: &'a str,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn missing(&self, key: &str, what: &str) -> ModelError {
        ModelError::config(self.source_name, format!("field `{key}` must be {what}"))
    }

    fn string(&self, key: &str) -> Result<String> {
        self.get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| self.missing(key, "a string"))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.missing(key, "a non-negative integer"))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.missing(key, "a non-negative integer")),
        }
    }

    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|n| n as f32)
                .ok_or_else(|| self.missing(key, "a number")),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.missing(key, "true or false")),
        }
    }

    /// `eos_token_id`: an integer or a list of them.
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        token_ids(self.get(key)).ok_or_else(|| self.missing(key, "a token id or a list of them"))
    }

    fn gpt2(&self, model_type: String) -> Result<ModelConfig> {
        let activation = self
            .get("activation_function")
            .and_then(Value::as_str)
            .unwrap_or("gelu_new");
        if !matches!(activation, "gelu_new" | "gelu_pytorch_tanh") {
            return Err(ModelError::config(
                self.source_name,
                format!("activation_function `{activation}` is not supported (gelu_new is)"),
            ));
        }
        let hidden = self.usize("n_embd")?;
        let heads = self.usize("n_head")?;
        Ok(ModelConfig {
            architecture: Architecture::Gpt2,
            model_type,
            vocab_size: self.usize("vocab_size")?,
            hidden_size: hidden,
            num_layers: self.usize("n_layer")?,
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: hidden.checked_div(heads).unwrap_or(0),
            intermediate_size: self.opt_usize("n_inner")?.unwrap_or(4 * hidden),
            max_positions: self.usize("n_positions")?,
            norm_eps: self.f32_or("layer_norm_epsilon", 1e-5)?,
            rope: None,
            qkv_bias: true,
            dense_bias: true,
            tie_word_embeddings: true,
            sliding_window: None,
            layer_attention: vec![LayerAttention::Full; self.usize("n_layer")?],
            variations: Variations::default(),
            bos_token_id: token_ids(self.get("bos_token_id")).and_then(|ids| ids.first().copied()),
            eos_token_ids: self.token_ids("eos_token_id").unwrap_or_default(),
        })
    }

    fn llama(&self, model_type: String) -> Result<ModelConfig> {
        let activation = self
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if activation != "silu" {
            return Err(ModelError::config(
                self.source_name,
                format!("hidden_act `{activation}` is not supported (silu is)"),
            ));
        }
        let hidden = self.usize("hidden_size")?;
        let heads = self.usize("num_attention_heads")?;
        let head_dim = match self.opt_usize("head_dim")? {
            Some(d) => d,
            None if heads > 0 => hidden / heads,
            None => 0,
        };
        let qwen2 = model_type == "qwen2";
        let qwen3 = model_type == "qwen3";
        let phi3 = model_type == "phi3";
        // Rotary on the first `head_dim * partial_rotary_factor` channels (truncated, as
        // transformers does), the rest passed through.
        let partial = self
            .get("rope_parameters")
            .and_then(|p| p.get("partial_rotary_factor"))
            .or_else(|| self.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        let rotary_dim = ((head_dim as f64 * partial) as usize != head_dim)
            .then_some((head_dim as f64 * partial) as usize);
        let sliding_window = match model_type.as_str() {
            "mistral" | "phi3" => self.opt_usize("sliding_window")?,
            "qwen2" | "qwen3" if self.bool_or("use_sliding_window", false)? => {
                return Err(ModelError::config(
                    self.source_name,
                    format!(
                        "{model_type} with use_sliding_window (per-layer windows) is not supported"
                    ),
                ))
            }
            _ => None,
        };
        let num_layers = self.usize("num_hidden_layers")?;
        let max_positions = self.opt_usize("max_position_embeddings")?.unwrap_or(2048);
        let rope = self.rope_with_max(max_positions)?;
        let longrope_original = self
            .get("rope_parameters")
            .or_else(|| self.get("rope_scaling"))
            .and_then(|p| p.get("original_max_position_embeddings"))
            .and_then(Value::as_u64)
            .map(|v| v as usize);
        let layer_attention = match sliding_window {
            Some(_) => vec![LayerAttention::Sliding; num_layers],
            None => vec![LayerAttention::Full; num_layers],
        };
        Ok(ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: self.usize("vocab_size")?,
            hidden_size: hidden,
            num_layers,
            num_heads: heads,
            num_kv_heads: self.opt_usize("num_key_value_heads")?.unwrap_or(heads),
            head_dim,
            intermediate_size: self.usize("intermediate_size")?,
            max_positions: match &rope.scaling {
                // LongRoPE's short factors hold up to the trained context only; past it
                // transformers switches to the long factors mid-sequence, which a cache of
                // keys rotated with the short ones cannot follow.
                RopeScaling::PerFrequency { .. } => self
                    .opt_usize("original_max_position_embeddings")?
                    .or(longrope_original)
                    .unwrap_or(max_positions)
                    .min(max_positions),
                _ => max_positions,
            },
            norm_eps: self.f32_or("rms_norm_eps", 1e-6)?,
            rope: Some(rope),
            qkv_bias: qwen2 || self.bool_or("attention_bias", false)?,
            dense_bias: !qwen2 && !qwen3 && !phi3 && self.bool_or("mlp_bias", false)?,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
            sliding_window,
            layer_attention,
            variations: Variations {
                qk_norm: qwen3,
                fused_projections: phi3,
                rotary_dim,
                ..Variations::default()
            },
            bos_token_id: token_ids(self.get("bos_token_id")).and_then(|ids| ids.first().copied()),
            eos_token_ids: self.token_ids("eos_token_id").unwrap_or_default(),
            model_type,
        })
    }

    /// Gemma 2 (`gemma2`) and Gemma 3's text model (`gemma3_text`, or the text part of a
    /// `gemma3` config). Both: sliding and full layers (`layer_types`, or v4's
    /// `sliding_window_pattern`: Gemma 2's alternate, Gemma 3's are five sliding to one
    /// full), four norms per block storing `w` for `1 + w`, GeGLU, embeddings scaled by
    /// √hidden and tied, attention scaled by `query_pre_attn_scalar`. Gemma 2 soft-caps the
    /// attention scores and the final logits. Gemma 3 has Q/K norms and a second rotary base on
    /// the sliding layers (v5 `rope_parameters.sliding_attention`, or v4
    /// `rope_local_base_freq`).
    fn gemma(&self, model_type: String) -> Result<ModelConfig> {
        if let Some(text) = self.get("text_config") {
            let fields = Fields {
                json: text,
                source_name: self.source_name,
            };
            return fields.gemma("gemma3_text".into());
        }
        let gemma2 = model_type == "gemma2";
        let activation = self
            .get("hidden_activation")
            .or_else(|| self.get("hidden_act"))
            .and_then(Value::as_str)
            .unwrap_or("gelu_pytorch_tanh");
        if !matches!(activation, "gelu_pytorch_tanh" | "gelu_new") {
            return Err(ModelError::config(
                self.source_name,
                format!("hidden_activation `{activation}` is not supported (gelu_pytorch_tanh is)"),
            ));
        }
        let hidden = self.usize("hidden_size")?;
        let heads = self.usize("num_attention_heads")?;
        let head_dim = self.opt_usize("head_dim")?.unwrap_or(256);
        let num_layers = self.usize("num_hidden_layers")?;
        let layer_attention = match self.get("layer_types").and_then(Value::as_array) {
            Some(types) => types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(LayerAttention::Sliding),
                    Some("full_attention") => Ok(LayerAttention::Full),
                    _ => Err(self.missing(
                        "layer_types",
                        "a list of \"sliding_attention\" and \"full_attention\"",
                    )),
                })
                .collect::<Result<Vec<_>>>()?,
            None => {
                let pattern = self
                    .opt_usize("sliding_window_pattern")?
                    .unwrap_or(if gemma2 { 2 } else { 6 })
                    .max(1);
                (0..num_layers)
                    .map(|i| match (i + 1) % pattern {
                        0 => LayerAttention::Full,
                        _ => LayerAttention::Sliding,
                    })
                    .collect()
            }
        };
        let max_positions = self.opt_usize("max_position_embeddings")?.unwrap_or(32_768);
        // v5: `rope_parameters` per layer type; v4: `rope_theta` + `rope_scaling` for the
        // global layers and `rope_local_base_freq` for the sliding ones.
        let (global, local) = match self.get("rope_parameters") {
            _ if gemma2 => (self.rope_with_max(max_positions)?, None),
            Some(params) if params.get("full_attention").is_some() => (
                self.rope_from(params.get("full_attention"), None, max_positions)?,
                Some(self.rope_from(
                    params.get("sliding_attention"),
                    Some(10_000.0),
                    max_positions,
                )?),
            ),
            _ => (
                self.rope_with_max(max_positions)?,
                Some(RopeConfig {
                    theta: self.f32_or("rope_local_base_freq", 10_000.0)?,
                    scaling: RopeScaling::None,
                }),
            ),
        };
        // A cap the config sets to null is off; Gemma 2's defaults are transformers'.
        let cap = |field: &str, default: f32| -> Result<Option<f32>> {
            match self.get(field) {
                Some(Value::Null) => Ok(None),
                Some(_) => Ok(Some(self.f32_or(field, default)?)),
                None if gemma2 => Ok(Some(default)),
                None => Ok(None),
            }
        };
        let scalar = self.f32_or("query_pre_attn_scalar", head_dim as f32)?;
        Ok(ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: self.usize("vocab_size")?,
            hidden_size: hidden,
            num_layers,
            num_heads: heads,
            num_kv_heads: self.opt_usize("num_key_value_heads")?.unwrap_or(heads),
            head_dim,
            intermediate_size: self.usize("intermediate_size")?,
            max_positions,
            norm_eps: self.f32_or("rms_norm_eps", 1e-6)?,
            rope: Some(global),
            qkv_bias: self.bool_or("attention_bias", false)?,
            dense_bias: false,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", true)?,
            sliding_window: Some(self.opt_usize("sliding_window")?.unwrap_or(4096)),
            layer_attention,
            variations: Variations {
                qk_norm: !gemma2,
                sandwich_norms: true,
                norm_weight_offset: 1.0,
                activation: GatedActivation::GeluTanh,
                embedding_scale: Some((hidden as f32).sqrt()),
                query_pre_attn_scalar: Some(scalar),
                local_rope: local,
                final_logit_softcap: cap("final_logit_softcapping", 30.0)?,
                attn_logit_softcap: cap("attn_logit_softcapping", 50.0)?,
                fused_projections: false,
                rotary_dim: None,
            },
            bos_token_id: token_ids(self.get("bos_token_id")).and_then(|ids| ids.first().copied()),
            eos_token_ids: self.token_ids("eos_token_id").unwrap_or_default(),
            model_type,
        })
    }

    /// Rope settings (v5 `rope_parameters`, or v4 `rope_theta` + `rope_scaling`) for a model
    /// of `max_positions` positions (LongRoPE's default
    /// attention factor depends on it).
    fn rope_with_max(&self, max_positions: usize) -> Result<RopeConfig> {
        match self.get("rope_parameters") {
            Some(params) => self.rope_from(Some(params), None, max_positions),
            None => {
                let theta = self.get("rope_theta").and_then(Value::as_f64);
                self.rope_from(
                    self.get("rope_scaling"),
                    theta.or(Some(10_000.0)),
                    max_positions,
                )
            }
        }
    }

    /// Rope settings from a `rope_parameters` or `rope_scaling` object (its own `rope_theta`
    /// first, then `theta`, then 10,000).
    fn rope_from(
        &self,
        params: Option<&Value>,
        theta: Option<f64>,
        max_positions: usize,
    ) -> Result<RopeConfig> {
        let own = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64);
        let theta = own.or(theta).unwrap_or(10_000.0) as f32;
        let Some(params) = params else {
            return Ok(RopeConfig {
                theta,
                scaling: RopeScaling::None,
            });
        };
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let number = |key: &str| -> Result<f32> {
            params
                .get(key)
                .and_then(Value::as_f64)
                .map(|v| v as f32)
                .ok_or_else(|| self.missing(&format!("rope {key}"), "a number"))
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: number("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_positions: number("original_max_position_embeddings")? as usize,
            },
            // Phi-3's LongRoPE (`su` in older configs): the short factors, which hold up to
            // the trained context (the model's `max_positions` stops there), and the
            // attention factor transformers computes when the config gives none.
            "longrope" | "su" => {
                let factors = params
                    .get("short_factor")
                    .and_then(Value::as_array)
                    .and_then(|f| f.iter().map(|v| v.as_f64().map(|v| v as f32)).collect())
                    .ok_or_else(|| self.missing("rope short_factor", "a list of numbers"))?;
                let original = params
                    .get("original_max_position_embeddings")
                    .or_else(|| self.get("original_max_position_embeddings"))
                    .and_then(Value::as_u64)
                    .ok_or_else(|| {
                        self.missing("original_max_position_embeddings", "a positive integer")
                    })? as f32;
                let factor = match params.get("factor").and_then(Value::as_f64) {
                    Some(f) => f as f32,
                    None => max_positions as f32 / original,
                };
                let attention_factor = match params.get("attention_factor").and_then(Value::as_f64)
                {
                    Some(a) => a as f32,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / original.ln()).sqrt(),
                };
                RopeScaling::PerFrequency {
                    factors,
                    attention_factor,
                }
            }
            other => {
                return Err(ModelError::config(
                    self.source_name,
                    format!(
                    "rope_type `{other}` is not supported (default, linear, llama3, longrope are)"
                ),
                ))
            }
        };
        Ok(RopeConfig { theta, scaling })
    }
}

/// A token id or a list of them, as `eos_token_id` may be written.
pub(crate) fn token_ids(value: Option<&Value>) -> Option<Vec<u32>> {
    match value? {
        Value::Number(n) => n.as_u64().map(|id| vec![id as u32]),
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_u64().map(|id| id as u32))
            .collect(),
        _ => None,
    }
}
