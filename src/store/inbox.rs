//! The writer's inbox: commands from async tasks to a log's writer thread.
//!
//! A bounded queue (senders wait for room, so a flood of appends cannot grow memory
//! without bound) that the writer drains whole. It is not a channel because the writer
//! must be able to wait for more appends *with a deadline* measured in microseconds — to
//! let a group commit fill up before paying for a sync — which neither a blocking channel
//! receive nor an async runtime's millisecond timers offer.
//!
//! Wake-ups: a wake costs a `futex` syscall even when nobody sleeps any more, so a waiting
//! writer is woken once per wait, by the item that completes what it waits for (one item,
//! or the group it lingers for: [`Inbox::take_at_least`]), not by every item queued
//! before it runs again. It takes everything queued when it runs.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Semaphore;

pub(crate) struct Inbox<T> {
    state: Mutex<State<T>>,
    arrived: Condvar,
    /// One permit per free slot.
    room: Semaphore,
}

struct State<T> {
    queue: VecDeque<T>,
    closed: bool,
    /// The writer waits and has not been woken yet.
    writer_waiting: bool,
    /// How many queued items the waiting writer waits for.
    wake_at: usize,
}

/// What [`Inbox::take`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Taken {
    /// This many items were moved out.
    Items(usize),
    /// The deadline passed with nothing queued.
    TimedOut,
    /// The inbox is closed and empty.
    Closed,
}

impl<T> Inbox<T> {
    pub fn new(capacity: usize) -> Inbox<T> {
        Inbox {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(capacity.min(1024)),
                closed: false,
                writer_waiting: false,
                wake_at: 1,
            }),
            arrived: Condvar::new(),
            room: Semaphore::new(capacity),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // The state stays consistent even if a holder panicked: every update is one push
        // or one drain.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues an item, waiting for room; gives it back if the inbox is closed.
    pub async fn send(&self, item: T) -> Result<(), T> {
        match self.room.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(item),
        }
        self.push(item)
    }

    /// Queues an item if there is room right now.
    pub fn try_send(&self, item: T) -> Result<(), T> {
        match self.room.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(item),
        }
        self.push(item)
    }

    fn push(&self, item: T) -> Result<(), T> {
        let mut state = self.lock();
        if state.closed {
            return Err(item);
        }
        state.queue.push_back(item);
        // Only the item that completes what the writer waits for wakes it (see the module
        // docs); it clears the flag so that the items after it do not wake it again.
        let wake = state.writer_waiting && state.queue.len() >= state.wake_at;
        if wake {
            state.writer_waiting = false;
        }
        drop(state);
        if wake {
            self.arrived.notify_one();
        }
        Ok(())
    }

    /// Refuses further items and wakes the writer; queued items can still be taken.
    pub fn close(&self) {
        self.lock().closed = true;
        self.room.close();
        self.arrived.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Items that can be queued right now without waiting.
    #[cfg(test)]
    pub fn room(&self) -> usize {
        self.room.available_permits()
    }

    /// Moves every queued item into `out`, first waiting until there is one (or until
    /// `deadline`, if given).
    pub fn take(&self, out: &mut Vec<T>, deadline: Option<Instant>) -> Taken {
        self.take_at_least(out, 1, deadline)
    }

    /// Moves every queued item into `out`, first waiting until there are at least `want`
    /// (or until `deadline`, if given, or the inbox is closed: then whatever is queued).
    pub fn take_at_least(&self, out: &mut Vec<T>, want: usize, deadline: Option<Instant>) -> Taken {
        let want = want.max(1);
        let mut state = self.lock();
        while state.queue.len() < want {
            if state.closed {
                if state.queue.is_empty() {
                    return Taken::Closed;
                }
                break;
            }
            state.writer_waiting = true;
            state.wake_at = want;
            state = match deadline {
                None => self
                    .arrived
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
                Some(deadline) => {
                    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                        state.writer_waiting = false;
                        if state.queue.is_empty() {
                            return Taken::TimedOut;
                        }
                        break;
                    };
                    self.arrived
                        .wait_timeout(state, left)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0
                }
            };
            state.writer_waiting = false;
        }
        let n = state.queue.len();
        out.extend(state.queue.drain(..));
        drop(state);
        self.room.add_permits(n);
        Taken::Items(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn delivers_in_order_and_bounds_the_queue() {
        let inbox = Arc::new(Inbox::new(2));
        inbox.send(1).await.unwrap();
        inbox.send(2).await.unwrap();
        assert_eq!(inbox.try_send(3), Err(3), "full");
        let mut out = Vec::new();
        assert_eq!(inbox.take(&mut out, None), Taken::Items(2));
        assert_eq!(out, vec![1, 2]);
        inbox.try_send(3).unwrap();
        let soon = Instant::now() + Duration::from_millis(1);
        out.clear();
        assert_eq!(inbox.take(&mut out, Some(soon)), Taken::Items(1));
        assert_eq!(inbox.take(&mut out, Some(soon)), Taken::TimedOut);
        inbox.close();
        assert_eq!(inbox.send(4).await, Err(4));
        assert_eq!(inbox.take(&mut out, None), Taken::Closed);
    }

    #[test]
    fn a_writer_waiting_for_several_items_gets_them_all() {
        let inbox = Arc::new(Inbox::new(8));
        let writer = {
            let inbox = Arc::clone(&inbox);
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let later = Instant::now() + Duration::from_secs(30);
                let taken = inbox.take_at_least(&mut out, 3, Some(later));
                (taken, out)
            })
        };
        for item in 1..=3 {
            std::thread::sleep(Duration::from_millis(10));
            inbox.try_send(item).unwrap();
        }
        assert_eq!(writer.join().unwrap(), (Taken::Items(3), vec![1, 2, 3]));
        // At the deadline, what is queued is taken even if it is fewer.
        inbox.try_send(4).unwrap();
        let mut out = Vec::new();
        let soon = Instant::now() + Duration::from_millis(5);
        assert_eq!(
            inbox.take_at_least(&mut out, 3, Some(soon)),
            Taken::Items(1)
        );
        assert_eq!(out, vec![4]);
        // A closed inbox gives what it holds, then says so.
        inbox.try_send(5).unwrap();
        inbox.close();
        out.clear();
        assert_eq!(inbox.take_at_least(&mut out, 3, None), Taken::Items(1));
        assert_eq!(inbox.take_at_least(&mut out, 3, None), Taken::Closed);
    }

    #[test]
    fn a_waiting_writer_is_woken() {
        let inbox = Arc::new(Inbox::new(8));
        let writer = {
            let inbox = Arc::clone(&inbox);
            std::thread::spawn(move || {
                let mut out = Vec::new();
                inbox.take(&mut out, None);
                out
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        inbox.try_send(7).unwrap();
        assert_eq!(writer.join().unwrap(), vec![7]);
    }
}
