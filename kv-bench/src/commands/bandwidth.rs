//! `kv-bench bandwidth`: the machine's read bandwidth and the decode floor it sets.

use super::*;

#[derive(Debug, Args)]
pub(crate) struct BandwidthArgs {
    /// Model whose decode floor to report (a directory, a .gguf or a config.json; default:
    /// SmolLM2-135M-Instruct's shape, no download needed).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Buffer size in MiB (keep it far above the last-level cache).
    #[arg(long, default_value_t = 1024)]
    pub(crate) mib: usize,
    /// Reading threads (default: all cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Timed passes; the best one is reported.
    #[arg(long, default_value_t = 5)]
    pub(crate) passes: usize,
}

pub(crate) fn bandwidth(args: &BandwidthArgs) -> Result<(), BenchError> {
    if args.mib == 0 || args.passes == 0 {
        return Err(BenchError::Usage(
            "--mib and --passes must be at least 1".into(),
        ));
    }
    let config = match &args.model {
        None => {
            let json: serde_json::Value = serde_json::from_str(SMOLLM2_CONFIG)
                .map_err(|e| BenchError::Usage(format!("built-in SmolLM2 config: {e}")))?;
            kv_model::ModelConfig::from_hf_json(&json, "configs/smollm2-135m-instruct.json")?
        }
        Some(path) => model_config(path)?,
    };
    let bw = kv_bench::bandwidth::measure_read_bandwidth(
        args.mib << 20,
        args.threads.unwrap_or_else(threads),
        args.passes,
    );
    let passes: Vec<String> = bw
        .passes
        .iter()
        .map(|p| format!("{:.1}", p / 1e9))
        .collect();
    println!(
        "read bandwidth: {:.1} GB/s, best of {} passes over {} MiB with {} threads (GB/s: {})",
        bw.best() / 1e9,
        bw.passes.len(),
        args.mib,
        bw.threads,
        passes.join(", ")
    );
    for (name, bytes) in [("f32", 4), ("bf16", 2)] {
        let weight_bytes = kv_bench::bandwidth::decode_weight_bytes(&config, bytes);
        println!(
            "{} ({name} weights): {:.1} MB read per decode step, floor {:.1} tokens/s",
            config.model_type,
            weight_bytes as f64 / 1e6,
            bw.floor_steps_per_second(weight_bytes)
        );
    }
    if let Some(path) = args.model.as_ref().filter(|p| is_gguf(p)) {
        let weight_bytes = gguf_step_bytes(path)?;
        println!(
            "{} (the file's own blocks, `--weights native`): {:.1} MB read per decode step, floor {:.1} tokens/s",
            config.model_type,
            weight_bytes as f64 / 1e6,
            bw.floor_steps_per_second(weight_bytes)
        );
    }
    Ok(())
}

fn is_gguf(path: &std::path::Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Bytes of a GGUF file's matrices that a native decode step reads, from its header alone:
/// every 2-D tensor but the token embedding (of which a step reads one row), unless the file
/// has no `output.weight`, in which case the embedding is the LM head and is read whole.
fn gguf_step_bytes(path: &std::path::Path) -> Result<usize, BenchError> {
    let file = kv_model::gguf::GgufFile::open(path)?;
    let tied = file.tensor_info("output.weight").is_none();
    let bytes = file
        .tensors
        .iter()
        .filter(|t| t.dims.len() == 2 && (tied || t.name != "token_embd.weight"))
        .filter_map(|t| t.ggml_type.byte_len(t.elements()))
        .sum::<u64>();
    Ok(bytes as usize)
}
