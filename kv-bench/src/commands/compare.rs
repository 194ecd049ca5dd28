//! `kv-bench compare`: the seed's experiment, every step timed, with a peer in the same loop.

use super::*;

#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Prompt text (tokenized with the model's tokenizer).
    #[arg(long, default_value = "What is KV caching?")]
    pub(crate) prompt: String,
    /// Prompt as exact token ids, comma-separated (for models without a tokenizer).
    #[arg(long)]
    pub(crate) prompt_ids: Option<TokenIds>,
    /// Tokens to generate per run; generation never stops early.
    #[arg(long, default_value_t = 1000)]
    pub(crate) new_tokens: usize,
    /// Timed runs per cache kind.
    #[arg(long, default_value_t = 10)]
    pub(crate) runs: usize,
    /// Untimed runs per cache kind before the timed ones.
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup: usize,
    /// Cache kinds to time besides `none` (always included): dynamic, static,
    /// sliding[:WINDOW], sink[:SINKS+WINDOW], int8, int4.
    #[arg(long, num_args = 1.., default_value = "dynamic")]
    pub(crate) cache: Vec<CacheRequest>,
    /// Window of the sliding and sink kinds.
    #[arg(long, default_value_t = 256)]
    pub(crate) window: usize,
    /// Leave out the run without a cache (for long generations, where re-feeding the whole
    /// sequence every step takes hours on a CPU). The peer then runs with its cache only.
    #[arg(long)]
    pub(crate) no_uncached: bool,
    /// Also run a peer in the same loop, interleaved: `hf` (transformers, f32, with and
    /// without its cache) or `llama-cpp` (llama.cpp on the GGUF file as stored, built by
    /// `kv-bench/peers/llama_cpp.sh build`).
    #[arg(long)]
    pub(crate) peer: Option<String>,
    /// Device for the peer: cpu, or cuda for transformers.
    #[arg(long, default_value = "cpu")]
    pub(crate) peer_device: String,
    /// Read-bandwidth buffer in MiB, measured before the runs on CPU backends to report the
    /// decode floor (0: skip).
    #[arg(long, default_value_t = 1024)]
    pub(crate) bandwidth_mib: usize,
    /// Python for the peer script (with torch and transformers for hf; numpy, diskcache and
    /// jinja2 for llama-cpp's bindings).
    #[arg(long, default_value = "python3")]
    pub(crate) peer_python: String,
    /// Threads for the peer (default: all cores).
    #[arg(long)]
    pub(crate) peer_threads: Option<usize>,
    /// Where compare.json and step_latency.svg go.
    #[arg(long, default_value = "bench-out")]
    pub(crate) out: PathBuf,
}

/// `kv-bench compare` on the backend chosen.
pub(crate) struct Compare<'a>(pub(crate) &'a CompareArgs);

impl OnBackend for Compare<'_> {
    type Output = Result<(), BenchError>;

    fn run<B: Backend>(self, kind: BackendKind, device: B::Device) -> Self::Output {
        let args = self.0;
        let on = On::<B> {
            kind,
            name: kind.name(),
            device,
        };
        if args.runs == 0 || args.new_tokens == 0 {
            return Err(BenchError::Usage(
                "--runs and --new-tokens must be at least 1".into(),
            ));
        }
        let path = model_path(&args.model.model)?;
        eprintln!("kv-bench: loading {}", path.display());
        let placement = on.kind.placement(args.model.weights)?;
        let LoadedModel {
            model,
            tokenizer,
            notes,
            ..
        } = load_model_placed::<B>(&path, placement, &on.device)?;
        for note in &notes {
            eprintln!("kv-bench: {note}");
        }
        // What the load left resident, beside the file's size and the weights' bytes: a native
        // load holds the file's blocks, not a widened copy.
        let file_bytes = std::fs::metadata(&path)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        let resident = kv_bench::machine::resident_memory();
        if let Some(rss) = resident {
            eprintln!(
                "kv-bench: resident after load {:.1} MB (peak while loading {:.1} MB); weights {:.1} MB{}",
                rss.now_bytes as f64 / 1e6,
                rss.peak_bytes as f64 / 1e6,
                model.weight_bytes() as f64 / 1e6,
                file_bytes.map_or(String::new(), |b| format!("; file {:.1} MB", b as f64 / 1e6)),
            );
        }
        let model = model.with_execution(on.kind.execution());
        let weights = weight_name(placement);
        let prompt_ids = match (&args.prompt_ids, &tokenizer) {
            (Some(ids), _) => ids.0.clone(),
            (None, Some(tokenizer)) => tokenizer.encode(&args.prompt)?,
            (None, None) => {
                return Err(BenchError::Usage(format!(
                    "{} has no tokenizer: pass --prompt-ids",
                    path.display()
                )))
            }
        };
        if prompt_ids.is_empty() {
            return Err(BenchError::Usage("the prompt is empty".into()));
        }
        let capacity = prompt_ids.len() + args.new_tokens;
        let mut caches = Vec::new();
        if !args.no_uncached {
            caches.push(CacheChoice::None);
        }
        let sizes = bench_sizes(args.window, 4, capacity, 1, model.config());
        for request in args.cache.iter().filter(|c| **c != CacheRequest::None) {
            caches.push(request.choice(&sizes)?);
        }
        let peer_kind = args
            .peer
            .as_deref()
            .map(str::parse::<PeerKind>)
            .transpose()
            .map_err(BenchError::Usage)?;
        if peer_kind == Some(PeerKind::LlamaCpp) {
            if args.peer_device != "cpu" {
                return Err(BenchError::Usage(
                    "--peer llama-cpp runs on the CPU only: drop --peer-device".into(),
                ));
            }
            if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
                return Err(BenchError::Usage(format!(
                    "--peer llama-cpp reads GGUF files; {} is not one",
                    path.display()
                )));
            }
        }
        let peer = peer_kind.map(|kind| Peer {
            kind,
            python: args.peer_python.clone(),
            model: path.clone(),
            threads: args
                .peer_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            device: args.peer_device.clone(),
        });
        let spec = CompareSpec {
            prompt_ids,
            new_tokens: args.new_tokens,
            runs: args.runs,
            warmup: args.warmup,
            caches,
            peer,
        };
        // On a CPU, decoding is bound by reading the weights: measure how fast this machine
        // reads memory, to say how close each run comes to that floor.
        let bandwidth = (on.kind != BackendKind::Cuda && args.bandwidth_mib > 0).then(|| {
            eprintln!(
                "kv-bench: measuring read bandwidth ({} MiB)",
                args.bandwidth_mib
            );
            kv_bench::bandwidth::measure_read_bandwidth(args.bandwidth_mib << 20, threads(), 5)
        });
        let results = kv_bench::compare::run(&model, on.name, &spec, &mut |line| {
            eprintln!("kv-bench: {line}")
        })?;
        println!("{}", kv_bench::compare::table(&results));
        let weight_bytes = kv_bench::bandwidth::decode_weight_bytes(model.config(), 4);
        let read_bytes = model.step_read_bytes();
        for r in results.iter().filter(|r| r.cache != "none") {
            if let Some((early, a, late, b)) = r.step_growth(spec.prompt_ids.len(), 10) {
                println!(
                    "{:<28} {} step at position {early}: {a:.2} ms, at {late}: {b:.2} ms ({:.2}x)",
                    r.system,
                    r.cache,
                    b / a
                );
            }
        }
        if let Some(bw) = &bandwidth {
            println!(
                "read bandwidth {:.1} GB/s ({} threads); f32 weights read per step {:.1} MB; floor {:.1} tokens/s",
                bw.best() / 1e9,
                bw.threads,
                weight_bytes as f64 / 1e6,
                bw.floor_steps_per_second(weight_bytes)
            );
            let floor = bw.floor_steps_per_second(weight_bytes);
            for r in results.iter().filter(|r| r.cache != "none") {
                // transformers reads f32 weights, llama.cpp the file as stored (what kv-cache
                // reads with native weights); kv-cache reads `--weights`.
                let (dtype, bytes) = if r.system.starts_with("kv-cache") {
                    (weights, read_bytes)
                } else if peer_kind == Some(PeerKind::LlamaCpp) {
                    if placement != WeightPlacement::Host(WeightFormat::Native) {
                        continue; // the bytes llama.cpp reads are not the ones loaded here
                    }
                    ("as stored", read_bytes)
                } else {
                    ("f32", weight_bytes)
                };
                let achieved = r.tokens_per_second() * bytes as f64;
                println!(
                    "{:<28} {}: {:.1} tokens/s, {:.0}% of the f32 floor; {dtype} weights read at {:.1} GB/s ({:.0}% of the read bandwidth)",
                    r.system,
                    r.cache,
                    r.tokens_per_second(),
                    100.0 * r.tokens_per_second() / floor,
                    achieved / 1e9,
                    100.0 * achieved / bw.best()
                );
            }
        }
        let setting = json!({
            "model": path.display().to_string(),
            "backend": on.name,
            "prompt": args.prompt_ids.is_none().then_some(&args.prompt),
            "window": args.window,
            "peer": peer_kind.map(PeerKind::name),
            "peer_device": args.peer.as_ref().map(|_| &args.peer_device),
            "decode_weight_bytes_f32": weight_bytes,
            "weights": weights,
            "decode_weight_bytes": read_bytes,
            "weight_bytes": model.weight_bytes(),
            "file_bytes": file_bytes,
            "resident_after_load_bytes": resident.map(|r| r.now_bytes),
            "peak_resident_while_loading_bytes": resident.map(|r| r.peak_bytes),
            "read_bandwidth": bandwidth.as_ref().map(|b| b.to_json()),
        });
        let report = kv_bench::compare::report(&spec, &results, setting);
        let json_path = args.out.join("compare.json");
        write(
            &json_path,
            &serde_json::to_string_pretty(&report).unwrap_or_default(),
        )?;
        let svg = plot::step_latency_svg(
            &format!(
                "Decode step latency, {} new tokens ({})",
                args.new_tokens,
                path.file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned())
            ),
            spec.prompt_ids.len(),
            &kv_bench::compare::series(&results),
        );
        let svg_path = args.out.join("step_latency.svg");
        write(&svg_path, &svg)?;
        eprintln!(
            "kv-bench: wrote {} and {}",
            json_path.display(),
            svg_path.display()
        );
        Ok(())
    }
}
