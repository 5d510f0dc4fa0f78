//! Group commit: connections that changed subscriptions ask the `Committer` for durability and
//! wait; one task flushes the store for everyone who asked before that flush began, so many
//! concurrent requests share one disk flush and no request waits longer than the flush in
//! progress plus its own. The flush itself runs on the blocking pool. This is the store's only
//! async code.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{StoreError, SubscriptionStore};

type Waiter = oneshot::Sender<Result<(), StoreError>>;

/// Most requests queued for the next flush before callers wait to enqueue.
const QUEUE: usize = 4096;

/// Handle to the group committer; a cheap clone.
#[derive(Debug, Clone)]
pub struct Committer {
    /// `None` when the store is not durable: commits complete at once.
    requests: Option<mpsc::Sender<Waiter>>,
}

impl Committer {
    /// Starts the commit task for `store` on the current runtime. The task ends when every
    /// handle is dropped.
    pub fn start(store: Arc<dyn SubscriptionStore>) -> Committer {
        if !store.is_durable() {
            return Committer { requests: None };
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx));
        Committer { requests: Some(tx) }
    }

    /// Waits until every change applied to the store before this call is on disk. If the
    /// future is dropped the flush still happens; only the wait is abandoned.
    pub async fn commit(&self) -> Result<(), StoreError> {
        let Some(requests) = &self.requests else {
            return Ok(());
        };
        let (tx, rx) = oneshot::channel();
        requests
            .send(tx)
            .await
            .map_err(|_| StoreError::Backend("the committer has stopped".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Backend("the committer has stopped".into())))
    }
}

async fn run(store: Arc<dyn SubscriptionStore>, mut requests: mpsc::Receiver<Waiter>) {
    let mut waiters = Vec::new();
    while let Some(first) = requests.recv().await {
        waiters.push(first);
        // Everyone who asked before this flush starts shares it.
        while waiters.len() < QUEUE {
            match requests.try_recv() {
                Ok(w) => waiters.push(w),
                Err(_) => break,
            }
        }
        let store = store.clone();
        let result = tokio::task::spawn_blocking(move || store.flush())
            .await
            .unwrap_or_else(|e| Err(StoreError::Backend(format!("flush task failed: {e}"))));
        if let Err(e) = &result {
            tracing::error!("subscription store flush failed: {e}");
        }
        for waiter in waiters.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, SledStore};

    #[tokio::test]
    async fn non_durable_stores_commit_at_once() {
        let c = Committer::start(Arc::new(MemoryStore::new()));
        c.commit().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_all_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn SubscriptionStore> = Arc::new(SledStore::open(dir.path()).unwrap());
        let c = Committer::start(store.clone());
        let mut tasks = Vec::new();
        for i in 0..200 {
            let c = c.clone();
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .subscribe(&format!("u{i}"), &["t".to_string()], u64::MAX, 0, 10)
                    .unwrap();
                c.commit().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        drop(store);
    }
}
