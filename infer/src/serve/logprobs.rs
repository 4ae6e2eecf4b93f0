//! The answer of a scoring request (`logprobs`, `echo`) in OpenAI's legacy completions format:
//! the text, and per token its text, log probability, most likely alternatives and where its
//! text starts. With `echo` the prompt's tokens come first, the first of them with `null`
//! (nothing precedes it to predict it from).

use serde_json::{Map, Value, json};
use tokenizers::Tokenizer;

use crate::score::TokenScore;

/// The answer's text and its `logprobs` object, for `answer` after `prompt` (`prompt` holds the
/// prompt's scores when the request echoes it, its first token in `first`).
pub fn completion(
    tokenizer: Option<&Tokenizer>,
    echo: Option<(u32, &[TokenScore])>,
    answer: &[TokenScore],
) -> (String, Value) {
    let mut ids = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    if let Some((first, prompt)) = echo {
        ids.push(first);
        token_logprobs.push(Value::Null);
        top_logprobs.push(Value::Null);
        for score in prompt {
            ids.push(score.token);
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
    let mut offset = 0;
    for (i, &id) in ids.iter().enumerate() {
        offsets.push(offset);
        offset += match tokenizer {
            Some(_) => piece(tokenizer, id, true).chars().count(),
            None => tokens[i].len() + 1,
        };
    }
    let text = match tokenizer {
        Some(tokenizer) => tokenizer.decode(&ids, true).unwrap_or_default(),
        None => tokens.join(","),
    };
    let logprobs = json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    });
    (text, logprobs)
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
