//! The ranges of the settings a generation takes from its user (command-line flags, request
//! fields), derived from the model and the request where they depend on them, and the memory a
//! generation will hold, computed from the model's shapes before any of it is allocated. The
//! command line and the server check through these, so a value is refused alike whichever way
//! it came in, and arithmetic on users' values is checked (an overflow is a refusal).

use model::HuginnConfig;

use crate::adaptive::{AdaptiveConfig, MAX_STEPS};
use crate::cache::bytes_per_position;
use crate::range::{OutOfRange, within, within_f64};
use crate::sampling::SamplingConfig;
use crate::speculative::SpeculativeConfig;
use crate::strategy::Strategy;

/// The largest exit threshold: the KL and entropy criteria stay below `ln V` (at most 12 for
/// a 2^17 vocabulary), the latent ones near 2, and argmax-stability counts steps (at most
/// [`MAX_STEPS`]); beyond this no criterion differs from "exit at once".
pub const MAX_EXIT_THRESHOLD: f64 = 1e6;

/// The positions a generation needs for a prompt of `prompt` tokens, `new` new ones and
/// `extra` beyond them (speculation's lookahead), refused when they exceed the context.
pub fn positions(model: &HuginnConfig, prompt: usize, new: usize, extra: usize) -> Result<usize, OutOfRange> {
    let context = model.block_size;
    let room = context.saturating_sub(prompt).saturating_sub(extra);
    let needed = prompt.checked_add(new).and_then(|n| n.checked_add(extra));
    match needed {
        Some(n) if n <= context && new >= 1 => Ok(n),
        _ => Err(OutOfRange::new(
            "max_new_tokens",
            format!("in 1..={room} (a prompt of {prompt} tokens in a context of {context})"),
            new,
        )),
    }
}

/// Checks the recurrence settings of sequential generation: the steps, and an exit threshold
/// that is a finite number the criterion can reach.
pub fn check_recurrence(config: &AdaptiveConfig) -> Result<(), OutOfRange> {
    within("num_steps", config.max_steps, 1, MAX_STEPS)?;
    within_f64("exit_threshold", config.threshold, 0.0, MAX_EXIT_THRESHOLD)
}

/// Checks a whole sequential generation against `model`: its recurrence, its sampling and that
/// the prompt and `max_new` new tokens fit the context.
pub fn check_generation(
    model: &HuginnConfig,
    prompt: usize,
    max_new: usize,
    config: &AdaptiveConfig,
    sampling: &SamplingConfig,
) -> Result<(), OutOfRange> {
    check_recurrence(config)?;
    sampling.check(model.vocab_size)?;
    positions(model, prompt, max_new, 0).map(drop)
}

/// Checks self-speculative decoding's knobs: its draft and verifying depths, the acceptance
/// threshold, and that the lookahead fits the context after the prompt and `max_new` tokens.
pub fn check_speculative(
    model: &HuginnConfig,
    prompt: usize,
    max_new: usize,
    config: &SpeculativeConfig,
) -> Result<(), OutOfRange> {
    within("draft_steps", config.draft_steps, 1, MAX_STEPS)?;
    within("num_steps", config.verify_steps, 1, MAX_STEPS)?;
    if !(config.threshold > 0.0 && config.threshold <= 1.0) {
        return Err(OutOfRange::new("accept_threshold", "in (0, 1]", config.threshold));
    }
    let room = model.block_size.saturating_sub(prompt).saturating_sub(max_new);
    within("lookahead", config.lookahead, 1, room.max(1))?;
    positions(model, prompt, max_new, config.lookahead).map(drop)
}

/// Bytes the KV cache of `batch` rows holds at most over `positions` positions, each token
/// iterated up to `steps` times through `strategy`; `None` when that overflows.
pub fn kv_cache_bytes(
    model: &HuginnConfig,
    strategy: Strategy,
    steps: usize,
    positions: usize,
    batch: usize,
    element_bytes: usize,
) -> Option<usize> {
    bytes_per_position(strategy, model, steps, element_bytes)
        .checked_mul(positions)?
        .checked_mul(batch)
}

/// A generation that would hold more memory than it may.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{what} would take {}, more than the {} {limit}", gib(*.needed), gib(*.available))]
pub struct OutOfMemory {
    pub what: String,
    /// `usize::MAX` when the count overflowed.
    pub needed: usize,
    pub available: usize,
    /// Whose limit it is ("this machine has available", "of the server's KV budget").
    pub limit: String,
}

/// `needed` bytes (`None`: more than can be counted) within `available`, or the refusal.
pub fn check_memory(what: &str, needed: Option<usize>, available: usize, limit: &str) -> Result<(), OutOfMemory> {
    match needed {
        Some(n) if n <= available => Ok(()),
        _ => Err(OutOfMemory {
            what: what.to_string(),
            needed: needed.unwrap_or(usize::MAX),
            available,
            limit: limit.to_string(),
        }),
    }
}

/// Bytes of memory the system can still give this process without swapping (Linux's
/// `MemAvailable`); `None` where that is not known.
pub fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Checks `needed` bytes against the memory this machine has available (nothing where that is
/// not known).
pub fn check_machine_memory(what: &str, needed: Option<usize>) -> Result<(), OutOfMemory> {
    match available_memory() {
        Some(available) => check_memory(what, needed, available, "this machine has available"),
        None => Ok(()),
    }
}

/// Bytes as GiB (MiB below one GiB), for messages.
fn gib(bytes: usize) -> String {
    if bytes == usize::MAX {
        return "more bytes than can be counted".into();
    }
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warm_start::WarmStart;

    #[test]
    fn ranges_name_the_setting_and_the_value() {
        let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1));
        assert_eq!(
            positions(&model, 250, 7, 0).unwrap_err().to_string(),
            "max_new_tokens must be in 1..=6 (a prompt of 250 tokens in a context of 256) (got 7)"
        );
        assert!(positions(&model, 3, usize::MAX, 0).is_err(), "no overflow");
        assert!(positions(&model, 3, 0, 0).is_err());
        assert_eq!(positions(&model, 250, 6, 0), Ok(256));
        let mut config = AdaptiveConfig::fixed(4, WarmStart::Cold, Strategy::default());
        config.threshold = f64::NAN;
        let err = check_recurrence(&config).unwrap_err().named("--exit-threshold");
        assert_eq!(
            err.to_string(),
            "--exit-threshold must be a number in [0, 1000000] (got NaN)"
        );
        let speculative = SpeculativeConfig {
            draft_steps: 2,
            lookahead: usize::MAX,
            verify_steps: 8,
            threshold: 1.0,
        };
        let err = check_speculative(&model, 6, 10, &speculative).unwrap_err();
        assert_eq!(err.name, "lookahead");
    }

    #[test]
    fn memory_is_counted_without_overflow_and_refused_over_the_limit() {
        let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1));
        let full = Strategy::default();
        // (1 prelude + 2·4 core + 1 coda) slots × keys and values × 32 floats × 4 bytes.
        assert_eq!(
            kv_cache_bytes(&model, full, 4, 10, 2, 4),
            Some(10 * 2 * 10 * 2 * 32 * 4)
        );
        assert_eq!(kv_cache_bytes(&model, full, 4, usize::MAX, 2, 4), None);
        let err = check_memory("this run", Some(3 << 30), 1 << 30, "this machine has available").unwrap_err();
        assert_eq!(
            err.to_string(),
            "this run would take 3.0 GiB, more than the 1.0 GiB this machine has available"
        );
        assert!(check_memory("x", None, usize::MAX, "y").is_err());
        assert!(available_memory().is_none_or(|b| b > 0));
    }
}
