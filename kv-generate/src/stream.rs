//! Text out of tokens as it becomes valid: a byte-level tokenizer may split one character
//! (an emoji, a CJK character) across tokens, and half a character must never be printed.

use kv_model::{SpecialTokens, Tokenizer};

use crate::error::Result;

/// Turns a growing list of token ids into text increments.
///
/// It decodes only a short window of recent tokens each step (the tokens since the last
/// emitted text, plus the ones before them for context), so the cost per token stays constant.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the tokens whose text was already emitted up to `emitted`.
    prefix_start: usize,
    /// End of the tokens whose text was emitted.
    emitted: usize,
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id` and returns the text that became complete, if any.
    ///
    /// ```no_run
    /// # fn demo(tokenizer: &kv_model::Tokenizer) -> kv_generate::Result<()> {
    /// let mut stream = kv_generate::TextStream::new();
    /// for id in tokenizer.encode("naïve 🦀")? {
    ///     if let Some(text) = stream.push(tokenizer, id)? {
    ///         print!("{text}");
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tokenizer.decode(
            &self.ids[self.prefix_start..self.emitted],
            SpecialTokens::Skip,
        )?;
        let now = tokenizer.decode(&self.ids[self.prefix_start..], SpecialTokens::Skip)?;
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
        {
            let text = now[before.len()..].to_owned();
            self.prefix_start = self.emitted;
            self.emitted = self.ids.len();
            return Ok(Some(text));
        }
        Ok(None)
    }

    /// Text of tokens not emitted yet (an incomplete character at the very end, if any).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let before = tokenizer.decode(
            &self.ids[self.prefix_start..self.emitted],
            SpecialTokens::Skip,
        )?;
        let now = tokenizer.decode(&self.ids[self.prefix_start..], SpecialTokens::Skip)?;
        self.prefix_start = self.emitted;
        self.emitted = self.ids.len();
        Ok(
            (now.len() > before.len() && now.is_char_boundary(before.len()))
                .then(|| now[before.len()..].to_owned()),
        )
    }
}

/// Stop strings that may span tokens: finds the first one in the text generated so far.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    strings: Vec<String>,
}

impl StopStrings {
    /// Watches for `strings` (empty strings are ignored).
    pub fn new(strings: Vec<String>) -> Self {
        Self {
            strings: strings.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }

    /// Byte offset in `text` where the earliest stop string starts, if one occurs.
    ///
    /// ```
    /// use kv_generate::StopStrings;
    ///
    /// let stops = StopStrings::new(vec!["\n\n".into(), "User:".into()]);
    /// assert_eq!(stops.find("Paris.\n\nUser: hi"), Some(6));
    /// assert_eq!(stops.find("Paris."), None);
    /// ```
    pub fn find(&self, text: &str) -> Option<usize> {
        self.strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// Length of the longest tail of `text` that begins some stop string: text that must be
    /// held back while it may still turn into one.
    ///
    /// ```
    /// use kv_generate::StopStrings;
    ///
    /// let stops = StopStrings::new(vec!["User:".into()]);
    /// assert_eq!(stops.pending_len("Paris. Us"), 2);
    /// assert_eq!(stops.pending_len("Paris."), 0);
    /// ```
    pub fn pending_len(&self, text: &str) -> usize {
        self.strings
            .iter()
            .flat_map(|stop| {
                (1..stop.len())
                    .rev()
                    .filter(|&n| stop.is_char_boundary(n))
                    .find(|&n| text.ends_with(&stop[..n]))
            })
            .max()
            .unwrap_or(0)
    }
}
