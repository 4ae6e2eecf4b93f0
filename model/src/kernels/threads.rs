//! The calling thread as one of rayon's workers, and the other workers kept awake while it works.
//!
//! burn-flex and this crate's fused kernels split their work over rayon's global pool. Called
//! from a thread outside the pool, every parallel operation wakes the pool's workers and blocks
//! until they finish: at a decoding step's products (10-30 µs each, hundreds per token) the wake-up
//! costs about as much as the work. With the calling thread in the pool, it starts on its own
//! share at once and the other worker joins when it can.
//!
//! "When it can" is the second cost. An idle rayon worker looks for work a few dozen times, then
//! sleeps, and waking it takes a futex call and, on a virtual machine, an interrupt through the
//! hypervisor. On one 2-core VM that made batch-1 decoding slower on two threads than on one
//! (26-31 against 37 tok/s). OpenMP runtimes, which torch and MKL use, keep their workers
//! spinning for a while after each parallel region for this reason; [`keep_warm`] does the same
//! for the pool, in the binaries that joined it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The pool index of the thread that joined the pool ([`join_the_pool`]), `usize::MAX` while
/// none has: only that thread's kernels keep the other workers awake.
static JOINED: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Workers now polling for work on [`keep_warm`]'s behalf.
static POLLING: AtomicUsize = AtomicUsize::new(0);

/// How long a worker kept awake polls without finding work before it goes back to rayon's own
/// idling (and sleep). Longer than the pause between two decoding steps or two training
/// operations; short enough that an idle process stops burning a core at once.
const WARM_FOR: Duration = Duration::from_millis(10);

/// Builds rayon's global pool with the calling thread as one of its workers (one thread per core
/// in all). Call it first thing in a binary whose work runs on its main thread (a CLI command, a
/// benchmark, a training run), before anything else uses rayon; not on a thread that goes on to
/// block in another runtime (an async server's), which would take a worker away from the pool.
/// Returns whether it took effect: `false` where the pool already exists, which only costs speed.
pub fn join_the_pool() -> bool {
    let joined = rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global()
        .is_ok();
    if let (true, Some(index)) = (joined, rayon::current_thread_index()) {
        JOINED.store(index, Ordering::Relaxed);
    }
    joined
}

/// The calling thread as a worker of a new pool of one thread per core, for as long as the
/// returned pool lives: for a long-lived thread that does the process's model work but is not
/// its main thread (the server's engine, beside an async runtime that may already have built
/// the global pool). Its kernels then split their work as a CLI command's do on its main thread,
/// and [`keep_warm`] keeps this pool's other workers awake for it. `None` where the pool cannot
/// be built, which only costs speed.
pub fn join_a_new_pool() -> Option<rayon::ThreadPool> {
    let pool = rayon::ThreadPoolBuilder::new().use_current_thread().build().ok()?;
    if let Some(index) = rayon::current_thread_index() {
        JOINED.store(index, Ordering::Relaxed);
    }
    Some(pool)
}

/// Keeps the pool's other workers looking for work, without sleeping, until none has come for
/// [`WARM_FOR`]. Kernels that split a few microseconds of work over the pool call it first; it
/// costs one atomic load while the workers are awake. It does nothing unless the calling thread
/// is the one that joined the pool: elsewhere (tests, the server, a worker running a task)
/// several threads share the cores and a spinning worker would take time from them, or the
/// caller itself might pick up its broadcast and spin when its work is done. Returns whether
/// the other workers are kept awake for the caller, so that smaller work is worth splitting.
pub fn keep_warm() -> bool {
    let threads = rayon::current_num_threads();
    let caller = JOINED.load(Ordering::Relaxed);
    if threads < 2 || rayon::current_thread_index() != Some(caller) {
        return false;
    }
    if POLLING.load(Ordering::Relaxed) > 0
        || POLLING
            .compare_exchange(0, threads - 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
    {
        return true;
    }
    // A broadcast reaches every worker, each in its own queue (a plain spawn could be taken by
    // the caller itself while it waits in a join, and spin there instead of working).
    rayon::spawn_broadcast(move |context| {
        if context.index() == caller {
            return;
        }
        let mut found = Instant::now();
        loop {
            match rayon::yield_now() {
                Some(rayon::Yield::Executed) => found = Instant::now(),
                _ if found.elapsed() >= WARM_FOR => break,
                _ => std::hint::spin_loop(),
            }
        }
        POLLING.fetch_sub(1, Ordering::AcqRel);
    });
    true
}

/// How many workers [`keep_warm`] keeps polling now (0 once they went back to idling).
pub fn polling_workers() -> usize {
    POLLING.load(Ordering::Relaxed)
}
