//! `kv-bench speculate`: plain greedy decoding against speculative decoding (prompt lookup, a
//! draft model) on a fixed set of prompts, grounded (the answer repeats the prompt: code to
//! edit, a passage to quote, records to extract) and open-ended; the runs of one round one after
//! the other, so that their ratio holds on a shared machine. speculate.json holds every run.
//!
//! `--through engine` runs the chosen workloads at once as requests of the continuous-batching
//! engine instead (plain, then speculating with each drafter), and times the steps after every
//! request has its first token: decoding only, the batch shrinking as answers end.

use std::time::Duration;

use kv_generate::engine::{
    Engine, EngineConfig, EngineEvent, EngineSpeculation, PoolSize, Request,
};
use kv_generate::speculative::{
    check_same_tokens, DraftModel, Drafter, PromptLookup, Speculation, SpeculationStats,
    SpeculativeOutput,
};
use kv_generate::SamplingConfig;
use kv_model::{ChatMessage, GenerationPrompt};

use super::*;

#[derive(Debug, Args)]
pub(crate) struct SpeculateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Drafters to time against plain decoding: ngram (prompt lookup) and draft (a draft model:
    /// --draft-model in --draft-weights).
    #[arg(long, num_args = 1.., default_value = "ngram")]
    pub(crate) drafter: Vec<DrafterKind>,
    /// The draft model [default: the model itself, in --draft-weights].
    #[arg(long, value_name = "PATH")]
    pub(crate) draft_model: Option<PathBuf>,
    /// Weight format of the draft model [default: q4_0 for the model itself, else native].
    #[arg(long, value_name = "FORMAT")]
    pub(crate) draft_weights: Option<WeightFormat>,
    /// Shortest run of last tokens prompt lookup looks up.
    #[arg(long, default_value_t = 1)]
    pub(crate) ngram_min: usize,
    /// Longest run of last tokens prompt lookup looks up.
    #[arg(long, default_value_t = 3)]
    pub(crate) ngram_max: usize,
    /// Most guesses a pass for prompt lookup.
    #[arg(long, default_value_t = 8)]
    pub(crate) ngram_tokens: usize,
    /// Most guesses a pass for the draft model.
    #[arg(long, default_value_t = 4)]
    pub(crate) draft_tokens: usize,
    /// Stop a draft where the draft model's largest probability falls below P.
    #[arg(long, default_value_t = 0.75, value_name = "P")]
    pub(crate) draft_p_min: f64,
    /// Workloads to run (default: all): code, quote, extract, story, explain.
    #[arg(long, num_args = 1..)]
    pub(crate) workload: Vec<String>,
    /// Most tokens per answer (the model's EOS ends it earlier).
    #[arg(long, default_value_t = 200)]
    pub(crate) new_tokens: usize,
    /// Rounds; each runs plain decoding and every drafter once per workload.
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Sample at this temperature instead of decoding greedily (seeded by --seed plus the
    /// round; the draft model draws with its own seed). Sampled runs are timed, not compared:
    /// speculative sampling keeps the model's distribution, not its draws.
    #[arg(long, value_name = "T")]
    pub(crate) temperature: Option<f32>,
    /// Seed of sampled runs.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// What decodes: generator (one request at a time, each workload alone) or engine (the
    /// workloads at once, batched continuously).
    #[arg(long, default_value = "generator")]
    pub(crate) through: Through,
    /// With --through engine: speculate only while at most this many requests decode.
    #[arg(long, default_value_t = kv_generate::engine::DEFAULT_MAX_DECODING)]
    pub(crate) max_decoding: usize,
    /// Where speculate.json goes.
    #[arg(long, default_value = "bench-out")]
    pub(crate) out: PathBuf,
}

/// What `kv-bench speculate` decodes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Through {
    /// `Generator::speculate`, one request at a time.
    Generator,
    /// The continuous-batching engine, every workload at once.
    Engine,
}

impl SpeculateArgs {
    /// The model's sampler in round `round`: greedy, or --temperature seeded per round.
    fn sampling(&self, round: usize) -> SamplingConfig {
        match self.temperature {
            None => SamplingConfig::greedy(),
            Some(t) => SamplingConfig {
                temperature: Some(t),
                seed: self.seed + round as u64,
                ..SamplingConfig::greedy()
            },
        }
    }

    /// The draft model's sampler in round `round`: the model's under another seed.
    fn draft_sampling(&self, round: usize) -> SamplingConfig {
        let sampling = self.sampling(round);
        SamplingConfig {
            seed: sampling.seed ^ 0x5eed_d4af,
            ..sampling
        }
    }

    fn lookup(&self) -> PromptLookup {
        PromptLookup {
            min_ngram: self.ngram_min.max(1),
            max_ngram: self.ngram_max.max(self.ngram_min).max(1),
        }
    }
}

/// A drafter `kv-bench speculate` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DrafterKind {
    /// Prompt lookup.
    Ngram,
    /// A draft model.
    Draft,
}

/// Whether a workload's answer repeats its prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grounding {
    Grounded,
    OpenEnded,
}

/// One prompt of the set.
struct Workload {
    name: &'static str,
    grounding: Grounding,
    prompt: &'static str,
}

const WORKLOADS: [Workload; 5] = [
    Workload {
        name: "code",
        grounding: Grounding::Grounded,
        prompt: "Rename the variable `total` to `subtotal` in this Python function and reply with \
                 the whole function, nothing else.\n\n```python\ndef order_total(items, tax_rate):\n    \
                 total = 0\n    for item in items:\n        if item.quantity <= 0:\n            \
                 continue\n        total += item.price * item.quantity\n    if total > 100:\n        \
                 total = total * 0.95\n    tax = total * tax_rate\n    return round(total + tax, 2)\n```",
    },
    Workload {
        name: "quote",
        grounding: Grounding::Grounded,
        prompt: "The lighthouse stood on a rock at the mouth of the bay. Every evening the keeper \
                 climbed its hundred and twelve steps, trimmed the wick, wound the clockwork that \
                 turned the lens, and wrote the weather in a book. Ships saw the light from twenty \
                 miles out and knew where the rocks were.\n\nRepeat the paragraph above exactly, \
                 word for word.",
    },
    Workload {
        name: "extract",
        grounding: Grounding::Grounded,
        prompt: "Staff list: Maria Lopez, engineer, Madrid. John Smith, designer, London. Akira \
                 Tanaka, manager, Osaka. Fatima Diallo, engineer, Dakar. Lars Berg, analyst, \
                 Oslo.\n\nList every person on the staff list with their job and city, one per \
                 line, in the same order.",
    },
    Workload {
        name: "story",
        grounding: Grounding::OpenEnded,
        prompt: "Write a short story about a robot who learns to paint.",
    },
    Workload {
        name: "explain",
        grounding: Grounding::OpenEnded,
        prompt: "Explain how a bicycle's gears work.",
    },
];

/// One timed generation.
#[derive(Debug, Clone)]
struct Run {
    tokens: Vec<u32>,
    decode: Duration,
    /// Passes, drafted and accepted (speculative runs).
    stats: Option<SpeculationStats>,
}

impl Run {
    fn tokens_per_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// `kv-bench speculate` on the backend chosen.
pub(crate) struct Speculate<'a>(pub(crate) &'a SpeculateArgs);

impl OnBackend for Speculate<'_> {
    type Output = Result<(), BenchError>;

    fn run<B: Backend>(self, kind: BackendKind, device: B::Device) -> Self::Output {
        let args = self.0;
        if args.rounds == 0 || args.new_tokens == 0 {
            return Err(BenchError::Usage(
                "--rounds and --new-tokens must be at least 1".into(),
            ));
        }
        let workloads: Vec<&Workload> = match args.workload.is_empty() {
            true => WORKLOADS.iter().collect(),
            false => args
                .workload
                .iter()
                .map(|name| {
                    WORKLOADS.iter().find(|w| w.name == name).ok_or_else(|| {
                        BenchError::Usage(format!(
                            "no workload {name:?}: choose among code, quote, extract, story, explain"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let path = model_path(&args.model.model)?;
        eprintln!("kv-bench: loading {}", path.display());
        let placement = kind.placement(args.model.weights)?;
        let loaded = load_model_placed::<B>(&path, placement, &device)?;
        let model = loaded.model.with_execution(kind.execution());
        let tokenizer = loaded
            .tokenizer
            .ok_or_else(|| BenchError::Usage(format!("{} has no tokenizer", path.display())))?;
        let draft = match args.drafter.contains(&DrafterKind::Draft) {
            false => None,
            true => {
                let draft_path = args.draft_model.clone().unwrap_or_else(|| path.clone());
                let format = args.draft_weights.unwrap_or(match args.draft_model {
                    Some(_) => WeightFormat::Native,
                    None => WeightFormat::Q4_0,
                });
                eprintln!(
                    "kv-bench: loading the draft {} ({format})",
                    draft_path.display()
                );
                let draft =
                    load_model_placed::<B>(&draft_path, kind.placement(Some(format))?, &device)?;
                if let Some(draft_tokenizer) = &draft.tokenizer {
                    check_same_tokens(&tokenizer, draft_tokenizer)?;
                }
                Some((
                    draft.model.with_execution(kind.execution()),
                    format!("{} ({format})", draft_path.display()),
                ))
            }
        };
        let eos = model.config().eos_token_ids.clone();
        let generator = Generator::new(&model, None);
        let mut report = Vec::new();
        if args.through == Through::Engine {
            let prompts: Vec<Vec<u32>> = workloads
                .iter()
                .map(|workload| {
                    let text = tokenizer.apply_chat_template(
                        &[ChatMessage::new("user", workload.prompt)],
                        GenerationPrompt::Add,
                    )?;
                    Ok(tokenizer.encode(&text)?)
                })
                .collect::<Result<_, BenchError>>()?;
            let draft = draft.as_ref().map(|(model, _)| model);
            let runs = engine_rounds(args, &model, draft, &prompts)?;
            let names: Vec<&str> = workloads.iter().map(|w| w.name).collect();
            let grounded = workloads.iter().all(|w| w.grounding == Grounding::Grounded);
            let total: usize = prompts.iter().map(Vec::len).sum();
            let name = names.join("+");
            report.push(workload_report(
                &name,
                grounded,
                total,
                &runs,
                args.temperature,
            ));
        }
        for workload in workloads
            .iter()
            .filter(|_| args.through == Through::Generator)
        {
            let text = tokenizer.apply_chat_template(
                &[ChatMessage::new("user", workload.prompt)],
                GenerationPrompt::Add,
            )?;
            let prompt = tokenizer.encode(&text)?;
            let cache = CacheConfig::Dynamic {
                capacity: prompt.len() + args.new_tokens,
            };
            let mut runs: Vec<(String, Vec<Run>)> = vec![("plain".into(), Vec::new())];
            for drafter in &args.drafter {
                runs.push((format!("{drafter:?}").to_lowercase(), Vec::new()));
            }
            for round in 0..args.rounds {
                let config = GenerationConfig {
                    max_new_tokens: args.new_tokens,
                    eos: EosPolicy::Model,
                    sampling: args.sampling(round),
                    cache: CacheChoice::Cache(cache.clone()),
                    ..Default::default()
                };
                let plain =
                    generator.generate(std::slice::from_ref(&prompt), &config, &mut |_, _| {})?;
                runs[0].1.push(Run {
                    tokens: plain.rows[0].generated_ids.clone(),
                    decode: plain.timings.decode,
                    stats: None,
                });
                for (i, drafter) in args.drafter.iter().enumerate() {
                    let speculation = Speculation {
                        max_new_tokens: args.new_tokens,
                        eos: eos.clone(),
                        sampling: args.sampling(round),
                        draft_tokens: match drafter {
                            DrafterKind::Ngram => args.ngram_tokens,
                            DrafterKind::Draft => args.draft_tokens,
                        },
                    };
                    let mut lookup = args.lookup();
                    let mut model_drafter;
                    let drafter: &mut dyn Drafter = match (drafter, &draft) {
                        (DrafterKind::Draft, Some((draft, _))) => {
                            model_drafter =
                                DraftModel::new(draft, &cache, args.draft_sampling(round))?
                                    .with_min_probability(args.draft_p_min);
                            &mut model_drafter
                        }
                        _ => &mut lookup,
                    };
                    let out: SpeculativeOutput =
                        generator.speculate(&prompt, &cache, &speculation, drafter)?;
                    runs[i + 1].1.push(Run {
                        tokens: out.tokens,
                        decode: out.decode,
                        stats: Some(out.stats),
                    });
                }
                let line: Vec<String> = runs
                    .iter()
                    .map(|(name, r)| format!("{name} {:.1} tok/s", r[round].tokens_per_s()))
                    .collect();
                eprintln!(
                    "kv-bench: {} round {}: {} tokens; {}",
                    workload.name,
                    round + 1,
                    runs[0].1[round].tokens.len(),
                    line.join(", ")
                );
            }
            let grounded = workload.grounding == Grounding::Grounded;
            report.push(workload_report(
                workload.name,
                grounded,
                prompt.len(),
                &runs,
                args.temperature,
            ));
        }
        let value = json!({
            "model": path.display().to_string(),
            "weights": weight_name(placement),
            "draft": draft.as_ref().map(|(_, name)| name.clone()),
            "backend": kind.name(),
            "threads": threads(),
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "ngram_tokens": args.ngram_tokens,
            "ngram_min": args.ngram_min,
            "ngram_max": args.ngram_max,
            "draft_tokens": args.draft_tokens,
            "draft_p_min": args.draft_p_min,
            "temperature": args.temperature,
            "seed": args.seed,
            "through": format!("{:?}", args.through).to_lowercase(),
            "max_decoding": args.max_decoding,
            "workloads": report,
        });
        let out = args.out.join("speculate.json");
        write(&out, &serde_json::to_string_pretty(&value).expect("json"))?;
        print_table(&value);
        eprintln!("kv-bench: wrote {}", out.display());
        Ok(())
    }
}

/// One workload's runs: per drafter, tokens/s per round, the ratio to plain decoding in the
/// same round, acceptance (kept of guessed) and tokens a pass, and whether every run gave plain
/// greedy's tokens.
fn workload_report(
    name: &str,
    grounded: bool,
    prompt_tokens: usize,
    runs: &[(String, Vec<Run>)],
    temperature: Option<f32>,
) -> serde_json::Value {
    let plain = &runs[0].1;
    let modes: Vec<serde_json::Value> = runs
        .iter()
        .map(|(name, rounds)| {
            let tok_s: Vec<f64> = rounds.iter().map(Run::tokens_per_s).collect();
            let ratio: Vec<f64> = rounds
                .iter()
                .zip(plain)
                .map(|(r, p)| r.tokens_per_s() / p.tokens_per_s())
                .collect();
            // Sampled runs draw differently by construction: nothing to compare.
            let same = temperature
                .is_none()
                .then(|| rounds.iter().zip(plain).all(|(r, p)| r.tokens == p.tokens));
            let mut mode = json!({
                "mode": name,
                "tokens": rounds[0].tokens.len(),
                "tokens_per_s": tok_s,
                "ratio_to_plain": ratio,
                "same_tokens_as_plain": same,
            });
            if let Some(stats) = rounds[0].stats {
                mode["passes"] = json!(stats.passes);
                mode["drafted"] = json!(stats.drafted);
                mode["accepted"] = json!(stats.accepted);
                mode["acceptance"] = json!(stats.accepted as f64 / stats.drafted.max(1) as f64);
                // Tokens each pass adds: its kept guesses and its own token.
                mode["tokens_per_pass"] =
                    json!((stats.accepted + stats.passes) as f64 / stats.passes.max(1) as f64);
            }
            mode
        })
        .collect();
    json!({
        "workload": name,
        "grounded": grounded,
        "prompt_tokens": prompt_tokens,
        "modes": modes,
    })
}

/// The report as a Markdown table on stdout.
fn print_table(value: &serde_json::Value) {
    println!("| workload | mode | tokens | tok/s per round | ratio to plain | guesses kept | tokens a pass | same tokens |");
    println!("|---|---|---|---|---|---|---|---|");
    for workload in value["workloads"].as_array().into_iter().flatten() {
        for mode in workload["modes"].as_array().into_iter().flatten() {
            let list = |key: &str, digits: usize| {
                mode[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| format!("{:.*}", digits, x.as_f64().unwrap_or(0.0)))
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let kept = match mode.get("drafted") {
                Some(drafted) => format!("{} of {}", mode["accepted"], drafted),
                None => "-".into(),
            };
            let per_pass = mode
                .get("tokens_per_pass")
                .and_then(|x| x.as_f64())
                .map_or("-".into(), |x| format!("{x:.2}"));
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                workload["workload"].as_str().unwrap_or(""),
                mode["mode"].as_str().unwrap_or(""),
                mode["tokens"],
                list("tokens_per_s", 1),
                list("ratio_to_plain", 2),
                kept,
                per_pass,
                mode["same_tokens_as_plain"]
                    .as_bool()
                    .map_or("sampled".into(), |same| same.to_string()),
            );
        }
    }
}

/// `--through engine`: every round runs `prompts` at once through the engine, plain and then
/// speculating with each drafter. A run's tokens are every request's, concatenated in request
/// order; its rate counts the tokens generated in the steps after the last request's first
/// token, over those steps' time.
fn engine_rounds<B: Backend>(
    args: &SpeculateArgs,
    model: &kv_model::Transformer<B>,
    draft: Option<&kv_model::Transformer<B>>,
    prompts: &[Vec<u32>],
) -> Result<Vec<(String, Vec<Run>)>, BenchError> {
    let mut runs: Vec<(String, Vec<Run>)> = vec![("plain".into(), Vec::new())];
    for drafter in &args.drafter {
        runs.push((format!("{drafter:?}").to_lowercase(), Vec::new()));
    }
    let positions: usize = prompts.iter().map(|p| p.len() + args.new_tokens).sum();
    let config = EngineConfig {
        pool: PoolSize::Tokens(positions + 64 * prompts.len()),
        max_running: prompts.len(),
        ..EngineConfig::default()
    };
    for round in 0..args.rounds {
        for (mode, (_, rounds)) in runs.iter_mut().enumerate() {
            let mut engine = Engine::new(model, None, config.clone())?;
            let speculation = match mode.checked_sub(1).map(|i| args.drafter[i]) {
                None => None,
                Some(DrafterKind::Ngram) => Some(EngineSpeculation::prompt_lookup(
                    args.lookup(),
                    args.ngram_tokens,
                )),
                Some(DrafterKind::Draft) => Some(EngineSpeculation::draft_model(
                    draft.expect("loaded for --drafter draft"),
                    args.draft_p_min,
                    args.draft_tokens,
                )),
            };
            if let Some(speculation) = speculation {
                engine =
                    engine.with_speculation(speculation.with_max_decoding(args.max_decoding))?;
            }
            let ids: Vec<_> = prompts
                .iter()
                .map(|prompt| {
                    engine.add_request(Request {
                        sampling: args.sampling(round),
                        ..Request::greedy(prompt.clone(), args.new_tokens)
                    })
                })
                .collect::<Result<_, _>>()?;
            let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); ids.len()];
            let mut started: Option<(std::time::Instant, usize)> = None;
            let mut generated = 0;
            while engine.has_work() {
                for event in engine.step()? {
                    if let EngineEvent::Token { request, token, .. } = event {
                        let at = ids.iter().position(|&id| id == request).expect("ours");
                        tokens[at].push(token);
                        generated += 1;
                    }
                }
                if started.is_none() && tokens.iter().all(|t| !t.is_empty()) {
                    started = Some((std::time::Instant::now(), generated));
                }
            }
            let (start, before) = started.expect("every request generates");
            let elapsed = start.elapsed();
            let counts = engine.stats().speculation;
            // `Run::tokens_per_s` divides all tokens but one by `decode`: scale the timed
            // steps' time to that count.
            let timed = (generated - before).max(1) as f64;
            rounds.push(Run {
                tokens: tokens.concat(),
                decode: elapsed.mul_f64(generated.saturating_sub(1) as f64 / timed),
                stats: (mode > 0).then_some(SpeculationStats {
                    passes: counts.drafts,
                    drafted: counts.drafted_tokens,
                    accepted: counts.accepted_tokens,
                }),
            });
        }
        let line: Vec<String> = runs
            .iter()
            .map(|(name, r)| format!("{name} {:.1} tok/s", r[round].tokens_per_s()))
            .collect();
        eprintln!(
            "kv-bench: {} requests at once, round {}: {}",
            prompts.len(),
            round + 1,
            line.join(", ")
        );
    }
    Ok(runs)
}
