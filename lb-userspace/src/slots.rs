//! Backend polls: every interval, each backend of a service is asked how many of its llama.cpp
//! slots are idle (policy `slots`) and, for an http service, which models it serves; the answers
//! go to the backend table, which writes the slots to the kernel (forgetting the connections the
//! poll has already seen) and routes each model's requests to the backends that list it.
//!
//! `/slots` lists every slot with `is_processing`. A server started with `--no-slots` answers 501
//! there (builds without the endpoint, 404); then `/metrics` (`llamacpp:requests_processing`,
//! needs `--metrics`) and `/props` (`total_slots`) give the same counts.
//!
//! `/v1/models` lists the models with their `id` and `aliases` (llama-server: `--alias`, else
//! the model's name or file name); where it is missing (404), `/props` names one (`model_alias`).
//! A backend's models change only with what it runs, so once known they are asked again every
//! [`MODELS_REFRESH`], and at the next poll after one of its slots or models failed or while it
//! is out of service or lists none (a restart or a new model goes through one of those
//! first): two GETs a poll would cost the agent about
//! twice the CPU of the slot polls alone, each a new connection (llama-server gives every open
//! connection a thread of its small pool, so polls do not keep one alive).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::probe::{GetError, get};
use crate::spec::SlotPoll;
use crate::table::{SlotCounts, SlotReport, TableError, TableHandle};

const PROCESSING_GAUGE: &str = "llamacpp:requests_processing";

/// How often a backend whose models are known is asked for them again.
pub const MODELS_REFRESH: Duration = Duration::from_secs(10);
/// How often an http service's backends are asked for llama-server's own `/metrics`, which
/// the agent's `/metrics` passes on: a scrape of the agent never waits for one of a backend.
pub const METRICS_REFRESH: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Get(#[from] GetError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("GET {path}: {source}")]
    Json {
        path: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("GET /metrics: no {PROCESSING_GAUGE} gauge")]
    NoProcessingGauge,
}

/// What each poll asks a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Polled {
    /// Its idle slots (policy `slots`, or a `[service.slots]` table).
    pub slots: bool,
    /// Its models (http services), asked again this often once known ([`MODELS_REFRESH`]).
    pub models: Option<Duration>,
    /// llama-server's `/metrics` (http services), this often ([`METRICS_REFRESH`]).
    pub metrics: Option<Duration>,
}

/// Poll the backends of `service` until the task is aborted or the table stops.
pub async fn run(table: TableHandle, service: String, poll: SlotPoll, polled: Polled) {
    let span = info_span!("slots", service = %service);
    async move {
        // Backends whose last poll failed, so a failure is logged once per streak; by what
        // was asked ("slots", "models").
        let mut failing: HashSet<(u32, SocketAddrV4, &'static str)> = HashSet::new();
        // When each backend last told its models, and was last asked for its metrics.
        let mut models_known: HashMap<(u32, SocketAddrV4), Instant> = HashMap::new();
        let mut metrics_asked: HashMap<(u32, SocketAddrV4), Instant> = HashMap::new();
        let mut tick = tokio::time::interval(poll.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(snapshot) = table.snapshot() else {
                return; // the table is gone: the agent is stopping
            };
            let mut polls = tokio::task::JoinSet::new();
            for b in snapshot.backends.iter().filter(|b| b.service == service) {
                // The flows steered so far (live, not as of the snapshot) are the ones this
                // poll can see.
                let (id, address, steered_before) = (b.id, b.address, table.steered(b.id));
                let timeout = poll.timeout;
                let due = |asked: &HashMap<_, Instant>, refresh: Option<Duration>| {
                    refresh.is_some_and(|refresh| {
                        asked
                            .get(&(id, address))
                            .is_none_or(|at: &Instant| at.elapsed() >= refresh)
                    })
                };
                let ask_models = due(&models_known, polled.models);
                let ask_metrics = due(&metrics_asked, polled.metrics);
                if ask_metrics {
                    metrics_asked.insert((id, address), Instant::now());
                }
                polls.spawn(async move {
                    // Both at once, each within the poll's timeout.
                    let slots = async {
                        if polled.slots {
                            Some(poll_backend(address, timeout).await)
                        } else {
                            None
                        }
                    };
                    let models = async {
                        if ask_models {
                            Some(poll_models(address, timeout).await)
                        } else {
                            None
                        }
                    };
                    let metrics = async {
                        if ask_metrics {
                            poll_metrics(address, timeout).await
                        } else {
                            None
                        }
                    };
                    let (slots, models, metrics) = tokio::join!(slots, models, metrics);
                    (id, address, steered_before, slots, models, metrics)
                });
            }
            let listed = |id, address| {
                snapshot
                    .backends
                    .iter()
                    .any(|b| (b.id, b.address) == (id, address))
            };
            failing.retain(|&(id, address, _)| listed(id, address));
            metrics_asked.retain(|&(id, address), _| listed(id, address));
            // Asked again at once after anything a change of what it runs goes through: out of
            // service (a restart, a load) or no models known.
            models_known.retain(|&(id, address), _| {
                snapshot.backends.iter().any(|b| {
                    (b.id, b.address) == (id, address) && b.healthy && !b.models.is_empty()
                })
            });
            while let Some(Ok((id, address, steered_before, slots, models, metrics))) =
                polls.join_next().await
            {
                if let Some(metrics) = metrics
                    && stopped(table.set_metrics(id, address, metrics).await, id, address)
                {
                    return;
                }
                if matches!(slots, Some(Err(_))) {
                    models_known.remove(&(id, address));
                }
                let slots = slots.and_then(|r| answered(&mut failing, id, address, "slots", r));
                if let Some(slots) = slots {
                    let report = SlotReport {
                        id,
                        address,
                        slots,
                        steered_before,
                    };
                    if stopped(table.set_slots(report).await, id, address) {
                        return;
                    }
                }
                let models = models.and_then(|r| answered(&mut failing, id, address, "models", r));
                if let Some(models) = models {
                    let learnt = table.set_models(id, address, models).await;
                    if learnt.is_ok() {
                        models_known.insert((id, address), Instant::now());
                    }
                    if stopped(learnt, id, address) {
                        return;
                    }
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// A poll's answer, or `None` after logging its failure (once per streak of failures).
fn answered<T>(
    failing: &mut HashSet<(u32, SocketAddrV4, &'static str)>,
    id: u32,
    address: SocketAddrV4,
    what: &'static str,
    result: Result<T, PollError>,
) -> Option<T> {
    match result {
        Ok(answer) => {
            if failing.remove(&(id, address, what)) {
                info!(id, %address, what, "backend poll answers again");
            }
            Some(answer)
        }
        Err(error) => {
            if failing.insert((id, address, what)) {
                warn!(id, %address, what, %error, "backend poll failed; keeping the last answer");
            } else {
                debug!(id, %address, what, %error, "backend poll failed");
            }
            None
        }
    }
}

/// Whether publishing a poll found the table stopped (the agent is stopping); other errors
/// are logged.
fn stopped(published: Result<(), TableError>, id: u32, address: SocketAddrV4) -> bool {
    match published {
        Ok(()) => false,
        Err(TableError::Stopped) => true,
        Err(error) => {
            warn!(id, %address, %error, "publishing a backend poll");
            false
        }
    }
}

/// llama-server's own `/metrics` text at `address` (it needs `--metrics`), within `timeout`;
/// `None` when it has none or did not answer (a failure there says nothing the other polls do
/// not: it is only logged at DEBUG).
pub async fn poll_metrics(address: SocketAddrV4, timeout: Duration) -> Option<Arc<str>> {
    match get(address, "/metrics", timeout).await {
        Ok(body) => Some(String::from_utf8_lossy(&body).into()),
        Err(error) => {
            debug!(%address, %error, "no llama-server metrics");
            None
        }
    }
}

/// The models the llama-server at `address` serves: each `id` and alias of its `/v1/models`,
/// or where that is missing, its `/props` `model_alias`; within `timeout`.
pub async fn poll_models(
    address: SocketAddrV4,
    timeout: Duration,
) -> Result<Vec<String>, PollError> {
    let budget = Budget::new(address, timeout);
    let exchange = async {
        match budget.get("/v1/models").await {
            Ok(body) => json("/v1/models", parse_models(&body)),
            Err(GetError::Status { status: 404, .. }) => {
                let props = budget.get("/props").await?;
                json("/props", parse_model_alias(&props))
            }
            Err(error) => Err(error.into()),
        }
    };
    exchange.await.map_err(|error| budget.timed_out(error))
}

/// `/v1/models`: `{"object":"list","data":[{"id":"a","aliases":["a","b"],...}]}`; each name once,
/// in order.
fn parse_models(body: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Model {
        id: String,
        #[serde(default)]
        aliases: Vec<String>,
    }
    #[derive(Deserialize)]
    struct List {
        data: Vec<Model>,
    }
    let list: List = serde_json::from_slice(body)?;
    let mut names: Vec<String> = Vec::new();
    for name in list
        .data
        .into_iter()
        .flat_map(|m| std::iter::once(m.id).chain(m.aliases))
    {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

/// `/props`: `{"model_alias":"a", ...}`.
fn parse_model_alias(body: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Props {
        model_alias: String,
    }
    serde_json::from_slice::<Props>(body).map(|p| vec![p.model_alias])
}

/// The slots of the llama-server at `address`, from `/slots`, or from `/metrics` and `/props`
/// where `/slots` is off; all within `timeout`.
pub async fn poll_backend(
    address: SocketAddrV4,
    timeout: Duration,
) -> Result<SlotCounts, PollError> {
    let budget = Budget::new(address, timeout);
    let exchange = async {
        match budget.get("/slots").await {
            Ok(body) => json("/slots", parse_slots(&body)),
            Err(GetError::Status {
                status: 404 | 501, ..
            }) => {
                let metrics = budget.get("/metrics").await?;
                let processing = parse_processing(&String::from_utf8_lossy(&metrics))
                    .ok_or(PollError::NoProcessingGauge)?;
                let props = budget.get("/props").await?;
                let total = json("/props", parse_total_slots(&props))?;
                Ok(SlotCounts {
                    total,
                    idle: total.saturating_sub(processing),
                })
            }
            Err(error) => Err(error.into()),
        }
    };
    exchange.await.map_err(|error| budget.timed_out(error))
}

/// The GETs of one poll of a backend: one time budget for the whole exchange, each GET has
/// what is left of it.
struct Budget {
    address: SocketAddrV4,
    timeout: Duration,
    deadline: Instant,
}

impl Budget {
    fn new(address: SocketAddrV4, timeout: Duration) -> Budget {
        Budget {
            address,
            timeout,
            deadline: Instant::now() + timeout,
        }
    }

    async fn get(&self, path: &'static str) -> Result<bytes::Bytes, GetError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        get(self.address, path, left).await
    }

    /// A GET that ran out of the budget is the poll's timeout.
    fn timed_out(&self, error: PollError) -> PollError {
        match error {
            PollError::Get(GetError::Timeout { .. }) => PollError::Timeout(self.timeout),
            error => error,
        }
    }
}

/// A parse of the answer to `path`, its error naming the path.
fn json<T>(path: &'static str, parsed: Result<T, serde_json::Error>) -> Result<T, PollError> {
    parsed.map_err(|source| PollError::Json { path, source })
}

/// `/slots`: `[{"id":0,...,"is_processing":false}, ...]`.
fn parse_slots(body: &[u8]) -> Result<SlotCounts, serde_json::Error> {
    #[derive(Deserialize)]
    struct Slot {
        is_processing: bool,
    }
    let slots: Vec<Slot> = serde_json::from_slice(body)?;
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Ok(SlotCounts {
        total: count(slots.len()),
        idle: count(slots.iter().filter(|s| !s.is_processing).count()),
    })
}

/// `/props`: `{"total_slots":2, ...}`.
fn parse_total_slots(body: &[u8]) -> Result<u32, serde_json::Error> {
    #[derive(Deserialize)]
    struct Props {
        total_slots: u32,
    }
    serde_json::from_slice::<Props>(body).map(|p| p.total_slots)
}

/// The `llamacpp:requests_processing` gauge of a Prometheus text exposition.
fn parse_processing(metrics: &str) -> Option<u32> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(PROCESSING_GAUGE)?.strip_prefix(' ')?;
        let value: f64 = value.split_whitespace().next()?.parse().ok()?;
        // A gauge of requests: a whole, non-negative number.
        (value >= 0.0 && value <= f64::from(u32::MAX)).then_some(value as u32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::tests::answering;
    use tokio::net::TcpListener;

    /// Captured from llama-server 11434.0.0 (`-np 2 -c 2048`) while slot 1 answered a chat.
    const SLOTS_ONE_BUSY: &str = include_str!("../fixtures/llama-server/slots_one_busy.json");
    /// The same server idle.
    const SLOTS_IDLE: &str = r#"[{"id":0,"n_ctx":1024,"speculative":false,"is_processing":false},{"id":1,"n_ctx":1024,"speculative":false,"is_processing":false}]"#;
    /// Its `/metrics` (with `--metrics`) at that moment, comments cut.
    const METRICS_ONE_BUSY: &str = "# HELP llamacpp:requests_processing Number of requests processing\n\
        # TYPE llamacpp:requests_processing gauge\n\
        llamacpp:requests_processing 1\n\
        llamacpp:requests_deferred 0\n\
        llamacpp:n_busy_slots_per_decode 0\n";
    /// `/slots` of a server started with `--no-slots`.
    const NO_SLOTS: &str = "HTTP/1.1 501 Not Implemented\r\nServer: llama.cpp\r\n\
        Content-Type: application/json; charset=utf-8\r\nContent-Length: 132\r\n\
        Connection: close\r\n\r\n\
        {\"error\":{\"code\":501,\"message\":\"This server does not support slots endpoint. \
        Start it with `--slots`\",\"type\":\"not_supported_error\"}}";

    #[test]
    fn parses_real_llama_server_answers() -> Result<(), serde_json::Error> {
        assert_eq!(
            parse_slots(SLOTS_ONE_BUSY.as_bytes())?,
            SlotCounts { total: 2, idle: 1 }
        );
        assert_eq!(
            parse_slots(SLOTS_IDLE.as_bytes())?,
            SlotCounts { total: 2, idle: 2 }
        );
        assert_eq!(
            parse_total_slots(
                br#"{"default_generation_settings":{},"total_slots":2,"model_alias":"m"}"#
            )?,
            2
        );
        assert_eq!(parse_processing(METRICS_ONE_BUSY), Some(1));
        assert_eq!(parse_processing("llamacpp:requests_processing_x 3\n"), None);
        assert_eq!(parse_processing("llamacpp:requests_processing -1\n"), None);
        assert!(parse_slots(br#"{"error":"no"}"#).is_err());
        assert!(
            parse_slots(br#"[{"id":0}]"#).is_err(),
            "is_processing is needed"
        );
        Ok(())
    }

    #[test]
    fn models_are_each_id_and_alias_once() -> Result<(), serde_json::Error> {
        let listed = br#"{"models":[{"name":"a","model":"a"}],"object":"list","data":[
            {"id":"a","aliases":["a","chat"],"tags":[],"object":"model","owned_by":"llamacpp"},
            {"id":"b","object":"model"}]}"#;
        assert_eq!(parse_models(listed)?, ["a", "chat", "b"]);
        assert_eq!(
            parse_model_alias(br#"{"total_slots":2,"model_alias":"m"}"#)?,
            ["m"]
        );
        assert!(
            parse_models(br#"{"data":[{"aliases":["x"]}]}"#).is_err(),
            "an id is needed"
        );
        Ok(())
    }

    #[tokio::test]
    async fn polls_models_or_falls_back_to_props() {
        let timeout = Duration::from_secs(2);
        let listing = server(|path| match path {
            "/v1/models" => ok(r#"{"object":"list","data":[{"id":"a","aliases":["a"]}]}"#),
            _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned(),
        })
        .await;
        assert_eq!(
            poll_models(listing, timeout).await.ok(),
            Some(vec!["a".to_owned()])
        );
        let props_only = server(|path| match path {
            "/props" => ok(r#"{"model_alias":"m","total_slots":1}"#),
            _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned(),
        })
        .await;
        assert_eq!(
            poll_models(props_only, timeout).await.ok(),
            Some(vec!["m".to_owned()])
        );
        let loading =
            server(|_| "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_owned())
                .await;
        assert!(matches!(
            poll_models(loading, timeout).await,
            Err(PollError::Get(GetError::Status { status: 503, .. }))
        ));
    }

    /// Models asked once known only every `refresh` (an hour here: never within the test), and
    /// at once after a failed slot poll, which a restart with a new model goes through.
    #[tokio::test]
    async fn models_are_asked_again_after_a_failed_poll_not_at_every_poll() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let (model_asks, restarted, down) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let backend = crate::probe::tests::answering({
            let (model_asks, restarted, down) =
                (model_asks.clone(), restarted.clone(), down.clone());
            move |path| {
                let answer = match path {
                    _ if down.swap(false, Ordering::SeqCst) => {
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_owned()
                    }
                    "/slots" => ok(r#"[{"id":0,"is_processing":false}]"#),
                    "/v1/models" => {
                        model_asks.fetch_add(1, Ordering::SeqCst);
                        let name = if restarted.load(Ordering::SeqCst) {
                            "b"
                        } else {
                            "a"
                        };
                        ok(&format!(r#"{{"data":[{{"id":"{name}"}}]}}"#))
                    }
                    _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned(),
                };
                answer.into_bytes()
            }
        })
        .await;
        let backends = vec![crate::spec::BackendSpec {
            address: backend,
            weight: crate::spec::Weight::ONE,
            max_connections: 0,
            models: Vec::new(),
        }];
        let service = crate::fake::chat_service(backends, None);
        let dataplane = crate::fake::FakeDataplane::default();
        let (table, _task) = crate::table::start(dataplane, &[service]).expect("start");
        let poll = SlotPoll {
            interval: Duration::from_millis(20),
            timeout: Duration::from_secs(2),
        };
        let polled = Polled {
            slots: true,
            models: Some(Duration::from_secs(3600)),
            metrics: None,
        };
        let interval = poll.interval;
        let poller = tokio::spawn(run(table.clone(), "chat".to_owned(), poll, polled));
        let models = || {
            table.snapshot().expect("snapshot").backends[0]
                .models
                .clone()
        };
        // Bounded waits for the polls, not timing assertions.
        let until = |wanted: &'static str| {
            let models = &models;
            async move {
                for _ in 0..500 {
                    if models() == [wanted] {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                models()
            }
        };
        assert_eq!(until("a").await, ["a"]);
        let asked = model_asks.load(Ordering::SeqCst);
        // Another model without anything failing: not asked again for the hour (ten polls).
        restarted.store(true, Ordering::SeqCst);
        tokio::time::sleep(10 * interval).await;
        assert_eq!(
            (models(), model_asks.load(Ordering::SeqCst)),
            (vec!["a".to_owned()], asked)
        );
        // A poll that fails (the server restarting): asked at the next one.
        down.store(true, Ordering::SeqCst);
        assert_eq!(until("b").await, ["b"]);
        poller.abort();
    }

    /// A loopback llama-server stand-in: `answer(path)` is the whole HTTP response.
    async fn server(answer: fn(&str) -> String) -> SocketAddrV4 {
        answering(move |path| answer(path).into_bytes()).await
    }

    fn ok(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn polls_slots_or_falls_back_to_metrics_and_props() {
        let timeout = Duration::from_secs(2);
        let with_slots = server(|path| match path {
            "/slots" => ok(SLOTS_ONE_BUSY),
            _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned(),
        })
        .await;
        assert_eq!(
            poll_backend(with_slots, timeout).await.ok(),
            Some(SlotCounts { total: 2, idle: 1 })
        );
        let no_slots = server(|path| match path {
            "/metrics" => ok(METRICS_ONE_BUSY),
            "/props" => ok(r#"{"total_slots":4}"#),
            _ => NO_SLOTS.to_owned(),
        })
        .await;
        assert_eq!(
            poll_backend(no_slots, timeout).await.ok(),
            Some(SlotCounts { total: 4, idle: 3 })
        );
        let nothing = server(|_| NO_SLOTS.replace("slots endpoint", "metrics endpoint")).await;
        assert!(matches!(
            poll_backend(nothing, timeout).await,
            Err(PollError::Get(GetError::Status { ref path, status: 501, .. })) if path == "/metrics"
        ));
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let std::net::SocketAddr::V4(silent_addr) = silent.local_addr().expect("addr") else {
            panic!("not IPv4");
        };
        assert!(matches!(
            poll_backend(silent_addr, Duration::from_millis(100)).await,
            Err(PollError::Timeout(_))
        ));
    }
}
