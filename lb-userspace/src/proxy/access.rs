//! What each http request felt like, once its answer is done (or refused, cut, or left by the
//! client): a line of the access log, as target `steer::access` (`--log-level
//! steer::access=off` silences it), INFO, or WARN when the proxy or a backend failed it (with
//! `--log-format json` a JSON object whose `fields` hold the values below); and the service's
//! [`RequestMetrics`], per model and backend.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::Method;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;

use super::gate::WAIT_BUCKETS;
use crate::requests::Timings;

/// Upper bounds (seconds) of the time to first token and request duration histograms: 10 ms to
/// 10 minutes.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];
/// Upper bounds (seconds) of the time per output token histogram: 1 ms to 5 s.
pub const TOKEN_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
];
/// Which series a request counts in: the model pool it went to (empty: a service without pools,
/// or refused before a pool was chosen; never the client's own string, so the series stay as
/// few as the config's pools times backends) and the backend of its last try (`None`: refused
/// before one was chosen).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SeriesKey {
    pub model: String,
    pub backend: Option<SocketAddrV4>,
}

/// The requests of one model on one backend.
#[derive(Clone, Debug)]
pub struct Series {
    /// Streamed answers: from the request's arrival to the first piece of the body.
    pub ttft: Histogram,
    /// llama-server's decode time per generated token (`timings.predicted_ms / predicted_n`).
    pub time_per_output_token: Histogram,
    /// From the request's arrival to the answer's end (or the refusal).
    pub duration: Histogram,
    /// In the queue, over every try, of requests that got a backend.
    pub queue_wait: Histogram,
    /// Requests by the status the client got (a body cut short counts its head's).
    pub by_status: BTreeMap<u16, u64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Default for Series {
    fn default() -> Self {
        Series {
            ttft: Histogram::new(LATENCY_BUCKETS),
            time_per_output_token: Histogram::new(TOKEN_BUCKETS),
            duration: Histogram::new(LATENCY_BUCKETS),
            queue_wait: Histogram::new(WAIT_BUCKETS),
            by_status: BTreeMap::new(),
            prompt_tokens: 0,
            completion_tokens: 0,
        }
    }
}

/// A service's request series, by model and backend (`/metrics`).
#[derive(Debug, Default)]
pub struct RequestMetrics {
    series: Mutex<BTreeMap<SeriesKey, Series>>,
}

impl RequestMetrics {
    /// Every series now (the histograms share their counts with the live ones).
    pub fn snapshot(&self) -> Vec<(SeriesKey, Series)> {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series.iter().map(|(k, s)| (k.clone(), s.clone())).collect()
    }

    /// Forget the series of backends not among `listed` (those the service no longer has).
    pub fn retain_backends(&self, listed: &[SocketAddrV4]) {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series.retain(|key, _| key.backend.is_none_or(|b| listed.contains(&b)));
    }

    fn record(&self, access: &Access, timings: Option<&Timings>) {
        let key = SeriesKey {
            model: access.pool.clone().unwrap_or_default(),
            backend: access.backend,
        };
        let mut all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let series = all.entry(key).or_default();
        if let Some(status) = access.status {
            *series.by_status.entry(status).or_default() += 1;
        }
        series
            .duration
            .observe(access.started.elapsed().as_secs_f64());
        if let Some(ttft) = access.first_byte.filter(|_| access.streamed) {
            series.ttft.observe(ttft.as_secs_f64());
        }
        if access.backend.is_some() {
            series.queue_wait.observe(access.queue_wait.as_secs_f64());
        }
        if let Some(timings) = timings {
            series.prompt_tokens += timings.prompt_n;
            series.completion_tokens += timings.predicted_n;
            if timings.predicted_n > 0 {
                let per_token = timings.predicted_ms / 1000.0 / timings.predicted_n as f64;
                series.time_per_output_token.observe(per_token);
            }
        }
    }
}

/// What the log says of one request, filled in as it goes.
#[derive(Clone, Debug)]
pub struct Access {
    metrics: Arc<RequestMetrics>,
    started: Instant,
    method: Method,
    path: String,
    /// The `model` its body names.
    pub model: Option<String>,
    /// The model pool it went to.
    pub pool: Option<String>,
    pub streamed: bool,
    /// The backend of its last try.
    pub backend: Option<SocketAddrV4>,
    /// Its time in the queue, over every try.
    pub queue_wait: Duration,
    pub retries: u32,
    /// The status the client got.
    pub status: Option<u16>,
    /// When the first byte of the answer's body went out: a streamed generation's first token.
    first_byte: Option<Duration>,
}

/// How a request ended, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The answer was passed to its end.
    Done,
    /// The client went away before the end (llama-server then stops generating).
    ClientGone,
    /// The backend's body failed mid-answer.
    BackendFailed,
    /// The proxy refused it, for this reason (a `Refusal` name).
    Refused(&'static str),
    /// The proxy cut its answer short, for this reason (a `Refusal` name).
    Cut(&'static str),
}

impl Access {
    pub fn begin(metrics: &Arc<RequestMetrics>, method: &Method, path: &str) -> Access {
        Access {
            metrics: Arc::clone(metrics),
            started: Instant::now(),
            method: method.clone(),
            path: path.to_owned(),
            model: None,
            pool: None,
            streamed: false,
            backend: None,
            queue_wait: Duration::ZERO,
            retries: 0,
            status: None,
            first_byte: None,
        }
    }

    /// The answer's first byte goes out now.
    pub fn first_byte(&mut self) {
        self.first_byte = Some(self.started.elapsed());
    }

    /// Write the line and count it in the service's metrics: `timings` are what llama-server
    /// reported at the answer's end.
    pub fn log(&self, outcome: Outcome, timings: Option<&Timings>) {
        self.metrics.record(self, timings);
        let tokens = timings.map(|t| (t.prompt_n, t.predicted_n));
        let outcome_name = match outcome {
            Outcome::Done => "done",
            Outcome::ClientGone => "client_gone",
            Outcome::BackendFailed => "backend_failed",
            Outcome::Refused(reason) | Outcome::Cut(reason) => reason,
        };
        let failed = match outcome {
            Outcome::BackendFailed | Outcome::Cut(_) => true,
            Outcome::Refused(_) => self.status.is_none_or(|s| s >= 500),
            Outcome::Done | Outcome::ClientGone => false,
        };
        let ttft_ms = self.first_byte.filter(|_| self.streamed).map(millis);
        let duration_ms = millis(self.started.elapsed());
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "steer::access",
                    method = %self.method,
                    path = bounded(&self.path),
                    model = self.model.as_deref().map(bounded),
                    backend = self.backend.map(tracing::field::display),
                    status = self.status,
                    queue_ms = millis(self.queue_wait),
                    ttft_ms,
                    duration_ms,
                    prompt_tokens = tokens.map(|t| t.0),
                    completion_tokens = tokens.map(|t| t.1),
                    retries = self.retries,
                    outcome = outcome_name,
                    "request"
                )
            };
        }
        if failed {
            line!(warn);
        } else {
            line!(info);
        }
    }
}

/// `text`, or its first [`LOGGED_CHARS`] characters: a client's value must not make a line of
/// megabytes.
fn bounded(text: &str) -> &str {
    text.char_indices()
        .nth(LOGGED_CHARS)
        .map_or(text, |(end, _)| &text[..end])
}

/// The most of a client's string (a path, a model) a line keeps.
const LOGGED_CHARS: usize = 512;

/// Milliseconds to a tenth.
fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 10_000.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_string_is_logged_bounded_on_a_character_boundary() {
        assert_eq!(bounded("qwen"), "qwen");
        let long = "é".repeat(LOGGED_CHARS + 10);
        let kept = bounded(&long);
        assert_eq!(kept.chars().count(), LOGGED_CHARS);
        assert!(long.starts_with(kept));
    }

    #[test]
    fn a_series_is_keyed_by_the_pool_not_the_model_a_client_names() {
        let metrics = Arc::new(RequestMetrics::default());
        for named in ["a", "b", "c"] {
            let mut access = Access::begin(&metrics, &Method::POST, "/v1/chat/completions");
            access.model = Some(named.to_owned());
            access.status = Some(200);
            access.log(Outcome::Done, None);
        }
        let mut pooled = Access::begin(&metrics, &Method::POST, "/v1/chat/completions");
        pooled.model = Some("gpt-4o-mini".to_owned());
        pooled.pool = Some("qwen".to_owned());
        pooled.status = Some(200);
        pooled.log(Outcome::Done, None);
        let keys: Vec<String> = metrics
            .snapshot()
            .into_iter()
            .map(|(k, _)| k.model)
            .collect();
        assert_eq!(keys, ["", "qwen"], "three names, one series without pools");
    }
}
