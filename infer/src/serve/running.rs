//! A generation request in the engine's running batch: its sequence, and the answer as its
//! client has seen it so far (text held back for stop strings, tokens sent, steps per token).

use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;

use tokenizers::Tokenizer;

use super::engine::{Event, Finish, Job, Shared};
use crate::adaptive::Row;
use crate::continuous::{Chosen, Sequence};
use crate::score;
use crate::text::TextStream;
use folder::ModelFolder;

pub(super) struct Running<'f> {
    pub job: Job,
    pub sequence: Sequence,
    /// The answer's text, through the stop strings (with a tokenizer).
    text: Option<TextStream<'f, Tokenizer>>,
    /// Stop tokens: the request's and the folder's.
    stop_tokens: Vec<u32>,
    sent: usize,
    steps_per_token: Vec<usize>,
    /// KV-cache bytes its admission reserved.
    pub reserved: usize,
    /// The request's last event (its end or failure), held until the engine has taken the
    /// request out of its running count: a client that has its answer sees it gone.
    last: Option<Event>,
}

impl<'f> Running<'f> {
    /// Starts `job`: its prompt's scores first when it asks for them, then its sequence. A
    /// request that cannot start is answered with why, and `None` returned.
    pub fn start(
        folder: &'f ModelFolder,
        job: Job,
        reserved: usize,
        window: NonZeroUsize,
        prompt_scores: Option<Result<Vec<score::TokenScore>, String>>,
    ) -> Option<Self> {
        if let Some(scores) = prompt_scores {
            match scores {
                Ok(prompt) => {
                    let _ = job.events.send(Event::Scored { prompt });
                }
                Err(reason) => {
                    let _ = job.events.send(Event::Failed(reason));
                    return None;
                }
            }
        }
        let mut row: Row = job.row.clone();
        for &id in &folder.stop_tokens {
            if !row.decoding.stop_tokens.contains(&id) {
                row.decoding.stop_tokens.push(id);
            }
        }
        let sequence = match Sequence::new(&folder.model, &row, job.config, window) {
            Ok(sequence) => sequence,
            Err(e) => {
                let _ = job.events.send(Event::Failed(e.to_string()));
                return None;
            }
        };
        let text = folder.tokenizer.as_ref().map(|tokenizer| {
            let stops = folder.stop_strings.iter().chain(&job.stop_strings).cloned();
            TextStream::new(tokenizer, stops)
        });
        let mut running = Self {
            job,
            sequence,
            text,
            stop_tokens: row.decoding.stop_tokens,
            sent: 0,
            steps_per_token: Vec::new(),
            reserved,
            last: None,
        };
        if running.sequence.done() {
            // Nothing to generate (`max_tokens` 0).
            running.finish(Finish::Length);
        }
        Some(running)
    }

    /// Whether the request has ended (answered, failed, or its client left).
    pub fn ended(&self) -> bool {
        self.sequence.done()
    }

    /// Sends the token the sequence chose, and the end when it is the last: its length, a stop
    /// token or a stop string. A client that has left ends the request.
    pub fn deliver(&mut self, chosen: Chosen, shared: &Shared) {
        shared.generated.fetch_add(1, Ordering::AcqRel);
        let id = chosen.id;
        let mut stopped = self.stop_tokens.contains(&id);
        let text = match &mut self.text {
            Some(stream) => match stream.push(id) {
                Ok(released) => {
                    stopped |= released.stopped;
                    released.text
                }
                Err(e) => return self.fail(e.to_string()),
            },
            // Without a tokenizer the text is the token ids, comma separated (as the CLI).
            None if self.sent == 0 => id.to_string(),
            None => format!(",{id}"),
        };
        self.sent += 1;
        self.steps_per_token.push(chosen.steps);
        let score = self
            .job
            .scoring
            .map(|s| score::token_score(&chosen.logits, id, s.top, chosen.steps));
        let token = Event::Token {
            id,
            text,
            steps: chosen.steps,
            score,
        };
        if self.job.events.send(token).is_err() {
            return self.sequence.end();
        }
        if stopped {
            self.finish(Finish::Stop);
        } else if chosen.last {
            self.finish(Finish::Length);
        }
    }

    /// Ends the request with `finish` and the text held back (sent by [`Self::send_last`]).
    pub fn finish(&mut self, finish: Finish) {
        self.sequence.end();
        let tail = match &mut self.text {
            Some(stream) => match stream.finish() {
                Ok(tail) => tail,
                Err(e) => return self.fail(e.to_string()),
            },
            None => String::new(),
        };
        self.last = Some(Event::Done {
            finish,
            tail,
            steps_per_token: std::mem::take(&mut self.steps_per_token),
        });
    }

    /// Ends the request with a failure (sent by [`Self::send_last`]).
    pub fn fail(&mut self, reason: String) {
        self.sequence.end();
        self.last = Some(Event::Failed(reason));
    }

    /// Sends the request's last event, if it has ended with one.
    pub fn send_last(&mut self) {
        if let Some(event) = self.last.take() {
            let _ = self.job.events.send(event);
        }
    }
}
