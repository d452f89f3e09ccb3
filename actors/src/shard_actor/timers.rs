//! The timers a shard leader holds in memory: those due within the horizon, ordered by deadline.
//!
//! The timer index in the shard's state is the truth; this set is a bounded cache of its
//! earliest part. A timer is in it at most once, at its latest known deadline, so re-arming a
//! timer (earlier or later) replaces its entry. When the set is full, the latest deadlines give
//! way to earlier ones and the set remembers that it dropped some (`truncated`): the next scan
//! of the index brings them back once there is room.

use std::collections::{BTreeSet, HashMap};

use fetter_raft::ids::FlowId;

/// A timer of a flow.
pub(super) type TimerKey = (FlowId, String);

/// Timers by deadline, with each timer's deadline.
#[derive(Debug)]
pub(super) struct Timers {
    by_deadline: BTreeSet<(u64, FlowId, String)>,
    deadline_of: HashMap<TimerKey, u64>,
    max_len: usize,
    truncated: bool,
}

impl Timers {
    /// An empty set holding at most `max_len` timers (at least one).
    pub(super) fn new(max_len: usize) -> Self {
        Timers {
            by_deadline: BTreeSet::new(),
            deadline_of: HashMap::new(),
            max_len: max_len.max(1),
            truncated: false,
        }
    }

    /// Holds `key` at `deadline_ms`, replacing the deadline it had. When the set is full, the
    /// latest timer gives way (it may be this one) and the set is marked truncated.
    pub(super) fn arm(&mut self, key: TimerKey, deadline_ms: u64) {
        match self.deadline_of.get(&key) {
            Some(&held) if held == deadline_ms => return,
            Some(_) => self.remove(&key),
            None => {}
        }
        if self.by_deadline.len() >= self.max_len {
            self.truncated = true;
            match self.by_deadline.last() {
                Some((latest, _, _)) if *latest > deadline_ms => {
                    if let Some((_, flow, timer_id)) = self.by_deadline.pop_last() {
                        self.deadline_of.remove(&(flow, timer_id));
                    }
                }
                _ => return,
            }
        }
        self.by_deadline.insert((deadline_ms, key.0.clone(), key.1.clone()));
        self.deadline_of.insert(key, deadline_ms);
    }

    /// Forgets `key`.
    pub(super) fn remove(&mut self, key: &TimerKey) {
        if let Some(deadline_ms) = self.deadline_of.remove(key) {
            self.by_deadline.remove(&(deadline_ms, key.0.clone(), key.1.clone()));
        }
    }

    /// The deadline `key` is held at.
    #[cfg(test)]
    fn deadline_of(&self, key: &TimerKey) -> Option<u64> {
        self.deadline_of.get(key).copied()
    }

    /// The earliest deadline held.
    pub(super) fn earliest(&self) -> Option<u64> {
        self.by_deadline.first().map(|(deadline_ms, _, _)| *deadline_ms)
    }

    /// Takes up to `n` timers whose deadline is at or before `now_ms`, earliest first.
    pub(super) fn take_due(&mut self, now_ms: u64, n: usize) -> Vec<TimerKey> {
        let mut due = Vec::new();
        while due.len() < n {
            match self.by_deadline.first() {
                Some((deadline_ms, _, _)) if *deadline_ms <= now_ms => {}
                _ => break,
            }
            if let Some((_, flow, timer_id)) = self.by_deadline.pop_first() {
                let key = (flow, timer_id);
                self.deadline_of.remove(&key);
                due.push(key);
            }
        }
        due
    }

    /// Timers held.
    pub(super) fn len(&self) -> usize {
        self.by_deadline.len()
    }

    /// Whether a timer was dropped for lack of room since [`Timers::clear_truncated`].
    pub(super) fn truncated(&self) -> bool {
        self.truncated
    }

    /// Forgets that timers were dropped (a scan of the index is bringing them back).
    pub(super) fn clear_truncated(&mut self) {
        self.truncated = false;
    }

    /// Whether there is room for more timers.
    pub(super) fn has_room(&self) -> bool {
        self.by_deadline.len() < self.max_len
    }

    /// Forgets every timer.
    pub(super) fn clear(&mut self) {
        self.by_deadline.clear();
        self.deadline_of.clear();
        self.truncated = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> TimerKey {
        (FlowId::new("t", name), "x".to_string())
    }

    #[test]
    fn rearming_moves_a_timer_earlier_or_later() {
        let mut timers = Timers::new(10);
        timers.arm(key("a"), 500);
        timers.arm(key("b"), 300);
        timers.arm(key("a"), 100);
        assert_eq!(timers.len(), 2);
        assert_eq!(timers.earliest(), Some(100));
        assert_eq!(timers.take_due(200, 10), [key("a")]);
        timers.arm(key("b"), 900);
        assert_eq!(timers.take_due(800, 10), Vec::<TimerKey>::new());
        assert_eq!(timers.deadline_of(&key("b")), Some(900));
    }

    #[test]
    fn due_timers_come_earliest_first_and_bounded() {
        let mut timers = Timers::new(10);
        for (name, deadline) in [("a", 30), ("b", 10), ("c", 20), ("d", 99)] {
            timers.arm(key(name), deadline);
        }
        assert_eq!(timers.take_due(50, 2), [key("b"), key("c")]);
        assert_eq!(timers.take_due(50, 2), [key("a")]);
        assert_eq!(timers.len(), 1);
    }

    #[test]
    fn a_full_set_keeps_the_earliest_and_says_it_dropped_some() {
        let mut timers = Timers::new(2);
        timers.arm(key("a"), 10);
        timers.arm(key("b"), 30);
        assert!(!timers.truncated());
        timers.arm(key("c"), 20);
        assert!(timers.truncated());
        assert_eq!(timers.deadline_of(&key("b")), None, "the latest gave way");
        timers.arm(key("d"), 40);
        assert_eq!(timers.deadline_of(&key("d")), None, "a later one does not get in");
        assert_eq!(timers.take_due(100, 10), [key("a"), key("c")]);
        timers.clear_truncated();
        assert!(!timers.truncated() && timers.has_room());
    }
}
