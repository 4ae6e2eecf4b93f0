//! The server once its engine thread has ended: the only way to end it from outside is to
//! close its queue, which is what dropping the engine does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use model::HuginnConfig;
use model::burn::prelude::Device;
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::api::ServerDefaults;
use super::engine::EngineLimits;
use super::{App, ConnectionLimits, serve};
use folder::ModelFolder;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_engine_answers_503_on_health_and_requests() {
    let model = HuginnConfig::tiny(64, 32, 4, (1, 1, 1)).init(&Device::flex(), 0);
    let defaults = ServerDefaults {
        model_name: "tiny".into(),
        num_steps: 2,
        max_num_steps: 8,
    };
    let limits = EngineLimits {
        max_batch: 1,
        queue_capacity: 4,
        kv_budget_bytes: 1 << 30,
        prefill_window: EngineLimits::PREFILL_WINDOW,
        exit_wait: EngineLimits::EXIT_WAIT,
    };
    let mut app = App::new(ModelFolder::from_model(model), defaults, limits, None);
    app.engine.close();
    let closed = Instant::now();
    while app.engine.alive() {
        assert!(
            closed.elapsed() < Duration::from_secs(30),
            "the engine thread did not end"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(
        listener,
        Arc::new(app),
        std::future::pending(),
        ConnectionLimits::default(),
    ));
    let client = reqwest::Client::new();
    let health = client.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "engine stopped");
    let answer = client
        .post(format!("{url}/v1/completions"))
        .json(&json!({"prompt": [1, 2, 3], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "engine_stopped", "{answer}");
}
