//! Named moments where a run can be made to wait to be killed, for the fault-injection tests:
//! with `HUGINN_PAUSE_AT=POINT` (or `POINT:N`, the N-th time it is reached) the process says
//! `paused at POINT` on stderr and waits, so a test can SIGKILL a real run at that exact moment
//! of a checkpoint write, a pruning or a log write. Unset, a point costs one environment lookup.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Times the named point has been reached in this process.
static REACHED: AtomicUsize = AtomicUsize::new(0);

/// Waits forever here if `HUGINN_PAUSE_AT` names this point (and this is its N-th time).
pub fn pause_point(point: &str) {
    let Some(wanted) = std::env::var_os("HUGINN_PAUSE_AT") else {
        return;
    };
    let wanted = wanted.to_string_lossy();
    let (name, nth) = match wanted.split_once(':') {
        Some((name, n)) => (name, n.parse().unwrap_or(1)),
        None => (&*wanted, 1),
    };
    if name != point {
        return;
    }
    if REACHED.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("paused at {point}");
        loop {
            std::thread::park();
        }
    }
}
