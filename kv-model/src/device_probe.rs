//! Whether a backend's device can start, asked without letting it panic.
//!
//! GPU backends start their device on the first operation, and some have no fallible way to
//! do it: burn-wgpu with no Vulkan, Metal or DX12 adapter panics, on its own device thread,
//! and the calling thread then panics too with a message that no longer says why. A binary
//! that would rather say "no adapter: install a driver" runs one small operation here first.

use std::sync::{Arc, Mutex};

use burn::tensor::{backend::Backend, Tensor};

/// Runs one small operation on `device` and reads its result back. `Err` holds the first
/// panic message raised while doing so, on any thread (the device's own thread usually says
/// the real reason). Panic messages are recorded instead of printed meanwhile, since the panic
/// hook is process-wide: call this before other threads start work.
///
/// ```
/// use kv_model::probe_device;
///
/// assert_eq!(probe_device::<burn_ndarray::NdArray>(&Default::default()), Ok(()));
/// ```
pub fn probe_device<B: Backend>(device: &B::Device) -> Result<(), String> {
    let first = Arc::new(Mutex::new(None::<String>));
    let record = Arc::clone(&first);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let mut first = record.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(info.payload_as_str().unwrap_or("a panic").to_string());
        }
    }));
    // Unwind safety: on a panic nothing of the device is used again here; the caller learns
    // the device cannot start and does not use it either.
    let probe = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Tensor::<B, 1>::ones([1], device).into_data()
    }));
    std::panic::set_hook(hook);
    let first = first.lock().unwrap_or_else(|e| e.into_inner()).take();
    match probe {
        Ok(_) => Ok(()),
        Err(_) => Err(first.unwrap_or_else(|| "the device panicked while starting".into())),
    }
}
