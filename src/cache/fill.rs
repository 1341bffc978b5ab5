//! Fills: one background download per pinned dataset, however many publishes wait for it.
//!
//! A publish call waits a bounded time; the fill goes on after the call has answered, and the
//! next call joins the same fill (or finds the finished tree). Progress is shared through
//! atomics so any waiter can report it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::Error;
use crate::units::human;

/// How far a fill has come.
#[derive(Debug, Default)]
pub struct Progress {
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_downloaded: AtomicU64,
}

impl Progress {
    /// Adds one finished file of `bytes`.
    pub fn file_done(&self, bytes: u64) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `1,234 of 10,000 files, 120 MiB of 1.0 GiB (12%)`.
    pub fn describe(&self) -> String {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let (done, total) = (get(&self.bytes_done), get(&self.bytes_total));
        let percent = (done * 100).checked_div(total).unwrap_or(0);
        format!(
            "{} of {} files, {} of {} ({percent}%)",
            get(&self.files_done),
            get(&self.files_total),
            human(done),
            human(total)
        )
    }
}

/// The outcome every waiter of a fill receives.
pub type Outcome = Result<PathBuf, Error>;

/// One running fill.
#[derive(Debug)]
pub struct Fill {
    pub progress: Arc<Progress>,
    done: watch::Receiver<Option<Outcome>>,
}

impl Fill {
    /// Waits for the fill to end. A fill whose task vanished (it panicked) is an error, so
    /// the caller's retry starts a new one.
    pub async fn finished(&self) -> Outcome {
        let mut done = self.done.clone();
        match done.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or_else(|| Err(vanished())),
            Err(_) => Err(vanished()),
        }
    }
}

fn vanished() -> Error {
    Error::internal("the dataset download task ended without an answer; retry")
}

/// The fills in progress, by pin key.
#[derive(Debug, Default)]
pub struct Fills(Mutex<HashMap<String, Arc<Fill>>>);

/// The sending half given to the task that does a fill.
pub struct Finisher {
    key: String,
    done: watch::Sender<Option<Outcome>>,
}

impl Fills {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Fill>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The running fill of `key`, or a new one: then the caller must start the work and end
    /// it with [`Fills::finish`].
    pub fn join(&self, key: &str) -> (Arc<Fill>, Option<Finisher>) {
        let mut fills = self.lock();
        if let Some(fill) = fills.get(key)
            && fill.done.has_changed().is_ok()
        {
            return (fill.clone(), None);
        }
        let (tx, rx) = watch::channel(None);
        let fill = Arc::new(Fill {
            progress: Arc::default(),
            done: rx,
        });
        fills.insert(key.to_owned(), fill.clone());
        let finisher = Finisher {
            key: key.to_owned(),
            done: tx,
        };
        (fill, Some(finisher))
    }

    /// Ends a fill: later calls start afresh (or find the tree), waiters get `outcome`.
    pub fn finish(&self, finisher: Finisher, outcome: Outcome) {
        self.lock().remove(&finisher.key);
        let _ = finisher.done.send(Some(outcome));
    }

    /// Keys and progress of the fills running now.
    pub fn running(&self) -> Vec<(String, Arc<Progress>)> {
        self.lock()
            .iter()
            .map(|(key, fill)| (key.clone(), fill.progress.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_fill_per_key_and_every_waiter_gets_the_outcome() {
        let fills = Fills::default();
        let (first, finisher) = fills.join("a");
        let (second, none) = fills.join("a");
        assert!(none.is_none(), "the second caller joins");
        assert!(Arc::ptr_eq(&first, &second));
        first.progress.files_total.store(2, Ordering::Relaxed);
        first.progress.bytes_total.store(2048, Ordering::Relaxed);
        first.progress.file_done(1024);
        assert_eq!(
            first.progress.describe(),
            "1 of 2 files, 1.0 KiB of 2.0 KiB (50%)"
        );
        fills.finish(finisher.unwrap(), Ok(PathBuf::from("/tree")));
        assert_eq!(second.finished().await.unwrap(), PathBuf::from("/tree"));
        let (_, again) = fills.join("a");
        assert!(again.is_some(), "a finished fill is not joined again");
    }

    #[tokio::test]
    async fn a_vanished_task_is_an_error_and_is_replaced() {
        let fills = Fills::default();
        let (fill, finisher) = fills.join("b");
        drop(finisher);
        assert!(fill.finished().await.is_err());
        let (_, again) = fills.join("b");
        assert!(again.is_some());
    }
}
