//! `kv-bench memory`: cache bytes per kind from the model's shape, cross-checked against real
//! caches.

use super::*;
use kv_model::LayerAttention;
use serde_json::Value;

#[derive(Debug, Args)]
pub(crate) struct MemoryArgs {
    /// A Hugging Face model directory or a .gguf file (default: SmolLM2-135M-Instruct).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Window of the sliding and sink kinds.
    #[arg(long, default_value_t = 4096)]
    pub(crate) window: usize,
    /// Sink tokens.
    #[arg(long, default_value_t = 4)]
    pub(crate) sinks: usize,
    /// Batch rows.
    #[arg(long, default_value_t = 1)]
    pub(crate) batch: usize,
    /// Write memory.json here too.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

pub(crate) fn memory_table(args: &MemoryArgs) -> Result<(), BenchError> {
    let path = model_path(&args.model)?;
    let config = model_config(&path)?;
    let kinds = kv_bench::memory::kinds(args.window, args.sinks, 32_768)?;
    let sizes = [1_024usize, 8_192, 32_768];
    println!(
        "cache bytes for {} ({} layers x {} kv heads x {} head_dim, f32, batch {}):",
        path.file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
        config.num_layers,
        config.num_kv_heads,
        config.head_dim,
        args.batch
    );
    println!(
        "{:<32} {:>14} {:>14} {:>14}",
        "kind", "1k tokens", "8k tokens", "32k tokens"
    );
    let mib = |b: usize| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    let theory: Vec<usize> = sizes
        .iter()
        .map(|&n| kv_bench::memory::theoretical_bytes(&config, args.batch, n))
        .collect();
    println!(
        "{:<32} {:>14} {:>14} {:>14}",
        "2 x L x kv x d x seq x 4 B",
        mib(theory[0]),
        mib(theory[1]),
        mib(theory[2])
    );
    let sliding = config
        .layer_attention
        .iter()
        .filter(|&&a| a == LayerAttention::Sliding);
    let sliding = sliding.count();
    if sliding > 0 {
        println!(
            "{} of {} layers attend over a window of {} positions: each kind is built as the model \
             builds it (a ring of the window on those layers where the kind holds every position); \
             in brackets, full + sliding layers",
            sliding,
            config.num_layers,
            config.sliding_window.unwrap_or(0)
        );
    }
    let mut table = Vec::new();
    // The serving engine's pool: one sequence's blocks (of 16) as it decodes.
    let engine = (
        "engine pool (blocks of 16)".to_string(),
        None::<kv_core::CacheConfig>,
    );
    let rows = kinds.iter().map(|(n, k)| (n.clone(), Some(k.clone())));
    for (name, kind) in rows.chain([engine]) {
        let bytes: Vec<Option<kv_bench::memory::LayerBytes>> = sizes
            .iter()
            .map(|&n| match &kind {
                Some(kind) => kv_bench::memory::model_bytes(&config, kind, args.batch, n),
                None => {
                    let one = kv_bench::memory::engine_bytes(&config, 16, n);
                    Some(kv_bench::memory::LayerBytes {
                        full: one.full * args.batch,
                        sliding: one.sliding * args.batch,
                    })
                }
            })
            .collect();
        let cell = |b: &Option<kv_bench::memory::LayerBytes>| match b {
            None => "refused".to_string(),
            Some(b) if sliding > 0 => format!(
                "{} ({:.0}+{:.0})",
                mib(b.total()),
                b.full as f64 / (1 << 20) as f64,
                b.sliding as f64 / (1 << 20) as f64
            ),
            Some(b) => mib(b.total()),
        };
        let width = if sliding > 0 { 22 } else { 14 };
        println!(
            "{name:<32} {:>width$} {:>width$} {:>width$}",
            cell(&bytes[0]),
            cell(&bytes[1]),
            cell(&bytes[2])
        );
        let per_size: Vec<Value> = sizes
            .iter()
            .zip(&bytes)
            .map(|(n, b)| match b {
                Some(b) => json!({"tokens": n, "bytes": b.total(), "full_layers": b.full, "sliding_layers": b.sliding}),
                None => json!({"tokens": n, "refused": true}),
            })
            .collect();
        table.push(json!({ "kind": name, "bytes": per_size }));
    }
    // Cross-check the arithmetic against real one-layer caches at a small size.
    let check_kinds = kv_bench::memory::kinds(64, args.sinks, 512)?;
    let mismatches = cross_check(&config, &check_kinds)?;
    if mismatches.is_empty() {
        println!("cross-check: real caches at 300 tokens report exactly the predicted bytes");
    } else {
        return Err(BenchError::Usage(format!(
            "predicted bytes disagree with real caches: {mismatches:?}"
        )));
    }
    if let Some(out) = &args.out {
        let report = json!({ "model": path.display().to_string(), "batch": args.batch, "theoretical": theory, "kinds": table });
        write(
            &out.join("memory.json"),
            &serde_json::to_string_pretty(&report).unwrap_or_default(),
        )?;
    }
    Ok(())
}

pub(crate) fn cross_check(
    config: &kv_model::ModelConfig,
    kinds: &[(String, CacheConfig)],
) -> Result<Vec<(String, usize, usize)>, BenchError> {
    #[cfg(feature = "ndarray")]
    {
        Ok(kv_bench::memory::cross_check::<
            kv_generate::backend::Ndarray,
        >(config, kinds, 300, &Default::default())?)
    }
    #[cfg(all(not(feature = "ndarray"), feature = "flex"))]
    {
        Ok(kv_bench::memory::cross_check::<kv_generate::backend::Flex>(
            config,
            kinds,
            300,
            &Default::default(),
        )?)
    }
    #[cfg(not(any(feature = "ndarray", feature = "flex")))]
    {
        let _ = (config, kinds);
        Err(BenchError::Usage(
            "memory cross-check needs a CPU backend".into(),
        ))
    }
}
