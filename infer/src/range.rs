//! A setting outside its range, and the two checks that produce it. Every bound a user's value
//! meets (a flag, a request field, a sampler knob) refuses with this one error, so the command
//! line and the server name the setting, its range and the value alike.

use std::fmt::Display;

/// A setting outside its range: which one (by the library's name, which a caller may replace
/// by its own: a flag, a request field), what it must be, and what it was.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{name} must be {range} (got {got})")]
pub struct OutOfRange {
    pub name: String,
    pub range: String,
    pub got: String,
}

impl OutOfRange {
    pub fn new(name: &str, range: impl Into<String>, got: impl Display) -> Self {
        Self {
            name: name.to_string(),
            range: range.into(),
            got: got.to_string(),
        }
    }

    /// The same refusal under the caller's name for the setting.
    pub fn named(self, name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..self
        }
    }
}

/// `value` in `low..=high`, or the refusal naming `name`.
pub fn within(name: &str, value: usize, low: usize, high: usize) -> Result<(), OutOfRange> {
    if (low..=high).contains(&value) {
        Ok(())
    } else {
        Err(OutOfRange::new(name, format!("in {low}..={high}"), value))
    }
}

/// A finite `value` in `[low, high]`.
pub fn within_f64(name: &str, value: f64, low: f64, high: f64) -> Result<(), OutOfRange> {
    if value.is_finite() && (low..=high).contains(&value) {
        Ok(())
    } else {
        Err(OutOfRange::new(name, format!("a number in [{low}, {high}]"), value))
    }
}
