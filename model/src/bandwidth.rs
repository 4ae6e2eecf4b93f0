//! How fast this machine reads memory: the ceiling for decoding, which streams the core's
//! weights once per recurrence step. The probe sums a buffer far larger than any cache on every
//! core at once (each core its own slice, eight independent sums so nothing waits on an add) and
//! keeps the best of several passes, as a `torch.sum` over a few GiB measures it. Here rather
//! than in the inference crate because this crate is always built optimised.

use std::time::Instant;

/// Bytes the probe reads: well past the last-level cache of any CPU (96 MiB per chiplet on the
/// largest), small enough to leave room beside a model.
pub const PROBE_BYTES: usize = 1 << 30;

/// Passes over the buffer; the fastest counts (the others met other work on the machine).
const PASSES: usize = 5;

/// Reads `bytes` (rounded down to whole 64-byte lines) with every core and returns the best
/// rate in bytes per second. The caller checks that the machine has the memory.
pub fn measure(bytes: usize) -> f64 {
    let words = bytes / 64 * 8;
    // Written before it is read: untouched pages would all map the one zero page.
    let buffer: Vec<u64> = (0..words as u64).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let slice = words.div_ceil(threads).next_multiple_of(8);
    let mut best = 0.0f64;
    let mut checksum = 0u64;
    for _ in 0..PASSES {
        let started = Instant::now();
        let sums: Vec<u64> = std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(slice.max(8))
                .map(|part| scope.spawn(move || sum(part)))
                .collect();
            handles.into_iter().map(|h| h.join().expect("a probe thread")).collect()
        });
        let seconds = started.elapsed().as_secs_f64();
        checksum = sums.iter().fold(checksum, |a, s| a.wrapping_add(*s));
        best = best.max((words * 8) as f64 / seconds);
    }
    // Used, so that the sums are not optimised away.
    std::hint::black_box(checksum);
    best
}

/// The wrapping sum of `values`, in eight lanes.
fn sum(values: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.wrapping_add(*v);
        }
    }
    let rest = chunks.remainder().iter().fold(0u64, |a, v| a.wrapping_add(*v));
    lanes.iter().fold(rest, |a, v| a.wrapping_add(*v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_value_and_reads_at_a_plausible_rate() {
        let values: Vec<u64> = (0..1003).collect();
        assert_eq!(sum(&values), 1002 * 1003 / 2);
        // 64 MiB: a rate between 100 MB/s and 10 TB/s on any machine this runs on.
        let rate = measure(64 << 20);
        assert!((1e8..1e13).contains(&rate), "{rate}");
    }
}
