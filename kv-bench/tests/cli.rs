//! The harness, not the speed: `kv-bench` writes the files it promises, in their schema, and
//! generates exactly the tokens asked for. (Timings are never asserted.)

#[path = "../../kv-model/tests/common/fixtures.rs"]
mod fixtures;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fixtures::fixtures;
use serde_json::Value;

fn kv_bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kv-bench"))
        .args(args)
        .output()
        .expect("run kv-bench")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kv-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn compare_writes_every_run_and_a_valid_plot() {
    let out = scratch("compare");
    let model = fixtures().join("tiny-llama.gguf");
    let result = kv_bench(&[
        "compare",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        "5,17,42,8",
        "--new-tokens",
        "9",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--cache",
        "dynamic",
        "static",
        "sliding",
        "int4",
        "--window",
        "6",
        "--bandwidth-mib",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let table = String::from_utf8(result.stdout).unwrap();
    assert!(table.contains("without KV caching:"), "{table}");
    assert_eq!(table.matches("with KV caching (").count(), 4, "{table}");
    assert!(table.contains("+-") && table.contains("seconds"));

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    assert_eq!(report["new_tokens"], 9);
    assert_eq!(report["prompt_ids"], serde_json::json!([5, 17, 42, 8]));
    assert!(report["machine"]["cpu"].is_string());
    assert!(report["date"].as_str().unwrap().ends_with('Z'));
    assert!(
        report["setting"]["read_bandwidth"].is_null(),
        "--bandwidth-mib 0"
    );
    let results = report["results"].as_array().unwrap();
    let kinds: Vec<&str> = results
        .iter()
        .map(|r| r["cache"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["none", "dynamic", "static", "sliding", "int4"]);
    for result in results {
        let runs = result["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 3, "warm-up runs are not recorded");
        for run in runs {
            assert_eq!(
                run["generated"], 9,
                "--new-tokens 9 generates 9 tokens, never fewer"
            );
            assert_eq!(run["step_ms"].as_array().unwrap().len(), 8);
            assert!(run["total_s"].as_f64().unwrap() > 0.0);
        }
        let bytes = runs[0]["cache_bytes"].as_u64().unwrap();
        assert_eq!(bytes == 0, result["cache"] == "none");
    }

    let svg = std::fs::read_to_string(out.join("step_latency.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 5, "one line per kind");
    assert_eq!(svg.matches("<svg").count(), 1);
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn sweep_writes_json_and_csv_for_the_grid() {
    let out = scratch("sweep");
    let model = fixtures().join("llama");
    let result = kv_bench(&[
        "sweep",
        "--model",
        model.to_str().unwrap(),
        "--cache",
        "dynamic",
        "int8",
        "--new-tokens",
        "4",
        "6",
        "--batch",
        "1",
        "2",
        "--prompt-len",
        "8",
        "24",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
    assert_eq!(
        svg.matches("<polyline").count(),
        3 * 2,
        "one line per kind and batch size"
    );
    // 3 kinds x 2 token counts x 2 batch sizes, then 2 prefill rows, after the header.
    assert_eq!(csv.lines().count(), 1 + 12 + 2, "{csv}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    let rows = report["generation"].as_array().unwrap();
    assert_eq!(rows.len(), 12);
    for row in rows {
        if row["kind"] == "dynamic" {
            // The dynamic cache holds at least what the formula says its positions need.
            assert!(row["cache_bytes"].as_u64() >= row["theoretical_bytes"].as_u64());
        }
    }
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn memory_prints_the_table_and_cross_checks_it() {
    let model = fixtures().join("llama");
    let result = kv_bench(&[
        "memory",
        "--model",
        model.to_str().unwrap(),
        "--window",
        "64",
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let table = String::from_utf8(result.stdout).unwrap();
    for kind in [
        "dynamic", "static", "sliding", "sink", "paged", "int8", "int4",
    ] {
        assert!(table.contains(kind), "{kind} missing: {table}");
    }
    assert!(table.contains("cross-check: real caches"), "{table}");
}

/// `compare` on the tiny GGUF with its cache only, one timed run, an 8 MiB bandwidth probe, and
/// `extra` arguments; its stdout (the table) once it has succeeded.
fn compare_cached_only(out: &Path, extra: &[&str]) -> String {
    let model = fixtures().join("tiny-llama.gguf");
    let mut args = vec![
        "compare",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        "5,17,42,8",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--no-uncached",
        "--bandwidth-mib",
        "8",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let result = kv_bench(&args);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    String::from_utf8(result.stdout).unwrap()
}

#[test]
fn compare_without_the_uncached_run_reports_the_bandwidth_floor() {
    let out = scratch("floor");
    let table = compare_cached_only(&out, &["--new-tokens", "30", "--weights", "f32"]);
    assert!(!table.contains("without KV caching"), "{table}");
    assert!(table.contains("prefill"), "{table}");
    assert!(
        table.contains("dynamic step at position 10:"),
        "step growth: {table}"
    );
    assert!(table.contains("% of the f32 floor"), "{table}");
    assert!(table.contains("f32 weights read at"), "{table}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let kinds: Vec<&str> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cache"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["dynamic"]);
    let bandwidth = &report["setting"]["read_bandwidth"];
    assert_eq!(bandwidth["buffer_bytes"], 8 << 20);
    assert!(bandwidth["best_gb_per_s"].as_f64().unwrap() > 0.0);
    // The tiny model's weights per step, from its shape (kv_bench::bandwidth).
    let per_step = report["setting"]["decode_weight_bytes_f32"]
        .as_u64()
        .unwrap();
    assert!(per_step > 0 && per_step < 4 << 20, "{per_step}");
    assert_eq!(report["setting"]["weights"], "f32");
    // What the model holds: the matrices of that count (norms, which it also counts, aside).
    let held = report["setting"]["decode_weight_bytes"].as_u64().unwrap();
    assert!(
        held <= per_step && held * 10 >= per_step * 9,
        "{held} vs {per_step}"
    );
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn compare_with_f16_weights_counts_half_the_bytes() {
    let out = scratch("f16");
    let table = compare_cached_only(
        &out,
        &["--new-tokens", "8", "--backend", "flex", "--weights", "f16"],
    );
    assert!(table.contains("f16 weights read at"), "{table}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let setting = &report["setting"];
    assert_eq!(setting["weights"], "f16");
    let f32_bytes = setting["decode_weight_bytes_f32"].as_u64().unwrap();
    // Half the bytes of every matrix; the norms, which the f32 count includes, are tiny.
    let f16_bytes = setting["decode_weight_bytes"].as_u64().unwrap();
    let ratio = f16_bytes as f64 / f32_bytes as f64;
    assert!((0.49..0.51).contains(&ratio), "{f16_bytes} / {f32_bytes}");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn bandwidth_reports_the_default_models_floor() {
    let result = kv_bench(&["bandwidth", "--mib", "16", "--passes", "2"]);
    assert!(result.status.success());
    let text = String::from_utf8(result.stdout).unwrap();
    assert!(text.starts_with("read bandwidth: "), "{text}");
    assert!(text.contains("best of 2 passes over 16 MiB"), "{text}");
    // SmolLM2-135M: 134,515,584 weights read per step, 4 bytes each in f32, 2 in bf16.
    assert!(text.contains("538.1 MB read per decode step"), "{text}");
    assert!(text.contains("269.0 MB read per decode step"), "{text}");
}

#[test]
fn bad_input_is_one_line_and_non_zero() {
    let model = fixtures().join("llama");
    let model = model.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "compare",
                "--model",
                model,
                "--prompt-ids",
                "1",
                "--cache",
                "radix",
            ],
            "unknown cache",
        ),
        (
            vec![
                "compare",
                "--model",
                model,
                "--prompt-ids",
                "1",
                "--runs",
                "0",
            ],
            "at least 1",
        ),
        (vec!["compare", "--model", model], "no tokenizer"),
        (vec!["bandwidth", "--mib", "0"], "at least 1"),
        (
            vec!["compare", "--model", "missing.gguf", "--prompt-ids", "1"],
            "no such file",
        ),
        (
            vec![
                "compare",
                "--model",
                model,
                "--prompt-ids",
                "1",
                "--peer",
                "vllm",
            ],
            "unknown peer",
        ),
        (
            vec![
                "compare",
                "--model",
                model,
                "--prompt-ids",
                "1",
                "--peer",
                "llama-cpp",
            ],
            "reads GGUF files",
        ),
        (
            vec![
                "compare",
                "--model",
                model,
                "--prompt-ids",
                "1",
                "--peer",
                "llama-cpp",
                "--peer-device",
                "cuda",
            ],
            "CPU only",
        ),
    ] {
        let out = kv_bench(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("kv-bench: error:") && last.contains(needle),
            "{args:?}: {last}"
        );
    }
}

/// `perplexity` on the tiny quantized GGUF: the JSON carries every number, the decode path
/// (chunks of 4) moves the distributions off the f32 base a little, the f32 model scored
/// against itself not at all, and bad settings are one-line errors.
#[test]
fn perplexity_scores_a_text_against_a_base_format() {
    let out = scratch("ppl");
    std::fs::create_dir_all(&out).unwrap();
    let text = out.join("text.txt");
    std::fs::write(
        &text,
        "the cat sat on the mat; the dog sat on the log. ".repeat(4),
    )
    .unwrap();
    let model = fixtures().join("tiny-llama.gguf");
    let json = out.join("ppl.json");
    let run = |weights: &str| {
        let result = kv_bench(&[
            "perplexity",
            "--model",
            model.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--tokens",
            "40",
            "--chunk",
            "4",
            "--segment",
            "16",
            "--weights",
            weights,
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        // The ids scored, for a peer to score the same ones: all 40, each in the vocabulary.
        let ids = report["token_ids"].as_array().unwrap();
        assert_eq!(ids.len(), 40);
        assert!(ids
            .iter()
            .all(|id| id.as_u64().is_some_and(|id| id < 1 << 20)));
        report["runs"][0].clone()
    };
    let native = run("native");
    assert_eq!(native["tokens"], 39);
    assert_eq!(native["weights"], "native");
    assert_eq!(native["segments"].as_array().unwrap().len(), 3);
    let perplexity = native["perplexity"].as_f64().unwrap();
    assert!(perplexity > 1.0 && perplexity.is_finite(), "{perplexity}");
    assert!(native["kl_divergence"].as_f64().unwrap() > 0.0);
    let f32_run = run("f32");
    assert_eq!(f32_run["kl_divergence"], Value::Null, "f32 is its own base");
    let out_of_range = kv_bench(&[
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--tokens",
        "100000",
    ]);
    let stderr = String::from_utf8_lossy(&out_of_range.stderr);
    assert!(!out_of_range.status.success());
    assert!(stderr.contains("fewer than --tokens 100000"), "{stderr}");
    std::fs::remove_dir_all(out).unwrap();
}

/// `perplexity --cache`: the text streams through each kind in turn; the JSON has a run per
/// kind with its label, bytes and curve, perplexity.svg a line per kind; a window that drops
/// the first tokens moves the distributions off the dense run of the same weights, which is
/// its own base; only a sink cache may run past the model's 128 positions; a bad kind is a
/// one-line error.
#[test]
fn perplexity_streams_a_text_through_each_cache_kind() {
    let out = scratch("ppl-caches");
    std::fs::create_dir_all(&out).unwrap();
    let text = out.join("text.txt");
    std::fs::write(
        &text,
        "the cat sat on the mat; the dog sat on the log. ".repeat(40),
    )
    .unwrap();
    let model = fixtures().join("tiny-llama.gguf");
    let json = out.join("ppl.json");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "perplexity",
            "--model",
            model.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--chunk",
            "16",
            "--segment",
            "32",
            "--curve-bin",
            "8",
            "--json",
            json.to_str().unwrap(),
        ];
        args.extend(extra);
        kv_bench(&args)
    };
    let result = run(&[
        "--tokens",
        "100",
        "--kl-base",
        "native",
        "--cache",
        "dynamic",
        "sliding:8",
        "sink:2+6",
        "int8",
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    let labels: Vec<&str> = runs.iter().map(|r| r["cache"].as_str().unwrap()).collect();
    assert_eq!(labels, ["dynamic", "sliding 8", "sink 2+6", "int8"]);
    assert_eq!(
        runs[0]["kl_divergence"],
        Value::Null,
        "dense is its own base"
    );
    assert!(runs[1]["kl_divergence"].as_f64().unwrap() > 0.0);
    for run in runs {
        assert_eq!(run["tokens"], 99);
        assert_eq!(run["curve"].as_array().unwrap().len(), 99usize.div_ceil(8));
        assert!(run["perplexity"].as_f64().unwrap().is_finite());
    }
    // A window holds its budget whatever the length; the dense cache grows with the text.
    let bytes = |i: usize| runs[i]["cache_bytes"].as_u64().unwrap();
    assert_eq!(bytes(1), bytes(2));
    assert!(bytes(0) > bytes(1));
    let svg = std::fs::read_to_string(out.join("perplexity.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 4);

    // Past the model's 128 positions: the sink cache streams on, others are refused.
    let result = run(&[
        "--tokens",
        "200",
        "--kl-base",
        "none",
        "--cache",
        "sink",
        "--window",
        "16",
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    for (args, needle) in [
        (
            vec![
                "--tokens",
                "200",
                "--kl-base",
                "none",
                "--cache",
                "sink",
                "dynamic",
            ],
            "past the model's 128 positions",
        ),
        (vec!["--tokens", "200", "--cache", "sink"], "--kl-base none"),
        (
            vec!["--tokens", "50", "--cache", "radix"],
            "unknown cache kind `radix`",
        ),
        (
            vec!["--tokens", "50", "--cache", "sink:4"],
            "sink:SINKS+WINDOW",
        ),
    ] {
        let result = run(&args);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{args:?}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    std::fs::remove_dir_all(out).unwrap();
}
