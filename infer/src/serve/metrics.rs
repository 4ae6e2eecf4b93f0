//! `GET /metrics`: what the server is doing, in the Prometheus text format (OpenMetrics), for a
//! scraper or a look with `curl`. Gauges (requests waiting and running, KV-cache bytes held
//! for the running batch and the budget) are read from the engine when scraped; counters and
//! histograms (tokens, finished requests, core steps per token, time to first token, time
//! between tokens) are counted as answers go out, so they are what clients saw, queueing
//! included.

use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::engine::Finish;

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The server's metrics, shared by every request.
pub struct Metrics {
    registry: Registry,
    waiting: Gauge,
    running: Gauge,
    kv_bytes: Gauge,
    kv_reserved: Gauge,
    kv_budget: Gauge,
    prompt_tokens: Counter,
    tokens: Counter,
    finished: Family<Vec<(String, String)>, Counter>,
    steps: Histogram,
    first_token: Histogram,
    between_tokens: Histogram,
}

/// What the engine reports when scraped.
#[derive(Debug, Clone, Copy)]
pub struct EngineState {
    pub waiting: usize,
    pub running: usize,
    pub kv_bytes: usize,
    pub kv_reserved: usize,
    pub kv_budget: usize,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("huginn");
        let waiting = Gauge::default();
        let running = Gauge::default();
        let kv_bytes = Gauge::default();
        let kv_reserved = Gauge::default();
        let kv_budget = Gauge::default();
        let prompt_tokens = Counter::default();
        let tokens = Counter::default();
        let finished = Family::default();
        // Steps per token: 1 to 1024 (the most a request may ask for), by powers of two.
        let steps = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        // Latencies from half a millisecond to about half a minute (a deep token of a large
        // model on a CPU takes seconds).
        let first_token = Histogram::new(exponential_buckets(0.0005, 2.0, 17));
        let between_tokens = Histogram::new(exponential_buckets(0.0005, 2.0, 17));
        registry.register(
            "requests_waiting",
            "Requests admitted and not yet started",
            waiting.clone(),
        );
        registry.register("requests_running", "Requests being decoded", running.clone());
        registry.register(
            "kv_cache_bytes",
            "KV-cache bytes the running requests hold now",
            kv_bytes.clone(),
        );
        registry.register(
            "kv_cache_reserved_bytes",
            "KV-cache bytes reserved for the running requests (what each can grow to; bounded by the budget)",
            kv_reserved.clone(),
        );
        registry.register(
            "kv_cache_budget_bytes",
            "The KV-cache budget (--kv-budget)",
            kv_budget.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of requests admitted",
            prompt_tokens.clone(),
        );
        registry.register("generation_tokens", "Tokens generated and sent", tokens.clone());
        registry.register(
            "requests_finished",
            "Requests answered to their end, by finish reason (failed: the engine could not answer)",
            finished.clone(),
        );
        registry.register(
            "core_steps_per_token",
            "Recurrence steps each generated token took (mean: _sum / _count)",
            steps.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From a request's submission to the engine to its first token",
            first_token.clone(),
        );
        registry.register(
            "time_per_output_token_seconds",
            "Between consecutive tokens of one request",
            between_tokens.clone(),
        );
        Self {
            registry,
            waiting,
            running,
            kv_bytes,
            kv_reserved,
            kv_budget,
            prompt_tokens,
            tokens,
            finished,
            steps,
            first_token,
            between_tokens,
        }
    }

    /// The text a scrape gets, with the engine's state as it is now.
    pub fn render(&self, engine: EngineState) -> String {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.waiting.set(gauge(engine.waiting));
        self.running.set(gauge(engine.running));
        self.kv_bytes.set(gauge(engine.kv_bytes));
        self.kv_reserved.set(gauge(engine.kv_reserved));
        self.kv_budget.set(gauge(engine.kv_budget));
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// A request with a prompt of `prompt_tokens` was admitted.
    pub fn admitted(&self, prompt_tokens: usize) {
        self.prompt_tokens.inc_by(prompt_tokens as u64);
    }

    /// A request ended: how, or `None` when the engine failed it.
    pub fn finished(&self, finish: Option<Finish>) {
        let reason = finish.map_or("failed", Finish::as_str);
        self.finished
            .get_or_create(&vec![("finish".to_string(), reason.to_string())])
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One request's clock: its time to first token, then the time between its tokens.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    submitted: Instant,
    last: Option<Instant>,
}

impl Clock {
    /// Starts as a request is submitted.
    pub fn start() -> Self {
        Self {
            submitted: Instant::now(),
            last: None,
        }
    }

    /// A token of `steps` recurrence steps went out.
    pub fn token(&mut self, metrics: &Metrics, steps: usize) {
        let now = Instant::now();
        match self.last {
            None => metrics.first_token.observe((now - self.submitted).as_secs_f64()),
            Some(last) => metrics.between_tokens.observe((now - last).as_secs_f64()),
        }
        self.last = Some(now);
        metrics.tokens.inc();
        metrics.steps.observe(steps as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_s_tokens_fill_the_histograms_and_the_engine_s_state_the_gauges() {
        let metrics = Metrics::new();
        metrics.admitted(7);
        let mut clock = Clock::start();
        for steps in [4, 8, 12] {
            clock.token(&metrics, steps);
        }
        metrics.finished(Some(Finish::Stop));
        metrics.finished(None);
        let text = metrics.render(EngineState {
            waiting: 2,
            running: 1,
            kv_bytes: 1 << 20,
            kv_reserved: 3 << 20,
            kv_budget: 1 << 31,
        });
        for line in [
            "huginn_requests_waiting 2",
            "huginn_requests_running 1",
            "huginn_kv_cache_bytes 1048576",
            "huginn_kv_cache_reserved_bytes 3145728",
            "huginn_kv_cache_budget_bytes 2147483648",
            "huginn_prompt_tokens_total 7",
            "huginn_generation_tokens_total 3",
            "huginn_requests_finished_total{finish=\"stop\"} 1",
            "huginn_requests_finished_total{finish=\"failed\"} 1",
            "huginn_core_steps_per_token_sum 24.0",
            "huginn_core_steps_per_token_count 3",
            "huginn_time_to_first_token_seconds_count 1",
            "huginn_time_per_output_token_seconds_count 2",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        assert!(
            text.contains("huginn_core_steps_per_token_bucket{le=\"8.0\"} 2"),
            "{text}"
        );
    }
}
