//! Named moments where a run can be made to wait to be killed, for the fault-injection tests:
//! with `HUGINN_PAUSE_AT=POINT` (or `POINT:N`, the N-th time it is reached) the process says
//! `paused at POINT` on stderr and waits, so a test can SIGKILL a real run at that exact moment
//! of a checkpoint write, a pruning, a log write or a quantized folder's write. The variable is read once; unset, a point
//! costs a load of that answer.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Times the named point has been reached in this process.
static REACHED: AtomicUsize = AtomicUsize::new(0);

/// The point `HUGINN_PAUSE_AT` names and the time (from 1) to wait at it.
fn wanted() -> Option<&'static (String, usize)> {
    static WANTED: OnceLock<Option<(String, usize)>> = OnceLock::new();
    WANTED
        .get_or_init(|| {
            let wanted = std::env::var("HUGINN_PAUSE_AT").ok()?;
            Some(match wanted.split_once(':') {
                Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
                None => (wanted, 1),
            })
        })
        .as_ref()
}

/// Waits forever here if `HUGINN_PAUSE_AT` names this point (and this is its N-th time).
pub fn pause_point(point: &str) {
    let Some((name, nth)) = wanted() else {
        return;
    };
    if name != point {
        return;
    }
    if REACHED.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
        eprintln!("paused at {point}");
        loop {
            std::thread::park();
        }
    }
}
