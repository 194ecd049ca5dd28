//! The server end to end: a real server on a free loopback port, with the tiny Llama GGUF
//! fixture on burn-ndarray, and a real HTTP client (ureq).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn_ndarray::NdArray;
use kv_generate::engine::{EngineConfig, PoolSize};
use kv_generate::{EosPolicy, GenerationConfig, Generator, SamplingConfig};
use kv_model::{load_model, ChatMessage, GenerationPrompt};
use kv_serve::worker::{Loaded, Shared};
use kv_serve::{App, Settings};
use serde_json::{json, Value};

/// A chat template made of characters in the fixture's 96-token byte-level vocabulary.
const TEMPLATE: &str =
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
const MODEL_ID: &str = "tiny";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kv-model/tests/fixtures/tiny-llama.gguf")
}

fn load() -> Result<Loaded<NdArray>, String> {
    load_as("native/ndarray")
}

/// The fixture, fingerprinted as if loaded with `settings` (weights and backend).
fn load_as(settings: &str) -> Result<Loaded<NdArray>, String> {
    let loaded =
        load_model::<NdArray>(&fixture(), &Default::default()).map_err(|e| e.to_string())?;
    Ok(Loaded {
        model: loaded.model,
        tokenizer: loaded.tokenizer.map(|t| t.with_chat_template(TEMPLATE)),
        id: MODEL_ID.into(),
        fingerprint: kv_serve::model_fingerprint(&fixture(), settings)
            .map_err(|e| e.to_string())?,
        speculation: None,
    })
}

/// A running server and its base URL.
struct Server {
    url: String,
    shared: Arc<Shared>,
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        pool: PoolSize::Tokens(1024),
        block_size: 4,
        max_running: 8,
        token_budget: 64,
        ..EngineConfig::default()
    }
}

fn start(settings: Settings) -> Server {
    start_with(settings, engine_config())
}

fn start_with(settings: Settings, engine: EngineConfig) -> Server {
    start_loading(load, settings, engine)
}

fn start_loading(
    load: impl FnOnce() -> Result<Loaded<NdArray>, String> + Send + 'static,
    settings: Settings,
    engine: EngineConfig,
) -> Server {
    let app = App::start::<NdArray, _>(load, engine, settings, None);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = app.router;
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, router).await.unwrap();
        });
    });
    let server = Server {
        url,
        shared: app.shared,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.get("/health").0 != 200 {
        assert!(Instant::now() < deadline, "the server never became healthy");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

impl Server {
    fn get(&self, path: &str) -> (u16, String) {
        self.call(ureq::get(&format!("{}{path}", self.url)), None)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.call(
            ureq::post(&format!("{}{path}", self.url)),
            Some(body.to_string()),
        );
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn call(&self, request: ureq::Request, body: Option<String>) -> (u16, String) {
        let request = request.set("Content-Type", "application/json");
        let result = match body {
            Some(body) => request.send_string(&body),
            None => request.call(),
        };
        match result {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(status, r)) => (status, r.into_string().unwrap()),
            Err(e) => panic!("transport error: {e}"),
        }
    }

    /// The `data:` payloads of a streamed request, in order.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let response = ureq::post(&format!("{}{path}", self.url))
            .send_string(&body.to_string())
            .unwrap();
        assert_eq!(response.content_type(), "text/event-stream");
        BufReader::new(response.into_reader())
            .lines()
            .map(Result::unwrap)
            .filter_map(|line| line.strip_prefix("data: ").map(str::to_string))
            .collect()
    }

    /// A metric's value from `/metrics`.
    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in {text}"))
    }
}

/// What the library's `Generator` gives for the same chat, greedy.
fn generator_reply(message: &str, max_new_tokens: usize) -> (Vec<u32>, String, usize) {
    let loaded = load().unwrap();
    let tokenizer = loaded.tokenizer.as_ref().unwrap();
    let text = tokenizer
        .apply_chat_template(&[ChatMessage::new("user", message)], GenerationPrompt::Add)
        .unwrap();
    let ids = tokenizer.encode(&text).unwrap();
    let config = GenerationConfig {
        max_new_tokens,
        sampling: SamplingConfig::greedy(),
        eos: EosPolicy::Model,
        ..GenerationConfig::default()
    };
    let generation = Generator::new(&loaded.model, Some(tokenizer))
        .generate(std::slice::from_ref(&ids), &config, &mut |_, _| {})
        .unwrap();
    let row = &generation.rows[0];
    (
        row.generated_ids.clone(),
        row.text.clone().unwrap(),
        ids.len(),
    )
}

#[test]
fn health_models_tokenize_and_metrics_answer() {
    let server = start(Settings::default());
    let (status, body) = server.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], MODEL_ID);
    assert_eq!(models["data"][0]["max_model_len"], 128);

    let (status, tokens) = server.post("/tokenize", &json!({ "content": "Hello!" }));
    assert_eq!(status, 200);
    assert_eq!(tokens["count"], 6);
    let (status, text) = server.post("/detokenize", &json!({ "tokens": tokens["tokens"] }));
    assert_eq!(status, 200);
    assert_eq!(text["content"], "Hello!");

    assert!(server.metric("kv_serve_kv_cache_blocks_total") >= 256.0);
    assert_eq!(server.metric("kv_serve_kv_cache_blocks_used"), 0.0);
}

#[test]
fn greedy_chat_equals_the_generator() {
    let server = start(Settings::default());
    let (ids, text, prompt_len) = generator_reply("Hi!", 24);
    let (status, reply) = server.post(
        "/v1/chat/completions",
        &json!({
            "model": MODEL_ID,
            "messages": [{ "role": "user", "content": "Hi!" }],
            "temperature": 0,
            "max_tokens": 24,
        }),
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
    let choice = &reply["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], text.as_str());
    let finish = if ids.len() == 24 { "length" } else { "stop" };
    assert_eq!(choice["finish_reason"], finish);
    assert_eq!(reply["usage"]["prompt_tokens"], prompt_len);
    assert_eq!(reply["usage"]["completion_tokens"], ids.len());
    assert_eq!(
        reply["usage"]["total_tokens"],
        prompt_len + ids.len(),
        "{reply}"
    );
}

/// A server started with speculation (prompt lookup, and the model itself as its draft):
/// greedy replies, whole and streamed, are plain greedy decoding's, and `/metrics` counts the
/// guesses drafted and kept under vLLM's names.
#[test]
fn a_speculating_server_replies_as_plain_greedy_and_counts_guesses() {
    use kv_generate::speculative::PromptLookup;
    use kv_serve::worker::{Drafting, LoadedSpeculation};
    let message = "Say abc abc abc abc abc abc, then abc abc abc abc again.";
    let (ids, text, _) = generator_reply(message, 40);
    for drafter in ["lookup", "itself"] {
        let load = move || {
            let mut loaded = load()?;
            let drafting = match drafter {
                "lookup" => Drafting::PromptLookup(PromptLookup::default()),
                _ => Drafting::DraftModel {
                    model: Box::new(
                        load_model::<NdArray>(&fixture(), &Default::default())
                            .map_err(|e| e.to_string())?
                            .model,
                    ),
                    min_probability: 0.0,
                },
            };
            loaded.speculation = Some(LoadedSpeculation {
                drafting,
                draft_tokens: 4,
                max_decoding: 8,
            });
            Ok(loaded)
        };
        let server = start_loading(load, Settings::default(), engine_config());
        let body = json!({
            "model": MODEL_ID,
            "messages": [{ "role": "user", "content": message }],
            "temperature": 0,
            "max_tokens": 40,
        });
        let (status, reply) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["choices"][0]["message"]["content"], text.as_str());
        assert_eq!(reply["usage"]["completion_tokens"], ids.len());
        let mut streamed = String::new();
        let mut stream_body = body.clone();
        stream_body["stream"] = json!(true);
        for data in server.stream("/v1/chat/completions", &stream_body) {
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(&data).unwrap();
            if let Some(delta) = chunk["choices"][0]["delta"]["content"].as_str() {
                streamed.push_str(delta);
            }
        }
        assert_eq!(streamed, text, "{drafter}");
        let drafted = server.metric("kv_serve_spec_decode_num_draft_tokens_total");
        let accepted = server.metric("kv_serve_spec_decode_num_accepted_tokens_total");
        assert!(
            drafted > 0.0 && accepted <= drafted,
            "{drafter}: {accepted} of {drafted}"
        );
        assert!(server.metric("kv_serve_spec_decode_num_drafts_total") > 0.0);
        if drafter == "itself" {
            assert!(accepted > 0.0, "the model's own guesses are kept");
        }
    }
}

#[test]
fn a_stream_concatenates_to_the_whole_reply_in_openai_order() {
    let server = start(Settings::default());
    let body = json!({
        "messages": [{ "role": "user", "content": "Tell!" }],
        "temperature": 0.8,
        "seed": 11,
        "n": 2,
        "max_tokens": 30,
        "ignore_eos": true,
    });
    let (status, whole) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{whole}");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({ "include_usage": true });
    let events = server.stream("/v1/chat/completions", &streamed);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    // Role deltas first, one per choice.
    for (i, chunk) in chunks[..2].iter().enumerate() {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["choices"][0]["index"], i);
        assert_eq!(chunk["choices"][0]["delta"]["role"], "assistant");
    }
    // The usage chunk last, with no choices; every other chunk has `usage: null`.
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        chunks.last().unwrap()["choices"].as_array().unwrap().len(),
        0
    );
    for count in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage[count], whole["usage"][count]);
    }
    // The same prompt a second time: its full blocks come from the prefix cache.
    assert_eq!(whole["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 20);
    let mut texts = [String::new(), String::new()];
    let mut finished = [false, false];
    for chunk in &chunks[2..chunks.len() - 1] {
        assert!(chunk["usage"].is_null());
        let choice = &chunk["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        assert!(!finished[i], "content after choice {i}'s finish chunk");
        if let Some(reason) = choice["finish_reason"].as_str() {
            assert_eq!(reason, "length");
            finished[i] = true;
        } else {
            texts[i].push_str(choice["delta"]["content"].as_str().unwrap());
        }
    }
    assert_eq!(finished, [true, true]);
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(
            text.as_str(),
            whole["choices"][i]["message"]["content"].as_str().unwrap(),
            "choice {i}: streamed text differs from the whole reply"
        );
    }
    // Seeds differ per choice (seed + index), so the two choices differ.
    assert_ne!(texts[0], texts[1]);
}

#[test]
fn completions_take_every_prompt_form_with_n_stop_and_logprobs() {
    let server = start(Settings::default());
    // Two prompts as token ids, two choices each: choices are prompt-major.
    let (status, reply) = server.post(
        "/v1/completions",
        &json!({
            "model": MODEL_ID,
            "prompt": [[5, 17, 42, 8], [63, 29, 77]],
            "n": 2,
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": true,
        }),
    );
    assert_eq!(status, 200, "{reply}");
    let choices = reply["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["finish_reason"], "length");
    }
    // Greedy: both choices of a prompt agree; the prompts' replies differ.
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(choices[2]["text"], choices[3]["text"]);
    assert_eq!(reply["usage"]["prompt_tokens"], 7);
    assert_eq!(reply["usage"]["completion_tokens"], 24);

    // Text prompt, greedy, with log-probabilities.
    let body = json!({
        "prompt": "Once",
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": 3,
        "ignore_eos": true,
    });
    let (status, reply) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{reply}");
    let text = reply["choices"][0]["text"].as_str().unwrap().to_string();
    let logprobs = &reply["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 12);
    for (lp, top) in logprobs["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(logprobs["top_logprobs"].as_array().unwrap())
    {
        let lp = lp.as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3);
        // Greedy: the chosen token is the most likely one.
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!((best - lp).abs() < 1e-5, "greedy token is not the top one");
    }

    // A stop string from the middle of that text ends the choice before it, not included.
    let chars: Vec<char> = text.chars().collect();
    let at = chars.len() / 2;
    let stop: String = chars[at..at + 2].iter().collect();
    let expected: String = text[..text.find(&stop).unwrap()].to_string();
    let (status, reply) = server.post(
        "/v1/completions",
        &json!({ "prompt": "Once", "max_tokens": 12, "temperature": 0, "stop": [stop],
                 "ignore_eos": true }),
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["text"], expected.as_str());
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");

    // echo puts the prompt first.
    let (_, reply) = server.post(
        "/v1/completions",
        &json!({ "prompt": "Once", "max_tokens": 12, "temperature": 0, "echo": true,
                 "ignore_eos": true }),
    );
    assert_eq!(reply["choices"][0]["text"], format!("Once{text}"));

    // The same seed gives the same sample; streamed, the same text.
    let sampled = json!({ "prompt": "Once", "max_tokens": 10, "seed": 5, "ignore_eos": true });
    let (_, a) = server.post("/v1/completions", &sampled);
    let (_, b) = server.post("/v1/completions", &sampled);
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    let mut streamed = sampled.clone();
    streamed["stream"] = json!(true);
    let events = server.stream("/v1/completions", &streamed);
    let text: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text.as_str(), a["choices"][0]["text"].as_str().unwrap());
}

#[test]
fn a_shared_prompt_reports_its_cached_tokens() {
    let server = start(Settings::default());
    let body = json!({
        "prompt": "Hello!Hello!Hello!Hello!",
        "max_tokens": 4,
        "temperature": 0,
    });
    let (_, first) = server.post("/v1/completions", &body);
    let (_, second) = server.post("/v1/completions", &body);
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // 24 prompt tokens in blocks of 4: the first 20 are full blocks the second request reuses
    // (the last token is always recomputed for its logits).
    assert_eq!(
        second["usage"]["prompt_tokens_details"]["cached_tokens"],
        20
    );
    assert_eq!(first["choices"], second["choices"]);
    assert!(server.metric("kv_serve_prefix_cache_hits_total") >= 20.0);
}

#[test]
fn bad_requests_get_a_4xx_naming_the_field_and_the_server_keeps_answering() {
    let server = start(Settings {
        max_body_bytes: 4096,
        ..Settings::default()
    });
    let chat = |extra: Value| {
        let mut body = json!({ "messages": [{ "role": "user", "content": "Hi" }] });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/v1/chat/completions",
            json!({ "messages": "hi" }),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": [] }),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "model": "gpt-4" })),
            404,
            "model",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "temperature": 3 })),
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "temperature": "hot" })),
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "top_p": 0 })),
            400,
            "top_p",
        ),
        ("/v1/chat/completions", chat(json!({ "n": 0 })), 400, "n"),
        ("/v1/chat/completions", chat(json!({ "n": 99 })), 400, "n"),
        (
            "/v1/chat/completions",
            chat(json!({ "presence_penalty": 5 })),
            400,
            "presence_penalty",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "max_tokens": 0 })),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "max_tokens": -1 })),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "max_tokens": 100000 })),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "top_logprobs": 50, "logprobs": true })),
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            chat(json!({ "repetition_penalty": 0 })),
            400,
            "repetition_penalty",
        ),
        (
            "/v1/chat/completions",
            json!({ "messages": [{ "role": "robot", "content": "x" }] }),
            400,
            "messages[0].role",
        ),
        (
            "/v1/completions",
            json!({ "prompt": [5, 400] }),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json!({ "prompt": [5, -3] }),
            400,
            "prompt",
        ),
        ("/v1/completions", json!({ "prompt": "" }), 400, "prompt"),
        ("/v1/completions", json!({ "prompt": [] }), 400, "prompt"),
        (
            "/v1/completions",
            json!({ "prompt": vec![5; 129] }),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json!({ "prompt": vec![5; 100], "max_tokens": 40 }),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({ "prompt": "Hi", "logprobs": 2, "echo": true }),
            400,
            "echo",
        ),
        ("/detokenize", json!({ "tokens": [1000] }), 400, "tokens"),
    ];
    for (path, body, status, param) in cases {
        let (got, reply) = server.post(path, &body);
        assert_eq!(got, status, "{path} {body}: {reply}");
        let error = &reply["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{reply}"
        );
        assert_eq!(error["param"], param, "{path} {body}: {reply}");
    }
    // Not JSON at all, a body over the limit, a path that does not exist.
    let (status, text) = server.call(
        ureq::post(&format!("{}/v1/chat/completions", server.url)),
        Some("{not json".into()),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("invalid_request_error"));
    let big = json!({ "prompt": "x".repeat(10_000) });
    let (status, reply) = server.post("/v1/completions", &big);
    assert_eq!(status, 413, "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("4096"));
    let (status, _) = server.get("/v2/nothing");
    assert_eq!(status, 404);

    // Still serving.
    let (status, reply) = server.post("/v1/chat/completions", &chat(json!({ "max_tokens": 3 })));
    assert_eq!(status, 200, "{reply}");
}

#[test]
fn an_api_key_guards_every_route_but_health() {
    let server = start(Settings {
        api_key: Some("sesame".into()),
        ..Settings::default()
    });
    let (status, _) = server.get("/v1/models");
    assert_eq!(status, 401);
    let wrong = server.call(
        ureq::get(&format!("{}/v1/models", server.url)).set("Authorization", "Bearer sesamE"),
        None,
    );
    assert_eq!(wrong.0, 401);
    assert!(wrong.1.contains("invalid_api_key"));
    let right = server.call(
        ureq::get(&format!("{}/v1/models", server.url)).set("Authorization", "Bearer sesame"),
        None,
    );
    assert_eq!(right.0, 200);
    assert_eq!(server.get("/health").0, 200);
}

#[test]
fn a_client_that_disconnects_gives_its_blocks_back() {
    let server = start(Settings::default());
    let body = json!({
        "prompt": [5, 17, 42, 8],
        "max_tokens": 120,
        "ignore_eos": true,
        "stream": true,
    });
    let response = ureq::post(&format!("{}/v1/completions", server.url))
        .send_string(&body.to_string())
        .unwrap();
    let mut lines = BufReader::new(response.into_reader()).lines();
    // Read a few tokens, then hang up mid-stream.
    let mut seen = 0;
    while seen < 3 {
        if lines.next().unwrap().unwrap().starts_with("data: ") {
            seen += 1;
        }
    }
    assert!(server.metric("kv_serve_kv_cache_blocks_used") > 0.0);
    drop(lines);
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("kv_serve_kv_cache_blocks_used") > 0.0
        || server.metric("kv_serve_requests_cancelled_total") < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the cancelled request kept its blocks"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.shared.in_flight(), 0);
    // The server still answers.
    let (status, _) = server.post(
        "/v1/completions",
        &json!({ "prompt": [5], "max_tokens": 2 }),
    );
    assert_eq!(status, 200);
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let server = start_with(
        Settings {
            max_in_flight: 1,
            ..Settings::default()
        },
        EngineConfig {
            max_running: 1,
            ..engine_config()
        },
    );
    let body = json!({ "prompt": [5, 17], "max_tokens": 120, "ignore_eos": true, "stream": true });
    let response = ureq::post(&format!("{}/v1/completions", server.url))
        .send_string(&body.to_string())
        .unwrap();
    let mut lines = BufReader::new(response.into_reader()).lines();
    lines.next().unwrap().unwrap();
    let refused = ureq::post(&format!("{}/v1/completions", server.url))
        .send_string(&json!({ "prompt": [5], "max_tokens": 2 }).to_string());
    match refused {
        Err(ureq::Error::Status(503, r)) => {
            assert_eq!(r.header("Retry-After"), Some("1"));
            let body: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "queue_full");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    drop(lines);
    // Once the first request is gone, new ones are served.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = server.post(
            "/v1/completions",
            &json!({ "prompt": [5], "max_tokens": 2 }),
        );
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "the slot was never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh folder under the system's temporary folder.
fn temp_folder(name: &str) -> PathBuf {
    let folder = std::env::temp_dir().join(format!("kv-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&folder);
    folder
}

#[test]
fn a_saved_prompt_cache_survives_a_restart() {
    let folder = temp_folder("prompt-cache");
    let settings = Settings {
        prompt_cache_dir: Some(folder.clone()),
        ..Settings::default()
    };
    // 26 prompt tokens: six full blocks of 4.
    let prompt = "Once!upon!a!time!there!was";
    let request = json!({ "prompt": prompt, "max_tokens": 8, "temperature": 0 });
    let first = start(settings.clone());
    // Before the prompt has run the pool holds none of it: nothing to save, and no file.
    let save = json!({ "filename": "story.kvc", "prompt": prompt });
    let (status, refused) = first.post("/prompt_cache/save", &save);
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("run the prompt first"),
        "{refused}"
    );
    assert!(!folder.join("story.kvc").exists());
    let (status, refused) = first.post(
        "/prompt_cache/save",
        &json!({ "filename": "short.kvc", "prompt": [5, 6] }),
    );
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "prompt");
    let (_, before) = first.post("/v1/completions", &request);
    let (status, saved) = first.post(
        "/prompt_cache/save",
        &json!({ "filename": "story.kvc", "prompt": prompt }),
    );
    assert_eq!(status, 200, "{saved}");
    assert_eq!(saved["tokens_saved"], 24);
    assert!(folder.join("story.kvc").is_file());

    // A new server: nothing cached until the file is restored.
    let second = start(settings.clone());
    let (status, restored) =
        second.post("/prompt_cache/restore", &json!({ "filename": "story.kvc" }));
    assert_eq!(status, 200, "{restored}");
    assert_eq!(restored["tokens_restored"], 24);
    let (_, after) = second.post("/v1/completions", &request);
    assert_eq!(after["usage"]["prompt_tokens_details"]["cached_tokens"], 24);
    assert_eq!(after["choices"], before["choices"]);

    // Names that leave the folder, missing files, corrupt files and files of another model.
    for (body, what) in [
        (json!({ "filename": "../story.kvc" }), "plain file name"),
        (json!({ "filename": "a/b" }), "plain file name"),
        (
            json!({ "filename": "missing.kvc" }),
            "no saved prompt cache",
        ),
    ] {
        let (status, reply) = second.post("/prompt_cache/restore", &body);
        assert_eq!(status, 400, "{reply}");
        assert_eq!(reply["error"]["param"], "filename");
        assert!(
            reply["error"]["message"].as_str().unwrap().contains(what),
            "{reply}"
        );
    }
    let mut bytes = std::fs::read(folder.join("story.kvc")).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(folder.join("flipped.kvc"), &bytes).unwrap();
    std::fs::write(folder.join("junk.kvc"), b"junk").unwrap();
    for (name, what) in [
        ("flipped.kvc", "SHA-256"),
        ("junk.kvc", "not a prompt cache"),
    ] {
        let (status, reply) = second.post("/prompt_cache/restore", &json!({ "filename": name }));
        assert_eq!(status, 400, "{reply}");
        assert!(
            reply["error"]["message"].as_str().unwrap().contains(what),
            "{reply}"
        );
    }
    let other = start_loading(|| load_as("f32/ndarray"), settings, engine_config());
    let (status, reply) = other.post("/prompt_cache/restore", &json!({ "filename": "story.kvc" }));
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another model"),
        "{reply}"
    );

    // Without a folder the routes say how to turn them on.
    let off = start(Settings::default());
    let (status, reply) = off.post("/prompt_cache/restore", &json!({ "filename": "story.kvc" }));
    assert_eq!(status, 501, "{reply}");
    assert!(reply["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--prompt-cache-dir"));
    let _ = std::fs::remove_dir_all(&folder);
}

/// Gemma 3 270M (sliding-window layers, window 512) served: each fixture prompt as text, the
/// 968-token one past the window, comes back as the text of transformers' 32 greedy tokens
/// (`kv-model/tests/fixtures/gemma3-270m-q4_k_m.json`). Needs the file
/// (`kv-bench/peers/llama_cpp.sh fetch-gemma3`); says so and checks nothing without it.
#[test]
fn gemma3_completions_past_the_window_equal_transformers() {
    let Some(path) = kv_model::cache_dir()
        .ok()
        .map(|dir| dir.join("gemma-3-270m-q4_k_m.gguf"))
        .filter(|path| path.is_file())
    else {
        eprintln!(
            "gemma-3-270m-q4_k_m.gguf is absent: run kv-bench/peers/llama_cpp.sh fetch-gemma3"
        );
        return;
    };
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../kv-model/tests/fixtures/gemma3-270m-q4_k_m.json");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let loader_path = path.clone();
    let load = move || -> Result<Loaded<NdArray>, String> {
        let placement = kv_model::WeightPlacement::Host(kv_model::WeightFormat::F32);
        let loaded =
            kv_model::load_model_placed::<NdArray>(&loader_path, placement, &Default::default())
                .map_err(|e| e.to_string())?;
        Ok(Loaded {
            model: loaded.model,
            tokenizer: loaded.tokenizer,
            id: "gemma3".into(),
            fingerprint: kv_serve::model_fingerprint(&loader_path, "f32/ndarray")
                .map_err(|e| e.to_string())?,
            speculation: None,
        })
    };
    let engine = EngineConfig {
        pool: PoolSize::Tokens(4096),
        block_size: 16,
        max_running: 4,
        token_budget: 256,
        ..EngineConfig::default()
    };
    let server = start_loading(load, Settings::default(), engine);
    let file = kv_model::gguf::GgufFile::open(&path).unwrap();
    let tokenizer = kv_model::Tokenizer::from_gguf(&file).unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let want: Vec<u32> = case["generated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_u64().unwrap() as u32)
            .collect();
        let want = tokenizer
            .decode(&want, kv_model::SpecialTokens::Skip)
            .unwrap();
        let body = json!({
            "model": "gemma3", "prompt": case["prompt"], "max_tokens": 32, "temperature": 0,
            "ignore_eos": true
        });
        let (status, reply) = server.post("/v1/completions", &body);
        assert_eq!(status, 200, "{reply}");
        assert_eq!(
            reply["usage"]["prompt_tokens"],
            case["prompt_ids"].as_array().unwrap().len()
        );
        assert_eq!(
            reply["choices"][0]["text"],
            want.as_str(),
            "{}",
            case["prompt"]
        );
    }
}

/// The render routes an inference gateway's router tokenizes through (vLLM's): a chat's
/// prompt ids are those its completion is fed, completions prompts come back one entry each
/// (text through the tokenizer, ids as given), and bad bodies are 4xx naming the field.
#[test]
fn render_routes_give_the_prompt_ids_and_refuse_bad_bodies() {
    let server = start(Settings::default());
    let loaded = load().unwrap();
    let tokenizer = loaded.tokenizer.as_ref().unwrap();
    let messages = json!([{ "role": "user", "content": "Hi!" }]);
    let (status, rendered) = server.post(
        "/v1/chat/completions/render",
        &json!({ "model": MODEL_ID, "messages": messages, "temperature": 0.5 }),
    );
    assert_eq!(status, 200, "{rendered}");
    let text = tokenizer
        .apply_chat_template(&[ChatMessage::new("user", "Hi!")], GenerationPrompt::Add)
        .unwrap();
    let ids: Vec<u32> = tokenizer.encode(&text).unwrap();
    assert_eq!(rendered["token_ids"], json!(ids));
    let (_, reply) = server.post(
        "/v1/chat/completions",
        &json!({ "messages": messages, "max_tokens": 1 }),
    );
    assert_eq!(reply["usage"]["prompt_tokens"], ids.len());

    let (status, rendered) = server.post(
        "/v1/completions/render",
        &json!({ "prompt": ["Hello", "Hi"] }),
    );
    assert_eq!(status, 200, "{rendered}");
    let encode = |text| tokenizer.encode_prompt(text).unwrap();
    assert_eq!(
        rendered,
        json!([{ "token_ids": encode("Hello") }, { "token_ids": encode("Hi") }])
    );
    let (status, rendered) = server.post(
        "/v1/completions/render",
        &json!({ "prompt": [[5, 17, 42], [8]] }),
    );
    assert_eq!(status, 200, "{rendered}");
    assert_eq!(
        rendered,
        json!([{ "token_ids": [5, 17, 42] }, { "token_ids": [8] }])
    );

    for (path, body, status, field) in [
        ("/v1/chat/completions/render", json!({}), 400, "messages"),
        (
            "/v1/completions/render",
            json!({ "prompt": [] }),
            400,
            "prompt",
        ),
        (
            "/v1/completions/render",
            json!({ "prompt": [[100000]] }),
            400,
            "prompt[0]",
        ),
        (
            "/v1/chat/completions/render",
            json!({ "model": "gpt-4", "messages": messages }),
            404,
            "",
        ),
    ] {
        let (got, error) = server.post(path, &body);
        assert_eq!(got, status, "{path} {body}: {error}");
        let message = error["error"]["message"].as_str().unwrap_or("");
        let param = error["error"]["param"].as_str().unwrap_or("");
        assert!(
            param == field || message.contains(field),
            "{path} {body}: {error}"
        );
    }
    assert_eq!(server.get("/health").0, 200);
}

/// `/metrics` carries the gauges an inference gateway's endpoint picker routes by, under
/// vLLM's names: waiting and running requests and the share of the KV pool in use, labelled
/// with the model, and the pool's block size and blocks.
#[test]
fn metrics_carry_the_inference_gateway_gauges_under_vllms_names() {
    let server = start(Settings::default());
    let labels = format!("{{model_name=\"{MODEL_ID}\"}}");
    assert_eq!(
        server.metric(&format!("vllm:num_requests_waiting{labels}")),
        0.0
    );
    assert_eq!(
        server.metric(&format!("vllm:num_requests_running{labels}")),
        0.0
    );
    assert_eq!(
        server.metric(&format!("vllm:kv_cache_usage_perc{labels}")),
        0.0
    );
    let blocks = server.metric("kv_serve_kv_cache_blocks_total");
    let config = format!(
        "vllm:cache_config_info{{block_size=\"4\",cache_dtype=\"f32\",num_gpu_blocks=\"{blocks}\"}}"
    );
    assert_eq!(server.metric(&config), 1.0);
    // A request leaves blocks cached, not used: the usage is back to 0 once it is done.
    let (status, _) = server.post(
        "/v1/completions",
        &json!({ "prompt": [5, 17, 42, 8, 9, 10], "max_tokens": 4 }),
    );
    assert_eq!(status, 200);
    let usage = server.metric(&format!("vllm:kv_cache_usage_perc{labels}"));
    assert!((0.0..=1.0).contains(&usage), "{usage}");
}
