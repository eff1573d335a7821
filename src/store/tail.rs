//! The in-memory tail: the most recent committed events of a log, ready to stream.
//!
//! The writer pushes every committed group here before it advances the watermark, so a
//! live reader finds what it waits for in memory and never touches the disk. The tail
//! holds a bounded number of bytes; older events are dropped from its front and read from
//! the segment files instead. It stores shared buffers, so serving one event to many
//! readers copies nothing.

use std::collections::VecDeque;

use crate::event::StoredEvent;

#[derive(Debug)]
pub struct Tail {
    /// Position of `events[0]` (or of the next event when empty).
    start: u64,
    events: VecDeque<StoredEvent>,
    bytes: usize,
    max_bytes: usize,
}

impl Tail {
    pub fn new(next_position: u64, max_bytes: usize) -> Tail {
        Tail {
            start: next_position,
            events: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// The position of the oldest event held (of the next one when empty).
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The position after the newest event held.
    pub fn end(&self) -> u64 {
        self.start + self.events.len() as u64
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Adds events that follow the current ones without a gap.
    pub fn extend(&mut self, events: impl IntoIterator<Item = StoredEvent>) {
        for event in events {
            debug_assert_eq!(event.position(), self.start + self.events.len() as u64);
            self.bytes += event.sse_frame().len();
            self.events.push_back(event);
        }
        while self.bytes > self.max_bytes {
            let Some(old) = self.events.pop_front() else {
                break;
            };
            self.bytes -= old.sse_frame().len();
            self.start += 1;
        }
    }

    /// Events `from..until` (at most `max` of them, and no more than `max_bytes` of stream
    /// frames unless the first alone is larger), or `None` if `from` is older than the tail.
    pub fn read(
        &self,
        from: u64,
        until: u64,
        max: usize,
        max_bytes: usize,
    ) -> Option<Vec<StoredEvent>> {
        if from < self.start {
            return None;
        }
        let first = (from - self.start) as usize;
        let end = (until.saturating_sub(self.start) as usize)
            .min(self.events.len())
            .min(first.saturating_add(max));
        let mut bytes = 0;
        let events = self
            .events
            .range(first.min(end)..end)
            .take_while(|event| {
                // Always at least one event, however large.
                let fits = bytes == 0 || bytes + event.sse_frame().len() <= max_bytes;
                bytes += event.sse_frame().len();
                fits
            })
            .cloned()
            .collect();
        Some(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn event(position: u64) -> StoredEvent {
        let id = format!("e_{position:04}");
        let json =
            format!(r#"{{"id":"{id}","subject":"a.b","created_at":"x","index":{position}}}"#);
        let layout = crate::event::JsonLayout::parse(json.as_bytes()).unwrap();
        let mut buf = BytesMut::new();
        crate::event::push_sse_frame(&mut buf, &id, json.as_bytes());
        StoredEvent::new(position, buf.freeze(), &layout)
    }

    #[test]
    fn keeps_recent_events_within_its_budget() {
        let frame_len = event(10).sse_frame().len();
        let mut tail = Tail::new(10, frame_len * 3);
        tail.extend((10..15).map(event));
        assert_eq!(
            tail.read(9, 15, 100, usize::MAX),
            None,
            "dropped from the front"
        );
        let got: Vec<u64> = tail
            .read(12, 15, 100, usize::MAX)
            .unwrap()
            .iter()
            .map(StoredEvent::position)
            .collect();
        assert_eq!(got, vec![12, 13, 14]);
        let got = tail.read(12, 14, 100, usize::MAX).unwrap();
        assert_eq!(got.len(), 2, "stops at the committed bound");
        assert_eq!(tail.read(13, 15, 1, usize::MAX).unwrap().len(), 1);
        assert!(tail.read(15, 15, 10, usize::MAX).unwrap().is_empty());
        // A byte budget stops the read early, but never before the first event.
        assert_eq!(tail.read(12, 15, 100, frame_len * 2).unwrap().len(), 2);
        assert_eq!(tail.read(12, 15, 100, frame_len * 2 - 1).unwrap().len(), 1);
        assert_eq!(tail.read(12, 15, 100, 1).unwrap().len(), 1);
    }
}
