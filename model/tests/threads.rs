//! The main thread in rayon's pool and the workers it keeps awake (its own test binary: the
//! pool is global, and this test builds it).

use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::Distribution;
use model::kernels::threads::{join_the_pool, keep_warm, polling_workers};
use rayon::prelude::*;

/// Waits until no worker polls any more; fails if they keep spinning.
fn workers_go_idle() {
    let start = Instant::now();
    while polling_workers() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "workers kept spinning with no work"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn workers_kept_warm_do_the_work_and_go_idle_after_it() {
    assert!(join_the_pool(), "the pool existed before this test");
    let threads = rayon::current_num_threads();
    assert_eq!(keep_warm(), threads > 1);
    assert_eq!(polling_workers(), threads - 1, "every other worker polls");

    // Work split over the pool while the others poll: the same results as on one thread.
    let sum: u64 = (0..1_000_000u64).into_par_iter().map(|x| x * 3).sum();
    assert_eq!(sum, 3 * 999_999 * 1_000_000 / 2);
    let device = Device::flex();
    let x = Tensor::<2>::random([4, 512], Distribution::Default, &device);
    let w = Tensor::<2>::random([512, 1536], Distribution::Default, &device);
    let fast = model::kernels::linear::product(x.clone(), w.clone());
    let diff = (fast - x.matmul(w)).abs().max().into_scalar::<f32>();
    assert!(diff < 1e-3, "product while the workers poll: {diff}");
    workers_go_idle();

    // Another thread's kernels (a server's, a test's) leave the workers alone.
    assert!(!std::thread::spawn(keep_warm).join().unwrap());
    assert_eq!(polling_workers(), 0);

    // And the joined thread wakes them again.
    assert_eq!(keep_warm(), threads > 1);
    assert_eq!(polling_workers(), threads - 1);
    workers_go_idle();
}
