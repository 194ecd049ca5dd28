#!/usr/bin/env bash
# Two kv-serve replicas behind nginx on loopback, with session affinity: requests that carry
# the same `X-Session-Id` header go to the same replica (nginx `hash ... consistent`), so a
# conversation keeps finding its prefix in that replica's cache; requests without it spread
# over both. Then: the official openai client test through nginx, the affinity shown by each
# replica's counters, and kv-bench serve-load through nginx for the aggregate.
#
#   scripts/serve-behind-nginx.sh [--model GGUF] [--requests N] [--concurrency C]
#
# Needs nginx (Debian: `apt-get install nginx-light`), Python 3 with pip (for the openai
# client), and cargo. With no --model it serves the tiny test fixture (fast, meaningless
# text); pass the default model's GGUF for real numbers.
set -euo pipefail
cd "$(dirname "$0")/.."

model=kv-model/tests/fixtures/tiny-llama.gguf
requests=32
concurrency=8
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --requests) requests="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v nginx >/dev/null || { echo "nginx is not installed (apt-get install nginx-light)" >&2; exit 1; }

cargo build --quiet --release -p kv-serve -p kv-bench -p kv-generate
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The tiny fixture has no chat template; give it one made of its vocabulary's characters.
printf '%s' '{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}' \
  > "$work/template.jinja"
template=()
case "$model" in *tiny-llama.gguf) template=(--chat-template "$work/template.jinja") ;; esac

replicas=()
for i in 1 2; do
  port=$(free_port)
  "$bin/kv-serve" --model "$model" --served-model-name tiny --port "$port" "${template[@]}" \
    --max-running 8 --max-waiting 64 >"$work/replica$i.log" 2>&1 &
  pids+=($!)
  replicas+=("127.0.0.1:$port")
done
for r in "${replicas[@]}"; do
  for _ in $(seq 600); do
    curl -sf "http://$r/health" >/dev/null && break
    sleep 0.1
  done
  curl -sf "http://$r/health" >/dev/null || { echo "replica $r did not start:"; cat "$work"/replica*.log; exit 1; }
done

front=$(free_port)
cat >"$work/nginx.conf" <<EOF
pid $work/nginx.pid;
error_log $work/nginx-error.log;
worker_processes 1;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/body;
  proxy_temp_path $work/proxy;
  fastcgi_temp_path $work/fastcgi;
  uwsgi_temp_path $work/uwsgi;
  scgi_temp_path $work/scgi;
  # A session's requests hash to one replica; requests without a session spread at random.
  map \$http_x_session_id \$affinity {
    ""      \$request_id;
    default \$http_x_session_id;
  }
  upstream kv_serve {
    hash \$affinity consistent;
    server ${replicas[0]};
    server ${replicas[1]};
  }
  server {
    listen 127.0.0.1:$front;
    location / {
      proxy_pass http://kv_serve;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # Stream tokens as they come, and let long generations finish.
      proxy_buffering off;
      proxy_read_timeout 600s;
    }
  }
}
EOF
nginx -c "$work/nginx.conf"
url="http://127.0.0.1:$front"
echo "replicas ${replicas[*]} behind nginx at $url"

echo "== the openai client through nginx"
./scripts/openai-client-test.sh --url "$url" --bin-dir "$bin"

echo "== affinity: 6 requests of one session, then 6 without a session"
finished() { curl -s "http://$1/metrics" | awk '/^kv_serve_requests_finished_total /{print $2}'; }
before=("$(finished "${replicas[0]}")" "$(finished "${replicas[1]}")")
for _ in $(seq 6); do
  curl -sf "$url/v1/completions" -H 'Content-Type: application/json' -H 'X-Session-Id: alice' \
    -d '{"prompt": [5, 17, 42, 8, 63, 29, 77, 11], "max_tokens": 2}' >/dev/null
done
mid=("$(finished "${replicas[0]}")" "$(finished "${replicas[1]}")")
for _ in $(seq 6); do
  curl -sf "$url/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": [5, 17, 42, 8, 63, 29, 77, 11], "max_tokens": 2}' >/dev/null
done
after=("$(finished "${replicas[0]}")" "$(finished "${replicas[1]}")")
echo "session alice: replica 1 served $((mid[0] - before[0])), replica 2 served $((mid[1] - before[1]))"
echo "no session:    replica 1 served $((after[0] - mid[0])), replica 2 served $((after[1] - mid[1]))"
if [ $((mid[0] - before[0])) -ne 0 ] && [ $((mid[1] - before[1])) -ne 0 ]; then
  echo "FAILED: one session's requests went to both replicas"; exit 1
fi

echo "== kv-bench serve-load through nginx"
"$bin/kv-bench" serve-load --url "$url" --requests "$requests" --concurrency "$concurrency" \
  --prompt-tokens 64 --new-tokens 32 --vocab 96
