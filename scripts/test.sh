#!/usr/bin/env bash
# The project's test command: everything CI checks, runnable on a fresh machine with a Rust
# toolchain (no GPU needed). Cold, it takes about 35-40 minutes on 2 cores, most of it compiling
# burn.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== format"
cargo fmt --all -- --check

echo "== unit, property, example and benchmark-harness tests (CPU backend)"
cargo test --workspace --all-targets

echo "== kv-model's golden, property and f16-weight tests on burn-flex, the fast CPU backend"
cargo test -p kv-model --features flex --tests

echo "== documentation examples"
cargo test --workspace --doc

echo "== kv-serve through the official openai Python client (installed from PyPI into a venv)"
# The debug binaries `cargo test --workspace --all-targets` built above (building them again
# with other features would recompile burn).
./scripts/openai-client-test.sh --bin-dir "${CARGO_TARGET_DIR:-target}/debug"

echo "== the GPU backends (cuda, wgpu) compile and lint clean (no GPU needed to build)"
cargo clippy --workspace --all-targets --features cuda,wgpu -- -D warnings

echo "== the GPU tests on wgpu, on any Vulkan device (lavapipe where there is no GPU)"
# wgpu needs a Vulkan driver. Where there is none and we are root on Debian or Ubuntu, install
# Mesa's lavapipe (a Vulkan device that runs on the CPU), so CI runs burn-cubecl's kernels.
# Elsewhere the wgpu tests say SKIPPED with the reason.
has_icd() { compgen -G '/usr/share/vulkan/icd.d/*.json' >/dev/null || compgen -G '/etc/vulkan/icd.d/*.json' >/dev/null; }
if ! has_icd || ! ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Mesa's Vulkan drivers (lavapipe) with apt-get"
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1; } ||
      echo "apt-get could not install them: the wgpu tests will say SKIPPED"
  else
    echo "no Vulkan driver and no root apt-get: the wgpu tests will say SKIPPED" \
      "(install mesa-vulkan-drivers and libvulkan1 to run them)"
  fi
fi
# The wgpu tests run the same burn-cubecl kernels burn-cuda would; cuda's build of them is
# linted above, and on a machine with an NVIDIA GPU scripts/gpu-check.sh runs them.
cargo test -p kv-model --features wgpu --test gpu -- --test-threads 1
