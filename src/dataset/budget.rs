//! The cap on file bodies held in memory at once (`cache.max_memory`): bodies a push reads to
//! send from memory, and the write buffers of downloads. One budget serves every push, pull
//! and cache fill of a process, so a node plugin under a container memory limit stays under
//! it whatever the datasets hold; a task waits for room rather than going over.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The default cap: room for the rest of a node plugin in a 256 MiB container.
pub const DEFAULT: u64 = 64 << 20;

/// See the module docs. Counted in KiB.
#[derive(Debug, Clone)]
pub struct Budget {
    room: Arc<Semaphore>,
    kib: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(DEFAULT)
    }
}

impl Budget {
    /// A budget of `bytes` (at least 1 MiB).
    pub fn new(bytes: u64) -> Budget {
        let kib = (bytes >> 10).clamp(1024, u64::from(u32::MAX >> 4)) as u32;
        Budget {
            room: Arc::new(Semaphore::new(kib as usize)),
            kib,
        }
    }

    /// Holds room for `bytes` (at most the whole budget) until the permit is dropped.
    pub async fn hold(&self, bytes: u64) -> OwnedSemaphorePermit {
        let kib = bytes.div_ceil(1024).clamp(1, u64::from(self.kib)) as u32;
        self.room
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("the budget's semaphore is never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holders_wait_for_room_and_never_exceed_it() {
        let budget = Budget::new(2 << 20);
        let first = budget.hold(1536 << 10).await;
        let larger_than_all = budget.clone();
        let waiting = tokio::spawn(async move { larger_than_all.hold(u64::MAX).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "no room while the first holds most of it"
        );
        drop(first);
        let all = waiting.await.unwrap();
        assert_eq!(all.num_permits(), 2048, "clamped to the whole budget");
    }
}
