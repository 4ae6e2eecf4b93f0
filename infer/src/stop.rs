//! Stop strings on a stream of text: generation ends at the first occurrence of any of them,
//! and the text before it is all that is shown. Text arrives in pieces (one per token), so a
//! stop string may straddle pieces: the tail that could still begin one is held back until the
//! next piece settles it.

/// Scans text pieces for stop strings.
#[derive(Debug, Clone)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but not released: it ends with the beginning of a stop string.
    held: String,
    stopped: bool,
}

/// What a piece of text released.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Released {
    /// Text that can be shown: it is not part of any stop string.
    pub text: String,
    /// A stop string was found; `text` ends just before it and nothing follows.
    pub stopped: bool,
}

impl StopStrings {
    /// Empty strings are ignored (they would stop before anything is generated).
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Takes the next piece of text; after a stop nothing more is released.
    pub fn push(&mut self, piece: &str) -> Released {
        if self.stopped {
            return Released {
                text: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(piece);
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first {
            self.stopped = true;
            let mut text = std::mem::take(&mut self.held);
            text.truncate(at);
            return Released { text, stopped: true };
        }
        // Everything before the earliest suffix that begins a stop string is safe: a stop
        // string starting there would have to be found or held now.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let rest = self.held.split_off(keep_from);
        Released {
            text: std::mem::replace(&mut self.held, rest),
            stopped: false,
        }
    }

    /// The text still held back when the stream ends without a stop.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds the pieces and returns what was released and whether it stopped.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()));
        let mut out = String::new();
        for piece in pieces {
            let r = s.push(piece);
            out += &r.text;
            if r.stopped {
                return (out, true);
            }
        }
        out += &s.finish();
        (out, false)
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_caught() {
        assert_eq!(
            run(&["\nUser:"], &["Hello", " there", "\nUs", "er", ": more"]),
            ("Hello there".into(), true)
        );
        assert_eq!(run(&["END"], &["aE", "N", "Dz"]), ("a".into(), true));
        // The earliest of several stop strings wins, wherever it is in the piece.
        assert_eq!(run(&["bc", "ab"], &["xa", "bcd"]), ("x".into(), true));
    }

    #[test]
    fn held_text_is_released_once_it_cannot_start_a_stop_string() {
        let mut s = StopStrings::new(["</s>".to_string()]);
        assert_eq!(s.push("a <").text, "a ");
        assert_eq!(s.push("/").text, "");
        assert_eq!(
            s.push("x"),
            Released {
                text: "</x".into(),
                stopped: false
            }
        );
        assert_eq!(s.push("<").text, "");
        assert_eq!(s.finish(), "<", "the end of the stream releases what was held");
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(
            run(&[""], &["a"]),
            ("a".into(), false),
            "empty stop strings are ignored"
        );
    }

    #[test]
    fn multibyte_text_is_split_only_at_char_boundaries() {
        assert_eq!(run(&["é!"], &["café", "?", "é", "!"]), ("café?".into(), true));
        assert_eq!(run(&["ü"], &["añ", "o"]), ("año".into(), false));
        let mut s = StopStrings::new(["x".to_string()]);
        assert!(s.push("x").stopped);
        assert_eq!(
            s.push("more"),
            Released {
                text: String::new(),
                stopped: true
            }
        );
    }
}
