//! Which instruction set the kernels run on, chosen once at run time.

use std::sync::OnceLock;

/// A level of x86 vector instructions the kernels are written for. Every level computes the
/// same products (integer dots are exact; float sums differ only in their order), and
/// [`Isa::Scalar`] is the reference the others are tested against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust: any processor.
    Scalar,
    /// AVX2 with FMA and F16C (x86-64-v3): 256-bit vectors, 8-bit dots through
    /// `vpmaddubsw`/`vpmaddwd`.
    Avx2,
    /// AVX-512 with VNNI (and BW/VL): the 8-bit dots in one `vpdpbusd`, on 256-bit vectors,
    /// which both split-512-bit (AMD Zen 4) and full-512-bit (Intel) cores run at full rate.
    Avx512Vnni,
}

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];

    /// Whether this processor runs the level.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx2.is_available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The levels this processor runs, lowest first.
    pub fn available() -> Vec<Isa> {
        Self::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The level the kernels use: the highest this processor runs, unless the environment
    /// variable `KV_KERNELS_ISA` names a lower one (`scalar`, `avx2`, `avx512vnni`), which is
    /// how benchmarks compare levels on one machine. Detected once.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let best = Self::available().into_iter().max().unwrap_or(Isa::Scalar);
            match std::env::var("KV_KERNELS_ISA")
                .ok()
                .and_then(|name| name.parse::<Isa>().ok())
            {
                Some(asked) if asked.is_available() => asked.min(best),
                _ => best,
            }
        })
    }

    /// The name `KV_KERNELS_ISA` and reports use.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|isa| isa.name() == s)
            .ok_or_else(|| format!("unknown instruction set `{s}`: scalar, avx2 or avx512vnni"))
    }
}
