//! Text out of generation as it happens: each new token is decoded against the tokens before
//! it (a token alone may be half a character, or lose a leading space), the new part of the
//! text goes through the stop strings, and what they release is handed on at once.

use std::ops::ControlFlow;

use model::{Huginn, InputError};
use thiserror::Error;
use tokenizers::Tokenizer;

use crate::adaptive::{self, AdaptiveConfig, AdaptiveGeneration, Decoding};
use crate::stop::{Released, StopStrings};

/// Token ids to text.
pub trait Detokenizer {
    fn text(&self, ids: &[u32]) -> Result<String, String>;
}

/// Special tokens are left out of the text: they mark structure (`<|end_turn|>`), not words.
impl Detokenizer for Tokenizer {
    fn text(&self, ids: &[u32]) -> Result<String, String> {
        self.decode(ids, true).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Error)]
pub enum TextError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("cannot decode the generated tokens: {0}")]
    Decode(String),
    #[error("cannot write the generated text: {0}")]
    Write(#[from] std::io::Error),
}

/// Generated tokens turned into text piece by piece, cut at the first stop string.
pub struct TextStream<'a, D: ?Sized> {
    decoder: &'a D,
    ids: Vec<u32>,
    /// Bytes of the decoded text already passed to the stop strings.
    sent: usize,
    stops: StopStrings,
}

impl<'a, D: Detokenizer + ?Sized> TextStream<'a, D> {
    pub fn new(decoder: &'a D, stop_strings: impl IntoIterator<Item = String>) -> Self {
        Self {
            decoder,
            ids: Vec::new(),
            sent: 0,
            stops: StopStrings::new(stop_strings),
        }
    }

    /// Adds a token. The sequence is decoded whole, so the pieces add up to the decoding of all
    /// tokens; text ending in U+FFFD (a character whose bytes have not all arrived) waits for
    /// the next token.
    pub fn push(&mut self, id: u32) -> Result<Released, TextError> {
        self.ids.push(id);
        let text = self.decode()?;
        if text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(Released::default());
        }
        Ok(self.send(&text))
    }

    /// What is left when generation ends: text held back for a stop string that never came,
    /// and an unfinished character.
    pub fn finish(&mut self) -> Result<String, TextError> {
        let text = self.decode()?;
        let last = self.send(&text);
        Ok(if last.stopped {
            last.text
        } else {
            last.text + &self.stops.finish()
        })
    }

    /// Adaptive generation for one prompt that hands the text to `on_text` as it is generated
    /// and ends at the first stop string (or a stop token, or `max_new` tokens).
    pub fn generate(
        mut self,
        model: &Huginn,
        prompt: &[u32],
        max_new: usize,
        config: AdaptiveConfig,
        decoding: &Decoding,
        mut on_text: impl FnMut(&str) -> std::io::Result<()>,
    ) -> Result<TextGeneration, TextError> {
        let mut text = String::new();
        let generation = adaptive::try_generate_streaming(model, prompt, max_new, config, decoding, |token, _| {
            let piece = self.push(token)?;
            on_text(&piece.text)?;
            text += &piece.text;
            Ok::<_, TextError>(if piece.stopped {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        })?;
        let rest = self.finish()?;
        on_text(&rest)?;
        text += &rest;
        Ok(TextGeneration { text, generation })
    }

    fn decode(&self) -> Result<String, TextError> {
        self.decoder.text(&self.ids).map_err(TextError::Decode)
    }

    /// Passes on the text after what was sent. A decoder that rewrites earlier text (none of
    /// the byte-level ones do) cannot take back what was shown; the stream goes on from the
    /// same byte offset.
    fn send(&mut self, text: &str) -> Released {
        let from = text.ceil_char_boundary(self.sent);
        self.sent = text.len().max(self.sent);
        self.stops.push(&text[from..])
    }
}

/// Generated text and the generation behind it (its tokens include the one that completed a
/// stop string or is a stop token).
#[derive(Debug, Clone, PartialEq)]
pub struct TextGeneration {
    /// The text up to the first stop string (special tokens left out).
    pub text: String,
    pub generation: AdaptiveGeneration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::Strategy;
    use crate::warm_start::WarmStart;
    use model::HuginnConfig;
    use model::burn::prelude::Device;

    /// Each id is a run of bytes; invalid UTF-8 decodes lossily, as byte-level tokenizers do.
    struct Bytes(Vec<&'static [u8]>);

    impl Detokenizer for Bytes {
        fn text(&self, ids: &[u32]) -> Result<String, String> {
            let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.0[i as usize].iter().copied()).collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    fn stream(decoder: &Bytes, stops: &[&str], ids: &[u32]) -> (Vec<String>, String, bool) {
        let mut s = TextStream::new(decoder, stops.iter().map(|s| s.to_string()));
        let mut pieces = Vec::new();
        for &id in ids {
            let r = s.push(id).unwrap();
            pieces.push(r.text);
            if r.stopped {
                return (pieces, s.finish().unwrap(), true);
            }
        }
        (pieces, s.finish().unwrap(), false)
    }

    #[test]
    fn characters_split_across_tokens_wait_for_their_last_byte() {
        // "é" is C3 A9; "€" is E2 82 AC.
        let d = Bytes(vec![b"caf", b"\xC3", b"\xA9", b" \xE2\x82", b"\xAC!"]);
        let (pieces, rest, stopped) = stream(&d, &[], &[0, 1, 2, 3, 4]);
        assert_eq!(pieces, ["caf", "", "é", "", " €!"]);
        assert!(rest.is_empty() && !stopped);
        // A character still unfinished at the end comes out as the decoder has it.
        let (pieces, rest, _) = stream(&d, &[], &[0, 1]);
        assert_eq!((pieces.concat(), rest), ("caf".into(), "\u{FFFD}".into()));
    }

    #[test]
    fn stop_strings_are_found_across_tokens_and_cut_the_text() {
        let d = Bytes(vec![b"Hello", b" wor", b"ld\nUs", b"er", b": hi", b"\xC3", b"\xA9"]);
        let (pieces, rest, stopped) = stream(&d, &["\nUser:"], &[0, 1, 2, 3, 4]);
        assert!(stopped);
        assert_eq!(pieces, ["Hello", " wor", "ld", "", ""]);
        assert!(rest.is_empty());
        // A stop string that begins with a character split across tokens.
        let (pieces, _, stopped) = stream(&d, &["é"], &[0, 5, 6, 1]);
        assert!(stopped);
        assert_eq!(pieces.concat(), "Hello");
        // Held-back text that never becomes a stop string comes out at the end.
        let (pieces, rest, stopped) = stream(&d, &["\nUser:"], &[0, 1, 2]);
        assert_eq!(
            (pieces.concat(), rest, stopped),
            ("Hello world".into(), "\nUs".into(), false)
        );
    }

    #[test]
    fn generation_shows_and_returns_the_text_up_to_the_stop_string() {
        let model = HuginnConfig::tiny(8, 32, 4, (1, 2, 1)).init(&Device::flex(), 3);
        let letters = Bytes(vec![b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"]);
        let config = AdaptiveConfig::fixed(2, WarmStart::Cold, Strategy::default());
        let free = adaptive::generate(&model, &[1, 2, 3], 12, config).unwrap().tokens;
        let full = letters.text(&free).unwrap();
        let stop = full[5..7].to_string();
        let at = full.find(&stop).unwrap();
        let mut shown = String::new();
        let out = TextStream::new(&letters, [stop])
            .generate(&model, &[1, 2, 3], 12, config, &Decoding::default(), |piece| {
                shown += piece;
                Ok(())
            })
            .unwrap();
        assert_eq!((out.text.as_str(), shown.as_str()), (&full[..at], &full[..at]));
        assert_eq!(
            out.generation.tokens,
            free[..at + 2],
            "ends with the token that completes it"
        );
    }
}
