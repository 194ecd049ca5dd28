//! Tokenizers: a Hugging Face `tokenizer.json`, or the byte-level BPE a GGUF file describes in
//! its `tokenizer.ggml.*` metadata, built the way transformers builds it from the same file.

use std::path::Path;

use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, MetaValue};
use crate::safetensors_dir::read_json;

/// Whether decoding writes special tokens (`<|im_end|>`) or leaves them out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialTokens {
    /// Written like any other token.
    Show,
    /// Left out.
    Skip,
}

/// One message of a conversation, for [`Tokenizer::apply_chat_template`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Whether a rendered chat ends with the header of the assistant's next turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationPrompt {
    /// End with the assistant's header, so the model writes the reply (`add_generation_prompt`).
    Add,
    /// End after the last message.
    Omit,
}

/// A tokenizer with the model's chat template and special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source_name: String,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Whether a plain-text prompt starts with the BOS token ([`Tokenizer::encode_prompt`]).
    add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source_name)
            .field("vocab_size", &self.vocab_size())
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Reads a `tokenizer.json`, with the chat template and special tokens of the
    /// `tokenizer_config.json` beside it, if there is one.
    pub fn from_file(path: &Path) -> Result<Self> {
        let source_name = path.display().to_string();
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            source_name: source_name.clone(),
            message: e.to_string(),
        })?;
        let config_path = path.with_file_name("tokenizer_config.json");
        let config = if config_path.is_file() {
            Some(read_json(&config_path)?)
        } else {
            None
        };
        let text = |key: &str| -> Option<String> {
            let value = config.as_ref()?.get(key)?;
            // A special token may be a string or an AddedToken object with `content`.
            value
                .as_str()
                .or_else(|| value.get("content").and_then(Value::as_str))
                .map(str::to_owned)
        };
        Ok(Self {
            chat_template: text("chat_template"),
            bos_token: text("bos_token"),
            eos_token: text("eos_token"),
            add_bos: config
                .as_ref()
                .and_then(|c| c.get("add_bos_token"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            inner,
            source_name,
        })
    }

    /// Builds the tokenizer a GGUF file describes, as transformers does for the same file:
    /// byte-level BPE (`tokenizer.ggml.model = gpt2`: the vocabulary and merges as stored, the
    /// split regex of `tokenizer.ggml.pre` where one is known, GPT-2's otherwise) or
    /// SentencePiece BPE (`llama`: Llama 2, Mistral, Gemma; merges rebuilt from the vocabulary,
    /// bytes falling back to `<0xXX>` tokens); control tokens added as special tokens,
    /// user-defined tokens as added tokens.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let source_name = file.path().display().to_string();
        let fail = |message: String| ModelError::Tokenizer {
            source_name: source_name.clone(),
            message,
        };
        let strings = |key: &str| -> Option<Vec<&str>> {
            file.get(key)?
                .as_array()?
                .iter()
                .map(MetaValue::as_str)
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens").ok_or_else(|| {
            fail("metadata `tokenizer.ggml.tokens` is missing or not strings".into())
        })?;
        let types: Vec<u64> = file
            .get("tokenizer.ggml.token_type")
            .and_then(MetaValue::as_array)
            .map(|items| items.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let flag = |key: &str| file.get(key).and_then(MetaValue::as_bool);
        let model = file.get("tokenizer.ggml.model").and_then(MetaValue::as_str);
        let (mut inner, is_token) = match model {
            Some("gpt2") => {
                let merges = strings("tokenizer.ggml.merges").unwrap_or_default();
                let pre = file
                    .get("tokenizer.ggml.pre")
                    .and_then(MetaValue::as_str)
                    .unwrap_or("default");
                let add_prefix_space = flag("tokenizer.ggml.add_space_prefix").unwrap_or(false);
                let inner =
                    byte_level_bpe(&tokens, &merges, pre, add_prefix_space).map_err(fail)?;
                // A control token outside GPT-2's byte alphabet is a mislabel: transformers
                // skips it, so the vocabulary keeps the size the model expects.
                let alphabet: std::collections::HashSet<char> =
                    bytes_to_unicode().into_iter().collect();
                let is_token: Box<dyn Fn(&str) -> bool> =
                    Box::new(move |t: &str| t.chars().all(|c| alphabet.contains(&c)));
                (inner, is_token)
            }
            Some("llama") => {
                let inner = sentencepiece_bpe(&tokens).map_err(fail)?;
                let is_token: Box<dyn Fn(&str) -> bool> = Box::new(|_: &str| true);
                (inner, is_token)
            }
            other => {
                return Err(fail(format!(
                    "tokenizer.ggml.model {other:?} is not supported (byte-level BPE `gpt2` and \
                     SentencePiece BPE `llama` are); use the model's tokenizer.json"
                )))
            }
        };

        let of_type = |kind: u64| -> Vec<&str> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(token, &t)| t == kind && is_token(token))
                .map(|(token, _)| *token)
                .collect()
        };
        let control: Vec<AddedToken> = of_type(3)
            .into_iter()
            .map(|t| AddedToken::from(t, true).normalized(false))
            .collect();
        inner.add_special_tokens(&control);
        // User-defined tokens (`<think>`) are matched whole, as llama.cpp does; one the
        // vocabulary spells otherwise (Gemma's runs of spaces, respelled with `▁`) is left to
        // the model, as transformers leaves it, so it gets no id of its own.
        let user: Vec<AddedToken> = of_type(4)
            .into_iter()
            .filter(|t| inner.token_to_id(t).is_some())
            .map(|t| AddedToken::from(t, false).normalized(false))
            .collect();
        inner.add_tokens(&user);

        let id_token = |key: &str| -> Option<String> {
            let id = file.get(key)?.as_u64()? as usize;
            tokens.get(id).map(|t| (*t).to_owned())
        };
        Ok(Self {
            chat_template: file
                .get("tokenizer.chat_template")
                .and_then(MetaValue::as_str)
                .map(str::to_owned),
            bos_token: id_token("tokenizer.ggml.bos_token_id"),
            eos_token: id_token("tokenizer.ggml.eos_token_id"),
            // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
            add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(model == Some("llama")),
            inner,
            source_name,
        })
    }

    /// Token ids of a plain-text prompt (no chat template): [`Tokenizer::encode`], with the
    /// BOS token in front where the model's tokenizer adds one (Gemma and Llama 2's do; the
    /// GGUF's `tokenizer.ggml.add_bos_token`, or `add_bos_token` in `tokenizer_config.json`)
    /// and the text does not start with it already.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        let bos = self.bos_token.as_deref().and_then(|t| self.token_id(t));
        if let (true, Some(bos)) = (self.add_bos, bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Token ids of `text`, with no BOS or other special tokens added (a chat template writes
    /// its own). Special tokens written in the text (`<|im_start|>`) are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| self.error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32], special: SpecialTokens) -> Result<String> {
        self.inner
            .decode(ids, special == SpecialTokens::Skip)
            .map_err(|e| self.error(e))
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of `token`, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The Jinja chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// This tokenizer with `template` as its Jinja chat template, replacing the model's own (as
    /// llama.cpp's and vLLM's `--chat-template` do, for models that ship none or a wrong one).
    ///
    /// ```
    /// # fn main() -> Result<(), kv_model::ModelError> {
    /// # let dir = std::env::temp_dir().join("kv-model-doc-chat-template");
    /// # std::fs::create_dir_all(&dir).unwrap();
    /// # let path = dir.join("tokenizer.json");
    /// # let json = r#"{"version":"1.0","added_tokens":[],"normalizer":null,"pre_tokenizer":null,
    /// #   "post_processor":null,"decoder":null,
    /// #   "model":{"type":"WordLevel","vocab":{"a":0,"[UNK]":1},"unk_token":"[UNK]"}}"#;
    /// # std::fs::write(&path, json).unwrap();
    /// use kv_model::{ChatMessage, GenerationPrompt, Tokenizer};
    ///
    /// let tokenizer = Tokenizer::from_file(&path)?
    ///     .with_chat_template("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}");
    /// let text = tokenizer
    ///     .apply_chat_template(&[ChatMessage::new("user", "hi")], GenerationPrompt::Omit)?;
    /// assert_eq!(text, "[user] hi\n");
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_chat_template(mut self, template: impl Into<String>) -> Self {
        self.chat_template = Some(template.into());
        self
    }

    /// Renders `messages` with the model's Jinja chat template, as transformers'
    /// `apply_chat_template(..., tokenize=False)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        prompt: GenerationPrompt,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            self.error("the model has no chat template; pass the prompt as plain text")
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| self.error(format!("chat template: {e}")))?;
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => prompt == GenerationPrompt::Add,
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
        };
        env.get_template("chat")
            .and_then(|t| t.render(context))
            .map_err(|e| self.error(format!("rendering the chat template: {e}")))
    }

    /// The beginning-of-sequence token's text.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The end-of-sequence token's text.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn error(&self, e: impl std::fmt::Display) -> ModelError {
        ModelError::Tokenizer {
            source_name: self.source_name.clone(),
            message: e.to_string(),
        }
    }
}

/// Byte-level BPE over GPT-2's byte alphabet from a GGUF's tokens and merges.
fn byte_level_bpe(
    tokens: &[&str],
    merges: &[&str],
    pre: &str,
    add_prefix_space: bool,
) -> std::result::Result<tokenizers::Tokenizer, String> {
    // Tokens are spelled in GPT-2's byte alphabet; one that is not (a mislabelled token)
    // is respelled byte by byte, as transformers does.
    let spelling = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = spelling.iter().copied().collect();
    let spell = |token: &str| -> String {
        if token.chars().all(|c| alphabet.contains(&c)) {
            token.to_owned()
        } else {
            token.bytes().map(|b| spelling[b as usize]).collect()
        }
    };
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (spell(token), id as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| format!("merge {m:?} is not two tokens separated by a space"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("building BPE: {e}"))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre_tokenizer: PreTokenizerWrapper = match split_regex(pre) {
        Some(regex) => {
            let split = Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| format!("split regex: {e}"))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        None => ByteLevel::new(add_prefix_space, true, true).into(),
    };
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    inner.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
    Ok(inner)
}

/// SentencePiece BPE from a GGUF's tokens (`▁` for a space, `<0xXX>` for a byte), as
/// transformers' `GemmaTokenizer` builds it for a Gemma file: spaces become `▁`, no pre-split,
/// bytes outside the vocabulary fall back to their `<0xXX>` tokens.
///
/// The file stores no merges, so they are rebuilt from the vocabulary, as transformers does:
/// every way to cut a token into two tokens is a merge, ranked by the position of the token
/// it makes in the file (earlier first: SentencePiece files list tokens best-first), and
/// for one token, longer left pieces first. Tokens written as two or more plain spaces are
/// spelled with `▁` first, so the merges that build them match.
fn sentencepiece_bpe(tokens: &[&str]) -> std::result::Result<tokenizers::Tokenizer, String> {
    use std::collections::HashMap;
    use tokenizers::decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as DecoderSequence,
        DecoderWrapper,
    };
    use tokenizers::normalizers::replace::Replace;

    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.trim().is_empty() {
                "\u{2581}".repeat(t.chars().count())
            } else {
                (*t).to_owned()
            }
        })
        .collect();
    // A token spelled twice keeps its last id, as a Python dict built from the list does.
    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(spelled.len());
    for (id, token) in spelled.iter().enumerate() {
        vocab.insert(token, id as u32);
    }
    let mut ranked: Vec<(u32, usize, &str, &str)> = Vec::new();
    let mut seen = std::collections::HashSet::with_capacity(spelled.len());
    for token in &spelled {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let rank = vocab[token.as_str()];
        for (cut, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(cut);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                ranked.push((rank, left.len(), left, right));
            }
        }
    }
    // Best first: the made token's position, then the longer left piece.
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let merges: Vec<(String, String)> = ranked
        .into_iter()
        .map(|(_, _, l, r)| (l.to_owned(), r.to_owned()))
        .collect();
    let vocab: Vocab = vocab
        .into_iter()
        .map(|(t, id)| (t.to_owned(), id))
        .collect();
    let unk = tokens
        .iter()
        .find(|t| **t == "<unk>")
        .map(|t| (*t).to_owned());
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(|e| format!("building BPE: {e}"))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_normalizer(Some(
        Replace::new(" ", "\u{2581}").map_err(|e| format!("normalizer: {e}"))?,
    ));
    let decoders: Vec<DecoderWrapper> = vec![
        Replace::new("\u{2581}", " ")
            .map_err(|e| format!("decoder: {e}"))?
            .into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// GPT-2's byte-to-character table: printable bytes map to themselves, the rest to code points
/// from 256 up, so every byte sequence has a visible spelling.
fn bytes_to_unicode() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('?')
            }
        })
        .collect()
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex for a `tokenizer.ggml.pre` value, where it differs from GPT-2's.
fn split_regex(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => {
            Some(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" => Some(QWEN2_SPLIT),
        _ => None,
    }
}
