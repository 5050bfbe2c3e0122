//! llama-server's `timings` read from the end of an answer as it passes to the client: the
//! last [`TAIL`] bytes are kept (copied aside; the client gets every frame at once) and read
//! when the body has ended. llama-server puts `timings` in a non-streamed answer's JSON and in
//! the last event(s) of a stream, with the `model` it answered as shortly before them.
//!
//! The keys are found as raw bytes: `"timings"` followed by `:` cannot occur inside a JSON string
//! (its quotes would be escaped), so whatever text the model generated cannot fake them.

use std::collections::VecDeque;

use crate::requests::Timings;

/// Bytes kept from the end of an answer: a streamed answer's last events (the one with
/// `timings`, then `[DONE]`) or a JSON answer's fields after its content fit many times over.
pub const TAIL: usize = 4096;

/// What the end of an answer says.
#[derive(Debug, PartialEq)]
pub struct Measured {
    /// The `model` it answered as, if the tail names one.
    pub model: Option<String>,
    pub timings: Timings,
}

/// The last [`TAIL`] bytes of an answer.
#[derive(Debug, Default)]
pub struct Tail {
    bytes: VecDeque<u8>,
}

impl Tail {
    /// Keep `data`'s bytes, dropping the oldest beyond [`TAIL`].
    pub fn push(&mut self, data: &[u8]) {
        let kept = &data[data.len().saturating_sub(TAIL)..];
        let over = (self.bytes.len() + kept.len()).saturating_sub(TAIL);
        self.bytes.drain(..over);
        self.bytes.extend(kept);
    }

    /// The answer's last complete `timings`, if the tail holds one.
    pub fn measured(&mut self) -> Option<Measured> {
        measured(self.bytes.make_contiguous())
    }
}

/// The last complete `timings` object in `tail` and the `model` named before it.
pub fn measured(tail: &[u8]) -> Option<Measured> {
    let mut end = tail.len();
    // The last one may be cut off (an answer that ended early): then the one before.
    while let Some((key, value)) = find_key(tail, b"\"timings\"", end) {
        if let Some(timings) = first_value::<Timings>(&tail[value..]) {
            let model = find_key(tail, b"\"model\"", key)
                .and_then(|(_, value)| first_value::<String>(&tail[value..]));
            return Some(Measured { model, timings });
        }
        end = key;
    }
    None
}

/// The last `key` (quoted) before `end` that is followed by a colon: where the key starts and
/// where its value does.
fn find_key(tail: &[u8], key: &[u8], end: usize) -> Option<(usize, usize)> {
    let mut end = end;
    loop {
        let start = tail[..end].windows(key.len()).rposition(|w| w == key)?;
        let after = &tail[start + key.len()..];
        let colon = after.iter().position(|b| !b.is_ascii_whitespace());
        if let Some(colon) = colon.filter(|&at| after[at] == b':') {
            return Some((start, start + key.len() + colon + 1));
        }
        end = start;
    }
}

/// The JSON value at the start of `bytes`, whatever follows it.
fn first_value<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<T>()
        .next()?
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from llama-server (this build, `--alias smol -np 2 -c 2048`) with curl.
    const CHAT: &[u8] = include_bytes!("../../fixtures/llama-server/chat.json");
    const CHAT_STREAM: &[u8] = include_bytes!("../../fixtures/llama-server/chat_stream.sse");
    const COMPLETION: &[u8] = include_bytes!("../../fixtures/llama-server/completion.json");
    const CHAT_ERROR: &[u8] = include_bytes!("../../fixtures/llama-server/chat_error.json");

    fn smol(timings: Timings) -> Option<Measured> {
        Some(Measured {
            model: Some("smol".to_owned()),
            timings,
        })
    }

    /// `body` through a [`Tail`] in frames of `size` bytes.
    fn passed_in_frames(body: &[u8], size: usize) -> Option<Measured> {
        let mut tail = Tail::default();
        for frame in body.chunks(size) {
            tail.push(frame);
        }
        tail.measured()
    }

    #[test]
    fn a_json_answer_and_a_stream_give_their_timings_and_model() {
        let chat = Timings {
            prompt_n: 32,
            prompt_ms: 324.475,
            prompt_per_second: 98.6208490638724,
            predicted_n: 12,
            predicted_ms: 173.858,
            predicted_per_second: 63.27002496290076,
        };
        assert_eq!(measured(CHAT), smol(chat));
        let stream = Timings {
            prompt_n: 1,
            prompt_ms: 14.45,
            prompt_per_second: 69.20415224913495,
            predicted_n: 12,
            predicted_ms: 202.296,
            predicted_per_second: 54.37576620397833,
        };
        assert_eq!(measured(CHAT_STREAM), smol(stream));
        // `/completion` names the model before its settings and prompt, still within the tail.
        let completion = measured(COMPLETION).expect("timings");
        assert_eq!(completion.model.as_deref(), Some("smol"));
        assert_eq!(completion.timings.predicted_n, 8);
    }

    #[test]
    fn frames_split_anywhere_give_the_same_as_the_whole() {
        for body in [CHAT, CHAT_STREAM, COMPLETION] {
            let whole = measured(body);
            assert!(whole.is_some());
            for size in [1, 2, 3, 7, 64, 100, 1000, TAIL, TAIL + 1, body.len()] {
                assert_eq!(passed_in_frames(body, size), whole, "frames of {size}");
            }
        }
    }

    #[test]
    fn only_the_tail_is_kept_and_a_long_stream_still_ends_with_its_timings() {
        let events = CHAT_STREAM
            .split(|&b| b == b'\n')
            .filter(|line| {
                line.starts_with(b"data: {") && !line.windows(9).any(|w| w == b"\"timings\"")
            })
            .flat_map(|line| [line, b"\n\n"].concat())
            .collect::<Vec<u8>>();
        let mut tail = Tail::default();
        for _ in 0..1000 {
            tail.push(&events);
            assert!(tail.bytes.len() <= TAIL);
        }
        assert_eq!(tail.measured(), None, "no timings in the content events");
        tail.push(CHAT_STREAM);
        assert_eq!(tail.bytes.len(), TAIL);
        assert_eq!(tail.measured(), measured(CHAT_STREAM));
    }

    #[test]
    fn no_timings_garbage_and_cut_off_answers_measure_nothing() {
        assert_eq!(measured(CHAT_ERROR), None);
        assert_eq!(measured(b""), None);
        assert_eq!(measured(b"\xff\xfe\x00 \"timings\":"), None);
        assert_eq!(measured(b"\"timings\": {\"prompt_n\": \"many\"}"), None);
        // Cut in the middle of its timings: nothing, not a wrong number.
        let at = CHAT
            .windows(13)
            .position(|w| w == b"\"predicted_n\"")
            .expect("a key");
        assert_eq!(measured(&CHAT[..at + 16]), None);
        // Generated text that spells the keys is escaped: it cannot fake them.
        let fake = br#"{"content":"\"timings\":{\"prompt_n\":1,\"prompt_ms\":1,\"prompt_per_second\":1,\"predicted_n\":1,\"predicted_ms\":1,\"predicted_per_second\":1}"}"#;
        assert_eq!(measured(fake), None);
    }

    #[test]
    fn a_cut_off_last_event_falls_back_to_the_one_before() {
        let mut body = CHAT_STREAM.to_vec();
        body.extend_from_slice(b"data: {\"model\":\"other\",\"timings\":{\"prompt_n\":3,");
        assert_eq!(measured(&body), measured(CHAT_STREAM));
    }
}
