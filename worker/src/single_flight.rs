//! One execution of a piece of work per key at a time: whoever asks while it runs waits for its
//! answer instead of starting another. Knows nothing of Calendly; [`crate::fetch`] uses it to share
//! event fetches.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::watch;

/// `None` until the leader finishes; then its value, or `None` inside when it failed.
type Slot<V> = watch::Receiver<Option<Option<V>>>;

pub struct SingleFlight<K, V> {
    inflight: Mutex<HashMap<K, Slot<V>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self { inflight: Mutex::new(HashMap::new()) }
    }
}

/// How a caller got its answer.
#[derive(Debug)]
pub enum Flight<V, E> {
    /// This caller ran the work.
    Led(Result<V, E>),
    /// Another caller ran it; `None` when that attempt failed or was abandoned (decide for yourself).
    Joined(Option<V>),
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    pub async fn run_or_join<E, Fut>(&self, key: K, work: impl FnOnce() -> Fut) -> Flight<V, E>
    where
        Fut: Future<Output = Result<V, E>>,
    {
        let joined = {
            let mut inflight = self.inflight.lock().expect("single-flight lock");
            match inflight.get(&key) {
                Some(slot) => Err(slot.clone()),
                None => {
                    let (leader, slot) = watch::channel(None);
                    inflight.insert(key.clone(), slot);
                    Ok(leader)
                }
            }
        };
        match joined {
            Ok(leader) => {
                // Removed however the work ends, cancellation included, so a key is never stuck.
                let entry = Entry { inflight: &self.inflight, key };
                let result = work().await;
                drop(entry);
                let _ = leader.send(Some(result.as_ref().ok().cloned()));
                Flight::Led(result)
            }
            Err(mut slot) => {
                Flight::Joined(slot.wait_for(Option::is_some).await.ok().and_then(|v| v.clone().flatten()))
            }
        }
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.inflight.lock().unwrap().len()
    }
}

struct Entry<'a, K: Eq + Hash, V> {
    inflight: &'a Mutex<HashMap<K, Slot<V>>>,
    key: K,
}

impl<K: Eq + Hash, V> Drop for Entry<'_, K, V> {
    fn drop(&mut self) {
        self.inflight.lock().expect("single-flight lock").remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_execution() {
        let flights = Arc::new(SingleFlight::<&str, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, gate) = watch::channel(false);
        let callers: Vec<_> = (0..5)
            .map(|_| {
                let (flights, runs, mut gate) = (flights.clone(), runs.clone(), gate.clone());
                tokio::spawn(async move {
                    flights
                        .run_or_join("event", || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            gate.wait_for(|open| *open).await.unwrap();
                            Ok::<_, ()>(7)
                        })
                        .await
                })
            })
            .collect();
        tokio::time::timeout(Duration::from_secs(5), async {
            while flights.in_flight() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        tokio::task::yield_now().await;
        release.send(true).unwrap();

        let mut led = 0;
        for caller in callers {
            match caller.await.unwrap() {
                Flight::Led(Ok(7)) => led += 1,
                Flight::Joined(Some(7)) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((runs.load(Ordering::SeqCst), led), (1, 1), "one execution, by the one leader");
        assert_eq!(flights.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_failed_leader_leaves_followers_to_decide_for_themselves() {
        let flights = Arc::new(SingleFlight::<u8, u32>::default());
        let (release, mut gate) = watch::channel(false);
        let leader = {
            let flights = flights.clone();
            tokio::spawn(async move {
                flights
                    .run_or_join(1, || async move {
                        gate.wait_for(|open| *open).await.unwrap();
                        Err::<u32, _>("503")
                    })
                    .await
            })
        };
        while flights.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let follower = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run_or_join(1, || async { Ok::<u32, &str>(1) }).await })
        };
        tokio::task::yield_now().await;
        release.send(true).unwrap();

        assert!(matches!(leader.await.unwrap(), Flight::Led(Err("503"))));
        assert!(matches!(follower.await.unwrap(), Flight::Joined(None) | Flight::Led(Ok(1))));
    }

    #[tokio::test]
    async fn an_abandoned_leader_does_not_leave_its_key_behind() {
        let flights = SingleFlight::<u8, u32>::default();
        let never = flights.run_or_join(1, std::future::pending::<Result<u32, ()>>);
        assert!(tokio::time::timeout(Duration::from_millis(10), never).await.is_err());

        assert_eq!(flights.in_flight(), 0);
        assert!(matches!(flights.run_or_join(1, || async { Ok::<_, ()>(2) }).await, Flight::Led(Ok(2))));
    }
}
