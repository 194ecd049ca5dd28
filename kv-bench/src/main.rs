//! `kv-bench`: the with/without-cache experiment (`compare`), a grid of settings (`sweep`) and
//! cache memory per kind (`memory`), perplexity through weight formats and cache kinds
//! (`perplexity`), the machine's read bandwidth (`bandwidth`), requests through the
//! continuous-batching engine (`throughput`) and load against a server (`serve-load`). This file parses and
//! dispatches; each subcommand lives in `commands/`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kv_bench::BackendKind;

mod commands;

use commands::bandwidth::BandwidthArgs;
use commands::compare::CompareArgs;
use commands::memory::MemoryArgs;
use commands::perplexity::PerplexityArgs;
use commands::serve_load::ServeLoadArgs;
use commands::speculate::SpeculateArgs;
use commands::sweep::SweepArgs;
use commands::throughput::ThroughputArgs;
use commands::BenchError;

/// Benchmarks of KV caching: the seed's experiment, sweeps and memory tables.
#[derive(Debug, Parser)]
#[command(name = "kv-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate the same tokens without a cache and through each cache kind, several times,
    /// timing every step: the seed article's table, compare.json and step_latency.svg.
    Compare(CompareArgs),
    /// One run per cache kind x new-token count x batch size, plus prefill throughput per
    /// prompt length: sweep.json, sweep.csv and sweep.svg.
    Sweep(SweepArgs),
    /// Cache bytes per kind at 1k, 8k and 32k tokens for the model's shape, from arithmetic,
    /// cross-checked against real caches at a small size.
    Memory(MemoryArgs),
    /// The machine's memory read bandwidth, and the decode floor it sets for a model.
    Bandwidth(BandwidthArgs),
    /// Perplexity of a long text, teacher-forced through a cache in chunks, overall and per
    /// segment; with KL divergence and same-top-1 share against a base weight format.
    Perplexity(PerplexityArgs),
    /// Requests through the continuous-batching engine at one or more concurrencies: time to
    /// first token, inter-token latency and aggregate tokens/s, against one request alone
    /// through a dynamic cache; throughput.json.
    Throughput(ThroughputArgs),
    /// Streamed completions against a running OpenAI-compatible server (kv-serve,
    /// llama-server): TTFT, inter-token and end-to-end latency percentiles, throughput and
    /// goodput; --json FILE.
    ServeLoad(ServeLoadArgs),
    /// Plain greedy decoding against speculative decoding (prompt lookup, a draft model) on
    /// grounded and open-ended prompts: tokens/s, guesses kept, tokens a pass, and whether
    /// the tokens are plain greedy's; speculate.json.
    Speculate(SpeculateArgs),
}

fn main() -> ExitCode {
    let cli: Cli = kv_generate::cli::parse_args("kv-bench");
    let result = match &cli.command {
        Command::Compare(args) => on_backend(args.model.backend, commands::compare::Compare(args)),
        Command::Sweep(args) => on_backend(args.model.backend, commands::sweep::Sweep(args)),
        Command::Perplexity(args) => {
            on_backend(args.model.backend, commands::perplexity::Perplexity(args))
        }
        Command::Throughput(args) => {
            on_backend(args.model.backend, commands::throughput::Throughput(args))
        }
        Command::Speculate(args) => {
            on_backend(args.model.backend, commands::speculate::Speculate(args))
        }
        Command::Memory(args) => commands::memory::memory_table(args),
        Command::Bandwidth(args) => commands::bandwidth::bandwidth(args),
        Command::ServeLoad(args) => commands::serve_load::serve_load(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kv-bench: error: {}", e.to_string().replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Runs a subcommand on the backend asked for (the fastest compiled in when none is).
fn on_backend<T>(asked: Option<BackendKind>, command: T) -> Result<(), BenchError>
where
    T: kv_generate::backend::OnBackend<Output = Result<(), BenchError>>,
{
    BackendKind::choose(asked)?.dispatch(command)?
}
