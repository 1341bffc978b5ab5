//! Progress of a copy: a bar on a terminal, plain periodic lines otherwise, nothing when quiet.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::units::human;

/// Counts done work and reports it from a background thread.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    inner: Arc<Inner>,
    quiet: bool,
}

#[derive(Debug, Default)]
struct Inner {
    files: AtomicU64,
    bytes: AtomicU64,
    files_total: AtomicU64,
    bytes_total: AtomicU64,
    done: AtomicBool,
}

/// How far a copy has come: done and total (totals are 0 until the plan is made).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub files: u64,
    pub bytes: u64,
    pub files_total: u64,
    pub bytes_total: u64,
    pub finished: bool,
}

impl Progress {
    /// A reporter writing to stderr; `quiet` reports nothing.
    pub fn new(quiet: bool) -> Progress {
        Progress {
            inner: Arc::default(),
            quiet,
        }
    }

    /// Starts reporting against these totals.
    pub fn start(&self, files: u64, bytes: u64) {
        self.inner.files_total.store(files, Ordering::Relaxed);
        self.inner.bytes_total.store(bytes, Ordering::Relaxed);
        if self.quiet || files == 0 {
            return;
        }
        let inner = self.inner.clone();
        let terminal = std::io::stderr().is_terminal();
        let every = if terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        std::thread::spawn(move || {
            let started = Instant::now();
            while !inner.done.load(Ordering::Relaxed) {
                std::thread::sleep(every);
                let (done_files, done_bytes) = (
                    inner.files.load(Ordering::Relaxed),
                    inner.bytes.load(Ordering::Relaxed),
                );
                let rate = done_bytes as f64 / started.elapsed().as_secs_f64().max(0.001);
                let eta = if rate > 0.0 {
                    (bytes.saturating_sub(done_bytes)) as f64 / rate
                } else {
                    0.0
                };
                let line = format!(
                    "{done_files}/{files} files, {} / {}, {}/s, ETA {:.0}s",
                    human(done_bytes),
                    human(bytes),
                    human(rate as u64),
                    eta
                );
                let mut err = std::io::stderr().lock();
                if terminal {
                    let _ = write!(err, "\r\x1b[2K{line}");
                } else {
                    let _ = writeln!(err, "progress: {line}");
                }
            }
            if terminal {
                let _ = writeln!(std::io::stderr());
            }
        });
    }

    /// One more file of `bytes` is done.
    pub fn advance(&self, bytes: u64) {
        self.inner.files.fetch_add(1, Ordering::Relaxed);
        self.inner.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn finish(&self) {
        self.inner.done.store(true, Ordering::Relaxed);
    }

    /// The counts now (for reporters other than the terminal one).
    pub fn snapshot(&self) -> Snapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            files: load(&self.inner.files),
            bytes: load(&self.inner.bytes),
            files_total: load(&self.inner.files_total),
            bytes_total: load(&self.inner.bytes_total),
            finished: self.inner.done.load(Ordering::Relaxed),
        }
    }
}
