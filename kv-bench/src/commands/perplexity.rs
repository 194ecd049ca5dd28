//! `kv-bench perplexity`: a long text streamed through weight formats and cache kinds.

use super::*;

#[derive(Debug, Args)]
pub(crate) struct PerplexityArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Plain text to score (default: the prose of CPython's `pydoc_data/topics.py`, found
    /// through `python3`, so every machine has it).
    #[arg(long)]
    pub(crate) text: Option<PathBuf>,
    /// Tokens of the text to score (its first N).
    #[arg(long, default_value_t = 4096)]
    pub(crate) tokens: usize,
    /// Tokens per forward pass. Chunks of up to 16 go through the decode path, longer chunks
    /// through the prompt path; both multiply with kv-kernels, whose block formats round
    /// activations to 8 bits, except that from 16 rows on the k-quants (Q4_K, Q5_K, Q6_K) are
    /// widened and meet f32 activations in `gemm`: to measure what a decode step rounds on
    /// every format, use chunks of 15 or fewer.
    #[arg(long, default_value_t = 512)]
    pub(crate) chunk: usize,
    /// Positions per reported segment.
    #[arg(long, default_value_t = 512)]
    pub(crate) segment: usize,
    /// Positions per point of the log-perplexity curve (perplexity.svg).
    #[arg(long, default_value_t = 64)]
    pub(crate) curve_bin: usize,
    /// Cache kinds to stream the text through, each scored in turn: dynamic, sliding[:W],
    /// sink[:S+W], int8, int4.
    #[arg(long, num_args = 1.., default_value = "dynamic")]
    pub(crate) cache: Vec<CacheSpec>,
    /// Positions a bare `sliding` or `sink` holds in all (a sink spends --sink-tokens of them
    /// on sinks), so windows and sinks compare at the same memory.
    #[arg(long, default_value_t = 256)]
    pub(crate) window: usize,
    /// Sinks of a bare `sink`.
    #[arg(long, default_value_t = 4)]
    pub(crate) sink_tokens: usize,
    /// Weight format of the base model for KL divergence and same-top-1, run through a dynamic
    /// cache ("none" to skip). A base of the model's own format measures what each cache kind
    /// changes.
    #[arg(long, default_value = "f32")]
    pub(crate) kl_base: String,
    /// Write every number as JSON here, and the log-perplexity curve beside it as
    /// perplexity.svg.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

/// The text `kv-bench perplexity` scores by default: the prose of CPython's
/// `pydoc_data/topics.py`, topic by topic in sorted order.
pub(crate) fn default_text() -> Result<String, BenchError> {
    let script = "from pydoc_data.topics import topics\n\
                  print('\\n\\n'.join(topics[k] for k in sorted(topics)))";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .output()
        .map_err(|e| {
            BenchError::Usage(format!(
                "running python3 for the default text: {e}; pass --text FILE"
            ))
        })?;
    if !out.status.success() {
        return Err(BenchError::Usage(format!(
            "python3 could not read pydoc_data.topics ({}); pass --text FILE",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    String::from_utf8(out.stdout)
        .map_err(|e| BenchError::Usage(format!("pydoc_data.topics is not UTF-8: {e}")))
}

/// `kv-bench perplexity` on the backend chosen.
pub(crate) struct Perplexity<'a>(pub(crate) &'a PerplexityArgs);

impl OnBackend for Perplexity<'_> {
    type Output = Result<(), BenchError>;

    fn run<B: Backend>(self, kind: BackendKind, device: B::Device) -> Self::Output {
        let args = self.0;
        let on = On::<B> {
            kind,
            name: kind.name(),
            device,
        };
        if args.tokens < 2 || args.chunk == 0 || args.segment == 0 || args.curve_bin == 0 {
            return Err(BenchError::Usage(
                "--tokens must be at least 2, --chunk, --segment and --curve-bin at least 1".into(),
            ));
        }
        let kl_base = match args.kl_base.as_str() {
            "none" => None,
            name => Some(name.parse::<WeightFormat>().map_err(BenchError::Usage)?),
        };
        let (text, text_name) = match &args.text {
            Some(path) => (
                std::fs::read_to_string(path)
                    .map_err(|e| BenchError::Usage(format!("{}: {e}", path.display())))?,
                path.display().to_string(),
            ),
            None => (default_text()?, "python3 pydoc_data/topics.py".to_string()),
        };
        let path = model_path(&args.model.model)?;
        let placement = on.kind.placement(args.model.weights)?;
        eprintln!("kv-bench: loading {}", path.display());
        let LoadedModel {
            model,
            tokenizer,
            notes,
            ..
        } = load_model_placed::<B>(&path, placement, &on.device)?;
        for note in &notes {
            eprintln!("kv-bench: {note}");
        }
        let model = model.with_execution(on.kind.execution());
        let runs = args
            .cache
            .iter()
            .map(|&spec| {
                CacheRun::new(
                    spec,
                    args.window,
                    args.sink_tokens,
                    model.config().sink_positions(),
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(BenchError::Usage)?;
        let tokenizer = tokenizer.ok_or_else(|| {
            BenchError::Usage(format!(
                "{} has no tokenizer to read the text with",
                path.display()
            ))
        })?;
        let mut ids = tokenizer.encode(&text)?;
        if ids.len() < args.tokens {
            return Err(BenchError::Usage(format!(
                "the text has {} tokens, fewer than --tokens {}",
                ids.len(),
                args.tokens
            )));
        }
        ids.truncate(args.tokens);
        let max = model.config().max_positions;
        if ids.len() > max {
            if let Some(run) = runs.iter().find(|r| !r.runs_past_the_context()) {
                return Err(BenchError::Usage(format!(
                    "--tokens {} is past the model's {max} positions, which `{}` would pass: \
                     only a sink cache runs past them",
                    ids.len(),
                    run.label
                )));
            }
            if kl_base.is_some() {
                return Err(BenchError::Usage(format!(
                    "--tokens {} is past the model's {max} positions, where no dense base can \
                     follow: pass --kl-base none",
                    ids.len()
                )));
            }
        }
        let weights = weight_name(placement);
        let other_base = match kl_base {
            Some(format) if format.name() != weights => {
                let base_placement = on.kind.placement(Some(format))?;
                eprintln!("kv-bench: loading the {format} base");
                Some(
                    load_model_placed::<B>(&path, base_placement, &on.device)?
                        .model
                        .with_execution(on.kind.execution()),
                )
            }
            _ => None,
        };
        let bins = kv_bench::perplexity::Bins {
            segment: args.segment,
            curve: args.curve_bin,
        };
        println!(
            "| cache | weights | tokens | perplexity | KL vs {} | same top-1 | cache bytes | seconds |",
            args.kl_base
        );
        println!("|---|---|---|---|---|---|---|---|");
        let mut reports = Vec::new();
        let mut series = Vec::new();
        for run in &runs {
            // The base: another weight format, or these weights through a dense cache where
            // the cache kind is not itself the dense one.
            let dense = matches!(run.config, CacheConfig::Dynamic { .. });
            let base = match (&other_base, kl_base) {
                (Some(other), _) => Some(other),
                (None, Some(_)) if !dense => Some(&model),
                _ => None,
            };
            eprintln!(
                "kv-bench: scoring {} tokens through {} in chunks of {} ({weights} weights{})",
                ids.len(),
                run.label,
                args.chunk,
                base.map_or(String::new(), |_| format!(
                    ", against {} dense",
                    args.kl_base
                ))
            );
            let start = std::time::Instant::now();
            let (score, cache_bytes) =
                kv_bench::perplexity::score(&model, &run.config, base, &ids, args.chunk, bins)?;
            let seconds = start.elapsed().as_secs_f64();
            let same = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}%", 100.0 * v));
            println!(
                "| {} | {weights} | {} | {:.4} | {} | {} | {cache_bytes} | {seconds:.1} |",
                run.label,
                score.tokens,
                score.perplexity,
                score
                    .kl_divergence
                    .map_or("-".into(), |v| format!("{v:.6}")),
                same(score.same_top1),
            );
            for s in &score.segments {
                eprintln!(
                    "kv-bench: {} segment {:>5}..{:<5} perplexity {:.4}",
                    run.label,
                    s.start,
                    s.start + s.tokens,
                    s.perplexity
                );
            }
            series.push(plot::Series {
                label: run.label.clone(),
                values: score.curve.clone(),
            });
            reports.push(serde_json::json!({
                "cache": run.label,
                "weights": weights,
                "tokens": score.tokens,
                "perplexity": score.perplexity,
                "mean_nll": score.mean_nll,
                "kl_divergence": score.kl_divergence,
                "same_top1": score.same_top1,
                "cache_bytes": cache_bytes,
                "seconds": seconds,
                "segments": score.segments,
                "curve_bin": score.curve_bin,
                "curve": score.curve,
            }));
        }
        if let Some(json_path) = &args.json {
            let report = serde_json::json!({
                "model": path.display().to_string(),
                "backend": on.name,
                "text": text_name,
                "setting": {
                    "tokens": ids.len(), "chunk": args.chunk, "segment": args.segment,
                    "curve_bin": args.curve_bin, "kl_base": args.kl_base,
                    "window": args.window, "sink_tokens": args.sink_tokens,
                },
                "runs": reports,
                // The ids scored, so a peer can score exactly these (peers/hf_perplexity.py).
                "token_ids": ids,
            });
            write(
                json_path,
                &serde_json::to_string_pretty(&report).expect("json"),
            )?;
            let svg_path = json_path.with_file_name("perplexity.svg");
            let xs: Vec<f64> = (0..series.iter().map(|s| s.values.len()).max().unwrap_or(0))
                .map(|i| ((i * args.curve_bin) + args.curve_bin / 2) as f64)
                .collect();
            let title = format!("{} tokens of {text_name}, {weights} weights", ids.len());
            write(
                &svg_path,
                &plot::chart(
                    &title,
                    "position in the text",
                    &format!(
                        "log-perplexity (mean NLL over {} positions)",
                        args.curve_bin
                    ),
                    &xs,
                    &series,
                ),
            )?;
            eprintln!(
                "kv-bench: wrote {} and {}",
                json_path.display(),
                svg_path.display()
            );
        }
        Ok(())
    }
}
