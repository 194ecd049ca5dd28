//! Backends a binary can run on, chosen by cargo feature at build time and by name at run time.

use std::fmt;
use std::str::FromStr;

use kv_core::Execution;
use thiserror::Error;

/// A compute backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// burn-ndarray on the CPU (cargo feature `ndarray`, on by default).
    Ndarray,
    /// burn-flex on the CPU (cargo feature `flex`, on by default): matrix products through the
    /// `gemm` crate, whose matrix-vector path makes decoding about 10x faster than ndarray's.
    Flex,
    /// burn-cuda on an NVIDIA GPU (cargo feature `cuda`).
    Cuda,
}

/// Why a backend cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BackendError {
    /// A name that is no backend.
    #[error("unknown backend `{0}`: choose `ndarray`, `flex` or `cuda`")]
    Unknown(String),
    /// A backend whose cargo feature was off at build time.
    #[error(
        "backend `{backend}` was not compiled in: rebuild with `--features {backend}` \
         (compiled in: {compiled})"
    )]
    NotCompiled {
        /// The backend asked for.
        backend: BackendKind,
        /// The ones available, comma-separated.
        compiled: String,
    },
    /// A GPU backend on a machine without the device's driver.
    #[error(
        "backend `{0}` needs an NVIDIA GPU and its driver, and this machine has none \
         (no /proc/driver/nvidia/version): use `--backend flex` or `ndarray`"
    )]
    NoDevice(BackendKind),
}

impl BackendKind {
    /// Every backend, compiled in or not.
    pub const ALL: [BackendKind; 3] = [BackendKind::Ndarray, BackendKind::Flex, BackendKind::Cuda];

    /// The cargo feature and command-line name.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Ndarray => "ndarray",
            BackendKind::Flex => "flex",
            BackendKind::Cuda => "cuda",
        }
    }

    /// Where a model on this backend runs a prompt's blocks of attention: spread over the
    /// CPU's threads for the CPU backends, whose attention kernels run on the calling thread;
    /// one after another for the GPU, which queues them on the device either way.
    pub fn execution(self) -> Execution {
        match self {
            BackendKind::Ndarray | BackendKind::Flex => Execution::Parallel,
            BackendKind::Cuda => Execution::Sequential,
        }
    }

    /// Whether this build includes the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::Ndarray => cfg!(feature = "ndarray"),
            BackendKind::Flex => cfg!(feature = "flex"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The backends this build includes.
    pub fn compiled() -> Vec<BackendKind> {
        Self::ALL.into_iter().filter(|b| b.is_compiled()).collect()
    }

    /// This backend, or an error that says how to get it: not compiled in, or (for cuda) no
    /// NVIDIA driver on this machine, checked before any GPU call could fail obscurely.
    pub fn require(self) -> Result<Self, BackendError> {
        if self.is_compiled() {
            if self == BackendKind::Cuda && !nvidia_driver_present() {
                return Err(BackendError::NoDevice(self));
            }
            return Ok(self);
        }
        let compiled: Vec<&str> = Self::compiled().into_iter().map(Self::name).collect();
        Err(BackendError::NotCompiled {
            backend: self,
            compiled: if compiled.is_empty() {
                "none".into()
            } else {
                compiled.join(", ")
            },
        })
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| BackendError::Unknown(s.to_string()))
    }
}

/// Whether an NVIDIA driver is loaded (Linux reports it in `/proc/driver/nvidia/version`;
/// elsewhere we cannot tell cheaply and let the backend try).
pub fn nvidia_driver_present() -> bool {
    if cfg!(target_os = "linux") {
        std::path::Path::new("/proc/driver/nvidia/version").exists()
    } else {
        true
    }
}

/// The burn-ndarray backend type the binaries use (f32).
#[cfg(feature = "ndarray")]
pub type Ndarray = burn_ndarray::NdArray<f32>;

/// The burn-flex backend type the binaries use (f32).
#[cfg(feature = "flex")]
pub type Flex = burn_flex::Flex;

/// The burn-cuda backend type the binaries use (f32 floats, i32 ints).
#[cfg(feature = "cuda")]
pub type Cuda = burn_cuda::Cuda<f32, i32>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for backend in BackendKind::ALL {
            assert_eq!(backend.name().parse::<BackendKind>(), Ok(backend));
        }
        assert_eq!(
            "rocm".parse::<BackendKind>(),
            Err(BackendError::Unknown("rocm".into()))
        );
    }

    #[test]
    fn require_matches_the_build_features() {
        assert_eq!(
            BackendKind::Ndarray.require().is_ok(),
            cfg!(feature = "ndarray")
        );
        let cuda = BackendKind::Cuda.require();
        assert_eq!(
            cuda.is_ok(),
            cfg!(feature = "cuda") && nvidia_driver_present()
        );
        match cuda {
            Err(err @ BackendError::NotCompiled { .. }) => {
                assert!(err.to_string().contains("--features cuda"), "{err}");
            }
            Err(err @ BackendError::NoDevice(_)) => {
                assert!(!nvidia_driver_present());
                assert!(err.to_string().contains("--backend flex"), "{err}");
            }
            Err(other) => panic!("unexpected {other}"),
            Ok(_) => {}
        }
    }
}
