#!/usr/bin/env bash
# kv-serve through the official `openai` Python client from PyPI (and its metrics through
# `prometheus_client`'s parser): builds kv-serve and kv-generate, installs both into a virtual
# environment in the cache folder, and runs
# scripts/openai_client_test.py against the tiny GGUF fixture, and against the default model
# when it has been fetched (for streaming of multi-byte characters), and against Gemma 3 270M
# when it has been fetched (sliding-window layers in the server's pool).
#
#   scripts/openai-client-test.sh [--url URL] [--bin-dir DIR]
#
# With --url it tests a server already running there (the tiny fixture served as `tiny`, as
# scripts/serve-behind-nginx.sh starts it) instead of starting its own; with --bin-dir it takes
# kv-serve and kv-generate from DIR instead of building them.
set -euo pipefail
cd "$(dirname "$0")/.."

OPENAI_VERSION=3.57.0
# Prometheus's own text parser, for the metrics an inference gateway scrapes.
PROMETHEUS_CLIENT_VERSION=0.21.1
# deploy/kubernetes read back, to check it against the server.
PYYAML_VERSION=6.0.2
# A ZeroMQ subscriber and msgpack, for kv-serve's KV events as a router reads them.
PYZMQ_VERSION=27.3.0
MSGPACK_VERSION=1.2.4
cache="${KV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kv-cache}"
venv="$cache/venv-openai-$OPENAI_VERSION"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai, prometheus_client, yaml, zmq, msgpack" 2>/dev/null; then
  echo "installing openai==$OPENAI_VERSION, prometheus-client==$PROMETHEUS_CLIENT_VERSION, pyyaml==$PYYAML_VERSION, pyzmq==$PYZMQ_VERSION and msgpack==$MSGPACK_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "openai==$OPENAI_VERSION" "prometheus-client==$PROMETHEUS_CLIENT_VERSION" "pyyaml==$PYYAML_VERSION" "pyzmq==$PYZMQ_VERSION" "msgpack==$MSGPACK_VERSION"
fi

remote=()
target=""
while [ $# -gt 0 ]; do
  case "$1" in
    --url) remote=(--url "$2"); shift 2 ;;
    --bin-dir) target="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$target" ]; then
  cargo build --quiet -p kv-serve -p kv-generate
  target="${CARGO_TARGET_DIR:-target}/debug"
fi
real=()
if [ -f "$cache/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  real=(--real-model "$cache/SmolLM2-135M-Instruct.Q4_1.gguf")
fi
if [ -f "$cache/gemma-3-270m-q4_k_m.gguf" ]; then
  real+=(--gemma3 "$cache/gemma-3-270m-q4_k_m.gguf")
fi
if [ ${#remote[@]} -gt 0 ]; then real=(); fi
"$venv/bin/python" scripts/openai_client_test.py \
  --kv-serve "$target/kv-serve" --kv-generate "$target/kv-generate" \
  --model kv-model/tests/fixtures/tiny-llama.gguf "${real[@]}" "${remote[@]}"
