//! The prelude/core/coda layer counts as the command lines write them (`--layers 2,4,2`).

use crate::limits::MAX_LAYERS;

/// Parses `prelude,core,coda`; the core needs at least one layer (it is what recurs), and
/// none has more than `MAX_LAYERS`.
pub fn parse_layers(s: &str) -> Result<(usize, usize, usize), String> {
    let parts: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("layers are three counts like 1,2,1: {e}"))?;
    match parts[..] {
        [p, c, o] if [p, c, o].iter().any(|&n| n as u64 > MAX_LAYERS) => {
            Err(format!("layers are counts of at most {MAX_LAYERS} each"))
        }
        [p, c, o] if c > 0 => Ok((p, c, o)),
        _ => Err("layers are three counts like 1,2,1 (the core needs at least one)".to_string()),
    }
}
