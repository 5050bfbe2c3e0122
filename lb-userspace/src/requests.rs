//! What the http proxy learns per backend id from the requests it passes: requests in flight,
//! answers by status class, tokens, and the decode and prompt speeds llama-server reports in
//! each answer's `timings`. Shared by `Arc` like the connection counts: the http layer writes,
//! the gate reads the speeds at every choice, the table reads the rest into each listed backend
//! and starts an id over when it gets a new backend.
//!
//! A speed is the backend's, all its requests together: one answer's rate times the requests
//! in flight on the backend when it ended (itself included). llama-server decodes its busy
//! slots together, so an answer's own rate is roughly the server's divided by them: two servers
//! of equal speed, one with one request and one with three, would otherwise read as three
//! times apart. Requests waiting inside llama-server for a slot count too, which overstates a
//! server loaded beyond its slots (never under policy `slots`, whose cap is the slot count).
//!
//! Speeds are exponentially weighted moving averages over answers, each answer weighing
//! [`EWMA_WEIGHT`]: the last ten answers make about 90% of the average, so a backend that slows
//! down (another tenant, a CPU cap) is seen within a few answers while one odd answer (a tiny
//! completion, a cold cache) moves it by a fifth.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// The weight of a new answer in a speed average (see the module doc).
pub const EWMA_WEIGHT: f64 = 0.2;
/// The lowest speed factor: a backend ten times slower than the fastest (or slower still) keeps
/// a tenth of its weight, so it still gets answers to learn from when it speeds up again.
pub const MIN_SPEED_FACTOR: f64 = 0.1;
/// Models whose speed a backend keeps; a new one beyond them replaces the one heard of last.
pub const MAX_MODELS: usize = 8;
/// Fewer prompt tokens evaluated than this (the rest came from the prompt cache) time the
/// round trip more than the prompt speed: such an answer leaves the prompt speed as it was.
pub const MIN_PROMPT_TOKENS: u64 = 16;
/// A model name longer than this is not tracked on its own (the backend's speed still is).
const MAX_MODEL_NAME: usize = 256;

/// What became of a request sent to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// 2xx.
    Success,
    /// 3xx.
    Redirect,
    /// 4xx.
    ClientError,
    /// 5xx, and any status outside 200-499 (no backend sends one as a final answer).
    ServerError,
    /// The backend could not be reached (connect refused or timed out): nothing was sent.
    Unreachable,
    /// The backend failed after the request was sent: no answer, or none within its first-byte or total timeout.
    Failed,
}

impl Class {
    pub const ALL: [Class; 6] = [
        Class::Success,
        Class::Redirect,
        Class::ClientError,
        Class::ServerError,
        Class::Unreachable,
        Class::Failed,
    ];

    /// A status's class.
    pub fn of_status(status: u16) -> Class {
        match status {
            200..=299 => Class::Success,
            300..=399 => Class::Redirect,
            400..=499 => Class::ClientError,
            _ => Class::ServerError,
        }
    }

    /// As `/v1/backends` and the `class` label of `/metrics` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Class::Success => "2xx",
            Class::Redirect => "3xx",
            Class::ClientError => "4xx",
            Class::ServerError => "5xx",
            Class::Unreachable => "unreachable",
            Class::Failed => "failed",
        }
    }
}

/// llama-server's `timings` of one answer (the fields used; others are ignored).
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize)]
pub struct Timings {
    /// Prompt tokens evaluated (not taken from the cache).
    pub prompt_n: u64,
    pub prompt_ms: f64,
    pub prompt_per_second: f64,
    /// Tokens generated.
    pub predicted_n: u64,
    pub predicted_ms: f64,
    /// Over the decode steps: llama-server leaves out the first token (it comes with the prompt),
    /// so one generated token reads 0.
    pub predicted_per_second: f64,
}

/// Decode and prompt speed averages, tokens per second of the backend (see the module doc),
/// and the tokens an answer generates on average; `None` until an answer measured one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Speed {
    pub decode_tokens_per_second: Option<f64>,
    pub prompt_tokens_per_second: Option<f64>,
    pub generated_tokens_per_answer: Option<f64>,
}

impl Speed {
    /// Fold in one answer's timings, which ended with `together` requests in flight on the
    /// backend; a rate that is zero or not finite measured nothing, and neither does a prompt
    /// under [`MIN_PROMPT_TOKENS`].
    fn learn(&mut self, timings: &Timings, together: u64) {
        let together = together.max(1) as f64;
        fold(
            &mut self.decode_tokens_per_second,
            timings.predicted_per_second * together,
        );
        if timings.prompt_n >= MIN_PROMPT_TOKENS {
            fold(
                &mut self.prompt_tokens_per_second,
                timings.prompt_per_second * together,
            );
        }
        fold(
            &mut self.generated_tokens_per_answer,
            timings.predicted_n as f64,
        );
    }
}

fn fold(average: &mut Option<f64>, sample: f64) {
    if sample.is_finite() && sample > 0.0 {
        *average = Some(average.map_or(sample, |old| old + EWMA_WEIGHT * (sample - old)));
    }
}

/// A backend's speed and that of each model it answered as (at most [`MAX_MODELS`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Speeds {
    #[serde(flatten)]
    pub backend: Speed,
    pub models: BTreeMap<String, Speed>,
}

/// One backend's counters as listed in `/v1/backends`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BackendRequests {
    pub requests: RequestCounters,
    pub tokens: Tokens,
    pub speed: Speeds,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounters {
    /// Sent to the backend and not yet answered to the end (or given up).
    pub in_flight: u64,
    /// By [`Class::name`].
    #[serde(flatten)]
    pub by_class: BTreeMap<&'static str, u64>,
}

/// Tokens in the answers' `timings`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tokens {
    /// Prompt tokens evaluated (`prompt_n`: those taken from the prompt cache are not).
    pub prompt: u64,
    /// Tokens generated (`predicted_n`).
    pub generated: u64,
}

#[derive(Default)]
struct Entry {
    /// Bumped when the id gets a new backend: the old one's requests still in flight then are
    /// not counted against the new one.
    generation: AtomicU64,
    in_flight: AtomicU64,
    /// Indexed like [`Class::ALL`].
    answered: [AtomicU64; Class::ALL.len()],
    /// Requests it failed since its last good answer (see [`InFlight::answered`]).
    failures_in_a_row: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    speeds: Mutex<Learnt>,
}

/// Speeds, changed once per measured answer.
#[derive(Default)]
struct Learnt {
    backend: Speed,
    /// Least recently measured first.
    models: Vec<(String, Speed)>,
}

/// Per-backend request counters and speeds, indexed by backend id.
pub struct RequestCounts {
    entries: Box<[Entry]>,
    /// Woken when a backend fails a request: passive health looks at the streaks.
    failed: tokio::sync::Notify,
}

impl std::fmt::Debug for RequestCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCounts")
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl RequestCounts {
    /// Counters for ids `0..entries`.
    pub fn new(entries: usize) -> Self {
        RequestCounts {
            entries: (0..entries).map(|_| Entry::default()).collect(),
            failed: tokio::sync::Notify::new(),
        }
    }

    fn entry(&self, id: u32) -> Option<&Entry> {
        self.entries.get(id as usize)
    }

    fn lock(entry: &Entry) -> std::sync::MutexGuard<'_, Learnt> {
        // Every edit is one assignment: consistent after a panic elsewhere.
        entry.speeds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Start `id` over from zero: it has a new backend.
    pub fn reset(&self, id: u32) {
        let Some(entry) = self.entry(id) else { return };
        entry.generation.fetch_add(1, Ordering::AcqRel);
        entry.in_flight.store(0, Ordering::Release);
        for count in &entry.answered {
            count.store(0, Ordering::Release);
        }
        entry.failures_in_a_row.store(0, Ordering::Release);
        entry.prompt_tokens.store(0, Ordering::Release);
        entry.generated_tokens.store(0, Ordering::Release);
        *Self::lock(entry) = Learnt::default();
    }

    /// A request sent to `id`: in flight until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>, id: u32) -> InFlight {
        let generation = self.entry(id).map(|entry| {
            entry.in_flight.fetch_add(1, Ordering::AcqRel);
            entry.generation.load(Ordering::Acquire)
        });
        InFlight {
            counts: Arc::clone(self),
            id,
            generation,
        }
    }

    /// `id`'s counters now.
    pub fn get(&self, id: u32) -> BackendRequests {
        let Some(entry) = self.entry(id) else {
            return BackendRequests::default();
        };
        let learnt = Self::lock(entry);
        BackendRequests {
            requests: RequestCounters {
                in_flight: entry.in_flight.load(Ordering::Acquire),
                by_class: Class::ALL
                    .iter()
                    .zip(&entry.answered)
                    .map(|(class, n)| (class.name(), n.load(Ordering::Acquire)))
                    .collect(),
            },
            tokens: Tokens {
                prompt: entry.prompt_tokens.load(Ordering::Acquire),
                generated: entry.generated_tokens.load(Ordering::Acquire),
            },
            speed: Speeds {
                backend: learnt.backend,
                models: learnt.models.iter().cloned().collect(),
            },
        }
    }

    /// Requests `id` failed in a row: 5xx answers (not llama.cpp's loading 503), connections
    /// refused, reset or timed out, answers cut short.
    pub fn failures_in_a_row(&self, id: u32) -> u64 {
        self.entry(id)
            .map_or(0, |e| e.failures_in_a_row.load(Ordering::Acquire))
    }

    /// Start `id`'s streak over (it was ejected for it).
    pub fn forget_failures(&self, id: u32) {
        if let Some(entry) = self.entry(id) {
            entry.failures_in_a_row.store(0, Ordering::Release);
        }
    }

    /// Completes once a backend failed a request since the last time it completed.
    pub async fn failure(&self) {
        self.failed.notified().await;
    }

    /// `id`'s decode speed average, if any answer measured one.
    pub fn decode_speed(&self, id: u32) -> Option<f64> {
        let entry = self.entry(id)?;
        Self::lock(entry).backend.decode_tokens_per_second
    }

    /// `id`'s pace, once answers measured both its parts.
    pub fn pace(&self, id: u32) -> Option<Pace> {
        let entry = self.entry(id)?;
        let speed = Self::lock(entry).backend;
        Some(Pace {
            decode_tokens_per_second: speed.decode_tokens_per_second?,
            prompt_tokens_per_second: speed.prompt_tokens_per_second,
            generated_tokens_per_answer: speed.generated_tokens_per_answer?,
        })
    }
}

/// How fast a backend gets through its answers: what the choice estimates a wait by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pace {
    /// The backend's, all its requests together.
    pub decode_tokens_per_second: f64,
    /// `None` until a prompt of [`MIN_PROMPT_TOKENS`] or more measured it.
    pub prompt_tokens_per_second: Option<f64>,
    pub generated_tokens_per_answer: f64,
}

impl Pace {
    /// Seconds to evaluate `prompt` tokens (none while the prompt speed is unknown) and
    /// generate `tokens` beside `others` requests in flight (each at an equal share of the
    /// speed).
    pub fn seconds(&self, prompt: f64, tokens: f64, others: u64) -> f64 {
        let evaluating = self
            .prompt_tokens_per_second
            .map_or(0.0, |speed| prompt / speed);
        (evaluating + tokens / self.decode_tokens_per_second) * (others + 1) as f64
    }

    /// Answers it completes per second while busy: when one of its slots frees, on average.
    pub fn answers_per_second(&self) -> f64 {
        self.decode_tokens_per_second / self.generated_tokens_per_answer.max(1.0)
    }
}

/// Each backend's speed relative to the fastest among `speeds`, clamped to
/// [`MIN_SPEED_FACTOR`]..=1; a backend not measured yet counts as the fastest (it gets its share
/// and with it a measurement). A server three times slower than the fastest gets 1/3.
pub fn speed_factors(speeds: &[Option<f64>]) -> Vec<f64> {
    let fastest = speeds.iter().flatten().copied().fold(0.0, f64::max);
    speeds
        .iter()
        .map(|speed| match speed {
            Some(speed) if fastest > 0.0 => (speed / fastest).clamp(MIN_SPEED_FACTOR, 1.0),
            _ => 1.0,
        })
        .collect()
}

/// A request on its way to a backend (see [`RequestCounts::begin`]).
pub struct InFlight {
    counts: Arc<RequestCounts>,
    id: u32,
    /// The id's generation when it began; `None` for an id beyond the counters.
    generation: Option<u64>,
}

impl InFlight {
    /// The id's entry, while it still has the backend this request went to.
    fn entry(&self) -> Option<&Entry> {
        let entry = self.counts.entry(self.id)?;
        (Some(entry.generation.load(Ordering::Acquire)) == self.generation).then_some(entry)
    }

    /// Count what became of it (once per request): an answer ends the backend's streak of
    /// failures, no answer adds to it. Use [`InFlight::answered_status`] for an answer.
    pub fn answered(&self, class: Class) {
        let failed = matches!(class, Class::Unreachable | Class::Failed);
        self.count(Some(class), Some(failed));
    }

    /// Count an answer of `status`: 500, 502, 503 (not the loading one: see
    /// [`InFlight::loading`]) and 504 say the server failed and add to its streak; any other
    /// status, a 501 for a feature it was not started with, a 4xx, ends it.
    pub fn answered_status(&self, status: u16) {
        let failed = matches!(status, 500 | 502 | 503 | 504);
        self.count(Some(Class::of_status(status)), Some(failed));
    }

    /// llama.cpp's `503 Loading model`: a 5xx that says nothing against the backend.
    pub fn loading(&self) {
        self.count(Some(Class::ServerError), None);
    }

    /// Its answer, begun, was cut short (it stalled past `idle_timeout`, or ran past
    /// `total_timeout`): a failure of the backend's.
    pub fn cut(&self) {
        self.count(None, Some(true));
    }

    /// Count it under `class`, if any, and add to the backend's streak of failures (`true`),
    /// end it (`false`) or leave it (`None`).
    fn count(&self, class: Option<Class>, failed: Option<bool>) {
        let Some(entry) = self.entry() else { return };
        if let Some(class) = class {
            // `ALL` lists them in declaration order.
            entry.answered[class as usize].fetch_add(1, Ordering::Relaxed);
        }
        match failed {
            Some(true) => {
                entry.failures_in_a_row.fetch_add(1, Ordering::AcqRel);
                self.counts.failed.notify_one();
            }
            Some(false) => entry.failures_in_a_row.store(0, Ordering::Release),
            None => {}
        }
    }

    /// Learn from the answer's `timings`, as model `model` when the answer names one.
    pub fn measured(&self, model: Option<&str>, timings: &Timings) {
        let Some(entry) = self.entry() else { return };
        entry
            .prompt_tokens
            .fetch_add(timings.prompt_n, Ordering::Relaxed);
        entry
            .generated_tokens
            .fetch_add(timings.predicted_n, Ordering::Relaxed);
        // This one is still in flight.
        let together = entry.in_flight.load(Ordering::Acquire);
        let mut learnt = RequestCounts::lock(entry);
        learnt.backend.learn(timings, together);
        let Some(model) = model.filter(|m| m.len() <= MAX_MODEL_NAME) else {
            return;
        };
        let mut speed = match learnt.models.iter().position(|(name, _)| name == model) {
            Some(at) => learnt.models.remove(at).1,
            None => {
                if learnt.models.len() == MAX_MODELS {
                    learnt.models.remove(0);
                }
                Speed::default()
            }
        };
        speed.learn(timings, together);
        learnt.models.push((model.to_owned(), speed));
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(entry) = self.entry() {
            // Saturates: never below zero.
            let _ = entry
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timings(decode: f64, prompt: f64) -> Timings {
        Timings {
            prompt_n: MIN_PROMPT_TOKENS,
            prompt_ms: 1.0,
            prompt_per_second: prompt,
            predicted_n: 20,
            predicted_ms: 1.0,
            predicted_per_second: decode,
        }
    }

    #[test]
    fn the_average_starts_at_the_first_sample_and_moves_a_fifth_towards_each_next() {
        let close = |got: Option<f64>, want: f64| {
            assert!(
                got.is_some_and(|got| (got - want).abs() < 1e-9),
                "{got:?}, not {want}"
            );
        };
        let mut speed = Speed::default();
        speed.learn(&timings(100.0, 1000.0), 1);
        close(speed.decode_tokens_per_second, 100.0);
        close(speed.generated_tokens_per_answer, 20.0);
        speed.learn(
            &Timings {
                predicted_n: 70,
                ..timings(100.0, 1000.0)
            },
            1,
        );
        close(speed.generated_tokens_per_answer, 30.0);
        speed.learn(&timings(50.0, 0.0), 1);
        close(speed.decode_tokens_per_second, 90.0);
        close(speed.prompt_tokens_per_second, 1000.0);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            speed.learn(&timings(bad, bad), 1);
        }
        close(speed.decode_tokens_per_second, 90.0);
        // A mostly cached prompt: its one token's rate is no prompt speed.
        speed.learn(
            &Timings {
                prompt_n: MIN_PROMPT_TOKENS - 1,
                ..timings(90.0, 10.0)
            },
            1,
        );
        close(speed.prompt_tokens_per_second, 1000.0);
        // A backend that turns 3x slower: 10 answers later the average has closed 89% of the
        // gap (0.8^10 of it is left).
        for _ in 0..10 {
            speed.learn(&timings(30.0, 1000.0), 1);
        }
        close(
            speed.decode_tokens_per_second,
            30.0 + 60.0 * 0.8f64.powi(10),
        );
    }

    #[test]
    fn a_pace_times_an_answer_beside_the_others_and_counts_answers_per_busy_second() {
        let mut pace = Pace {
            decode_tokens_per_second: 60.0,
            prompt_tokens_per_second: None,
            generated_tokens_per_answer: 20.0,
        };
        assert_eq!(
            pace.seconds(100.0, 30.0, 0),
            0.5,
            "the prompt speed unknown"
        );
        assert_eq!(pace.seconds(0.0, 30.0, 2), 1.5, "a third of the speed");
        pace.prompt_tokens_per_second = Some(200.0);
        assert_eq!(pace.seconds(100.0, 30.0, 0), 1.0);
        assert_eq!(pace.answers_per_second(), 3.0);
    }

    #[test]
    fn factors_are_relative_to_the_fastest_clamped_and_unmeasured_counts_as_fastest() {
        assert_eq!(
            speed_factors(&[Some(90.0), Some(30.0), None, Some(1.0)]),
            [1.0, 1.0 / 3.0, 1.0, MIN_SPEED_FACTOR]
        );
        assert_eq!(speed_factors(&[None, None]), [1.0, 1.0]);
        assert_eq!(speed_factors(&[]), Vec::<f64>::new());
    }

    #[test]
    fn counts_by_class_tokens_and_in_flight_until_the_guard_drops() {
        let counts = Arc::new(RequestCounts::new(4));
        let first = counts.begin(2);
        let second = counts.begin(2);
        assert_eq!(counts.get(2).requests.in_flight, 2);
        first.answered(Class::of_status(200));
        first.measured(Some("a"), &timings(50.0, 500.0));
        second.answered(Class::Unreachable);
        drop((first, second));
        let got = counts.get(2);
        assert_eq!(got.requests.in_flight, 0);
        assert_eq!(got.requests.by_class["2xx"], 1);
        assert_eq!(got.requests.by_class["unreachable"], 1);
        assert_eq!(got.requests.by_class["5xx"], 0);
        assert_eq!(got.requests.by_class.len(), Class::ALL.len());
        assert_eq!(
            got.tokens,
            Tokens {
                prompt: MIN_PROMPT_TOKENS,
                generated: 20
            }
        );
        // Measured with two in flight: the backend does twice the answer's own rate.
        assert_eq!(got.speed.backend.decode_tokens_per_second, Some(100.0));
        assert_eq!(got.speed.models["a"].prompt_tokens_per_second, Some(1000.0));
        assert_eq!(counts.decode_speed(2), Some(100.0));
        assert_eq!(counts.get(1), {
            let mut zero = BackendRequests::default();
            zero.requests.by_class = Class::ALL.iter().map(|c| (c.name(), 0)).collect();
            zero
        });
        // Beyond the ids: nothing counted, nothing panics.
        let beyond = counts.begin(9);
        beyond.answered(Class::Success);
        assert_eq!(counts.decode_speed(9), None);
    }

    #[test]
    fn a_new_backend_on_the_id_starts_over_and_the_old_ones_requests_do_not_count() {
        let counts = Arc::new(RequestCounts::new(1));
        let old = counts.begin(0);
        old.measured(None, &timings(10.0, 10.0));
        counts.reset(0);
        assert_eq!(counts.decode_speed(0), None);
        let new = counts.begin(0);
        old.answered(Class::Success);
        old.measured(None, &timings(10.0, 10.0));
        drop(old);
        let got = counts.get(0);
        assert_eq!(got.requests.in_flight, 1, "only the new backend's");
        assert_eq!(got.requests.by_class["2xx"], 0);
        assert_eq!(got.tokens, Tokens::default());
        assert_eq!(counts.decode_speed(0), None);
        drop(new);
        assert_eq!(counts.get(0).requests.in_flight, 0);
    }

    #[test]
    fn model_speeds_are_bounded_and_the_least_recently_measured_goes() {
        let counts = Arc::new(RequestCounts::new(1));
        let request = counts.begin(0);
        for n in 0..MAX_MODELS {
            request.measured(Some(&format!("m{n}")), &timings(1.0 + n as f64, 1.0));
        }
        // m0 measured again: m1 is now the oldest.
        request.measured(Some("m0"), &timings(1.0, 1.0));
        request.measured(Some("new"), &timings(1.0, 1.0));
        request.measured(Some(&"x".repeat(MAX_MODEL_NAME + 1)), &timings(1.0, 1.0));
        let models = counts.get(0).speed.models;
        assert_eq!(models.len(), MAX_MODELS);
        assert!(models.contains_key("m0") && models.contains_key("new"));
        assert!(!models.contains_key("m1"), "{models:?}");
    }
}
