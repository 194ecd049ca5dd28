//! Persistent workers that split one product's rows, with a hand-off cheap enough for the
//! thousands of small products a decode runs per second.
//!
//! Decoding one token runs about four matrix-vector products per layer, each a few tens of
//! microseconds of work. rayon's workers go to sleep between such products and waking them
//! costs about as much as the work (measured in this project: splitting a step's products
//! over rayon's pool was slower than one thread). llama.cpp's answer, followed here, is a
//! fixed set of workers that spin between products, so a hand-off is a store and a load on a
//! cache line, and park once no work has come for a while ([`Threads::DEFAULT_SPIN`]), so an
//! idle program or a prompt running on other threads gets the cores back.
//!
//! The calling thread always does one share itself: `n` threads means `n - 1` workers. Jobs
//! own what they read (an `Arc` of the weights and of the prepared activation row), so no
//! borrowed data crosses threads and no `unsafe` is needed; each share returns its own
//! output, which the caller copies into place (a few kilobytes per product).

use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of worker threads for splitting products (see the module docs).
pub struct Threads {
    workers: Vec<Worker>,
    spin: Duration,
}

struct Worker {
    jobs: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Threads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Threads")
            .field("threads", &self.count())
            .field("spin", &self.spin)
            .finish()
    }
}

impl Threads {
    /// How long a worker, or a caller waiting for workers, spins before it parks.
    pub const DEFAULT_SPIN: Duration = Duration::from_micros(500);

    /// `threads` threads in all (the caller and `threads - 1` workers; at least 1), spinning
    /// for `spin` between jobs.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use kv_kernels::Threads;
    ///
    /// let threads = Threads::new(2, Threads::DEFAULT_SPIN);
    /// let parts = threads.split(10, 1, Arc::new(|rows: std::ops::Range<usize>| rows.len()));
    /// let total: usize = parts.iter().map(|(_, n)| n).sum();
    /// assert_eq!(total, 10);
    /// ```
    pub fn new(threads: usize, spin: Duration) -> Self {
        let workers = (1..threads.max(1))
            .map(|i| {
                let (tx, rx) = crossbeam_channel::unbounded::<Job>();
                let handle = std::thread::Builder::new()
                    .name(format!("kv-kernels-{i}"))
                    .spawn(move || worker_loop(&rx, spin))
                    .expect("spawning a kernel worker thread");
                Worker {
                    jobs: Some(tx),
                    handle: Some(handle),
                }
            })
            .collect();
        Self { workers, spin }
    }

    /// The process-wide set, made on first use with [`Threads::configure_global`]'s count, or
    /// `KV_THREADS`, or every core the process may use.
    pub fn global() -> &'static Threads {
        GLOBAL.get_or_init(|| {
            let threads = std::env::var("KV_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n: &usize| n > 0)
                .unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
                });
            Threads::new(threads, Self::DEFAULT_SPIN)
        })
    }

    /// Sets the global set's thread count before its first use; `false` if it already exists
    /// (with another count).
    pub fn configure_global(threads: usize) -> bool {
        let mut made = false;
        let pool = GLOBAL.get_or_init(|| {
            made = true;
            Threads::new(threads, Self::DEFAULT_SPIN)
        });
        made || pool.count() == threads.max(1)
    }

    /// Threads in all, the caller included.
    pub fn count(&self) -> usize {
        self.workers.len() + 1
    }

    /// Cuts `0..len` into up to [`Threads::count`] ranges of at least `min_len` (one range
    /// when `len` is small), runs `task` on each (the first on the calling thread, the rest on
    /// workers) and returns each range with its result, in order.
    ///
    /// # Panics
    /// If `task` panics, on any thread (the worker survives and the panic is reported here).
    pub fn split<T: Send + 'static>(
        &self,
        len: usize,
        min_len: usize,
        task: Arc<dyn Fn(Range<usize>) -> T + Send + Sync>,
    ) -> Vec<(Range<usize>, T)> {
        let parts = self.count().min(len / min_len.max(1)).max(1);
        let ranges: Vec<Range<usize>> = (0..parts)
            .map(|i| i * len / parts..(i + 1) * len / parts)
            .collect();
        if parts == 1 {
            return vec![(0..len, task(0..len))];
        }
        let (done_tx, done_rx) = crossbeam_channel::bounded(parts - 1);
        for (i, range) in ranges.iter().enumerate().skip(1) {
            let (task, done, range) = (Arc::clone(&task), done_tx.clone(), range.clone());
            let job: Job = Box::new(move || {
                let out = task(range);
                // The caller is waiting unless it panicked itself; nothing to do then.
                let _ = done.send((i, out));
            });
            self.workers[i - 1]
                .jobs
                .as_ref()
                .expect("workers live as long as the set")
                .send(job)
                .expect("kernel workers outlive the set");
        }
        drop(done_tx);
        let first = task(ranges[0].clone());
        let mut outs: Vec<Option<T>> = (0..parts).map(|_| None).collect();
        outs[0] = Some(first);
        for _ in 1..parts {
            let (i, out) = spin_recv(&done_rx, self.spin)
                .or_else(|| done_rx.recv().ok())
                .expect("a kernel worker panicked in its share of a product");
            outs[i] = Some(out);
        }
        ranges
            .into_iter()
            .zip(outs)
            .map(|(range, out)| (range, out.expect("every share reported")))
            .collect()
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            drop(worker.jobs.take());
        }
        for worker in &mut self.workers {
            if let Some(handle) = worker.handle.take() {
                let _ = handle.join();
            }
        }
    }
}

static GLOBAL: OnceLock<Threads> = OnceLock::new();

/// A message from `rx`, spinning for up to `spin`; `None` if none came (or all senders left).
fn spin_recv<T>(rx: &Receiver<T>, spin: Duration) -> Option<T> {
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        match rx.try_recv() {
            Ok(message) => return Some(message),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {
                polls = polls.wrapping_add(1);
                // Reading the clock costs more than a poll: look at it now and then.
                if polls.is_multiple_of(64) && start.elapsed() >= spin {
                    return None;
                }
                std::hint::spin_loop();
            }
        }
    }
}

fn worker_loop(jobs: &Receiver<Job>, spin: Duration) {
    loop {
        let job = match spin_recv(jobs, spin) {
            Some(job) => job,
            // Nothing for a while: park until the next job, or leave once the set is dropped.
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        // A panicking task drops its result sender, which the caller reports; the worker
        // itself stays up for the next product.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_index_once_in_order() {
        let threads = Threads::new(3, Threads::DEFAULT_SPIN);
        for len in [0, 1, 2, 5, 100] {
            let parts = threads.split(len, 1, Arc::new(|r: Range<usize>| r.collect::<Vec<_>>()));
            let all: Vec<usize> = parts.into_iter().flat_map(|(_, v)| v).collect();
            assert_eq!(all, (0..len).collect::<Vec<_>>());
        }
    }

    #[test]
    fn small_work_stays_on_the_caller() {
        let threads = Threads::new(4, Threads::DEFAULT_SPIN);
        let parts = threads.split(
            10,
            8,
            Arc::new(|_r: Range<usize>| std::thread::current().id()),
        );
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].1, std::thread::current().id());
    }

    #[test]
    fn a_panicking_share_is_reported_and_the_workers_survive() {
        let threads = Threads::new(2, Duration::from_micros(10));
        let bad = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            threads.split(
                2,
                1,
                Arc::new(|r: Range<usize>| {
                    assert!(r.start == 0, "second share fails");
                    r.len()
                }),
            )
        }));
        assert!(bad.is_err());
        let good = threads.split(2, 1, Arc::new(|r: Range<usize>| r.len()));
        assert_eq!(good.len(), 2);
    }

    #[test]
    fn workers_park_and_wake() {
        let threads = Threads::new(2, Duration::from_micros(1));
        std::thread::sleep(Duration::from_millis(5));
        let parts = threads.split(4, 1, Arc::new(|r: Range<usize>| r.len()));
        assert_eq!(parts.iter().map(|(_, n)| n).sum::<usize>(), 4);
    }
}
