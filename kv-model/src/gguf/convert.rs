//! GGUF metadata to [`ModelConfig`], and llama.cpp tensor names and layouts to Hugging Face
//! ones, so one model builder serves both formats.

use std::collections::BTreeMap;

use crate::config::{
    Architecture, GatedActivation, LayerAttention, ModelConfig, RopeConfig, RopeScaling, Variations,
};
use crate::error::{ModelError, Result};
use crate::gguf::{GgmlType, GgufFile, MetaValue};
use crate::weights::{HostTensor, Weights};
use kv_kernels::Matrix;

/// The model configuration a GGUF file's metadata describes.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let source = file.path().display().to_string();
    let arch = file
        .get("general.architecture")
        .and_then(MetaValue::as_str)
        .ok_or_else(|| ModelError::config(&source, "metadata `general.architecture` is missing"))?
        .to_owned();
    let family = match arch.as_str() {
        "gpt2" => Architecture::Gpt2,
        "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" | "gemma2" | "gemma3" => {
            Architecture::Llama
        }
        _ => {
            return Err(ModelError::UnsupportedArchitecture {
                source_name: source,
                architecture: arch,
            })
        }
    };
    let key = |name: &str| format!("{arch}.{name}");
    let number = |name: &str| -> Result<usize> {
        file.get(&key(name))
            .and_then(MetaValue::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| {
                ModelError::config(
                    &source,
                    format!("metadata `{}` must be an integer", key(name)),
                )
            })
    };
    let float = |name: &str, default: f32| -> f32 {
        file.get(&key(name))
            .and_then(MetaValue::as_f64)
            .map_or(default, |v| v as f32)
    };
    let token_count = file
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .map(<[MetaValue]>::len);
    let vocab_size = match number("vocab_size") {
        Ok(v) => v,
        Err(e) => token_count.ok_or(e)?,
    };
    let hidden = number("embedding_length")?;
    let heads = number("attention.head_count")?;
    let head_dim = match number("attention.key_length") {
        Ok(d) => d,
        Err(_) if heads > 0 => hidden / heads,
        Err(e) => return Err(e),
    };
    let has = |name: &str| file.tensor_info(name).is_some();
    // Llama 3.1+ files store llama3 rope scaling as one divisor per frequency, Phi-3 files
    // LongRoPE's short factors (with the attention factor in the metadata).
    let factors_tensor = ["rope_freqs.weight", "rope_factors_short.weight"]
        .into_iter()
        .find_map(|name| file.tensor_info(name));
    let rope_factors = match factors_tensor {
        Some(info) => Some(file.tensor_f32(info)?),
        None => None,
    };
    let id = |name: &str| file.get(name).and_then(MetaValue::as_u64).map(|v| v as u32);
    let num_layers = number("block_count")?;
    let rope = RopeConfig {
        theta: float("rope.freq_base", 10_000.0),
        scaling: match (
            rope_factors,
            file.get(&key("rope.scaling.type"))
                .and_then(MetaValue::as_str),
        ) {
            (Some(factors), _) => RopeScaling::PerFrequency {
                factors,
                attention_factor: float("rope.scaling.attn_factor", 1.0),
            },
            (None, Some("linear")) => RopeScaling::Linear {
                factor: float("rope.scaling.factor", 1.0),
            },
            _ => RopeScaling::None,
        },
    };
    // Gemma files name the window and the soft-caps; llama.cpp fixes the rest of the recipe
    // for the architecture (Gemma 2: sliding and full layers alternating; Gemma 3: five
    // sliding layers to one full one and rotary base 10,000 on the sliding layers; both:
    // norms stored with Gemma's `1 + w` already added).
    let full_every = match arch.as_str() {
        "gemma2" => Some(2),
        "gemma3" => Some(6),
        _ => None,
    };
    let sliding_window = match (full_every, arch.as_str()) {
        (Some(_), _) => Some(number("attention.sliding_window")?),
        // Phi-3's window, where its file names one, on every layer (as transformers runs it).
        (None, "phi3") => number("attention.sliding_window").ok().filter(|&w| w > 0),
        _ => None,
    };
    let layer_attention = match (
        full_every,
        file.get(&key("attention.sliding_window_pattern"))
            .and_then(MetaValue::as_array),
    ) {
        (Some(_), Some(pattern)) => pattern
            .iter()
            .map(|v| match v.as_bool() {
                Some(true) => LayerAttention::Sliding,
                _ => LayerAttention::Full,
            })
            .collect(),
        (Some(every), None) => (0..num_layers)
            .map(|i| match (i + 1) % every {
                0 => LayerAttention::Full,
                _ => LayerAttention::Sliding,
            })
            .collect(),
        (None, _) if sliding_window.is_some() => vec![LayerAttention::Sliding; num_layers],
        (None, _) => vec![LayerAttention::Full; num_layers],
    };
    // As llama.cpp: attention scaled by 1/sqrt(head_dim), but by 1/sqrt(hidden/heads) for the
    // 27B models (46 layers in Gemma 2, 62 in Gemma 3).
    let gemma_scalar = |large_layers: usize| match num_layers == large_layers {
        true => (hidden / heads.max(1)) as f32,
        false => head_dim as f32,
    };
    let gemma = Variations {
        sandwich_norms: true,
        norm_weight_offset: 0.0,
        activation: GatedActivation::GeluTanh,
        embedding_scale: Some((hidden as f32).sqrt()),
        ..Variations::default()
    };
    let variations = match arch.as_str() {
        "qwen3" => Variations {
            qk_norm: true,
            ..Variations::default()
        },
        // Fused Q/K/V (`attn_qkv`) and gate/up (`ffn_up`); rotary on the first
        // `rope.dimension_count` channels of each head (Phi-4-mini: 96 of 128).
        "phi3" => Variations {
            fused_projections: true,
            rotary_dim: number("rope.dimension_count")
                .ok()
                .filter(|&d| d < head_dim),
            ..Variations::default()
        },
        "gemma2" => Variations {
            query_pre_attn_scalar: Some(gemma_scalar(46)),
            attn_logit_softcap: Some(float("attn_logit_softcapping", 50.0)),
            final_logit_softcap: Some(float("final_logit_softcapping", 30.0)),
            ..gemma
        },
        "gemma3" => Variations {
            qk_norm: true,
            query_pre_attn_scalar: Some(gemma_scalar(62)),
            local_rope: Some(RopeConfig {
                theta: 10_000.0,
                scaling: RopeScaling::None,
            }),
            ..gemma
        },
        _ => Variations::default(),
    };
    let config = ModelConfig {
        architecture: family,
        vocab_size,
        hidden_size: hidden,
        num_layers,
        num_heads: heads,
        num_kv_heads: number("attention.head_count_kv").unwrap_or(heads),
        head_dim,
        intermediate_size: number("feed_forward_length")?,
        // LongRoPE's short factors hold up to the trained context only (as from safetensors).
        max_positions: match (
            arch.as_str(),
            number("rope.scaling.original_context_length"),
        ) {
            ("phi3", Ok(original)) if factors_tensor.is_some() => {
                original.min(number("context_length")?)
            }
            _ => number("context_length")?,
        },
        norm_eps: match family {
            Architecture::Gpt2 => float("attention.layer_norm_epsilon", 1e-5),
            Architecture::Llama => float("attention.layer_norm_rms_epsilon", 1e-6),
        },
        rope: (family == Architecture::Llama).then_some(rope),
        qkv_bias: family == Architecture::Gpt2 || has("blk.0.attn_q.bias"),
        dense_bias: family == Architecture::Gpt2 || has("blk.0.ffn_up.bias"),
        tie_word_embeddings: !has("output.weight"),
        sliding_window,
        layer_attention,
        variations,
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: end_of_generation_ids(file),
        model_type: arch,
    };
    config.validate(&source)?;
    Ok(config)
}

/// The end-of-turn markers chat models end a reply with, which llama.cpp stops at whatever the
/// file's `eos_token_id` says: Gemma's, Llama 3's, ChatML's (Qwen, SmolLM2), Phi-3's.
const END_OF_TURN: [&str; 5] = [
    "<end_of_turn>",
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|eom_id|>",
];

/// The ids that end generation: the file's EOS, its end-of-turn and end-of-message ids
/// (`tokenizer.ggml.eot_token_id`, `eom_token_id`) and every control token spelled as a known
/// end-of-turn marker ([`END_OF_TURN`]), as llama.cpp's vocabulary collects them, so an
/// instruction-tuned Gemma stops at `<end_of_turn>` though its EOS is `<eos>`.
fn end_of_generation_ids(file: &GgufFile) -> Vec<u32> {
    let id = |name: &str| file.get(name).and_then(MetaValue::as_u64).map(|v| v as u32);
    let mut ids: Vec<u32> = [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ]
    .iter()
    .filter_map(|key| id(key))
    .collect();
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .unwrap_or_default();
    let types = file
        .get("tokenizer.ggml.token_type")
        .and_then(MetaValue::as_array)
        .unwrap_or_default();
    for (i, (token, kind)) in tokens.iter().zip(types).enumerate() {
        let control = kind.as_u64() == Some(3);
        if control && token.as_str().is_some_and(|t| END_OF_TURN.contains(&t)) {
            ids.push(i as u32);
        }
    }
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    ids
}

/// Every tensor of the file, renamed to Hugging Face names, with Q/K rows of Llama and
/// Mistral files put back in the rotate-half order (llama.cpp's converter interleaves them).
///
/// Llama-family matrices whose type has a kv-kernels format (F32, F16, Q8_0, Q4_0, Q4_1,
/// Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) are kept in their blocks (moving whole rows is all the Q/K
/// reordering needs), so a model built on kv-kernels runs on the file's own bytes. The other
/// types (BF16, Q2_K, Q3_K, IQ4_NL, IQ4_XS) are requantized to the format
/// [`GgmlType::requantize_to`] names, and [`Weights::notes`] says so in one line per type.
/// GPT-2 matrices are dequantized and transposed back to the Conv1D layout (`[in, out]`),
/// whose rows are not the file's blocks.
pub fn weights_from_gguf(file: &GgufFile, config: &ModelConfig) -> Result<Weights> {
    let mut weights = Weights::new(file.path().display().to_string());
    let permuted = matches!(config.model_type.as_str(), "llama" | "mistral");
    let mut requantized: BTreeMap<GgmlType, usize> = BTreeMap::new();
    for info in &file.tensors {
        let Some(name) = hf_name(&info.name, config) else {
            continue;
        };
        let heads = if permuted && info.name.ends_with("attn_q.weight") {
            Some(config.num_heads)
        } else if permuted && info.name.ends_with("attn_k.weight") {
            Some(config.num_kv_heads)
        } else {
            None
        };
        let shape = info.shape();
        if let (Architecture::Llama, &[rows, cols]) = (config.architecture, shape.as_slice()) {
            let kernel_error = |e: kv_kernels::KernelError| ModelError::Gguf {
                path: file.path().to_path_buf(),
                message: format!("tensor `{}` ({}): {e}", info.name, info.ggml_type),
            };
            let mut matrix = match info.ggml_type.kernel_format() {
                Some(format) => {
                    Matrix::from_ggml_bytes(format, rows, cols, &file.tensor_bytes(info)?)
                        .map_err(kernel_error)?
                }
                None => {
                    let target = info.ggml_type.requantize_to();
                    *requantized.entry(info.ggml_type).or_default() += 1;
                    Matrix::from_f32(target, rows, cols, &file.tensor_f32(info)?)
                        .map_err(kernel_error)?
                }
            };
            if let Some(heads) = heads {
                matrix = matrix.select_rows(&rotate_half_order(rows, heads, &info.name, file)?);
            }
            weights.insert_matrix(name, matrix);
            continue;
        }
        let mut tensor = HostTensor::new(shape, file.tensor_f32(info)?);
        if let Some(heads) = heads {
            let order = rotate_half_order(tensor.shape[0], heads, &info.name, file)?;
            let cols = tensor.shape[1];
            let data = order
                .iter()
                .flat_map(|&r| tensor.data[r * cols..(r + 1) * cols].iter().copied())
                .collect();
            tensor = HostTensor::new(tensor.shape, data);
        }
        if config.architecture == Architecture::Gpt2
            && tensor.shape.len() == 2
            && name.starts_with("transformer.h.")
        {
            // GGUF stores GPT-2's Conv1D weights as `[out, in]`; Hugging Face as `[in, out]`.
            tensor = tensor.transposed();
        }
        weights.insert(name, tensor);
    }
    for (kind, count) in requantized {
        weights.add_note(format!(
            "{count} matrices stored as {kind} requantized to {} at load (no {kind} kernel)",
            kind.requantize_to()
        ));
    }
    Ok(weights)
}

/// The Hugging Face name of a llama.cpp tensor, `None` for tensors the model does not use.
///
/// One llama.cpp name means two Hugging Face ones: `ffn_norm` is the norm before the MLP,
/// which Llama calls `post_attention_layernorm` and Gemma (whose `post_attention_layernorm`
/// is the norm after attention, llama.cpp's `post_attention_norm`)
/// `pre_feedforward_layernorm`.
fn hf_name(gguf: &str, config: &ModelConfig) -> Option<String> {
    let family = config.architecture;
    let sandwich = config.variations.sandwich_norms;
    let fused = config.variations.fused_projections;
    let global = match (family, gguf) {
        (Architecture::Llama, "token_embd.weight") => Some("model.embed_tokens.weight"),
        (Architecture::Llama, "output_norm.weight") => Some("model.norm.weight"),
        (Architecture::Llama, "output.weight") => Some("lm_head.weight"),
        (Architecture::Gpt2, "token_embd.weight") => Some("transformer.wte.weight"),
        (Architecture::Gpt2, "position_embd.weight") => Some("transformer.wpe.weight"),
        (Architecture::Gpt2, "output_norm.weight") => Some("transformer.ln_f.weight"),
        (Architecture::Gpt2, "output_norm.bias") => Some("transformer.ln_f.bias"),
        _ => None,
    };
    if let Some(name) = global {
        return Some(name.to_owned());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = part.rsplit_once('.')?;
    let hf = match (family, module) {
        (Architecture::Llama, "attn_norm") => "input_layernorm",
        (Architecture::Llama, "ffn_norm") if sandwich => "pre_feedforward_layernorm",
        (Architecture::Llama, "ffn_norm") => "post_attention_layernorm",
        (Architecture::Llama, "post_attention_norm") => "post_attention_layernorm",
        (Architecture::Llama, "post_ffw_norm") => "post_feedforward_layernorm",
        (Architecture::Llama, "attn_q_norm") => "self_attn.q_norm",
        (Architecture::Llama, "attn_k_norm") => "self_attn.k_norm",
        (Architecture::Llama, "attn_q") => "self_attn.q_proj",
        (Architecture::Llama, "attn_k") => "self_attn.k_proj",
        (Architecture::Llama, "attn_v") => "self_attn.v_proj",
        (Architecture::Llama, "attn_output") => "self_attn.o_proj",
        (Architecture::Llama, "attn_qkv") if fused => "self_attn.qkv_proj",
        (Architecture::Llama, "ffn_gate") => "mlp.gate_proj",
        (Architecture::Llama, "ffn_up") if fused => "mlp.gate_up_proj",
        (Architecture::Llama, "ffn_up") => "mlp.up_proj",
        (Architecture::Llama, "ffn_down") => "mlp.down_proj",
        (Architecture::Gpt2, "attn_norm") => "ln_1",
        (Architecture::Gpt2, "ffn_norm") => "ln_2",
        (Architecture::Gpt2, "attn_qkv") => "attn.c_attn",
        (Architecture::Gpt2, "attn_output") => "attn.c_proj",
        (Architecture::Gpt2, "ffn_up") => "mlp.c_fc",
        (Architecture::Gpt2, "ffn_down") => "mlp.c_proj",
        _ => return None,
    };
    Some(match family {
        Architecture::Llama => format!("model.layers.{layer}.{hf}.{suffix}"),
        Architecture::Gpt2 => format!("transformer.h.{layer}.{hf}.{suffix}"),
    })
}

/// The row order that undoes llama.cpp's Q/K permutation: within each head, GGUF row
/// `2i + j` is Hugging Face row `j * head_dim / 2 + i`, so Hugging Face row `to` is read from
/// GGUF row `order[to]`.
fn rotate_half_order(rows: usize, heads: usize, name: &str, file: &GgufFile) -> Result<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(ModelError::Gguf {
            path: file.path().to_path_buf(),
            message: format!(
                "tensor `{name}`: {rows} rows do not split into {heads} heads of even size"
            ),
        });
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut order = vec![0; rows];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                order[h * head_dim + j * half + i] = h * head_dim + 2 * i + j;
            }
        }
    }
    Ok(order)
}
