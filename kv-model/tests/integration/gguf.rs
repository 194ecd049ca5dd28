//! GGUF: dequantization against gguf-py, a tiny quantized Llama against transformers loading
//! the same file, and the reader's errors on malformed files.

use std::path::Path;

use crate::common::*;
use kv_model::gguf::{dequantize, first_non_finite, GgmlType, GgufFile};
use kv_model::{load_model, Logits, ModelError};

fn kind(name: &str) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unexpected kind {name}"))
}

#[test]
fn dequantization_matches_gguf_py_for_every_kind() {
    let cases = read_json("dequant.json");
    let cases = cases.as_object().unwrap();
    // Every type but F32 (which needs no fixture): each type llama.cpp's presets write.
    assert_eq!(cases.len(), GgmlType::ALL.len() - 1);
    for (name, case) in cases {
        let raw = hex::decode(case["raw_hex"].as_str().unwrap()).unwrap();
        let elements = case["elements"].as_u64().unwrap() as usize;
        let want = floats(&case["values"]);
        let kind = kind(name);
        assert_eq!(
            kind.byte_len(elements as u64),
            Some(raw.len() as u64),
            "{name} size"
        );
        let got = dequantize(kind, &raw, elements);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{name} element {i}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn tiny_quantized_llama_matches_transformers() {
    let path = fixtures().join("tiny-llama.gguf");
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version, 3);
    let kinds: std::collections::BTreeSet<String> = file
        .tensors
        .iter()
        .map(|t| format!("{:?}", t.ggml_type))
        .collect();
    assert_eq!(
        kinds.len(),
        5,
        "F32, F16, Q8_0, Q4_0 and Q4_1 all present: {kinds:?}"
    );

    let loaded = load_model::<B>(&path, &device()).unwrap();
    let model = loaded.model;
    assert!(!model.config().tie_word_embeddings);
    let expected = read_json("tiny-llama-gguf.json");
    let prompt = ids(&expected["prompt"]);
    let logits = model
        .forward_uncached(std::slice::from_ref(&prompt), None, Logits::Last)
        .unwrap();
    let diff = max_abs_diff(
        &host_logits(logits)[0][0],
        &floats(&expected["last_logits"]),
    );
    assert!(diff < 1e-4, "logits differ by {diff}");

    let reference = ids(&expected["greedy_with_cache"]);
    let mut cache = model
        .new_cache(&kv_core::CacheConfig::Dynamic { capacity: 8 })
        .unwrap();
    assert_eq!(
        greedy_cached(&model, &mut cache, &prompt, reference.len()),
        reference
    );
    assert_eq!(greedy_uncached(&model, &prompt, reference.len()), reference);

    // Its byte-level vocabulary (no merges) gives one token per byte.
    let tokenizer = loaded.tokenizer.expect("tokens in metadata");
    let text = "ab!";
    let ids = tokenizer.encode(text).unwrap();
    assert_eq!(ids.len(), 3);
    assert_eq!(
        tokenizer
            .decode(&ids, kv_model::SpecialTokens::Show)
            .unwrap(),
        text
    );
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, ModelError> {
    GgufFile::parse(bytes, Path::new("test.gguf"))
}

fn tiny_bytes() -> Vec<u8> {
    std::fs::read(fixtures().join("tiny-llama.gguf")).unwrap()
}

fn message(result: Result<GgufFile, ModelError>) -> String {
    match result {
        Ok(_) => panic!("malformed file parsed"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_headers_are_errors_that_say_what_is_wrong() {
    let good = tiny_bytes();

    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert!(message(parse(bad_magic)).contains("bad magic"));

    let mut bad_version = good.clone();
    bad_version[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert!(message(parse(bad_version)).contains("version 7"));

    let truncated_header = good[..100].to_vec();
    assert!(message(parse(truncated_header)).contains("truncated"));

    // Cutting the tensor data names the tensor that no longer fits.
    let truncated_data = good[..good.len() - 10].to_vec();
    let text = message(parse(truncated_data));
    assert!(
        text.contains("tensor `") && text.contains("truncated"),
        "{text}"
    );

    // A huge element count must not allocate: it is checked against the bytes left.
    let mut huge = b"GGUF".to_vec();
    huge.extend(3u32.to_le_bytes());
    huge.extend(0u64.to_le_bytes());
    huge.extend(1u64.to_le_bytes());
    huge.extend(3u64.to_le_bytes());
    huge.extend(b"key");
    huge.extend(9u32.to_le_bytes()); // array
    huge.extend(0u32.to_le_bytes()); // of u8
    huge.extend(u64::MAX.to_le_bytes());
    assert!(message(parse(huge)).contains("truncated"));

    let missing = load_model::<B>(Path::new("does-not-exist.gguf"), &device()).unwrap_err();
    assert!(matches!(missing, ModelError::Io { .. }), "{missing}");
}

#[test]
fn unknown_tensor_types_and_architectures_are_named() {
    let good = tiny_bytes();
    let file = GgufFile::parse(good.clone(), Path::new("t.gguf")).unwrap();
    // Rewrite the first tensor's type id (the u32 before its u64 offset) to an unknown type.
    let first = &file.tensors[0];
    let name = first.name.as_bytes();
    let at = good.windows(name.len()).position(|w| w == name).unwrap();
    let type_at = at + name.len() + 4 + 8 * first.dims.len();
    let mut bad_type = good.clone();
    bad_type[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let text = message(parse(bad_type));
    assert!(
        text.contains(&first.name) && text.contains("ggml type 99"),
        "{text}"
    );

    // An architecture this crate does not implement.
    let arch = b"llama";
    let at = good.windows(arch.len()).position(|w| w == arch).unwrap();
    let mut other = good;
    other[at..at + 5].copy_from_slice(b"mamba");
    let dir = std::env::temp_dir().join(format!("kv-model-arch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mamba.gguf");
    std::fs::write(&path, other).unwrap();
    let err = load_model::<B>(&path, &device()).unwrap_err();
    assert!(
        matches!(err, ModelError::UnsupportedArchitecture { ref architecture, .. } if architecture == "mamba"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A NaN or infinite scale is found exactly where it makes the block's values non-finite:
/// the half-precision bit pattern `0x7f80` (NaN as f16, infinity as bf16 and as an f32's upper
/// half) is written at every even offset of the second of two all-zero blocks of every type,
/// and the check reports it exactly when dequantization would have produced a non-finite
/// value (a zero block's other bytes, read as levels, times a zero scale stay zero).
#[test]
fn non_finite_scales_are_found_in_every_type() {
    for kind in GgmlType::ALL {
        let (per_block, block_bytes) = kind.block();
        let block_bytes = block_bytes as usize;
        let mut found_any = false;
        for at in (block_bytes..2 * block_bytes - 1).step_by(2) {
            let mut bytes = vec![0u8; 2 * block_bytes];
            bytes[at..at + 2].copy_from_slice(&[0x80, 0x7f]);
            let values = dequantize(kind, &bytes, 2 * per_block as usize);
            let poisoned = values.iter().any(|v| !v.is_finite());
            let found = first_non_finite(kind, &bytes);
            assert_eq!(found.is_some(), poisoned, "{kind} with 0x7f80 at byte {at}");
            if let Some((offset, value)) = found {
                assert!(!value.is_finite());
                assert!(offset <= at && at < offset + 4, "{kind}: {offset} for {at}");
                found_any = true;
            }
        }
        assert!(found_any, "{kind}: no scale position found");
    }
}

/// A tensor whose block scale is NaN is a load error naming the tensor, its type and the
/// byte offset in the file, not a model that generates garbage.
#[test]
fn corrupt_blocks_are_errors_naming_tensor_type_and_offset() {
    let good = tiny_bytes();
    let file = parse(good.clone()).unwrap();
    for kind in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::F16,
    ] {
        let info = file
            .tensors
            .iter()
            .find(|t| t.ggml_type == kind)
            .unwrap_or_else(|| panic!("the tiny model has a {kind} tensor"));
        // Where the tensor's bytes lie in the file.
        let expected = file.tensor_bytes(info).unwrap().into_owned();
        let start = good
            .windows(expected.len())
            .position(|w| w == expected.as_slice())
            .unwrap();
        // The second block's scale (its first two bytes; the second value for F16).
        let at = start + kind.block().1 as usize;
        let mut bad = good.clone();
        bad[at..at + 2].copy_from_slice(&[0x00, 0x7e]);
        let bad_file = parse(bad).unwrap();
        let err = bad_file
            .tensor_bytes(bad_file.tensor_info(&info.name).unwrap())
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&info.name)
                && text.contains(kind.name())
                && text.contains(&format!("offset {at}"))
                && text.contains("NaN"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1, "{text}");
    }
}

mod fuzz {
    use super::*;
    use kv_kernels::Matrix;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Random bytes as blocks of every type: dequantization never panics, and where
        /// kv-kernels keeps the type, a matrix over the same bytes holds the same values and
        /// multiplies without panicking (random scales may be NaN or infinite; the bytes are
        /// what they are, so only the absence of panics and agreement are asked).
        #[test]
        fn random_blocks_of_every_type_read_and_multiply(
            bytes in proptest::collection::vec(any::<u8>(), 2048),
            blocks in 1usize..4,
            rows in 1usize..4,
        ) {
            for kind in GgmlType::ALL {
                let (per_block, block_bytes) = kind.block();
                let cols = per_block as usize * blocks;
                let raw = &bytes[..rows * blocks * block_bytes as usize];
                let values = dequantize(kind, raw, rows * cols);
                prop_assert_eq!(values.len(), rows * cols);
                if let Some(format) = kind.kernel_format() {
                    let matrix = Matrix::from_ggml_bytes(format, rows, cols, raw).unwrap();
                    let widened = matrix.to_f32();
                    // The vector widening fuses a multiply and subtract the scalar reference
                    // rounds twice: equal within a rounding. A non-finite scale gives
                    // non-finite values whose kind (inf or NaN) depends on the order of the
                    // products (inf * 0 is NaN); a file holding one is refused at load
                    // (`first_non_finite`), so only "both non-finite" is asked there.
                    for (a, b) in widened.iter().zip(&values) {
                        let close = (a - b).abs() <= 1e-5 * b.abs().max(1.0);
                        let both_non_finite = !a.is_finite() && !b.is_finite();
                        prop_assert!(a == b || close || both_non_finite, "{}: {} vs {}", kind, a, b);
                    }
                    let x = vec![0.5f32; 3 * cols];
                    let mut y = vec![0.0; 3 * rows];
                    matrix.matmul(&x, 3, &mut y);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Random bytes after a valid magic and version: an error or a file, never a panic.
        #[test]
        fn random_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut bytes = b"GGUF".to_vec();
            bytes.extend(3u32.to_le_bytes());
            bytes.extend(tail);
            let _ = parse(bytes);
        }

        /// The tiny model with a few bytes of its header overwritten: parsing and loading
        /// tensors never panic.
        #[test]
        fn mutated_headers_never_panic(
            edits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8),
            cut in 0usize..64,
        ) {
            let mut bytes = tiny_bytes();
            for (at, value) in edits {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            bytes.truncate(bytes.len() - cut);
            if let Ok(file) = parse(bytes) {
                for info in &file.tensors {
                    let _ = file.tensor_f32(info);
                }
                if let Ok(config) = kv_model::gguf::config_from_gguf(&file) {
                    let _ = kv_model::gguf::weights_from_gguf(&file, &config);
                }
            }
        }
    }
}

/// A Llama 3 file: llama3 rope scaling stored as `rope_freqs.weight` (one divisor per
/// frequency, as llama.cpp's converter writes it) gives the logits and greedy tokens of the
/// same weights and scaling loaded from safetensors (`llama/expected.json`).
#[test]
fn llama3_rope_factors_in_gguf_match_the_safetensors_model() {
    let model = load_model::<B>(&fixtures().join("tiny-llama3.gguf"), &device())
        .unwrap()
        .model;
    assert!(matches!(
        model.config().rope.as_ref().unwrap().scaling,
        kv_model::RopeScaling::PerFrequency { .. }
    ));
    reference::check_all(&model, &expected("llama"), 1e-4);
}

/// The tiny Gemma 2 written as llama.cpp writes a Gemma 2 file (norms stored as `1 + w`,
/// soft-caps and window in the metadata, attention scaled by head_dim^-1/2 as llama.cpp
/// does for every Gemma 2 but the 27B) gives transformers' logits and greedy tokens for the
/// same weights.
#[test]
fn gemma2_gguf_matches_transformers() {
    let model = load_model::<B>(&fixtures().join("tiny-gemma2.gguf"), &device())
        .unwrap()
        .model;
    let variations = &model.config().variations;
    assert_eq!(variations.attn_logit_softcap, Some(2.0));
    assert_eq!(variations.final_logit_softcap, Some(4.0));
    assert_eq!(model.config().sliding_window, Some(4));
    reference::check_all(&model, &read_json("tiny-gemma2-gguf.json"), 1e-4);
}

/// The tiny Phi-4-mini-shaped model written as llama.cpp writes a Phi-3 file (fused Q/K/V and
/// gate/up, rotary on `rope.dimension_count` = 12 of 16 channels, LongRoPE's factors as
/// tensors and its attention factor in the metadata) gives the safetensors model's logits and
/// greedy tokens (`phi4/expected.json`).
#[test]
fn phi3_gguf_with_partial_rotary_matches_the_safetensors_model() {
    let model = load_model::<B>(&fixtures().join("tiny-phi4.gguf"), &device())
        .unwrap()
        .model;
    let config = model.config();
    assert_eq!(config.variations.rotary_dim, Some(12));
    assert!(config.variations.fused_projections);
    // LongRoPE's short factors hold up to the trained context (64 of 256).
    assert_eq!(config.max_positions, 64);
    reference::check_all(&model, &expected("phi4"), 1e-4);
}
