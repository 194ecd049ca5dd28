//! Cache kinds by name: the one place the names `dynamic`, `static`, `sliding`, `sink`,
//! `paged`, `int8` and `int4` are written and parsed, for every command line, report and file.
//!
//! A [`CacheSpec`] is what a user types (`sliding`, `sliding:128`, `sink:4+252`, `int8`): a
//! [`CacheKind`] with the sizes the text gives. [`CacheSpec::config`] fills in the rest from
//! [`CacheSizes`] (a command's `--window`, `--sink-tokens`, `--max-cache-len`) and makes the
//! [`CacheConfig`] that builds the caches.

use std::fmt;
use std::str::FromStr;

use crate::{
    CacheConfig, CacheError, PagedCacheConfig, QuantBits, QuantizedCacheConfig, Result,
    SinkPositions, DEFAULT_BLOCK_SIZE,
};

/// A kind of cache, without its sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheKind {
    /// [`CacheConfig::Dynamic`].
    Dynamic,
    /// [`CacheConfig::Static`].
    Static,
    /// [`CacheConfig::SlidingWindow`].
    Sliding,
    /// [`CacheConfig::Sink`].
    Sink,
    /// [`CacheConfig::Paged`].
    Paged,
    /// [`CacheConfig::Quantized`] in 8 bits.
    Int8,
    /// [`CacheConfig::Quantized`] in 4 bits.
    Int4,
}

/// What [`CacheSpec`]'s parser accepts, for error messages and help texts.
pub const CACHE_SPEC_FORMS: &str =
    "dynamic, static, sliding[:WINDOW], sink[:SINKS+WINDOW], paged[:BLOCK], int8 or int4";

impl CacheKind {
    /// Every kind, in the order reports list them.
    pub const ALL: [CacheKind; 7] = [
        CacheKind::Dynamic,
        CacheKind::Static,
        CacheKind::Sliding,
        CacheKind::Sink,
        CacheKind::Paged,
        CacheKind::Int8,
        CacheKind::Int4,
    ];

    /// The kind's name: `dynamic`, `static`, `sliding`, `sink`, `paged`, `int8`, `int4`.
    pub fn name(self) -> &'static str {
        match self {
            CacheKind::Dynamic => "dynamic",
            CacheKind::Static => "static",
            CacheKind::Sliding => "sliding",
            CacheKind::Sink => "sink",
            CacheKind::Paged => "paged",
            CacheKind::Int8 => "int8",
            CacheKind::Int4 => "int4",
        }
    }
}

impl fmt::Display for CacheKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CacheKind {
    type Err = CacheError;

    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| CacheError::UnknownCacheKind {
                name: name.to_string(),
            })
    }
}

impl CacheConfig {
    /// The configuration's kind.
    ///
    /// ```
    /// use kv_core::{CacheConfig, CacheKind};
    ///
    /// assert_eq!(CacheConfig::SlidingWindow { window: 8 }.kind(), CacheKind::Sliding);
    /// assert_eq!(CacheConfig::SlidingWindow { window: 8 }.kind().name(), "sliding");
    /// ```
    pub fn kind(&self) -> CacheKind {
        match self {
            CacheConfig::Dynamic { .. } => CacheKind::Dynamic,
            CacheConfig::Static { .. } => CacheKind::Static,
            CacheConfig::SlidingWindow { .. } => CacheKind::Sliding,
            CacheConfig::Sink { .. } => CacheKind::Sink,
            CacheConfig::Paged(_) => CacheKind::Paged,
            CacheConfig::Quantized(q) => match q.bits {
                QuantBits::Int8 => CacheKind::Int8,
                QuantBits::Int4 => CacheKind::Int4,
            },
        }
    }
}

/// A cache kind as a user writes it, with the sizes the text gives: `sliding:128` is a
/// sliding window of 128 positions, `sink:4+252` four sinks and a window of 252; a bare name
/// takes its sizes from [`CacheSizes`].
///
/// ```
/// use kv_core::{CacheKind, CacheSpec};
///
/// let spec: CacheSpec = "sink:4+252".parse().unwrap();
/// assert_eq!((spec.kind, spec.sinks, spec.window), (CacheKind::Sink, Some(4), Some(252)));
/// assert_eq!(spec.to_string(), "sink:4+252");
/// assert!("sink:4".parse::<CacheSpec>().is_err());
/// assert_eq!("paged:32".parse::<CacheSpec>().unwrap().block_size, Some(32));
/// assert!("radix".parse::<CacheSpec>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheSpec {
    /// The kind.
    pub kind: CacheKind,
    /// Positions of a sliding or sink cache's window, when given.
    pub window: Option<usize>,
    /// A sink cache's sinks, when given.
    pub sinks: Option<usize>,
    /// A paged cache's slots per block, when given.
    pub block_size: Option<usize>,
}

impl From<CacheKind> for CacheSpec {
    fn from(kind: CacheKind) -> Self {
        Self {
            kind,
            window: None,
            sinks: None,
            block_size: None,
        }
    }
}

impl FromStr for CacheSpec {
    type Err = CacheError;

    fn from_str(spec: &str) -> Result<Self> {
        let invalid = |reason: String| CacheError::InvalidCacheSpec {
            spec: spec.to_string(),
            reason,
        };
        let positive = |text: &str| {
            text.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| invalid(format!("`{text}` is not a positive number")))
        };
        let (name, sizes) = match spec.split_once(':') {
            Some((name, sizes)) => (name, Some(sizes)),
            None => (spec, None),
        };
        let kind: CacheKind = name.parse()?;
        let mut parsed = CacheSpec::from(kind);
        match (kind, sizes) {
            (_, None) => {}
            (CacheKind::Sliding, Some(window)) => parsed.window = Some(positive(window)?),
            (CacheKind::Paged, Some(block)) => parsed.block_size = Some(positive(block)?),
            (CacheKind::Sink, Some(sizes)) => {
                let (sinks, window) = sizes.split_once('+').ok_or_else(|| {
                    invalid("write sink:SINKS+WINDOW, e.g. sink:4+252".to_string())
                })?;
                parsed.sinks = Some(
                    sinks
                        .trim()
                        .parse()
                        .map_err(|_| invalid(format!("`{sinks}` is not a number of sinks")))?,
                );
                parsed.window = Some(positive(window)?);
            }
            (kind, Some(_)) => {
                return Err(invalid(format!(
                    "{kind} takes no sizes in its name (only sliding:WINDOW, \
                     sink:SINKS+WINDOW and paged:BLOCK do)"
                )))
            }
        }
        Ok(parsed)
    }
}

impl fmt::Display for CacheSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.sinks, self.window, self.block_size) {
            (CacheKind::Sink, Some(sinks), Some(window), _) => write!(f, "sink:{sinks}+{window}"),
            (CacheKind::Sliding, _, Some(window), _) => write!(f, "sliding:{window}"),
            (CacheKind::Paged, _, _, Some(block)) => write!(f, "paged:{block}"),
            (kind, ..) => f.write_str(kind.name()),
        }
    }
}

/// The sizes a [`CacheSpec`] leaves out, as a command's options give them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSizes {
    /// A dynamic cache's first allocation, in positions.
    pub capacity: usize,
    /// A static cache's rows, and the rows a paged cache's first pool is sized for.
    pub max_batch: usize,
    /// A static cache's positions, and the positions per row a paged cache's first pool is
    /// sized for.
    pub max_len: usize,
    /// A sliding or sink cache's window.
    pub window: usize,
    /// A sink cache's sinks.
    pub sinks: usize,
    /// Where a sink cache keeps its keys: the model's choice
    /// (`ModelConfig::sink_positions` in kv-model).
    pub sink_positions: SinkPositions,
}

impl CacheSpec {
    /// The configuration: the spec's own sizes, the rest from `sizes`, quantized kinds with
    /// [`QuantizedCacheConfig`]'s defaults. Refuses a window or static length of zero.
    ///
    /// ```
    /// use kv_core::{CacheConfig, CacheSizes, CacheSpec, SinkPositions};
    ///
    /// let sizes = CacheSizes {
    ///     capacity: 256, max_batch: 1, max_len: 1024, window: 256, sinks: 4,
    ///     sink_positions: SinkPositions::CacheRanks,
    /// };
    /// let sliding: CacheSpec = "sliding".parse().unwrap();
    /// assert_eq!(sliding.config(&sizes).unwrap(), CacheConfig::SlidingWindow { window: 256 });
    /// let sink: CacheSpec = "sink:2+30".parse().unwrap();
    /// assert_eq!(
    ///     sink.config(&sizes).unwrap(),
    ///     CacheConfig::Sink { sinks: 2, window: 30, positions: SinkPositions::CacheRanks },
    /// );
    /// ```
    pub fn config(&self, sizes: &CacheSizes) -> Result<CacheConfig> {
        let window = self.window.unwrap_or(sizes.window);
        let positive = |what: &str, value: usize| {
            if value == 0 {
                Err(CacheError::InvalidCacheSpec {
                    spec: self.to_string(),
                    reason: format!("{what} must be at least 1"),
                })
            } else {
                Ok(value)
            }
        };
        let quantized = |bits| {
            CacheConfig::Quantized(QuantizedCacheConfig {
                bits,
                ..QuantizedCacheConfig::default()
            })
        };
        Ok(match self.kind {
            CacheKind::Dynamic => CacheConfig::Dynamic {
                capacity: sizes.capacity,
            },
            CacheKind::Static => CacheConfig::Static {
                max_batch: sizes.max_batch,
                max_len: positive("a static cache's length", sizes.max_len)?,
            },
            CacheKind::Sliding => CacheConfig::SlidingWindow {
                window: positive("the window", window)?,
            },
            CacheKind::Sink => CacheConfig::Sink {
                sinks: self.sinks.unwrap_or(sizes.sinks),
                window: positive("the window", window)?,
                positions: sizes.sink_positions,
            },
            CacheKind::Paged => CacheConfig::Paged(PagedCacheConfig::for_sequences(
                self.block_size.unwrap_or(DEFAULT_BLOCK_SIZE),
                sizes.max_batch.max(1),
                sizes.max_len.max(1),
            )),
            CacheKind::Int8 => quantized(QuantBits::Int8),
            CacheKind::Int4 => quantized(QuantBits::Int4),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_name_and_its_config() {
        let sizes = CacheSizes {
            capacity: 64,
            max_batch: 2,
            max_len: 100,
            window: 16,
            sinks: 2,
            sink_positions: SinkPositions::TextPositions,
        };
        for kind in CacheKind::ALL {
            assert_eq!(kind.name().parse::<CacheKind>().unwrap(), kind);
            let spec: CacheSpec = kind.name().parse().unwrap();
            assert_eq!(spec.config(&sizes).unwrap().kind(), kind);
        }
        for text in ["sliding:128", "sink:4+252", "sink:0+8", "paged:16"] {
            assert_eq!(text.parse::<CacheSpec>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (text, needle) in [
            ("radix", "unknown cache kind `radix`"),
            ("paged:0", "`0` is not a positive number"),
            ("sink:4", "sink:SINKS+WINDOW"),
            ("sliding:0", "`0` is not a positive number"),
            ("sink:x+8", "`x` is not a number of sinks"),
            ("int8:3", "int8 takes no sizes"),
        ] {
            let error = text.parse::<CacheSpec>().unwrap_err().to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
        let sizes = CacheSizes {
            capacity: 64,
            max_batch: 1,
            max_len: 0,
            window: 0,
            sinks: 4,
            sink_positions: SinkPositions::CacheRanks,
        };
        for text in ["static", "sliding", "sink"] {
            let spec: CacheSpec = text.parse().unwrap();
            let error = spec.config(&sizes).unwrap_err().to_string();
            assert!(error.contains("must be at least 1"), "{text}: {error}");
        }
    }
}
