//! Backends a binary can run on, chosen by cargo feature at build time and by name at run time.

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::Backend;
use kv_core::Execution;
use kv_model::{WeightFormat, WeightPlacement};
use thiserror::Error;

/// A compute backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// burn-ndarray on the CPU (cargo feature `ndarray`, on by default).
    Ndarray,
    /// burn-flex on the CPU (cargo feature `flex`, on by default): SIMD element-wise kernels
    /// and the `gemm` crate for prompts; the default backend of a CPU build.
    Flex,
    /// burn-cuda on an NVIDIA GPU (cargo feature `cuda`).
    Cuda,
    /// burn-wgpu on any GPU wgpu reaches (cargo feature `wgpu`): Vulkan on Linux and Windows
    /// (AMD, Intel, NVIDIA, or Mesa's lavapipe, a Vulkan device on the CPU), Metal on macOS,
    /// DX12 on Windows. The same burn-cubecl kernels as `cuda`.
    Wgpu,
}

/// Why a backend cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BackendError {
    /// A name that is no backend.
    #[error("unknown backend `{0}`: choose `ndarray`, `flex`, `cuda` or `wgpu`")]
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
    /// A weight format only the CPU kernels multiply by, asked of a GPU backend.
    #[error(
        "--weights {format} runs on the CPU kernels, which a GPU backend cannot use: \
         choose f32 or f16 on {backend}, or a CPU backend (flex, ndarray)"
    )]
    HostOnlyFormat {
        /// The format asked for.
        format: WeightFormat,
        /// The backend.
        backend: BackendKind,
    },
    /// A GPU backend on a machine without the device's driver.
    #[error(
        "backend `{0}` needs an NVIDIA GPU and its driver, and this machine has none \
         (no /proc/driver/nvidia/version): use `--backend flex` or `ndarray`"
    )]
    NoDevice(BackendKind),
    /// wgpu found no adapter (no Vulkan, Metal or DX12 device, not even a software one).
    #[error(
        "backend `wgpu` found no GPU adapter ({0}); on Linux install a Vulkan driver \
         (`apt-get install mesa-vulkan-drivers libvulkan1` gives lavapipe, a CPU Vulkan \
         device), or use `--backend flex`"
    )]
    NoAdapter(String),
}

impl BackendKind {
    /// Every backend, compiled in or not.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::Ndarray,
        BackendKind::Flex,
        BackendKind::Cuda,
        BackendKind::Wgpu,
    ];

    /// The cargo feature and command-line name.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Ndarray => "ndarray",
            BackendKind::Flex => "flex",
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
        }
    }

    /// Where a model on this backend runs a prompt's blocks of attention: spread over the
    /// CPU's threads for the CPU backends, whose attention kernels run on the calling thread;
    /// one after another for the GPU, which queues them on the device either way.
    pub fn execution(self) -> Execution {
        match self {
            BackendKind::Ndarray | BackendKind::Flex => Execution::Parallel,
            BackendKind::Cuda | BackendKind::Wgpu => Execution::Sequential,
        }
    }

    /// Whether the backend computes on the host CPU (so the model's products can run through
    /// kv-kernels on the host memory its tensors already live in).
    pub fn is_host(self) -> bool {
        matches!(self, BackendKind::Ndarray | BackendKind::Flex)
    }

    /// The backend used when none is named: the fastest one compiled in and usable here
    /// (cuda with a driver present, then flex, then ndarray). wgpu is taken only when named:
    /// whether its adapter is a GPU or a software rasterizer slower than flex (lavapipe) is
    /// known only once it has started.
    pub fn fastest() -> Result<Self, BackendError> {
        [BackendKind::Cuda, BackendKind::Flex, BackendKind::Ndarray]
            .into_iter()
            .find(|b| b.require().is_ok())
            .ok_or_else(|| BackendError::NotCompiled {
                backend: BackendKind::Flex,
                compiled: "none".into(),
            })
    }

    /// The backend asked for, checked usable here ([`BackendKind::require`]), or
    /// [`BackendKind::fastest`] when none is.
    pub fn choose(asked: Option<BackendKind>) -> Result<Self, BackendError> {
        match asked {
            Some(kind) => kind.require(),
            None => Self::fastest(),
        }
    }

    /// Where a model's matrices go on this backend for `--weights format` (`None`: the
    /// backend's default). CPU backends multiply through kv-kernels in any format, by default
    /// each matrix as its file stores it ([`WeightFormat::Native`]); GPU backends keep f32 or
    /// f16 tensors on the device (f32 by default).
    pub fn placement(self, format: Option<WeightFormat>) -> Result<WeightPlacement, BackendError> {
        if self.is_host() {
            return Ok(WeightPlacement::Host(
                format.unwrap_or(WeightFormat::Native),
            ));
        }
        let format = format.unwrap_or(WeightFormat::F32);
        format
            .device_dtype()
            .map(WeightPlacement::Device)
            .ok_or(BackendError::HostOnlyFormat {
                format,
                backend: self,
            })
    }

    /// Whether this build includes the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::Ndarray => cfg!(feature = "ndarray"),
            BackendKind::Flex => cfg!(feature = "flex"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
        }
    }

    /// The backends this build includes.
    pub fn compiled() -> Vec<BackendKind> {
        Self::ALL.into_iter().filter(|b| b.is_compiled()).collect()
    }

    /// This backend, or an error that says how to get it: not compiled in, or no device for
    /// it on this machine (no NVIDIA driver for cuda, no adapter for wgpu), checked before
    /// any GPU call could fail obscurely.
    pub fn require(self) -> Result<Self, BackendError> {
        if self.is_compiled() {
            if self == BackendKind::Cuda && !nvidia_driver_present() {
                return Err(BackendError::NoDevice(self));
            }
            #[cfg(feature = "wgpu")]
            if self == BackendKind::Wgpu {
                wgpu_adapter().map_err(BackendError::NoAdapter)?;
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

/// Work a command runs on whichever backend it chose: generic over the backend type, which
/// [`BackendKind::dispatch`] names from the run-time choice (the one place the binaries map a
/// [`BackendKind`] to a burn type).
pub trait OnBackend {
    /// What the work returns.
    type Output;
    /// Runs on backend `B` (`kind`), on its default device.
    fn run<B: Backend>(self, kind: BackendKind, device: B::Device) -> Self::Output;
}

impl BackendKind {
    /// Runs `task` on this backend's burn type, or says the backend was not compiled in.
    ///
    /// ```
    /// use burn::tensor::{backend::Backend, ElementConversion, Tensor};
    /// use kv_generate::backend::{BackendKind, OnBackend};
    ///
    /// struct Sum;
    /// impl OnBackend for Sum {
    ///     type Output = f32;
    ///     fn run<B: Backend>(self, _: BackendKind, device: B::Device) -> f32 {
    ///         Tensor::<B, 1>::from_floats([1.0, 2.0], &device).sum().into_scalar().elem()
    ///     }
    /// }
    /// let kind = BackendKind::fastest().unwrap();
    /// assert_eq!(kind.dispatch(Sum).unwrap(), 3.0);
    /// ```
    pub fn dispatch<T: OnBackend>(self, task: T) -> Result<T::Output, BackendError> {
        match self {
            #[cfg(feature = "ndarray")]
            BackendKind::Ndarray => Ok(task.run::<Ndarray>(self, Default::default())),
            #[cfg(feature = "flex")]
            BackendKind::Flex => Ok(task.run::<Flex>(self, Default::default())),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => Ok(task.run::<Cuda>(self, Default::default())),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Ok(task.run::<Wgpu>(self, Default::default())),
            // A backend whose feature is off: `require` says how to get it.
            #[allow(unreachable_patterns)]
            other => match other.require() {
                Err(error) => Err(error),
                Ok(_) => unreachable!("every compiled-in backend has an arm above"),
            },
        }
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

/// Whether wgpu finds an adapter, with the reason when it does not (probed once per process,
/// through [`kv_model::probe_device`]: burn-wgpu has no fallible way to start).
#[cfg(feature = "wgpu")]
pub fn wgpu_adapter() -> Result<(), String> {
    use std::sync::OnceLock;
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| kv_model::probe_device::<Wgpu>(&Default::default()))
        .clone()
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

/// The burn-wgpu backend type the binaries use (f32 floats, i32 ints; WGSL shaders, which
/// wgpu runs on Vulkan, Metal or DX12).
#[cfg(feature = "wgpu")]
pub type Wgpu = burn_wgpu::Wgpu<f32, i32>;

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
    fn the_default_backend_is_the_fastest_compiled_in() {
        let fastest = BackendKind::fastest().unwrap();
        if cfg!(feature = "flex") && !(cfg!(feature = "cuda") && nvidia_driver_present()) {
            assert_eq!(fastest, BackendKind::Flex);
        }
        assert_eq!(BackendKind::choose(None).unwrap(), fastest);
        assert_eq!(
            BackendKind::choose(Some(BackendKind::Ndarray)).is_ok(),
            cfg!(feature = "ndarray")
        );
    }

    #[test]
    fn cpu_backends_run_every_format_and_gpus_only_device_dtypes() {
        use kv_model::WeightDtype;
        assert_eq!(
            BackendKind::Flex.placement(None),
            Ok(WeightPlacement::Host(WeightFormat::Native))
        );
        assert_eq!(
            BackendKind::Ndarray.placement(Some(WeightFormat::Q4_1)),
            Ok(WeightPlacement::Host(WeightFormat::Q4_1))
        );
        assert_eq!(
            BackendKind::Cuda.placement(None),
            Ok(WeightPlacement::Device(WeightDtype::F32))
        );
        assert_eq!(
            BackendKind::Cuda.placement(Some(WeightFormat::F16)),
            Ok(WeightPlacement::Device(WeightDtype::F16))
        );
        assert_eq!(
            BackendKind::Wgpu.placement(None),
            Ok(WeightPlacement::Device(WeightDtype::F32))
        );
        let err = BackendKind::Cuda
            .placement(Some(WeightFormat::Q8_0))
            .unwrap_err();
        assert!(err.to_string().contains("choose f32 or f16"), "{err}");
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
        if !cfg!(feature = "wgpu") {
            let err = BackendKind::Wgpu.require().unwrap_err();
            assert!(err.to_string().contains("--features wgpu"), "{err}");
        }
    }
}
