//! The calling thread as one of rayon's workers.
//!
//! burn-flex and this crate's fused kernels split their work over rayon's global pool. Called
//! from a thread outside the pool, every parallel operation wakes the pool's workers and blocks
//! until they finish: at a decoding step's products (10-30 µs each, hundreds per token) the wake-up
//! costs about as much as the work. With the calling thread in the pool, it starts on its own
//! share at once and the other worker joins when it can.

/// Builds rayon's global pool with the calling thread as one of its workers (one thread per core
/// in all). Call it first thing in a binary whose work runs on its main thread (a CLI command, a
/// benchmark, a training run), before anything else uses rayon; not on a thread that goes on to
/// block in another runtime (an async server's), which would take a worker away from the pool.
/// Returns whether it took effect: `false` where the pool already exists, which only costs speed.
pub fn join_the_pool() -> bool {
    rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global()
        .is_ok()
}
