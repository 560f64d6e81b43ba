//! Glue for the indexing passes of the block formats (xz, bzip2): decodes independent
//! blocks on the rayon pool, a few ahead of the reader, and hands their bytes out in
//! archive order. The decoder is the one random reads use, so the indexing pass proves
//! that every block decodes on its own.

use std::collections::VecDeque;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// Decodes one job into its bytes.
pub type Decode<J> = Arc<dyn Fn(&J) -> io::Result<Vec<u8>> + Send + Sync>;

/// A job in flight: the job, its cost and where its result arrives.
type Pending<J> = (J, u64, Receiver<io::Result<Vec<u8>>>);

/// Jobs being decoded, oldest first.
pub struct Ahead<J> {
    decode: Decode<J>,
    queue: VecDeque<Pending<J>>,
    /// Sum of the costs (expected output bytes) of the queued jobs.
    cost: u64,
    max_jobs: usize,
    max_cost: u64,
}

impl<J: Clone + Send + 'static> Ahead<J> {
    /// At most `max_jobs` jobs and `max_cost` expected bytes in flight (one job always).
    pub fn new(decode: Decode<J>, max_jobs: usize, max_cost: u64) -> Self {
        Ahead {
            decode,
            queue: VecDeque::new(),
            cost: 0,
            max_jobs: max_jobs.max(1),
            max_cost,
        }
    }

    /// Whether a job of `cost` may start now.
    pub fn has_room(&self, cost: u64) -> bool {
        self.queue.is_empty()
            || (self.queue.len() < self.max_jobs && self.cost.saturating_add(cost) <= self.max_cost)
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Starts decoding `job` on the rayon pool.
    pub fn push(&mut self, job: J, cost: u64) {
        let (tx, rx) = sync_channel(1);
        let decode = self.decode.clone();
        let j = job.clone();
        rayon::spawn(move || {
            // A panic must not abort the process (rayon's default): it becomes an error.
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| decode(&j)))
                .unwrap_or_else(|_| Err(io::Error::other("a block decoder panicked")));
            let _ = tx.send(r);
        });
        self.queue.push_back((job, cost, rx));
        self.cost = self.cost.saturating_add(cost);
    }

    /// Waits for the oldest job; `None` when none is in flight.
    pub fn pop(&mut self) -> Option<(J, io::Result<Vec<u8>>)> {
        let (job, cost, rx) = self.queue.pop_front()?;
        self.cost = self.cost.saturating_sub(cost);
        let r = rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("a block decoder vanished")));
        Some((job, r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_order_and_panics_are_errors() {
        let decode: Decode<u32> = Arc::new(|&j| {
            if j == 3 {
                panic!("boom");
            }
            std::thread::sleep(std::time::Duration::from_millis(u64::from(10 - j)));
            Ok(vec![j as u8; j as usize])
        });
        let mut a = Ahead::new(decode, 3, 100);
        let mut got = Vec::new();
        let mut next = 0u32;
        while next < 8 || !a.is_empty() {
            while next < 8 && a.has_room(1) {
                a.push(next, 1);
                next += 1;
            }
            let (j, r) = a.pop().unwrap();
            got.push((j, r.map(|v| v.len()).map_err(|e| e.to_string())));
        }
        for (k, (j, r)) in got.iter().enumerate() {
            assert_eq!(*j as usize, k);
            if *j == 3 {
                assert!(r.as_ref().unwrap_err().contains("panicked"));
            } else {
                assert_eq!(*r, Ok(*j as usize));
            }
        }
    }
}
