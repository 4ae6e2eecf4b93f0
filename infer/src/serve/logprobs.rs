//! Log probabilities in OpenAI's formats: the legacy completions object (per token its text,
//! log probability, most likely alternatives and where its text starts; with `echo` the
//! prompt's tokens first, the first of them `null`: nothing precedes it to predict it from),
//! and the chat object (`content`, per token its text, bytes, log probability and
//! alternatives).

use serde_json::{Map, Value, json};
use tokenizers::Tokenizer;

use crate::score::TokenScore;

/// The `logprobs` object for `answer`, after the prompt's tokens and scores when the request
/// echoes it (`prompt[0]` has no score: `scores[i]` is `prompt[i + 1]`'s).
pub fn completion(
    tokenizer: Option<&Tokenizer>,
    echo: Option<(&[u32], &[TokenScore])>,
    answer: &[TokenScore],
) -> Value {
    Completion::default().piece(tokenizer, echo, answer)
}

/// The legacy completions object built a piece at a time, as a streamed answer sends it (one
/// piece per chunk): each piece's text offsets run on from where the last one ended.
#[derive(Debug, Default)]
pub struct Completion {
    offset: usize,
}

impl Completion {
    /// The object for the echoed prompt (if any) followed by `answer`.
    pub fn piece(
        &mut self,
        tokenizer: Option<&Tokenizer>,
        echo: Option<(&[u32], &[TokenScore])>,
        answer: &[TokenScore],
    ) -> Value {
        let mut ids = Vec::new();
        let mut token_logprobs = Vec::new();
        let mut top_logprobs = Vec::new();
        if let Some((prompt, scores)) = echo {
            ids.extend_from_slice(prompt);
            token_logprobs.push(Value::Null);
            top_logprobs.push(Value::Null);
            for score in scores {
                token_logprobs.push(json!(score.logprob));
                top_logprobs.push(alternatives(tokenizer, score));
            }
        }
        for score in answer {
            ids.push(score.token);
            token_logprobs.push(json!(score.logprob));
            top_logprobs.push(alternatives(tokenizer, score));
        }
        // A token's text alone (special tokens by name); offsets count the characters each
        // token adds to the text, which leaves special tokens out (as the answer's text does).
        let tokens: Vec<String> = ids.iter().map(|&id| piece(tokenizer, id, false)).collect();
        let mut offsets = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            offsets.push(self.offset);
            self.offset += match tokenizer {
                Some(_) => piece(tokenizer, id, true).chars().count(),
                None => tokens[i].len() + 1,
            };
        }
        json!({
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        })
    }
}

/// The answer's text after the prompt's (`echo`): the prompt decoded as the answer is (token
/// ids, comma separated, without a tokenizer).
pub fn echoed(tokenizer: Option<&Tokenizer>, prompt: &[u32], answer: &str) -> String {
    match tokenizer {
        Some(tokenizer) => tokenizer.decode(prompt, true).unwrap_or_default() + answer,
        None => {
            let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
            let separator = if answer.is_empty() { "" } else { "," };
            ids.join(",") + separator + answer
        }
    }
}

/// The chat format's `logprobs`: `{"content": [...]}`, per token its text, log probability,
/// UTF-8 bytes and the most likely alternatives (each with the same three), most likely first.
pub fn chat(tokenizer: Option<&Tokenizer>, answer: &[TokenScore]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let token = piece(tokenizer, id, false);
        json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
    };
    let content: Vec<Value> = answer
        .iter()
        .map(|score| {
            let mut first = entry(score.token, score.logprob);
            first["top_logprobs"] = score.top.iter().map(|&(id, logprob)| entry(id, logprob)).collect();
            first
        })
        .collect();
    json!({ "content": content })
}

/// `{token text: log probability}` of the most likely tokens; when two tokens read the same
/// (bytes of an unfinished character), the more likely one is listed.
fn alternatives(tokenizer: Option<&Tokenizer>, score: &TokenScore) -> Value {
    let mut top = Map::new();
    for &(id, logprob) in &score.top {
        top.entry(piece(tokenizer, id, false)).or_insert(json!(logprob));
    }
    Value::Object(top)
}

/// One token's text, or its id without a tokenizer.
fn piece(tokenizer: Option<&Tokenizer>, id: u32, skip_special: bool) -> String {
    match tokenizer {
        Some(tokenizer) => tokenizer.decode(&[id], skip_special).unwrap_or_default(),
        None => id.to_string(),
    }
}
