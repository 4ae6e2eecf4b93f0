//! The range of every number a run is configured with, in flags and files alike.
//!
//! The upper ends are what a run on one machine can mean, not what the types hold: depths and
//! step counts past them are hours of silent work per step, and sizes past them are refused
//! by the memory check (`memory`) anyway, which they keep from overflowing. The command lines
//! parse their flags with [`count`], [`count64`] and [`non_negative`], so a value
//! out of range is a one-line error naming the flag.

/// Model width (`n_embd`), and heads.
pub const MAX_WIDTH: u64 = 1 << 16;
pub const MAX_HEADS: u64 = 1 << 10;
/// Layers of each of prelude, core and coda.
pub const MAX_LAYERS: u64 = 1 << 10;
/// Vocabulary (of a trained BPE or a model), and tokens per text row.
pub const MAX_VOCAB: u64 = 1 << 20;
pub const MAX_SEQ_LEN: u64 = 1 << 20;
/// Digits of an addition operand.
pub const MAX_DIGITS: u64 = 1000;
/// Mean (or fixed) training recurrence and its backprop window; evaluation depths, four times
/// the deepest training mean as the default depths reach.
pub const MAX_MEAN_DEPTH: u64 = 256;
pub const MAX_EVAL_DEPTH: u64 = 4 * MAX_MEAN_DEPTH;
/// Rows of a micro-batch, micro-batches of a step, rows of an evaluation split.
pub const MAX_BATCH: u64 = 1 << 16;
pub const MAX_ACCUMULATION: u64 = 1 << 10;
pub const MAX_EVAL_ROWS: u64 = 1 << 16;
/// Optimizer steps, and every count of steps (warmup, cooldown, intervals, curriculum).
pub const MAX_STEPS: u64 = 1 << 32;
/// Checkpoints kept.
pub const MAX_KEEP: u64 = 1 << 10;
/// Seeds: TOML integers are signed 64-bit, and a run's configuration is kept as TOML.
pub const MAX_SEED: u64 = i64::MAX as u64;

/// A count in `LO..=HI` (what a `usize` flag takes).
pub fn count<const LO: u64, const HI: u64>(text: &str) -> Result<usize, String> {
    count64::<LO, HI>(text).map(|n| n as usize)
}

/// A count in `LO..=HI` (what a `u64` flag takes).
pub fn count64<const LO: u64, const HI: u64>(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(n) if (LO..=HI).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from {LO} to {HI}")),
    }
}

/// A finite number of at least 0.
pub fn non_negative(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err("expected a finite number of at least 0".into()),
    }
}

/// Whether `value` lies in `LO..=HI`, or a message naming `field` and the range.
pub fn check(field: &str, value: u64, lo: u64, hi: u64) -> Result<(), String> {
    match (lo..=hi).contains(&value) {
        true => Ok(()),
        false => Err(format!("{field} = {value} is out of range: it must lie in {lo}..={hi}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers_take_their_range_and_nothing_else() {
        assert_eq!(count::<1, 8>("8"), Ok(8));
        for bad in ["0", "9", "-1", "1e9", "nan", "", "18446744073709551616"] {
            assert!(count::<1, 8>(bad).is_err(), "{bad}");
        }
        assert_eq!(non_negative("0"), Ok(0.0));
        for bad in ["-1", "nan", "inf", "-inf", "x"] {
            assert!(non_negative(bad).is_err(), "{bad}");
        }
        assert!(
            check("steps", 0, 1, 2)
                .unwrap_err()
                .starts_with("steps = 0 is out of range")
        );
    }
}
