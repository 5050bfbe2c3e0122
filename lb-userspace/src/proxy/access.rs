//! The access log: one line per http request once its answer is done (or refused, cut, or left
//! by the client), as target `steer::access` (`--log-level steer::access=off` silences it): INFO,
//! or WARN when the proxy or a backend failed it. With `--log-format json` each line is a JSON
//! object whose `fields` hold the values below.

use std::net::SocketAddrV4;
use std::time::Duration;

use hyper::Method;
use tokio::time::Instant;

/// What the log says of one request, filled in as it goes.
#[derive(Clone, Debug)]
pub struct Access {
    started: Instant,
    method: Method,
    path: String,
    /// The `model` its body names.
    pub model: Option<String>,
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
    pub fn begin(method: &Method, path: &str) -> Access {
        Access {
            started: Instant::now(),
            method: method.clone(),
            path: path.to_owned(),
            model: None,
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

    /// Write the line: `tokens` are the prompt and generated tokens llama-server reported.
    pub fn log(&self, outcome: Outcome, tokens: Option<(u64, u64)>) {
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
                    path = %self.path,
                    model = self.model.as_deref(),
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

/// Milliseconds to a tenth.
fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 10_000.0).round() / 10.0
}
