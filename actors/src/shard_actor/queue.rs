//! Flows waiting for an activation slot on a shard leader.
//!
//! The running index in the shard's state is the truth (every `Running` flow is in it); this
//! queue is a bounded window onto it. A flow that does not fit is not lost: the queue remembers
//! that it overflowed, and the leader's next pass over the running index finds the flow there.

use std::collections::{HashSet, VecDeque};

use fetter_raft::ids::FlowId;

/// A FIFO of distinct flows, bounded.
#[derive(Debug)]
pub(super) struct Queue {
    order: VecDeque<FlowId>,
    members: HashSet<FlowId>,
    max_len: usize,
    overflowed: bool,
}

impl Queue {
    /// An empty queue holding at most `max_len` flows (at least one).
    pub(super) fn new(max_len: usize) -> Self {
        Queue { order: VecDeque::new(), members: HashSet::new(), max_len: max_len.max(1), overflowed: false }
    }

    /// Queues `flow` unless it is queued already; a full queue drops it and remembers that.
    pub(super) fn push(&mut self, flow: FlowId) {
        if self.members.contains(&flow) {
            return;
        }
        if self.order.len() >= self.max_len {
            self.overflowed = true;
            return;
        }
        self.members.insert(flow.clone());
        self.order.push_back(flow);
    }

    /// The longest-waiting flow.
    pub(super) fn pop(&mut self) -> Option<FlowId> {
        let flow = self.order.pop_front()?;
        self.members.remove(&flow);
        Some(flow)
    }

    /// Whether `flow` is queued.
    pub(super) fn contains(&self, flow: &FlowId) -> bool {
        self.members.contains(flow)
    }

    /// Flows queued.
    pub(super) fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether a flow was dropped since the last call (and forgets it).
    pub(super) fn take_overflowed(&mut self) -> bool {
        std::mem::take(&mut self.overflowed)
    }

    /// Empties the queue.
    pub(super) fn clear(&mut self) {
        self.order.clear();
        self.members.clear();
        self.overflowed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_distinct_bounded() {
        let f = |n: u32| FlowId::new("q", n.to_string());
        let mut q = Queue::new(2);
        q.push(f(1));
        q.push(f(1));
        q.push(f(2));
        assert!(!q.take_overflowed());
        q.push(f(3));
        assert!(q.take_overflowed());
        assert!(!q.take_overflowed(), "taken once");
        assert_eq!(q.len(), 2);
        assert!(q.contains(&f(2)) && !q.contains(&f(3)));
        assert_eq!((q.pop(), q.pop(), q.pop()), (Some(f(1)), Some(f(2)), None));
    }
}
