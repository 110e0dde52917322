//! The crash back-off, for workers and for the zygote alike: the first crash is retried at once, each further
//! one within `CRASH_WINDOW` of the others doubles the wait (from 100 ms up to `MAX_BACKOFF`), so an app that
//! keeps crashing does not spin the CPU, and one that crashed long ago starts over from no wait.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// A crash within this window of the previous ones counts towards the back-off.
const CRASH_WINDOW: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The recent crashes of one kind of process.
#[derive(Default)]
pub(super) struct Backoff {
    crashes: VecDeque<Instant>,
}

impl Backoff {
    /// Counts a crash now: returns the number of crashes within the window (this one included) and how long
    /// to wait before starting the process again.
    pub(super) fn crashed(&mut self) -> (u32, Duration) {
        self.crashed_at(Instant::now())
    }

    fn crashed_at(&mut self, now: Instant) -> (u32, Duration) {
        self.crashes.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
        self.crashes.push_back(now);
        let recent = self.crashes.len() as u32;
        let delay = match recent {
            0 | 1 => Duration::ZERO,
            n => (Duration::from_millis(100) * 2u32.saturating_pow(n.min(10) - 1)).min(MAX_BACKOFF),
        };
        (recent, delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_within_the_window_up_to_the_cap_and_starts_over_after_it() {
        let mut backoff = Backoff::default();
        let start = Instant::now();
        let delays: Vec<Duration> = (0..9).map(|_| backoff.crashed_at(start).1).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(delays, [0, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000].map(ms));
        assert_eq!(backoff.crashed_at(start + CRASH_WINDOW), (1, Duration::ZERO));
    }
}
