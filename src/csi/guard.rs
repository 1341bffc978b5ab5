//! The per-volume in-flight guard.
//!
//! Rule (CSI "Concurrency"): a second call on a volume while one is in flight is answered with
//! ABORTED, so the CO retries later; there is no global lock. Keys are a volume ID (controller)
//! or a volume ID plus a path (node); the guard frees its key when dropped, on every exit path.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The set of operations in flight.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Holds a key while an operation runs.
#[derive(Debug)]
pub struct Guard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    /// Takes `key`, or returns `None` when another operation holds it.
    pub fn try_lock(&self, key: String) -> Option<Guard> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if !keys.insert(key.clone()) {
            return None;
        }
        Some(Guard {
            keys: self.keys.clone(),
            key,
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_the_first_drops() {
        let inflight = InFlight::default();
        let first = inflight.try_lock("local/a".into()).unwrap();
        assert!(inflight.try_lock("local/a".into()).is_none());
        assert!(inflight.try_lock("local/b".into()).is_some());
        drop(first);
        assert!(inflight.try_lock("local/a".into()).is_some());
    }
}
