//! What the benchmarks share.

use kv_model::ModelConfig;

/// SmolLM2-135M's shape (30 layers, 9 query heads over 3 key/value heads of 64, a 49152-token
/// tied head), for models with random weights.
pub fn smollm2_shape() -> ModelConfig {
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": true
    });
    ModelConfig::from_hf_json(&json, "SmolLM2-135M shape").expect("valid config")
}
