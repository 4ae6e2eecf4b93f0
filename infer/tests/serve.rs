//! `huginn serve` over loopback with a real HTTP client against a tiny model folder: answers
//! equal the CLI's, 32 concurrent clients, every kind of bad request, bodies and prompts beyond
//! the context, a full queue, the KV budget, clients that leave at every moment of a request,
//! the API key, and shutdown on SIGINT. Raw TCP stands in for a client where the moment it
//! leaves matters.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use folder::ModelFolder;
use infer::adaptive::{AdaptiveConfig, Decoding};
use infer::serve::api::{InputLimits, MAX_BODY_BYTES, ServerDefaults};
use infer::serve::engine::EngineLimits;
use infer::serve::{App, ConnectionLimits, serve};
use infer::strategy::Strategy;
use infer::text::TextStream;
use infer::warm_start::WarmStart;
use model::burn::prelude::Device;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpStream;

mod common;

use common::*;

const NAME: &str = "tiny";

fn limits() -> EngineLimits {
    EngineLimits {
        max_batch: 8,
        queue_capacity: 64,
        kv_budget_bytes: 1 << 30,
        prefill_window: EngineLimits::PREFILL_WINDOW,
        exit_wait: EngineLimits::EXIT_WAIT,
    }
}

/// A server on a free loopback port; stops when the test's runtime ends.
async fn start(dir: &Path, limits: EngineLimits, api_key: Option<&str>) -> (String, Arc<App>) {
    let connections = ConnectionLimits {
        shutdown_grace: Duration::from_secs(1),
        ..ConnectionLimits::default()
    };
    start_with(dir, limits, api_key, connections).await
}

/// [`start`] with the connection limits given.
async fn start_with(
    dir: &Path,
    limits: EngineLimits,
    api_key: Option<&str>,
    connections: ConnectionLimits,
) -> (String, Arc<App>) {
    let folder = ModelFolder::open(dir, &Device::flex()).unwrap();
    let defaults = ServerDefaults {
        model_name: NAME.into(),
        num_steps: STEPS,
        max_num_steps: 1000,
    };
    let app = Arc::new(App::new(folder, defaults, limits, api_key.map(str::to_string)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(listener, app.clone(), std::future::pending(), connections));
    (url, app)
}

async fn post(client: &Client, url: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let response = client.post(format!("{url}{path}")).json(&body).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// The server's `/metrics` page.
async fn metrics(client: &Client, url: &str) -> String {
    let response = client.get(format!("{url}/metrics")).send().await.unwrap();
    response.text().await.unwrap()
}

/// The bytes of a completion request, for a client that sends them itself.
fn raw_request(body: &Value) -> Vec<u8> {
    let body = body.to_string();
    let head = raw_head(body.len());
    [head.as_bytes(), body.as_bytes()].concat()
}

fn raw_head(content_length: usize) -> String {
    format!(
        "POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {content_length}\r\n\r\n"
    )
}

async fn connect(url: &str) -> TcpStream {
    TcpStream::connect(url.strip_prefix("http://").unwrap()).await.unwrap()
}

/// Writes all of `bytes` (tokio's `net` alone has no `write_all`).
async fn write_all(stream: &TcpStream, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        stream.writable().await.unwrap();
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("writing to the server: {e}"),
        }
    }
}

/// Reads what has come, waiting for something; 0 once the server has closed.
async fn read_some(stream: &TcpStream, buffer: &mut [u8]) -> usize {
    loop {
        stream.readable().await.unwrap();
        match stream.try_read(buffer) {
            Ok(n) => return n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("reading from the server: {e}"),
        }
    }
}

/// Reads a response up to the end of its headers (within a minute): the headers, and what
/// came after them.
async fn read_head(stream: &TcpStream) -> (String, Vec<u8>) {
    let mut read = Vec::new();
    let mut buffer = [0u8; 4096];
    let end = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                return end + 4;
            }
            let n = read_some(stream, &mut buffer).await;
            assert!(n > 0, "the server closed the connection before its headers");
            read.extend_from_slice(&buffer[..n]);
        }
    })
    .await
    .expect("no response headers within a minute");
    let rest = read.split_off(end);
    (String::from_utf8(read).unwrap(), rest)
}

/// A whole (not streamed) response read off a raw connection: its status and JSON body.
async fn read_response(stream: &TcpStream) -> (u16, Value) {
    let (head, mut body) = read_head(stream).await;
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_string)
        })
        .expect("a content-length")
        .parse()
        .unwrap();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(60), async {
        while body.len() < length {
            let n = read_some(stream, &mut buffer).await;
            assert!(n > 0, "the server closed the connection mid-body");
            body.extend_from_slice(&buffer[..n]);
        }
    })
    .await
    .expect("no response body within a minute");
    (status, serde_json::from_slice(&body).unwrap())
}

/// Once the engine is idle, a normal request is answered and `/health` says ok. (Waiting for
/// idle first keeps a request sent meanwhile from hiding an engine that ended on becoming
/// idle.)
async fn assert_serving(client: &Client, url: &str, app: &App, after: &str) {
    let since = Instant::now();
    while app.engine_load() != (0, 0) {
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "after {after}: {:?} still queued and running",
            app.engine_load()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, answer) = post(
        client,
        url,
        "/v1/completions",
        json!({"prompt": [1, 2, 3], "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "after {after}: {answer}");
    let health = client.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK, "after {after}");
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "ok", "after {after}: {health}");
}

/// The `data:` payloads of a server-sent event stream, in order.
async fn sse_data(response: reqwest::Response) -> Vec<String> {
    let body = response.text().await.unwrap();
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// The text of a streamed answer, checking each chunk's shape.
fn streamed_text(events: &[String], chat: bool) -> (String, String) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut text = String::new();
    let mut finish = String::new();
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        if chunk["choices"] == json!([]) {
            continue; // the usage chunk
        }
        let choice = &chunk["choices"][0];
        if chat {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            text += choice["delta"]["content"].as_str().unwrap_or("");
        } else {
            assert_eq!(chunk["object"], "text_completion");
            text += choice["text"].as_str().unwrap();
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = reason.to_string();
        }
    }
    (text, finish)
}

/// `huginn generate` sampling 24 tokens after "Hello" at temperature 1.5, as the seed tests
/// ask the server for them.
fn sampled_generate(dir: &Path) -> Vec<String> {
    let args = [
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--steps",
    ];
    let rest = ["--max-new-tokens", "24", "--temperature", "1.5"];
    let steps = STEPS.to_string();
    args.iter()
        .chain([&steps.as_str()])
        .chain(&rest)
        .map(|s| s.to_string())
        .collect()
}

/// `huginn generate`'s stdout, less the newline it ends with.
fn cli(args: &[&str]) -> String {
    let out = huginn(args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_equal_the_cli_streamed_or_not() {
    let dir = folder_of_seed(DEFAULT_IDS, 7);
    let (url, _app) = start(dir.path(), limits(), None).await;
    let client = Client::new();
    let path = dir.path().to_str().unwrap();
    let steps = STEPS.to_string();

    let want = cli(&[
        "generate",
        "--model",
        path,
        "--prompt",
        "Hello",
        "--steps",
        &steps,
        "--max-new-tokens",
        "12",
    ]);
    let body = json!({"model": NAME, "prompt": "Hello", "max_tokens": 12, "temperature": 0});
    let (status, answer) = post(&client, &url, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["object"], "text_completion");
    assert_eq!(answer["choices"][0]["text"], want);
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    let usage = &answer["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(usage["prompt_tokens"], 6, "BOS + 5 bytes");
    assert_eq!(usage["total_tokens"], 18);
    assert_eq!(usage["mean_steps_per_token"], STEPS as f64);
    assert_eq!(usage["max_steps_per_token"], STEPS);

    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let response = client
        .post(format!("{url}/v1/completions"))
        .json(&streaming)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = sse_data(response).await;
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 12);
    assert_eq!(usage_chunk["choices"], json!([]));
    let (text, finish) = streamed_text(&events, false);
    assert_eq!((text.as_str(), finish.as_str()), (want.as_str(), "length"));

    // Chat through the template, ended by the model's <|end_turn|> or the length.
    let want = cli(&[
        "generate",
        "--model",
        path,
        "--prompt",
        "Hi!",
        "--chat",
        "--steps",
        &steps,
        "--max-new-tokens",
        "20",
    ]);
    let body = json!({"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 20, "temperature": 0.0});
    let (status, answer) = post(&client, &url, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(answer["choices"][0]["message"]["content"], want);
    let mut streaming = body;
    streaming["stream"] = json!(true);
    let response = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&streaming)
        .send()
        .await
        .unwrap();
    let events = sse_data(response).await;
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let (text, finish) = streamed_text(&events, true);
    assert_eq!(text, want);
    assert_eq!(finish, answer["choices"][0]["finish_reason"].as_str().unwrap());

    let (status, models) = {
        let response = client.get(format!("{url}/v1/models")).send().await.unwrap();
        (response.status(), response.json::<Value>().await.unwrap())
    };
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["data"][0]["id"], NAME);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_concurrent_clients_each_get_their_own_answer() {
    let dir = folder_of_seed(DEFAULT_IDS, 11);
    let folder = ModelFolder::open(dir.path(), &Device::flex()).unwrap();
    let prompts: Vec<String> = (0..32).map(|i| format!("prompt {i}{}", "!".repeat(i % 5))).collect();
    let config = AdaptiveConfig::fixed(STEPS, WarmStart::Cold, Strategy::default());
    let decoding = Decoding {
        stop_tokens: folder.stop_tokens.clone(),
        ..Decoding::default()
    };
    let want: Vec<String> = prompts
        .iter()
        .map(|p| {
            let ids = folder.encode(p).unwrap();
            TextStream::new(folder.tokenizer.as_ref().unwrap(), Vec::new())
                .generate(&folder.model, &ids, 8, config, &decoding, |_| Ok(()))
                .unwrap()
                .text
        })
        .collect();
    let (url, _app) = start(dir.path(), limits(), None).await;
    let client = Client::new();
    let answers = futures_util::future::join_all(prompts.iter().enumerate().map(|(i, p)| {
        let (client, url) = (client.clone(), url.clone());
        let body = json!({"prompt": p, "max_tokens": 8, "temperature": 0, "stream": i % 2 == 0});
        async move {
            let response = client
                .post(format!("{url}/v1/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            if i % 2 == 0 {
                streamed_text(&sse_data(response).await, false).0
            } else {
                let answer: Value = response.json().await.unwrap();
                answer["choices"][0]["text"].as_str().unwrap().to_string()
            }
        }
    }))
    .await;
    assert_eq!(answers, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_with_a_reason_and_leave_the_server_healthy() {
    let dir = folder(DEFAULT_IDS);
    let (url, _app) = start(dir.path(), limits(), None).await;
    let client = Client::new();
    let raw = |body: Vec<u8>| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let response = client
                .post(format!("{url}/v1/completions"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    let long = "x".repeat(300);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"prompt\": \"Hi\",".to_vec(), "not valid JSON"),
        (b"\"Hi\"".to_vec(), "invalid request"),
        (
            b"{\"prompt\": \"Hi\", \"max_tokens\": \"ten\"}".to_vec(),
            "`max_tokens`",
        ),
        (b"{\"prompt\": \"Hi\", \"max_tokens\": -1}".to_vec(), "`max_tokens`"),
        (
            b"{\"prompt\": \"Hi\", \"max_token\": 3}".to_vec(),
            "unknown field `max_token`",
        ),
        (b"{\"prompt\": \"Hi\", \"temperature\": -1}".to_vec(), "temperature"),
        (b"{\"prompt\": \"Hi\", \"top_p\": 7}".to_vec(), "top_p"),
        (b"{\"prompt\": \"Hi\", \"num_steps\": 0}".to_vec(), "num_steps"),
        (b"{\"prompt\": \"Hi\", \"num_steps\": 1001}".to_vec(), "num_steps"),
        (
            b"{\"prompt\": \"Hi\", \"exit_criterion\": \"soon\"}".to_vec(),
            "exit criterion",
        ),
        (
            b"{\"prompt\": \"Hi\", \"cache_strategy\": \"latest\"}".to_vec(),
            "cache strategy",
        ),
        (b"{\"prompt\": \"Hi\", \"warm_start\": \"hot\"}".to_vec(), "warm start"),
        (b"{\"prompt\": \"Hi\", \"n\": 2}".to_vec(), "`n`"),
        (b"{\"prompt\": [1, 99999]}".to_vec(), "outside the vocabulary"),
        (b"{\"prompt\": []}".to_vec(), "empty"),
        (
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}".to_vec(),
            "/v1/chat/completions",
        ),
        (format!("{{\"prompt\": \"{long}\"}}").into_bytes(), "context"),
        (
            b"{\"prompt\": \"Hi\", \"max_tokens\": 300}".to_vec(),
            "exceed the context",
        ),
        (b"{\"prompt\": \"\xff\xfe\"}".to_vec(), "UTF-8"),
    ];
    for (body, reason) in cases {
        let shown = String::from_utf8_lossy(&body).into_owned();
        let (status, answer) = raw(body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{shown}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(reason), "{shown}: {message:?} lacks {reason:?}");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
    }
    // Broken JSON names no parameter; a wrong value names its own.
    let params: Vec<(&[u8], Value)> = vec![
        (b"{\"prompt\": \"Hi\",", Value::Null),
        (b"{\"prompt\": [1, 2,}", Value::Null),
        (b"{\"prompt\": \"Hi\"} {", Value::Null),
        (b"{\"prompt\": \"Hi\", \"max_tokens\": \"ten\"}", json!("max_tokens")),
        (b"{\"messages\": [{\"role\": 1}]}", json!("messages[0].role")),
        (b"{\"prompt\": \"Hi\", \"top_p\": 7}", json!("top_p")),
        (b"{\"prompt\": \"Hi\", \"temperature\": -1}", json!("temperature")),
        (
            b"{\"prompt\": \"Hi\", \"repetition_penalty\": 0}",
            json!("repetition_penalty"),
        ),
    ];
    for (body, param) in params {
        let shown = String::from_utf8_lossy(body).into_owned();
        let (status, answer) = raw(body.to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{shown}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{shown}: {answer}");
    }
    let (status, answer) = post(
        &client,
        &url,
        "/v1/completions",
        json!({"model": "gpt-4", "prompt": "Hi"}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );
    let (status, _) = post(
        &client,
        &url,
        "/v1/chat/completions",
        json!({"messages": [{"role": "robot", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let response = client.get(format!("{url}/nowhere")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // A known route asked with the wrong method: 405 with the methods it takes, in JSON.
    for (method, path, allowed) in [
        (reqwest::Method::GET, "/v1/completions", "POST"),
        (reqwest::Method::PUT, "/v1/chat/completions", "POST"),
        (reqwest::Method::POST, "/health", "GET,HEAD"),
        (reqwest::Method::DELETE, "/v1/models", "GET,HEAD"),
    ] {
        let response = client
            .request(method.clone(), format!("{url}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(response.headers()["allow"], allowed, "{method} {path}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "method_not_allowed", "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(path), "{answer}");
    }

    let health: Value = client
        .get(format!("{url}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let (status, answer) = post(
        &client,
        &url,
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_prompts_beyond_the_context_are_refused_unread() {
    let dir = folder(DEFAULT_IDS);
    let (url, app) = start(dir.path(), limits(), None).await;
    let client = Client::new();
    // The tokenizer's longest entry is `<|begin_header|>`, 16 bytes; the context is 256 tokens.
    let input = app.input_limits();
    assert_eq!(input.text_bytes(), Some(16 * 256));
    assert!(input.body_bytes() < 1 << 20, "{input:?}");

    // A 16 MB body is refused on its length, before any of it is read, in JSON like every
    // error; one that does not say its length is cut off at the limit.
    let stream = connect(&url).await;
    write_all(&stream, raw_head(16 << 20).as_bytes()).await;
    let (status, answer) = read_response(&stream).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "request_too_large", "{answer}");
    assert_eq!(answer["error"]["type"], "invalid_request_error");
    // A client that sends all of it before reading gets the answer too (the server reads
    // the rest and drops it), and the connection is not kept for another request.
    for megabytes in [1, 16] {
        let body = json!({"prompt": "x".repeat(megabytes << 20)}).to_string();
        let response = client
            .post(format!("{url}/v1/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(response.headers()["connection"], "close");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "request_too_large", "{answer}");
    }
    let over = input.body_bytes() + 1;
    let stream = connect(&url).await;
    let head = "POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n";
    write_all(&stream, format!("{head}{over:x}\r\n").as_bytes()).await;
    write_all(&stream, &vec![b' '; over]).await;
    let (status, answer) = read_response(&stream).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "request_too_large", "{answer}");

    // Text that cannot fit is refused on its length, before it is tokenized.
    let over = "x".repeat(16 * 256 + 1);
    let cases = [
        ("/v1/completions", json!({"prompt": over}), "prompt"),
        ("/v1/completions", json!({"prompt": [over]}), "prompt"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": over}]}),
            "messages",
        ),
    ];
    for (path, body, param) in cases {
        let (status, answer) = post(&client, &url, path, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        let error = &answer["error"];
        assert_eq!(error["code"], "context_length_exceeded", "{answer}");
        assert_eq!(error["param"], param, "{answer}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("bytes, more than the context of 256 tokens"),
            "{answer}"
        );
    }
    // Within the bound, text is tokenized and refused on its tokens; so are token ids.
    for prompt in [json!("x".repeat(16 * 256)), json!(vec![1; 257])] {
        let (status, answer) = post(&client, &url, "/v1/completions", json!({"prompt": prompt})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        let error = &answer["error"];
        assert_eq!(error["code"], "context_length_exceeded", "{answer}");
        assert!(error["message"].as_str().unwrap().contains("tokens"), "{answer}");
    }
    assert_serving(&client, &url, &app, "refused bodies and prompts").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_at_any_moment_leave_the_server_serving() {
    let dir = folder(DEFAULT_IDS);
    // One row at a time, so that a request sent while another runs waits in the queue.
    let limits = EngineLimits {
        max_batch: 1,
        ..limits()
    };
    let (url, app) = start(dir.path(), limits, None).await;
    let client = Client::new();
    let whole = raw_request(&json!({"prompt": [1, 2, 3], "max_tokens": 4}));
    let streamed = raw_request(&json!({"prompt": [1, 2, 3], "max_tokens": 4, "stream": true}));

    // Before the response: a bare connection, half a request, whole requests left unread.
    drop(connect(&url).await);
    assert_serving(&client, &url, &app, "a bare connection").await;
    let half = connect(&url).await;
    write_all(&half, &whole[..whole.len() - 5]).await;
    drop(half);
    assert_serving(&client, &url, &app, "half a request").await;
    for (request, what) in [(&whole, "an unread answer"), (&streamed, "an unread stream")] {
        let stream = connect(&url).await;
        write_all(&stream, request).await;
        drop(stream);
        assert_serving(&client, &url, &app, what).await;
    }
    // Right after a stream's headers.
    let stream = connect(&url).await;
    write_all(&stream, &streamed).await;
    let (head, _) = read_head(&stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(stream);
    assert_serving(&client, &url, &app, "a stream's headers").await;
    // Mid-stream, after some tokens.
    let body = json!({"prompt": [1, 2, 3], "max_tokens": 40, "stream": true, "stop": ["never"]});
    let mut response = client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    for _ in 0..3 {
        response.chunk().await.unwrap().unwrap();
    }
    drop(response);
    assert_serving(&client, &url, &app, "a stream left midway").await;

    // Waiting behind a long request: an answer and a stream left unread, and a stream left
    // after its headers, before its first token.
    let long = json!({"prompt": [1, 2, 3], "max_tokens": 250, "num_steps": 200, "stream": true, "stop": ["never"]});
    let mut running = client
        .post(format!("{url}/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    running.chunk().await.unwrap().unwrap();
    let mut waiting = Vec::new();
    for request in [&whole, &streamed, &streamed] {
        let stream = connect(&url).await;
        write_all(&stream, request).await;
        waiting.push(stream);
    }
    let (head, _) = read_head(&waiting[2]).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let sent = Instant::now();
    while app.engine_load().0 < 3 {
        assert!(sent.elapsed() < Duration::from_secs(60), "the requests were not queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(waiting);
    // Time for the server to see them go before the long request ends (not asserted: a
    // slower server only leaves fewer of them gone by then).
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(running);
    assert_serving(&client, &url, &app, "requests that left the queue").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_503_and_an_oversized_request_is_refused() {
    let dir = folder(DEFAULT_IDS);
    let limits = EngineLimits {
        max_batch: 1,
        queue_capacity: 1,
        kv_budget_bytes: 4 << 20,
        prefill_window: EngineLimits::PREFILL_WINDOW,
        exit_wait: EngineLimits::EXIT_WAIT,
    };
    let (url, _app) = start(dir.path(), limits, None).await;
    let client = Client::new();
    // Each of these runs for a while; one runs, at most one waits, the rest find the queue full.
    // (Whether one waits depends on whether the worker has taken the first off the queue
    // before the second arrives, so it is not asserted.)
    let body = json!({"prompt": [1, 2, 3], "max_tokens": 30, "num_steps": 48});
    let statuses = futures_util::future::join_all((0..8).map(|_| {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        async move { post(&client, &url, "/v1/completions", body).await }
    }))
    .await;
    let busy: Vec<_> = statuses
        .iter()
        .filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    let served = statuses.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert!(
        served >= 1 && busy.len() >= 4 && served + busy.len() == 8,
        "{statuses:?}"
    );
    assert_eq!(busy[0].1["error"]["code"], "queue_full");
    // 47 positions × (1 + 48·2 + 1 slots) × 2 × 32 floats × 4 bytes ≈ 1.2 MB each: a 4 MB
    // budget holds that, not 64 steps of a long prompt.
    let (status, answer) = post(
        &client,
        &url,
        "/v1/completions",
        json!({"prompt": vec![1; 40], "max_tokens": 7, "num_steps": 64, "cache_strategy": "full"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = post(
        &client,
        &url,
        "/v1/completions",
        json!({"prompt": vec![1; 40], "max_tokens": 8, "num_steps": 64}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let tight = EngineLimits {
        kv_budget_bytes: 100_000,
        prefill_window: EngineLimits::PREFILL_WINDOW,
        exit_wait: EngineLimits::EXIT_WAIT,
        ..limits
    };
    let (url, _app) = start(dir.path(), tight, None).await;
    let (status, answer) = post(
        &client,
        &url,
        "/v1/completions",
        json!({"prompt": vec![1; 40], "max_tokens": 8, "num_steps": 64}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["error"]["code"], "kv_budget_exceeded");
    // A compressing strategy fits where the full cache does not.
    let (status, answer) = post(
        &client,
        &url,
        "/v1/completions",
        json!({"prompt": [1, 2], "max_tokens": 4, "num_steps": 64, "cache_strategy": "latest-m4-compress-s4"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_frees_its_row_at_once() {
    let dir = folder(DEFAULT_IDS);
    let (url, app) = start(dir.path(), limits(), None).await;
    let client = Client::new();
    // 200 steps for each of 250 tokens: the row would run for a while.
    let body = json!({"prompt": [1, 2, 3], "max_tokens": 250, "num_steps": 200, "stream": true, "stop": ["never"]});
    let mut response = client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let first = response.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "), "{first:?}");
    // While it runs, its cache is in use and within what its admission reserved.
    let text = metrics(&client, &url).await;
    let value = |name: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (in_use, reserved) = (value("huginn_kv_cache_bytes"), value("huginn_kv_cache_reserved_bytes"));
    assert!(0.0 < in_use && in_use <= reserved, "{text}");
    assert!(reserved <= value("huginn_kv_cache_budget_bytes"), "{text}");
    let left = Instant::now();
    drop(response);
    while app.engine_load() != (0, 0) {
        assert!(left.elapsed() < Duration::from_secs(60), "the row was not freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The row stopped within a few tokens of the client leaving (the server notices when a
    // write fails), far from its 250.
    let generated = app.tokens_generated();
    assert!(generated < 100, "{generated} tokens generated for a client that left");
    let (status, _) = post(
        &client,
        &url,
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_the_v1_routes() {
    let dir = folder(DEFAULT_IDS);
    let (url, _app) = start(dir.path(), limits(), Some("sesame")).await;
    let client = Client::new();
    let body = json!({"prompt": "Hi", "max_tokens": 2});
    let (status, answer) = post(&client, &url, "/v1/completions", body.clone()).await;
    assert_eq!(
        (status, answer["error"]["type"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("authentication_error"))
    );
    let wrong = client
        .get(format!("{url}/v1/models"))
        .bearer_auth("open")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let right = client
        .post(format!("{url}/v1/completions"))
        .bearer_auth("sesame")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::OK);
    let health = client.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK, "health needs no key");
}

/// `huginn serve` on `dir` and a free loopback port, with `flags`: the process, its address
/// and the rest of its stderr.
fn spawn_server(dir: &Path, flags: &[&str]) -> (Child, String, BufReader<ChildStderr>) {
    let mut server = Command::new(env!("CARGO_BIN_EXE_huginn"))
        .args(["serve", "--model", dir.to_str().unwrap(), "--addr", "127.0.0.1:0"])
        .args(flags)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    let mut line = String::new();
    let address = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "the server ended before listening"
        );
        if let Some(address) = line.trim().strip_prefix("huginn serve: listening on ") {
            break address.to_string();
        }
    };
    (server, address, stderr)
}

#[test]
fn sigint_finishes_the_running_request_and_exits_cleanly() {
    let dir = folder(DEFAULT_IDS);
    let (mut server, address, mut stderr) = spawn_server(dir.path(), &[]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = Client::new();
        let body = json!({"prompt": [1, 2, 3], "max_tokens": 12, "num_steps": 16, "stream": true});
        let mut response = client
            .post(format!("{address}/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.chunk().await.unwrap();
        let killed = Command::new("kill")
            .args(["-INT", &server.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let mut rest = String::new();
        while let Some(chunk) = response.chunk().await.unwrap() {
            rest += &String::from_utf8_lossy(&chunk);
        }
        assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
        assert!(rest.trim_end().ends_with("data: [DONE]"));
    });
    let status = server.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(status.success(), "{status}: {rest}");
    assert!(rest.contains("huginn serve: stopped"), "{rest}");
    assert!(!rest.contains("panicked"), "{rest}");
}

/// `sampler: "diffusion"` runs the wavefront sampler (alone, batch size 1) and answers what the
/// CLI prints, streamed or not; its knobs are checked like every other field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_diffusion_sampler_answers_as_the_cli_and_refuses_what_it_cannot_run() {
    let dir = folder_of_seed(DEFAULT_IDS, 7);
    let (url, app) = start(dir.path(), limits(), None).await;
    let client = Client::new();
    let path = dir.path().to_str().unwrap();
    let steps = STEPS.to_string();
    let want = cli(&[
        "generate",
        "--model",
        path,
        "--prompt",
        "Hello",
        "--steps",
        &steps,
        "--max-new-tokens",
        "10",
        "--sampler",
        "diffusion",
        "--init-scale",
        "0",
        "--headway",
        "2",
    ]);
    let body = json!({
        "prompt": "Hello", "max_tokens": 10, "temperature": 0, "sampler": "diffusion",
        "diffusion": {"init_scale": 0.0, "headway": 2},
    });
    let (status, answer) = post(&client, &url, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["choices"][0]["text"], want);
    let mut streaming = body;
    streaming["stream"] = json!(true);
    let response = client
        .post(format!("{url}/v1/completions"))
        .json(&streaming)
        .send()
        .await
        .unwrap();
    let (text, _) = streamed_text(&sse_data(response).await, false);
    assert_eq!(text, want);

    for (body, param) in [
        (json!({"prompt": "Hi", "sampler": "wave"}), "sampler"),
        (json!({"prompt": "Hi", "diffusion": {"headway": 2}}), "diffusion"),
        (
            json!({"prompt": "Hi", "sampler": "diffusion", "diffusion": {"headway": 0}}),
            "diffusion",
        ),
        (
            json!({"prompt": "Hi", "sampler": "diffusion", "diffusion": {"max_wavefront": 1}}),
            "diffusion",
        ),
        (
            json!({"prompt": "Hi", "sampler": "diffusion", "diffusion": {"freeze_strategy": "x"}}),
            "diffusion.freeze_strategy",
        ),
        (
            json!({"prompt": "Hi", "sampler": "diffusion", "diffusion": {"wave": 1}}),
            "diffusion",
        ),
        (
            json!({"prompt": "Hi", "sampler": "diffusion", "exit_criterion": "kl"}),
            "exit_criterion",
        ),
        (
            json!({"prompt": "Hi", "sampler": "diffusion", "warm_start": "normalized"}),
            "warm_start",
        ),
        // Beyond the context (the wave could never hold it), at type limits, and the prompt
        // as the first wave when it cannot fit one: refused before any work.
        (
            json!({"prompt": [1, 2], "max_tokens": 4, "sampler": "diffusion", "diffusion": {"headway": 2147483647}}),
            "diffusion.headway",
        ),
        (
            json!({"prompt": [1, 2], "sampler": "diffusion", "diffusion": {"headway": u64::MAX}}),
            "diffusion.headway",
        ),
        (
            json!({"prompt": [1, 2], "sampler": "diffusion", "diffusion": {"headway": 255}}),
            "diffusion.headway",
        ),
        (
            json!({"prompt": [1, 2], "sampler": "diffusion", "diffusion": {"inner_recurrence": 1001}}),
            "diffusion.inner_recurrence",
        ),
        (
            json!({"prompt": [1, 2], "sampler": "diffusion", "diffusion": {"max_diffusion_steps": 0}}),
            "diffusion.max_diffusion_steps",
        ),
        (
            json!({"prompt": [1, 2, 3, 4, 5, 6], "sampler": "diffusion",
                   "diffusion": {"full_prefill": false, "max_wavefront": 4}}),
            "diffusion.full_prefill",
        ),
    ] {
        let (status, answer) = post(&client, &url, "/v1/completions", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let got = answer["error"]["param"].as_str().unwrap_or_default();
        assert!(got.starts_with(param), "{body}: {answer}");
    }
    assert_serving(&client, &url, &app, "refused diffusion requests").await;
}

/// Short timeouts, so that the tests of stalled clients take a second or two.
fn quick() -> ConnectionLimits {
    ConnectionLimits {
        header_timeout: Duration::from_millis(600),
        body_timeout: Duration::from_millis(600),
        max_connections: 16,
        shutdown_grace: Duration::from_secs(1),
    }
}

/// How long the server took to close `stream` (what it sent before is skipped), or `None`
/// when it is still open after `within`.
async fn closed_within(stream: &TcpStream, within: Duration) -> Option<Duration> {
    let since = Instant::now();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            stream.readable().await.unwrap();
            match stream.try_read(&mut buffer) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Reset: closed too.
                Err(_) => return,
            }
        }
    })
    .await
    .ok()
    .map(|()| since.elapsed())
}

/// A connection that sends nothing, one that stops within its headers, and one kept alive
/// after its answer are each closed once `--header-timeout` has passed; one that stops within
/// its body gets 408 after `--body-timeout`, and is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_are_cut_off_and_idle_connections_expire() {
    let dir = folder(DEFAULT_IDS);
    let (url, app) = start_with(dir.path(), limits(), None, quick()).await;
    let whole = raw_request(&json!({"prompt": [1, 2, 3], "max_tokens": 2}));
    let bare = connect(&url).await;
    let half = connect(&url).await;
    write_all(&half, b"POST /v1/completions HTTP/1.1\r\nhost: local").await;
    let kept = connect(&url).await;
    write_all(&kept, &whole).await;
    let (status, answer) = read_response(&kept).await;
    assert_eq!(status, 200, "{answer}");
    for (stream, what) in [
        (&bare, "a connection that sent nothing"),
        (&half, "a connection that stopped within its headers"),
        (&kept, "an idle kept-alive connection"),
    ] {
        let closed = closed_within(stream, Duration::from_secs(20)).await;
        assert!(closed.is_some(), "{what} was still open after 20 s");
    }
    let slow = connect(&url).await;
    let sent = Instant::now();
    write_all(&slow, &whole[..whole.len() - 5]).await;
    let (status, answer) = read_response(&slow).await;
    assert_eq!(status, 408, "{answer}");
    assert!(sent.elapsed() >= Duration::from_millis(500), "{:?}", sent.elapsed());
    assert_eq!(answer["error"]["code"], "body_timeout", "{answer}");
    assert!(closed_within(&slow, Duration::from_secs(20)).await.is_some());
    assert_serving(&Client::new(), &url, &app, "stalled clients").await;
}

/// With `max_connections` connections open, the next waits unaccepted in the listen backlog;
/// idle ones are closed after the header timeout, and the waiting request is then answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_until_idle_ones_time_out() {
    let dir = folder(DEFAULT_IDS);
    let connections = ConnectionLimits {
        max_connections: 4,
        header_timeout: Duration::from_millis(1500),
        ..quick()
    };
    let (url, _app) = start_with(dir.path(), limits(), None, connections).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(connect(&url).await);
    }
    // Time for the server to accept them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Instant::now();
    let body = json!({"prompt": [1, 2, 3], "max_tokens": 2});
    let (status, answer) = post(&Client::new(), &url, "/v1/completions", body).await;
    let waited = sent.elapsed();
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(
        waited >= Duration::from_millis(800),
        "answered after {waited:?}: the 4 idle connections did not hold the limit"
    );
    for stream in &idle {
        assert!(closed_within(stream, Duration::from_secs(20)).await.is_some());
    }
}

/// A client may shut its sending side once its request is out (as `curl` with a file upload or
/// `nc -N` do) and still read the answer, whole or streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let dir = folder(DEFAULT_IDS);
    let (url, _app) = start(dir.path(), limits(), None).await;
    for streamed in [false, true] {
        let request = raw_request(&json!({"prompt": [1, 2, 3], "max_tokens": 4, "stream": streamed}));
        let (read, answer) = half_closed_exchange(&url, request, Duration::from_secs(60)).await;
        assert!(read.is_ok(), "{read:?}: {answer}");
        let answer = after_probes(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "streamed {streamed}: {answer:?}");
        let end = if streamed {
            "data: [DONE]"
        } else {
            "\"completion_tokens\":4"
        };
        assert!(answer.contains(end), "streamed {streamed}: {answer}");
    }
}

/// Sends `request` on a new connection, shuts the sending side, and reads until the server
/// closes (or `timeout` passes without a byte): the read's outcome and what was read.
async fn half_closed_exchange(url: &str, request: Vec<u8>, timeout: Duration) -> (Result<usize, String>, String) {
    let address = url.strip_prefix("http://").unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(address).unwrap();
        tcp.set_read_timeout(Some(timeout)).unwrap();
        tcp.write_all(&request).unwrap();
        tcp.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        let read = tcp.read_to_end(&mut answer);
        (
            read.map_err(|e| e.to_string()),
            String::from_utf8_lossy(&answer).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// What follows the interim `100 Continue` answers a half-closed client is probed with.
fn after_probes(answer: &str) -> &str {
    let mut answer = answer;
    while let Some(rest) = answer.strip_prefix("HTTP/1.1 100 Continue\r\n\r\n") {
        answer = rest;
    }
    answer
}

/// A half-closed client whose answer takes several probe intervals is probed (interim
/// `100 Continue` answers, which HTTP/1.1 clients skip) and still gets its whole answer; a
/// client that has gone is told apart by the probe's failure
/// (`a_diffusion_request_whose_client_left_stops_at_the_next_wave` in tests/diffusion.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_client_with_a_long_answer_is_probed_and_answered() {
    let dir = folder(DEFAULT_IDS);
    let (url, _app) = start(dir.path(), limits(), None).await;
    // A diffusion run that never settles: it ends, `not_converged`, after its waves.
    let request = raw_request(&json!({"prompt": [1, 2, 3], "max_tokens": 4, "sampler": "diffusion",
        "diffusion": {"exit_t": 0.0, "max_wavefront": 8, "max_diffusion_steps": LONG_WAVES}}));
    let started = std::time::Instant::now();
    let (read, answer) = half_closed_exchange(&url, request, Duration::from_secs(120)).await;
    let took = started.elapsed();
    assert!(read.is_ok(), "{read:?}: {answer}");
    assert!(
        took > 2 * infer::serve::PROBE_EVERY,
        "the request took {took:?}: raise LONG_WAVES so that it outlasts two probes"
    );
    assert!(answer.starts_with("HTTP/1.1 100 Continue\r\n\r\n"), "{answer:?}");
    let answer = after_probes(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("\"finish_reason\":\"not_converged\""), "{answer}");
}

/// Waves of the half-closed test's diffusion run: a few seconds on the tiny model.
const LONG_WAVES: u64 = 20_000;

/// SIGTERM ends the server within the grace period and a second, even while clients hold
/// requests they never finish sending (headers stopped midway, a declared body not sent).
#[test]
fn sigterm_closes_half_sent_requests_after_the_grace_period() {
    let dir = folder(DEFAULT_IDS);
    let flags = [
        "--shutdown-grace",
        "1",
        "--header-timeout",
        "600",
        "--body-timeout",
        "600",
    ];
    let (mut server, address, mut stderr) = spawn_server(dir.path(), &flags);
    let address = address.strip_prefix("http://").unwrap();
    let mut half = std::net::TcpStream::connect(address).unwrap();
    half.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: local").unwrap();
    let mut bodiless = std::net::TcpStream::connect(address).unwrap();
    bodiless.write_all(raw_head(100).as_bytes()).unwrap();
    bodiless.write_all(b"{\"prompt\": ").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(30) {
            server.kill().unwrap();
            server.wait().unwrap();
            panic!("still running 30 s after SIGTERM with --shutdown-grace 1");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = signalled.elapsed();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "{status}: {rest}");
    assert!(took < Duration::from_secs(10), "{took:?}: {rest}");
    assert!(rest.contains("huginn serve: stopped"), "{rest}");
    for stream in [&mut half, &mut bodiless] {
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = Vec::new();
        match stream.read_to_end(&mut answer) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
}

/// Without a `seed`, each request samples with a fresh one, which the answer and each
/// streamed chunk report; given back, it repeats the answer, and the CLI does the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_seed_samples_anew_and_reports_its_seed() {
    let dir = folder_of_seed(DEFAULT_IDS, 7);
    let (url, _app) = start(dir.path(), limits(), None).await;
    let client = Client::new();
    let sampled = json!({"prompt": "Hello", "max_tokens": 24, "temperature": 1.5, "stop_token_ids": []});
    let mut seeds = Vec::new();
    let mut texts = Vec::new();
    for _ in 0..4 {
        let (status, answer) = post(&client, &url, "/v1/completions", sampled.clone()).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let seed = answer["seed"].as_u64().unwrap_or_else(|| panic!("no seed: {answer}"));
        assert!(seed < 1 << 53, "{seed} does not read back exactly as a JSON number");
        seeds.push(seed);
        texts.push(answer["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let mut distinct = seeds.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "{seeds:?}");
    assert!(texts.iter().any(|t| *t != texts[0]), "{texts:?}");
    let mut again = sampled.clone();
    again["seed"] = json!(seeds[0]);
    let (_, answer) = post(&client, &url, "/v1/completions", again.clone()).await;
    assert_eq!(
        (&answer["seed"], &answer["choices"][0]["text"]),
        (&json!(seeds[0]), &json!(texts[0]))
    );
    again["stream"] = json!(true);
    let response = client
        .post(format!("{url}/v1/completions"))
        .json(&again)
        .send()
        .await
        .unwrap();
    let events = sse_data(response).await;
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk["seed"], json!(seeds[0]), "{chunk}");
    }
    assert_eq!(streamed_text(&events, false).0, texts[0]);
    // Greedy answers do not depend on it.
    let greedy = json!({"prompt": "Hello", "max_tokens": 12, "temperature": 0});
    let (_, first) = post(&client, &url, "/v1/completions", greedy.clone()).await;
    let (_, second) = post(&client, &url, "/v1/completions", greedy).await;
    assert_ne!(first["seed"], second["seed"]);
    assert_eq!(first["choices"], second["choices"]);

    // The CLI draws one too, says which on stderr, and repeats the run (and the server's
    // answer) with it.
    let args = sampled_generate(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = huginn(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let seed = stderr
        .lines()
        .find_map(|l| l.strip_prefix("seed: "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no seed on stderr: {stderr}"))
        .to_string();
    let text = String::from_utf8(out.stdout).unwrap();
    let repeated = huginn(&[&args[..], &["--seed", &seed]].concat());
    assert_eq!(String::from_utf8(repeated.stdout).unwrap(), text);
    assert!(!String::from_utf8_lossy(&repeated.stderr).contains("seed:"));
    let mut same = sampled;
    same["seed"] = json!(seed.parse::<u64>().unwrap());
    let (_, answer) = post(&client, &url, "/v1/completions", same).await;
    assert_eq!(answer["choices"][0]["text"], json!(text.strip_suffix('\n').unwrap()));
}

/// An answer that ends at a stop token while the bytes of a character are still incomplete
/// shows them as U+FFFD, as the tokenizer decodes them and the CLI prints them, streamed or
/// not. (These seeds end that way with this folder; the server once dropped the bytes.)
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_ending_inside_a_character_at_a_stop_token_is_the_cli_s() {
    let dir = folder_of_seed(DEFAULT_IDS, 7);
    let (url, _app) = start(dir.path(), limits(), None).await;
    let client = Client::new();
    let mut unfinished = 0;
    for seed in [20u64, 33, 65, 97] {
        let mut args = sampled_generate(dir.path());
        args.extend(["--seed".to_string(), seed.to_string()]);
        let printed = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
        unfinished += usize::from(printed.ends_with(char::REPLACEMENT_CHARACTER));
        let request = json!({"prompt": "Hello", "max_tokens": 24, "temperature": 1.5, "seed": seed});
        let (status, answer) = post(&client, &url, "/v1/completions", request.clone()).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["choices"][0]["text"], json!(printed), "seed {seed}");
        assert_eq!(answer["choices"][0]["finish_reason"], json!("stop"), "seed {seed}");
        let mut streamed = request;
        streamed["stream"] = json!(true);
        let response = client
            .post(format!("{url}/v1/completions"))
            .json(&streamed)
            .send()
            .await
            .unwrap();
        assert_eq!(
            streamed_text(&sse_data(response).await, false).0,
            printed,
            "seed {seed}"
        );
    }
    assert!(
        unfinished > 0,
        "no seed ended inside a character: the test checks nothing"
    );
}

/// A context beyond what rotary positions in f32 can tell apart is refused when the folder
/// loads, naming the field; and a request body is bounded whatever the context.
#[test]
fn a_config_with_an_absurd_context_is_refused_and_bodies_have_a_cap() {
    let dir = folder(DEFAULT_IDS);
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["block_size"] = json!(1_000_000_000_000u64);
    std::fs::write(&path, config.to_string()).unwrap();
    let out = huginn_within(&[
        "serve",
        "--model",
        dir.path().to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("block_size = 1000000000000 is over 16777216"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let input = InputLimits {
        context: 1 << 24,
        token_bytes: Some(300),
    };
    assert_eq!(input.body_bytes(), MAX_BODY_BYTES);
}

/// Runs `huginn` with `args`, killed (and the test failed) if it is still running after 60 s:
/// a flag that is not refused starts a server that would run forever.
fn huginn_within(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_huginn"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "huginn {args:?} still running after 60 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Every numeric flag of `serve` has a range, and a value outside it is a one-line error
/// before anything starts.
#[test]
fn absurd_serve_flags_are_refused_with_their_range() {
    let cases: [(&[&str], &str); 18] = [
        (
            &["--shutdown-grace", "1e300"],
            "--shutdown-grace must be a number of seconds in [0, 3600] (got 1e300)",
        ),
        (&["--shutdown-grace=-1"], "--shutdown-grace must be"),
        (&["--shutdown-grace", "NaN"], "--shutdown-grace must be"),
        (
            &["--header-timeout", "0"],
            "--header-timeout must be a number of seconds in (0, 3600] (got 0.0)",
        ),
        (&["--header-timeout", "1e300"], "--header-timeout must be"),
        (&["--body-timeout", "inf"], "--body-timeout must be"),
        (&["--max-connections", "0"], "--max-connections must be in 1..="),
        (
            &["--max-connections", "1000000000"],
            "--max-connections must be in 1..=",
        ),
        (&["--max-batch", "0"], "--max-batch must be in 1..=1024"),
        (&["--max-batch", "100000"], "--max-batch must be in 1..=1024"),
        (&["--queue", "1000000000"], "--queue must be in 1..=65536"),
        (
            &["--kv-budget", "1000000GiB"],
            "--kv-budget must be between 1 byte and this machine's memory",
        ),
        (&["--kv-budget", "0"], "--kv-budget must be between"),
        (&["--max-steps", "99999999999"], "--max-steps must be in 1..=1024"),
        (&["--steps", "0"], "--steps must be in 1..=--max-steps"),
        (&["--prefill-window", "0"], "--prefill-window must be in 1..="),
        (&["--exit-wait", "257"], "--exit-wait must be in 0..=--max-steps (256)"),
        (
            &["--prefill-window", "100000"],
            "--prefill-window must be in 1..=256 (the model's context)",
        ),
    ];
    for (flags, needle) in cases {
        let args: Vec<&str> = ["serve", "--addr", "127.0.0.1:0"]
            .iter()
            .chain(flags)
            .copied()
            .collect();
        let out = huginn_within(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{flags:?}");
        assert!(stderr.contains(needle), "{flags:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{flags:?}: {stderr}");
    }
}

/// A server process, killed when the test ends however it ends (a server left running would
/// keep the test harness's output open).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The case: with the descriptor limit at 128, 200 connections that never send a
/// request. The server keeps at most 64 open (128 less its headroom), each closed after the
/// header timeout, so a normal request waits its turn instead of forever.
#[test]
fn idle_connections_beyond_the_descriptor_limit_do_not_block_a_request_forever() {
    let dir = folder(DEFAULT_IDS);
    let mut server = Killed(
        Command::new("sh")
            .args([
                "-c",
                "ulimit -n 128 && exec \"$0\" \"$@\"",
                env!("CARGO_BIN_EXE_huginn"),
            ])
            .args([
                "serve",
                "--model",
                dir.path().to_str().unwrap(),
                "--addr",
                "127.0.0.1:0",
            ])
            .args(["--header-timeout", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = BufReader::new(server.0.stderr.take().unwrap());
    let mut lines = Vec::new();
    let address = loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the server ended: {lines:?}");
        if let Some(address) = line.trim().strip_prefix("huginn serve: listening on ") {
            break address.to_string();
        }
        lines.push(line);
    };
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("huginn serve: at most 64 connections open")),
        "{lines:?}"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let outcome = runtime.block_on(async {
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(connect(&address).await);
        }
        let client = Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let sent = Instant::now();
        let response = client
            .post(format!("{address}/v1/completions"))
            .json(&json!({"prompt": [1, 2, 3], "max_tokens": 2}))
            .send()
            .await;
        (response.map(|r| r.status()).map_err(|e| e.to_string()), sent.elapsed())
    });
    drop(server);
    let (status, took) = outcome;
    assert_eq!(status, Ok(StatusCode::OK), "after {took:?}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

/// What lm-eval's `local-completions` does with a scoring answer (`parse_logprobs`): the
/// continuation's summed log probability (`token_logprobs[ctxlen:-1]`) and whether each of
/// its tokens is the most likely one (`top_logprobs`).
fn lm_eval_reads(choice: &Value, context: usize) -> (f64, bool) {
    let logprobs = &choice["logprobs"];
    let tokens = logprobs["token_logprobs"].as_array().unwrap();
    let tops = logprobs["top_logprobs"].as_array().unwrap();
    let continuation = &tokens[context..tokens.len() - 1];
    let sum = continuation.iter().map(|v| v.as_f64().unwrap()).sum();
    let greedy = continuation.iter().zip(&tops[context..]).all(|(token, top)| {
        let best = top
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        token.as_f64().unwrap() == best
    });
    (sum, greedy)
}

/// lm-eval's loglikelihood request, as its `local-completions` model sends it: token ids,
/// `echo`, one alternative, one new token, and the depth in the model's name. Every prompt
/// token after the first gets the library's log probability at that depth, concurrent
/// requests of different lengths (scored in one padded pass) get what each gets alone, the
/// new token is greedy decoding's, and pure scoring (`max_tokens: 0`) returns the prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_requests_get_the_library_s_log_probabilities_alone_or_together() {
    let dir = folder(DEFAULT_IDS);
    let (url, app) = start(dir.path(), limits(), None).await;
    let client = Client::new();
    let model = ModelFolder::open(dir.path(), &Device::flex()).unwrap().model;
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| (0..3 + 2 * i).map(|t| (7 * t + i) % 250).collect())
        .collect();
    let request = |prompt: &Vec<u32>, name: &str| json!({"model": name, "prompt": [prompt], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": true, "seed": 1234});
    let answers = futures_util::future::join_all(
        prompts
            .iter()
            .map(|p| post(&client, &url, "/v1/completions", request(p, "tiny@r=4"))),
    )
    .await;
    let expected = infer::score::at_depths(&model, &prompts, &[4], 1).unwrap().remove(0);
    for ((prompt, (status, answer)), scores) in prompts.iter().zip(answers).zip(&expected) {
        assert_eq!(status, StatusCode::OK, "{answer}");
        let choice = &answer["choices"][0];
        let logprobs = &choice["logprobs"];
        let token_logprobs = logprobs["token_logprobs"].as_array().unwrap();
        assert_eq!(token_logprobs.len(), prompt.len() + 1);
        assert_eq!(token_logprobs[0], Value::Null);
        assert_eq!(logprobs["top_logprobs"][0], Value::Null);
        for (got, want) in token_logprobs[1..prompt.len()].iter().zip(&scores.tokens) {
            assert!(
                (got.as_f64().unwrap() - f64::from(want.logprob)).abs() < 1e-5,
                "{got} vs {want:?}"
            );
        }
        assert_eq!(logprobs["tokens"].as_array().unwrap().len(), prompt.len() + 1);
        assert_eq!(logprobs["text_offset"].as_array().unwrap().len(), prompt.len() + 1);
        // The continuation as lm-eval reads it: the prompt's last two tokens.
        let (sum, greedy) = lm_eval_reads(choice, prompt.len() - 2);
        let (want_sum, want_greedy) = scores.continuation(prompt.len() - 2);
        assert!((sum - want_sum).abs() < 1e-4, "{sum} vs {want_sum}");
        assert_eq!(greedy, want_greedy);
        // The new token is greedy decoding's at that depth.
        let plain = json!({"prompt": [prompt], "max_tokens": 1, "temperature": 0, "num_steps": 4});
        let (_, generated) = post(&client, &url, "/v1/completions", plain).await;
        assert_eq!(choice["token_ids"], generated["choices"][0]["token_ids"], "{answer}");
        assert_eq!(answer["usage"]["completion_tokens"], json!(1));
    }
    // Pure scoring: the prompt's text and log probabilities, nothing new.
    let mut pure = request(&prompts[0], "tiny@r=4");
    pure["max_tokens"] = json!(0);
    pure["prompt"] = json!("Hello");
    let (status, answer) = post(&client, &url, "/v1/completions", pure).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["choices"][0]["text"], json!("Hello"));
    assert_eq!(answer["usage"]["completion_tokens"], json!(0));
    assert_eq!(answer["choices"][0]["finish_reason"], json!("length"));
    let tokens = answer["choices"][0]["logprobs"]["tokens"].as_array().unwrap();
    assert_eq!(json!(tokens.len()), answer["usage"]["prompt_tokens"]);
    // Under an exit criterion each token's prediction takes its own steps, as the library's
    // token-by-token scoring gives them.
    let exit = request(&prompts[3], "tiny@r=8@exit=kl:0.001");
    let (status, answer) = post(&client, &url, "/v1/completions", exit).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let config = AdaptiveConfig {
        criterion: infer::exit::Criterion::Kl,
        threshold: 0.001,
        max_steps: 8,
        ..AdaptiveConfig::fixed(8, WarmStart::Cold, Strategy::default())
    };
    let alone = infer::score::adaptive(&model, &prompts[3], config, 1).unwrap();
    let got = answer["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
    for (got, want) in got[1..prompts[3].len()].iter().zip(&alone.tokens) {
        assert!(
            (got.as_f64().unwrap() - f64::from(want.logprob)).abs() < 1e-5,
            "{got} vs {want:?}"
        );
    }
    assert_eq!(answer["choices"][0]["steps_per_token"], json!([alone.next.steps]));
    // A longer answer with its log probabilities: greedy decoding's tokens, each scored as
    // the teacher-forced pass over the prompt and the answer scores it, and the most likely.
    let prompt = &prompts[2];
    let ask =
        json!({"prompt": [prompt], "max_tokens": 5, "temperature": 0, "logprobs": 2, "num_steps": 4, "echo": true});
    let (status, answer) = post(&client, &url, "/v1/completions", ask).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let plain = json!({"prompt": [prompt], "max_tokens": 5, "temperature": 0, "num_steps": 4});
    let (_, generated) = post(&client, &url, "/v1/completions", plain).await;
    let choice = &answer["choices"][0];
    assert_eq!(choice["token_ids"], generated["choices"][0]["token_ids"]);
    let new: Vec<u32> = serde_json::from_value(choice["token_ids"].clone()).unwrap();
    let whole = [prompt.as_slice(), &new[..new.len() - 1]].concat();
    let forced = infer::score::at_depths(&model, &[whole], &[4], 2)
        .unwrap()
        .remove(0)
        .remove(0);
    let logprobs = &choice["logprobs"];
    let got = logprobs["token_logprobs"].as_array().unwrap();
    assert_eq!(got.len(), prompt.len() + new.len());
    for (i, want) in forced.tokens.iter().enumerate().skip(prompt.len() - 1) {
        assert!(
            (got[i + 1].as_f64().unwrap() - f64::from(want.logprob)).abs() < 1e-4,
            "{i}: {got:?} vs {want:?}"
        );
        assert!(want.greedy, "temperature 0 draws the most likely token");
        // Two alternatives that read alike (bytes of unfinished characters) are listed once.
        let alternatives = logprobs["top_logprobs"][i + 1].as_object().unwrap();
        assert!((1..=2).contains(&alternatives.len()), "{alternatives:?}");
        let best = alternatives
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(best, got[i + 1].as_f64().unwrap(), "the token is the most likely");
    }
    // The chat format: one entry per new token, its alternatives most likely first.
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
        "logprobs": true, "top_logprobs": 2});
    let (status, answer) = post(&client, &url, "/v1/chat/completions", chat).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let content = answer["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(json!(content.len()), answer["usage"]["completion_tokens"]);
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(
            top[0]["logprob"], entry["logprob"],
            "greedy: the token is the most likely"
        );
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        assert_eq!(entry["bytes"], json!(entry["token"].as_str().unwrap().as_bytes()));
    }
    assert_serving(&client, &url, &app, "scoring").await;
}

/// A streamed answer with log probabilities carries, chunk by chunk, what the whole answer
/// carries: an echoed prompt and its scores in a chunk of their own, then each token's, the
/// text offsets running on across chunks; the chat format's entries one chunk each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_probabilities_stream_as_the_whole_answer_gives_them() {
    let dir = folder(DEFAULT_IDS);
    let (url, app) = start(dir.path(), limits(), None).await;
    let client = Client::new();
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
        "logprobs": true, "top_logprobs": 2});
    for (path, request) in [
        (
            "/v1/completions",
            json!({"prompt": "Hello there", "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": true, "num_steps": 4}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hello", "max_tokens": 5, "temperature": 0.8, "seed": 7, "logprobs": 0}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hello", "max_tokens": 0, "echo": true, "logprobs": 1}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": 3, "echo": true}),
        ),
        ("/v1/chat/completions", chat),
    ] {
        let is_chat = path.contains("chat");
        let (status, whole) = post(&client, &url, path, request.clone()).await;
        assert_eq!(status, StatusCode::OK, "{whole}");
        let mut streamed = request.clone();
        streamed["stream"] = json!(true);
        let response = client
            .post(format!("{url}{path}"))
            .json(&streamed)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let events = sse_data(response).await;
        let (text, finish) = streamed_text(&events, is_chat);
        let choice = &whole["choices"][0];
        let whole_text = if is_chat {
            &choice["message"]["content"]
        } else {
            &choice["text"]
        };
        assert_eq!(
            (json!(text), json!(finish)),
            (whole_text.clone(), choice["finish_reason"].clone()),
            "{request}"
        );
        let pieces: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .filter(|c| c["choices"] != json!([]))
            .map(|c| c["choices"][0]["logprobs"].clone())
            .filter(|l| !l.is_null())
            .collect();
        let joined = |key: &str| -> Value { pieces.iter().flat_map(|p| p[key].as_array().unwrap().clone()).collect() };
        let want = &choice["logprobs"];
        if want.is_null() {
            assert!(pieces.is_empty(), "{request}: {pieces:?}");
        } else if is_chat {
            assert_eq!(joined("content"), want["content"], "{request}");
            assert!(pieces.iter().all(|p| p["content"].as_array().unwrap().len() == 1));
        } else {
            for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                assert_eq!(joined(key), want[key], "{request}: {key}");
            }
        }
    }
    assert_serving(&client, &url, &app, "streamed scoring").await;
    // Without a tokenizer the text is token ids: the echoed ones and the answer's are one list.
    let bare = folder(DEFAULT_IDS);
    std::fs::remove_file(bare.path().join("tokenizer.json")).unwrap();
    let (url, _bare_app) = start(bare.path(), limits(), None).await;
    let request = json!({"prompt": [[3, 4, 5]], "max_tokens": 3, "echo": true, "logprobs": 1, "temperature": 0});
    let (status, whole) = post(&client, &url, "/v1/completions", request.clone()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let mut streamed = request;
    streamed["stream"] = json!(true);
    let response = client
        .post(format!("{url}/v1/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let (text, _) = streamed_text(&sse_data(response).await, false);
    assert_eq!(json!(text), whole["choices"][0]["text"]);
    assert!(text.starts_with("3,4,5,") && text.split(',').count() == 6, "{text}");
}

/// `/metrics` counts what clients were sent: tokens, steps per token, finished requests by
/// reason, one latency per token; its gauges read the engine; it needs no key, as `/health`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_clients_were_sent() {
    let dir = folder(DEFAULT_IDS);
    let (url, _app) = start(dir.path(), limits(), Some("sesame")).await;
    let client = Client::new();
    let mut tokens = 0;
    let mut steps = 0;
    for (body, stream) in [
        (json!({"prompt": "Hello", "max_tokens": 5, "num_steps": 3}), false),
        (
            json!({"prompt": "Hi", "max_tokens": 4, "num_steps": 2, "stream": true}),
            true,
        ),
        (
            json!({"prompt": "Hi", "max_tokens": 6, "exit_criterion": "kl", "exit_threshold": 0.01}),
            false,
        ),
    ] {
        let response = client
            .post(format!("{url}/v1/completions"))
            .bearer_auth("sesame")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        if stream {
            let events = sse_data(response).await;
            for event in &events[..events.len() - 1] {
                let chunk: Value = serde_json::from_str(event).unwrap();
                if let Some(n) = chunk["choices"][0]["num_steps"].as_u64() {
                    tokens += 1;
                    steps += n;
                }
            }
        } else {
            let answer: Value = response.json().await.unwrap();
            let per_token = answer["choices"][0]["steps_per_token"].as_array().unwrap();
            tokens += per_token.len() as u64;
            steps += per_token.iter().map(|s| s.as_u64().unwrap()).sum::<u64>();
        }
    }
    let response = client.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "no key needed");
    let kind = response.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    let text = response.text().await.unwrap();
    let value = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value("huginn_generation_tokens_total"), tokens as f64);
    assert_eq!(value("huginn_core_steps_per_token_count"), tokens as f64);
    assert_eq!(value("huginn_core_steps_per_token_sum"), steps as f64);
    assert_eq!(value("huginn_time_to_first_token_seconds_count"), 3.0);
    assert_eq!(value("huginn_time_per_output_token_seconds_count"), (tokens - 3) as f64);
    let finished: f64 = ["stop", "length"]
        .iter()
        .filter_map(|r| {
            let name = format!("huginn_requests_finished_total{{finish=\"{r}\"}}");
            text.lines()
                .find(|l| l.starts_with(&name))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        })
        .sum();
    assert_eq!(finished, 3.0, "{text}");
    assert_eq!(value("huginn_requests_running"), 0.0);
    assert_eq!(value("huginn_kv_cache_bytes"), 0.0);
    assert_eq!(value("huginn_kv_cache_budget_bytes"), limits().kv_budget_bytes as f64);
    assert!(value("huginn_prompt_tokens_total") >= 3.0);
}

/// A request the engine runs whole between steps (a scoring batch, the wavefront sampler) is
/// out of the running count before its client has the answer: a scrape right after never sees
/// it still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_run_whole_are_not_running_once_answered() {
    let dir = folder(DEFAULT_IDS);
    let (url, _app) = start(dir.path(), limits(), None).await;
    let client = Client::new();
    let scoring = json!({"prompt": "Hello there", "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": true});
    let wavefront = json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0, "sampler": "diffusion",
                           "diffusion": {"headway": 2}});
    for body in [&scoring, &wavefront].repeat(4) {
        let (status, _) = post(&client, &url, "/v1/completions", body.clone()).await;
        assert_eq!(status, StatusCode::OK);
        let text = metrics(&client, &url).await;
        assert!(text.lines().any(|l| l == "huginn_requests_running 0"), "{body}\n{text}");
    }
}

/// Scoring asks that cannot be met are refused by name, before any work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_requests_out_of_range_are_refused_by_name() {
    let dir = folder(DEFAULT_IDS);
    let (url, _app) = start(dir.path(), limits(), None).await;
    let client = Client::new();
    let base = json!({"prompt": "Hi", "max_tokens": 1, "logprobs": 1, "echo": true});
    let with = |field: &str, value: Value| {
        let mut request = base.clone();
        request[field] = value;
        request
    };
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}]});
    let chat_with = |field: &str, value: Value| {
        let mut request = chat.clone();
        request[field] = value;
        request
    };
    let bad_request = StatusCode::BAD_REQUEST;
    let mut cases: Vec<(&str, Value, StatusCode, &str)> = [
        (with("logprobs", json!(21)), "logprobs"),
        (with("logprobs", json!(-1)), "logprobs"),
        (with("logprobs", json!("many")), "logprobs"),
        (with("top_logprobs", json!(2)), "top_logprobs"),
        (with("sampler", json!("diffusion")), "sampler"),
        (with("model", json!("tiny@r=x")), "model"),
        (with("model", json!("tiny@depth=4")), "model"),
        (with("model", json!("tiny@r=4@r=5")), "model"),
        (with("model", json!("tiny@exit=kl:x")), "model"),
        (with("model", json!("tiny@exit=soon")), "exit_criterion"),
        (with("model", json!("tiny@r=0")), "num_steps"),
        (
            json!({"prompt": "Hi", "model": "tiny@r=4", "num_steps": 4}),
            "num_steps",
        ),
        (json!({"prompt": "Hi", "max_tokens": 0}), "max_tokens"),
    ]
    .into_iter()
    .map(|(request, field)| ("/v1/completions", request, bad_request, field))
    .collect();
    let not_found = with("model", json!("tinier@r=4"));
    cases.push(("/v1/completions", not_found, StatusCode::NOT_FOUND, "model"));
    let mut too_many = chat_with("logprobs", json!(true));
    too_many["top_logprobs"] = json!(21);
    let chat_cases = [
        (chat_with("echo", json!(true)), "echo"),
        (chat_with("logprobs", json!(5)), "logprobs"),
        (chat_with("top_logprobs", json!(2)), "top_logprobs"),
        (too_many, "top_logprobs"),
    ];
    for (request, field) in chat_cases {
        cases.push(("/v1/chat/completions", request, bad_request, field));
    }
    for (path, request, status, field) in cases {
        let (got, answer) = post(&client, &url, path, request.clone()).await;
        assert_eq!(
            (got, &answer["error"]["param"]),
            (status, &json!(field)),
            "{request}: {answer}"
        );
    }
    // The suffixes are listed with the model.
    let models: Value = client
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        models["data"][0]["name_suffixes"],
        json!(["@r=STEPS", "@exit=CRITERION[:THRESHOLD]"])
    );
}

/// One request's answer as its client saw it: text, finish reason and steps per token.
async fn streamed_answer(response: reqwest::Response) -> (String, String, Vec<u64>) {
    let events = sse_data(response).await;
    let mut text = String::new();
    let mut finish = String::new();
    let mut steps = Vec::new();
    for event in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        let choice = &chunk["choices"][0];
        text += choice["text"].as_str().unwrap_or("");
        if let Some(n) = choice["num_steps"].as_u64() {
            steps.push(n);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = reason.to_string();
        }
    }
    (text, finish, steps)
}

/// Twenty requests of random settings (depths, every exit criterion and threshold, cache
/// strategies, warm starts, sampling, lengths, a wavefront request among them) sent at random
/// moments, four of whose clients leave mid-answer: every answer that completes is exactly
/// what the same request gets alone, steps per token included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_do_not_depend_on_the_requests_running_beside_them() {
    use rand::{Rng, SeedableRng};
    let dir = folder_of_seed(DEFAULT_IDS, 19);
    let (url, app) = start(dir.path(), limits(), None).await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let criteria = infer::exit::Criterion::ALL.map(|c| c.name());
    let strategies = [
        "full",
        "latest-m4",
        "always-last-m4-compress-s4",
        "compress-anchor",
        "skip",
    ];
    let bodies: Vec<Value> = (0..20)
        .map(|i| {
            let prompt: Vec<u32> = (0..rng.random_range(1..24)).map(|_| rng.random_range(0..256)).collect();
            let warm_start = ["cold", "raw", "normalized"][rng.random_range(0..3)];
            let temperature = [0.0, 0.8][rng.random_range(0..2)];
            let mut body = json!({
                "prompt": prompt, "max_tokens": rng.random_range(1..40), "stream": true,
                "num_steps": rng.random_range(1..48), "stop": ["never"],
                "exit_criterion": criteria[rng.random_range(0..criteria.len())],
                "cache_strategy": strategies[rng.random_range(0..strategies.len())],
                "warm_start": warm_start, "temperature": temperature, "seed": rng.random::<u32>(),
            });
            if i == 7 {
                body = json!({"prompt": [1, 2, 3], "max_tokens": 6, "stream": true, "sampler": "diffusion",
                              "stop_token_ids": []});
            }
            body
        })
        .collect();
    let delays: Vec<u64> = bodies.iter().map(|_| rng.random_range(0..100)).collect();
    let leaves = |i: usize| i % 5 == 2;
    let client = Client::new();
    // The most requests seen running at once: the mix must overlap to test anything.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (app, done) = (app.clone(), done.clone());
        tokio::spawn(async move {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                most = most.max(app.engine_load().1);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            most
        })
    };
    let mixed = futures_util::future::join_all(bodies.iter().zip(&delays).enumerate().map(|(i, (body, delay))| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(*delay)).await;
            let mut response = client
                .post(format!("{url}/v1/completions"))
                .json(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "request {i}");
            if leaves(i) {
                response.chunk().await.unwrap();
                return None;
            }
            Some(streamed_answer(response).await)
        }
    }))
    .await;
    done.store(true, std::sync::atomic::Ordering::Release);
    let most = watcher.await.unwrap();
    assert!(most >= 6, "at most {most} requests ran at once");
    assert_serving(&client, &url, &app, "the mix").await;
    let mut compared = 0;
    for (i, (body, got)) in bodies.iter().zip(mixed).enumerate() {
        let Some(got) = got else { continue };
        let response = client
            .post(format!("{url}/v1/completions"))
            .json(body)
            .send()
            .await
            .unwrap();
        let alone = streamed_answer(response).await;
        assert_eq!(got, alone, "request {i}: {body}");
        compared += 1;
    }
    assert_eq!(compared, 16);
}
