//! A board's compute shared by the runs of several inferences (a stream of frames,
//! docs/architecture.md, "Frames in flight"): one tile at a time, and of the tiles
//! waiting, the lowest inference's (the oldest frame's) first. A tile that is ready
//! while an older frame waits for rows runs at once; a running tile is never
//! interrupted. The stream's timeline (`legion_plan::network::stream_timeline`) models
//! the same rule.

use super::lock;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// The turns on a board's compute.
#[derive(Default)]
pub(super) struct ComputeTurns {
    state: Mutex<Turns>,
    /// Wakes the waiting tiles when the compute is free or the first waiting left.
    changed: Notify,
}

#[derive(Default)]
struct Turns {
    busy: bool,
    /// (inference, ticket) of every tile waiting; tickets keep a frame's order.
    waiting: BTreeSet<(u64, u64)>,
    tickets: u64,
}

/// A tile's turn: waiting, then holding the compute until dropped.
pub(super) struct Turn {
    turns: Arc<ComputeTurns>,
    key: (u64, u64),
    held: bool,
}

impl ComputeTurns {
    /// Waits for the compute for a tile of inference `inference`; the compute is
    /// held until the turn is dropped.
    pub(super) async fn take(self: &Arc<Self>, inference: u64) -> Turn {
        let key = {
            let mut s = lock(&self.state);
            s.tickets += 1;
            let key = (inference, s.tickets);
            s.waiting.insert(key);
            key
        };
        // Dropped while waiting (the call cancelled), the turn leaves the line.
        let mut turn = Turn {
            turns: self.clone(),
            key,
            held: false,
        };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut s = lock(&self.state);
                if !s.busy && s.waiting.first() == Some(&key) {
                    s.waiting.remove(&key);
                    s.busy = true;
                    turn.held = true;
                    return turn;
                }
            }
            changed.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut s = lock(&self.turns.state);
        if self.held {
            s.busy = false;
        } else {
            s.waiting.remove(&self.key);
        }
        drop(s);
        self.turns.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Lets the spawned tasks run until they wait.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn the_oldest_waiting_frame_goes_first_and_a_running_tile_is_not_interrupted() {
        let turns = Arc::new(ComputeTurns::default());
        let (order, mut got) = tokio::sync::mpsc::unbounded_channel();
        // Frame 7's tile holds the compute; frames 9 and 8 then wait, 9 first.
        let first = turns.take(7).await;
        let mut tasks = tokio::task::JoinSet::new();
        for inference in [9, 8] {
            let (turns, order) = (turns.clone(), order.clone());
            tasks.spawn(async move {
                let _turn = turns.take(inference).await;
                order.send(inference).unwrap();
                settle().await;
            });
            settle().await;
        }
        // An older frame's tile arriving now waits for the running one too.
        let (turns6, order6) = (turns.clone(), order.clone());
        tasks.spawn(async move {
            let _turn = turns6.take(6).await;
            order6.send(6).unwrap();
        });
        settle().await;
        assert!(got.try_recv().is_err(), "a tile ran beside frame 7's");
        drop(first);
        tasks.join_all().await;
        let order: Vec<u64> = std::iter::from_fn(|| got.try_recv().ok()).collect();
        assert_eq!(order, vec![6, 8, 9]);
    }

    #[tokio::test]
    async fn a_turn_given_up_while_waiting_lets_the_next_go() {
        let turns = Arc::new(ComputeTurns::default());
        let first = turns.take(1).await;
        let waiting = {
            let turns = turns.clone();
            tokio::spawn(async move { turns.take(2).await })
        };
        settle().await;
        waiting.abort();
        let _ = waiting.await;
        let third = {
            let turns = turns.clone();
            tokio::spawn(async move { turns.take(3).await.held })
        };
        settle().await;
        drop(first);
        let held = tokio::time::timeout(Duration::from_secs(5), third).await;
        assert!(matches!(held, Ok(Ok(true))), "{held:?}");
    }

    #[tokio::test]
    async fn a_free_compute_goes_to_whoever_is_ready() {
        let turns = Arc::new(ComputeTurns::default());
        // A newer frame's tile ready while the older frame waits for rows runs at once.
        let turn = tokio::time::timeout(Duration::from_secs(1), turns.take(42)).await;
        assert!(turn.is_ok_and(|t| t.held));
    }
}
