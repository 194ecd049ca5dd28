//! The `kv-generate` binary: JSON output equal to transformers' greedy tokens for every cache
//! flag, and a one-line error with a non-zero exit for every bad input.

use std::process::{Command, Output};

use crate::fixtures::{expected, fixtures};
use serde_json::Value;

fn kv_generate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kv-generate"))
        .args(args)
        .output()
        .expect("run kv-generate")
}

fn csv(value: &Value) -> String {
    let ids: Vec<String> = value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    ids.join(",")
}

/// Runs and expects failure: returns the single stderr line that says why.
fn failure(args: &[&str]) -> String {
    let out = kv_generate(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let last = stderr.lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("kv-generate: error: "),
        "{args:?}: {stderr}"
    );
    last
}

#[test]
fn json_greedy_equals_transformers_for_every_cache_flag() {
    let model = fixtures().join("llama");
    let model = model.to_str().unwrap();
    let expected = expected("llama");
    let prompt = csv(&expected["prompt"]);
    let reference: Vec<u64> = expected["greedy_with_cache"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let n = reference.len().to_string();
    let variants: Vec<Vec<&str>> = vec![
        vec!["--cache", "none"],
        vec!["--no-kv-cache"],
        vec!["--cache", "dynamic"],
        vec!["--cache", "static"],
        vec!["--cache", "static", "--max-cache-len", "64"],
        vec!["--cache", "sliding", "--window", "64"],
        vec!["--cache", "sliding:64"],
        vec!["--cache", "sink", "--sink-tokens", "4", "--window", "60"],
        vec!["--cache", "sink:4+60"],
        vec!["--cache", "paged"],
        vec!["--cache", "paged:3"],
    ];
    // Every CPU backend compiled in gives transformers' tokens through every cache.
    let mut backends = Vec::new();
    if cfg!(feature = "ndarray") {
        backends.push("ndarray");
    }
    if cfg!(feature = "flex") {
        backends.push("flex");
    }
    assert!(!backends.is_empty());
    for (backend, variant) in backends
        .iter()
        .flat_map(|b| variants.iter().map(move |v| (*b, v)))
    {
        let mut args = vec!["--model", model, "--prompt-ids", &prompt];
        args.extend(["--max-new-tokens", &n, "--ignore-eos", "--greedy", "--json"]);
        // f32 is the reference format, whose tokens are transformers'.
        args.extend(["--backend", backend, "--weights", "f32"]);
        args.extend(variant);
        let out = kv_generate(&args);
        assert!(
            out.status.success(),
            "{variant:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
        let generated: Vec<u64> = json["generated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(generated, reference, "{backend} {variant:?}");
        assert_eq!(json["finish_reason"], "length");
        assert_eq!(json["prompt_ids"], expected["prompt"]);
        assert!(json["timings"]["prefill_ms"].as_f64().unwrap() > 0.0);
        assert!(json["timings"]["tokens_per_s"].as_f64().unwrap() > 0.0);
        let kind = json["cache"]["kind"].as_str().unwrap();
        assert_eq!(kind == "none", json["cache"]["bytes"] == 0, "{variant:?}");
    }
}

/// `--cache sink` on a rotary model is StreamingLLM's cache (keys re-rotated with the
/// model's table): it generates past the 128 positions the llama fixture was built for, with
/// the tokens of that cache through the library, while `--cache dynamic` is refused with an
/// error naming the limit.
#[test]
fn cache_sink_runs_past_the_model_context_and_dynamic_refuses() {
    let model = fixtures().join("llama");
    let model = model.to_str().unwrap();
    let prompt: Vec<u32> = (0..100u32).map(|i| (i * 11 + 5) % 90).collect();
    let prompt_csv: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let prompt_csv = prompt_csv.join(",");
    let common = [
        "--model",
        model,
        "--prompt-ids",
        &prompt_csv,
        "--max-new-tokens",
        "60",
        "--ignore-eos",
        "--greedy",
        "--backend",
        "ndarray",
        "--weights",
        "f32",
    ];
    let line = failure(&[&common[..], &["--cache", "dynamic"]].concat());
    assert!(line.contains("past the 128"), "{line}");

    let args = [
        &common[..],
        &[
            "--cache",
            "sink",
            "--sink-tokens",
            "4",
            "--window",
            "28",
            "--json",
        ],
    ]
    .concat();
    let out = kv_generate(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let generated: Vec<u32> = json["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();

    let loaded = kv_model::load_model::<burn_ndarray::NdArray<f32>>(
        &fixtures().join("llama"),
        &Default::default(),
    )
    .unwrap();
    let sink = kv_core::CacheConfig::Sink {
        sinks: 4,
        window: 28,
        positions: kv_core::SinkPositions::CacheRanks,
    };
    let config = kv_generate::GenerationConfig {
        max_new_tokens: 60,
        eos: kv_generate::EosPolicy::Ignore,
        cache: kv_generate::CacheChoice::Cache(sink),
        ..Default::default()
    };
    let library = kv_generate::Generator::new(&loaded.model, None)
        .generate(&[prompt], &config, &mut |_, _| {})
        .unwrap();
    assert_eq!(generated, library.rows[0].generated_ids);
}

/// `--num-beams` with its companions returns transformers' hypotheses and scores, best first,
/// through a cache and without one.
#[test]
fn beam_flags_return_transformers_hypotheses_as_json() {
    let model = fixtures().join("llama");
    let fixture = crate::fixtures::read_json("llama/beam.json");
    let prompt = csv(&fixture["prompt"]);
    // The case that stops at the model's own EOS (the command's default) and returns two.
    let case = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["eos_token_ids"] == serde_json::json!([1]) && c["num_return_sequences"] == 2)
        .expect("a beam case on the model's EOS");
    assert_eq!(case["early_stopping"], "never");
    let expected = case["sequences"].as_array().unwrap();
    for cache in ["none", "static", "dynamic"] {
        let out = kv_generate(&[
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            &prompt,
            "--backend",
            "ndarray",
            "--weights",
            "f32",
            "--cache",
            cache,
            "--max-new-tokens",
            &case["max_new_tokens"].to_string(),
            "--num-beams",
            &case["num_beams"].to_string(),
            "--num-return-sequences",
            "2",
            "--length-penalty",
            &case["length_penalty"].to_string(),
            "--early-stopping",
            "never",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        let sequences = json["sequences"].as_array().unwrap();
        assert_eq!(sequences.len(), 2, "{cache}");
        for (got, want) in sequences.iter().zip(expected) {
            assert_eq!(got["generated_ids"], want["generated_ids"], "{cache}");
            let (got, want) = (
                got["score"].as_f64().unwrap(),
                want["score"].as_f64().unwrap(),
            );
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{cache}: {got} vs {want}"
            );
        }
        assert_eq!(json["generated_ids"], sequences[0]["generated_ids"]);
        assert_eq!(json["cache"]["kind"], cache);
    }
}

#[test]
fn quantized_flags_run_and_stop_at_eos_by_default() {
    let model = fixtures().join("llama");
    let prompt = csv(&expected("llama")["prompt"]);
    for cache in ["int8", "int4"] {
        let out = kv_generate(&[
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            &prompt,
            "--cache",
            cache,
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["cache"]["kind"], cache);
        assert_eq!(
            json["finish_reason"], "eos",
            "the greedy path reaches EOS (token 1)"
        );
        assert_eq!(json["generated_ids"].as_array().unwrap().last().unwrap(), 1);
    }
}

#[test]
fn text_mode_streams_text_and_summarises_on_stderr() {
    let model = fixtures().join("tiny-llama.gguf");
    let out = kv_generate(&[
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "10",
        "--ignore-eos",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.trim_end_matches('\n').chars().count(),
        10,
        "{stdout:?}"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    let summary = stderr.lines().last().unwrap();
    assert!(
        summary.contains("10 new tokens") && summary.contains("tok/s"),
        "{summary}"
    );
}

#[test]
fn bad_input_exits_non_zero_with_one_line() {
    let llama = fixtures().join("llama");
    let llama = llama.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("kv-generate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corrupt = dir.join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\x00\x00\x00 not really").unwrap();
    let corrupt = corrupt.to_str().unwrap();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model", "missing-model.gguf", "--prompt", "hi"],
            "no such file",
        ),
        (
            vec!["--model", corrupt, "--prompt", "hi"],
            "not a valid GGUF",
        ),
        (vec!["--model", llama, "--prompt-ids", ""], "empty"),
        (vec!["--model", llama, "--prompt", "hi"], "no tokenizer"),
        (
            vec!["--model", llama, "--prompt-ids", "1,96"],
            "token id 96",
        ),
        (
            vec!["--model", llama, "--prompt-ids", "1", "--temperature", "-1"],
            "temperature",
        ),
        (
            vec![
                "--model",
                llama,
                "--prompt-ids",
                "1",
                "--temperature",
                "1",
                "--top-p",
                "1.5",
            ],
            "top-p",
        ),
        (
            vec!["--model", llama, "--prompt-ids", "1", "--top-k", "0"],
            "top-k",
        ),
        (
            vec![
                "--model",
                llama,
                "--prompt-ids",
                "1",
                "--repeat-penalty",
                "0",
            ],
            "repetition penalty",
        ),
        (
            vec![
                "--model",
                llama,
                "--prompt-ids",
                "1,2,3",
                "--cache",
                "static",
                "--max-cache-len",
                "4",
                "--max-new-tokens",
                "8",
            ],
            "static cache of 4",
        ),
        (vec!["--model", llama], "give a prompt"),
        (
            vec![
                "--model",
                llama,
                "--prompt-ids",
                "1",
                "--num-return-sequences",
                "2",
            ],
            "--num-beams",
        ),
        (
            vec![
                "--model",
                llama,
                "--prompt-ids",
                "1",
                "--num-beams",
                "2",
                "--early-stopping",
                "maybe",
            ],
            "true, false or never",
        ),
        (
            vec![
                "--model",
                llama,
                "--prompt-ids",
                "1",
                "--num-beams",
                "2",
                "--num-return-sequences",
                "3",
            ],
            "between 1 and num_beams (2), got 3",
        ),
        (
            vec![
                "--model",
                llama,
                "--prompt-ids",
                "1",
                "--num-beams",
                "2",
                "--temperature",
                "0.7",
            ],
            "chooses by score",
        ),
    ];
    for (args, needle) in cases {
        let line = failure(&args);
        assert!(line.contains(needle), "{args:?}: {line}");
    }
    // An unknown or malformed --cache, --backend or --prompt-ids is refused by the argument
    // parser, naming what is wrong.
    for (flag, value, needle) in [
        (
            "--cache",
            "radix",
            "unknown cache kind `radix`: dynamic, static, sliding[:WINDOW]",
        ),
        ("--cache", "sink:4", "write sink:SINKS+WINDOW"),
        ("--cache", "sliding:0", "`0` is not a positive number"),
        ("--backend", "tpu", "unknown backend `tpu`"),
        ("--prompt-ids", "1,x", "`x` is not a token id"),
    ] {
        let mut args = vec!["--model", llama, flag, value];
        if flag != "--prompt-ids" {
            args.extend(["--prompt-ids", "1"]);
        }
        let out = kv_generate(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value}");
        assert!(stderr.contains(needle), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // An unknown --weights value is refused by the argument parser, before anything loads.
    let out = kv_generate(&["--model", llama, "--prompt-ids", "1", "--weights", "int3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(
            "unknown weight format `int3`: expected one of f32, f16, q8_0, q6_k, q5_1, q5_0, q5_k, q4_1, q4_0, q4_k, native"
        ),
        "{stderr}"
    );
    if !cfg!(feature = "cuda") {
        let line = failure(&["--model", llama, "--prompt-ids", "1", "--backend", "cuda"]);
        assert!(line.contains("--features cuda"), "{line}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--speculate ngram` gives transformers' greedy tokens (the llama fixture's 32), reports its
/// passes and guesses, samples reproducibly by seed, and is refused without a cache.
#[test]
fn speculate_ngram_gives_the_greedy_tokens_and_counts_its_guesses() {
    let model = fixtures().join("llama");
    let model = model.to_str().unwrap();
    let expected = expected("llama");
    let prompt = csv(&expected["prompt"]);
    let n = expected["greedy_with_cache"]
        .as_array()
        .unwrap()
        .len()
        .to_string();
    for cache in ["dynamic", "paged:3"] {
        let args = [
            "--model",
            model,
            "--prompt-ids",
            &prompt,
            "--max-new-tokens",
            &n,
            "--greedy",
            "--ignore-eos",
            "--json",
            "--cache",
            cache,
            "--speculate",
            "ngram",
            "--draft-tokens",
            "4",
        ];
        let out = kv_generate(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            json["generated_ids"], expected["greedy_with_cache"],
            "{cache}"
        );
        let speculation = &json["speculation"];
        let (drafted, accepted) = (
            speculation["drafted"].as_u64(),
            speculation["accepted"].as_u64(),
        );
        assert!(accepted <= drafted, "{speculation}");
        assert!(
            speculation["passes"].as_u64().unwrap() <= 31,
            "{speculation}"
        );
    }
    let sampled = |seed: &str| {
        let args = [
            "--model",
            model,
            "--prompt-ids",
            &prompt,
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--json",
            "--speculate",
            "ngram",
            "--temperature",
            "0.8",
            "--seed",
            seed,
        ];
        let out = kv_generate(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        json["generated_ids"].clone()
    };
    assert_eq!(sampled("5"), sampled("5"));
    let refused = failure(&[
        "--model",
        model,
        "--prompt-ids",
        "1,2,3",
        "--speculate",
        "ngram",
        "--greedy",
        "--cache",
        "none",
    ]);
    assert!(refused.contains("--no-kv-cache"), "{refused}");
}

/// `--speculate draft` with the model itself in Q8_0 as its draft (the default draft model, in
/// a chosen format) and with another model directory: transformers' greedy tokens; a draft
/// whose tokenizer differs is refused with what differs.
#[test]
fn speculate_draft_gives_the_greedy_tokens() {
    let model = fixtures().join("llama");
    let model = model.to_str().unwrap();
    let expected = expected("llama");
    let prompt = csv(&expected["prompt"]);
    let n = expected["greedy_with_cache"]
        .as_array()
        .unwrap()
        .len()
        .to_string();
    let qwen = fixtures().join("qwen2");
    for draft in [
        vec!["--draft-weights", "q8_0"],
        vec!["--draft-model", qwen.to_str().unwrap()],
    ] {
        let mut args = vec![
            "--model",
            model,
            "--prompt-ids",
            &prompt,
            "--max-new-tokens",
            &n,
            "--greedy",
            "--ignore-eos",
            "--json",
            "--speculate",
            "draft",
            "--draft-tokens",
            "3",
            // Draft every guess: a tiny fixture is rarely 75% sure of its next token.
            "--draft-p-min",
            "0",
        ];
        args.extend(&draft);
        let out = kv_generate(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            json["generated_ids"], expected["greedy_with_cache"],
            "{draft:?}"
        );
        let speculation = &json["speculation"];
        assert!(
            speculation["drafted"].as_u64().unwrap() > 0,
            "{speculation}"
        );
    }
    // A tiny GGUF file's tokenizer against the default model's: refused before generating.
    let llama = fixtures().join("tiny-llama.gguf");
    let smollm2 = kv_model::default_model(&mut |_| {}).expect("fetch the default model");
    let refused = failure(&[
        "--model",
        llama.to_str().unwrap(),
        "--prompt-ids",
        "1,2,3",
        "--speculate",
        "draft",
        "--draft-model",
        smollm2.to_str().unwrap(),
    ]);
    assert!(
        refused.contains("draft model's tokenizer differs"),
        "{refused}"
    );
}
