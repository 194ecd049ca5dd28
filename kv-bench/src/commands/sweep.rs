//! `kv-bench sweep`: cache kinds x new tokens x batch sizes, and prefill throughput.

use super::*;

#[derive(Debug, Args)]
pub(crate) struct SweepArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Cache kinds (besides none, which is always included).
    #[arg(long, num_args = 1.., default_values = ["dynamic", "static", "int8"])]
    pub(crate) cache: Vec<CacheRequest>,
    /// New-token counts.
    #[arg(long, num_args = 1.., default_values_t = vec![128, 512, 1000, 2000])]
    pub(crate) new_tokens: Vec<usize>,
    /// Batch sizes.
    #[arg(long, num_args = 1.., default_values_t = vec![1, 4, 8])]
    pub(crate) batch: Vec<usize>,
    /// Prompt lengths for the prefill-throughput rows.
    #[arg(long, num_args = 1.., default_values_t = vec![16, 128, 512])]
    pub(crate) prompt_len: Vec<usize>,
    /// Skip `none` for new-token counts above this (re-feeding is quadratic).
    #[arg(long, default_value_t = 512)]
    pub(crate) max_uncached: usize,
    /// Where sweep.json, sweep.csv and sweep.svg go.
    #[arg(long, default_value = "bench-out")]
    pub(crate) out: PathBuf,
}

/// `kv-bench sweep` on the backend chosen.
pub(crate) struct Sweep<'a>(pub(crate) &'a SweepArgs);

impl OnBackend for Sweep<'_> {
    type Output = Result<(), BenchError>;

    fn run<B: Backend>(self, kind: BackendKind, device: B::Device) -> Self::Output {
        let args = self.0;
        let on = On::<B> {
            kind,
            name: kind.name(),
            device,
        };
        let path = model_path(&args.model.model)?;
        eprintln!("kv-bench: loading {}", path.display());
        let placement = on.kind.placement(args.model.weights)?;
        let model = load_model_placed::<B>(&path, placement, &on.device)?
            .model
            .with_execution(on.kind.execution());
        let generator = Generator::new(&model, None);
        let vocab = model.config().vocab_size as u32;
        let prompt = |len: usize, row: usize| -> Vec<u32> {
            (0..len)
                .map(|i| ((i * 7 + row * 13 + 1) as u32) % vocab)
                .collect()
        };
        let mut rows = Vec::new();
        let mut csv = String::from("kind,new_tokens,batch,prompt_tokens,prefill_ms,decode_s,tokens_per_s,cache_bytes,theoretical_bytes\n");
        let mut requests = vec![CacheRequest::None];
        requests.extend(args.cache.iter().filter(|c| **c != CacheRequest::None));
        for &new_tokens in &args.new_tokens {
            for &batch in &args.batch {
                for request in &requests {
                    if *request == CacheRequest::None && new_tokens > args.max_uncached {
                        continue;
                    }
                    let prompts: Vec<Vec<u32>> = (0..batch).map(|r| prompt(16, r)).collect();
                    let sizes = bench_sizes(256, 4, 16 + new_tokens, batch, model.config());
                    let cache = request.choice(&sizes)?;
                    eprintln!("kv-bench: {request}, {new_tokens} new tokens, batch {batch}");
                    let config = GenerationConfig {
                        max_new_tokens: new_tokens,
                        eos: EosPolicy::Ignore,
                        cache,
                        ..GenerationConfig::default()
                    };
                    let out = generator.generate(&prompts, &config, &mut |_, _| {})?;
                    let t = &out.timings;
                    let decode_s = t.decode.as_secs_f64();
                    let tokens_per_s =
                        (t.generated.saturating_sub(batch)) as f64 / decode_s.max(1e-9);
                    let theoretical = kv_bench::memory::theoretical_bytes(
                        model.config(),
                        batch,
                        16 + new_tokens - 1,
                    );
                    csv.push_str(&format!(
                        "{request},{new_tokens},{batch},16,{:.3},{decode_s:.4},{tokens_per_s:.2},{},{theoretical}\n",
                        t.prefill.as_secs_f64() * 1e3,
                        out.cache_bytes
                    ));
                    rows.push(json!({
                        "kind": request.to_string(), "new_tokens": new_tokens, "batch": batch, "prompt_tokens": 16,
                        "prefill_ms": t.prefill.as_secs_f64() * 1e3, "decode_s": decode_s,
                        "tokens_per_s": tokens_per_s, "cache_bytes": out.cache_bytes,
                        "theoretical_bytes": theoretical,
                    }));
                }
            }
        }
        let mut prefill = Vec::new();
        for &len in &args.prompt_len {
            eprintln!("kv-bench: prefill of {len} tokens");
            let config = GenerationConfig {
                max_new_tokens: 1,
                eos: EosPolicy::Ignore,
                cache: CacheChoice::Cache(CacheConfig::Dynamic { capacity: len + 1 }),
                ..GenerationConfig::default()
            };
            let out = generator.generate(&[prompt(len, 0)], &config, &mut |_, _| {})?;
            let ms = out.timings.prefill.as_secs_f64() * 1e3;
            csv.push_str(&format!(
                "prefill,0,1,{len},{ms:.3},0,{:.2},,\n",
                len as f64 / (ms / 1e3)
            ));
            prefill.push(json!({ "prompt_tokens": len, "prefill_ms": ms, "tokens_per_s": len as f64 / (ms / 1e3) }));
        }
        let report = json!({
            "model": path.display().to_string(),
            "backend": on.name,
            "machine": kv_bench::machine::describe(),
            "git_commit": kv_bench::machine::git_commit(),
            "date": kv_bench::machine::now(),
            "generation": rows,
            "prefill": prefill,
        });
        write(
            &args.out.join("sweep.json"),
            &serde_json::to_string_pretty(&report).unwrap_or_default(),
        )?;
        write(&args.out.join("sweep.csv"), &csv)?;
        // Decode tokens/s against new-token count, one line per kind and batch size.
        let xs: Vec<f64> = args.new_tokens.iter().map(|&n| n as f64).collect();
        let mut series = Vec::new();
        for request in &requests {
            let name = request.to_string();
            for &batch in &args.batch {
                let values = args
                    .new_tokens
                    .iter()
                    .map(|&n| {
                        rows.iter()
                            .find(|r| {
                                r["kind"] == name.as_str()
                                    && r["new_tokens"] == n
                                    && r["batch"] == batch
                            })
                            .and_then(|r| r["tokens_per_s"].as_f64())
                            .unwrap_or(f64::NAN)
                    })
                    .collect();
                series.push(plot::Series {
                    label: format!("{name}, batch {batch}"),
                    values,
                });
            }
        }
        let svg = plot::chart(
            "Decode throughput",
            "new tokens",
            "generated tokens/s (all rows)",
            &xs,
            &series,
        );
        write(&args.out.join("sweep.svg"), &svg)?;
        print!("{csv}");
        Ok(())
    }
}
