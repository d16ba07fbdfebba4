//! The deadlines the scheduler sleeps towards: one per credential, in a
//! min-heap. Pure data, tested without a runtime.
//!
//! A new deadline for a credential does not search the heap for the old
//! one: it is pushed with a fresh sequence number, and entries whose number
//! is not the credential's current one are skipped when they come up (and
//! swept out when they outnumber the live ones), so every change is
//! O(log n).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

#[derive(Default)]
pub(super) struct Deadlines {
    heap: BinaryHeap<Reverse<(i64, u64, String)>>,
    /// Per credential: the heap entry in force (its sequence number) and its instant.
    current: HashMap<String, (u64, i64)>,
    seq: u64,
}

impl Deadlines {
    /// The credential's next deadline (ms), or None to forget it.
    pub(super) fn set(&mut self, name: String, at: Option<i64>) {
        match at {
            Some(at) => self.push(name, at),
            None => {
                self.current.remove(&name);
            }
        }
    }

    /// Look at the credential by `at` at the latest: its deadline becomes
    /// the earlier of the two.
    pub(super) fn by(&mut self, name: String, at: i64) {
        if self.current.get(&name).is_none_or(|c| c.1 > at) {
            self.push(name, at);
        }
    }

    /// Removes and returns the credentials due at `now`.
    pub(super) fn due(&mut self, now: i64) -> Vec<String> {
        let mut due = Vec::new();
        while let Some(Reverse((at, s, _))) = self.heap.peek() {
            if *at > now {
                break;
            }
            let s = *s;
            let Reverse((_, _, name)) = self.heap.pop().expect("peeked");
            if self.current.get(&name).is_some_and(|c| c.0 == s) {
                self.current.remove(&name);
                due.push(name);
            }
        }
        // Rebuild when stale entries dominate, so the heap stays O(credentials).
        if self.heap.len() > 2 * self.current.len() + 1024 {
            let current = &self.current;
            self.heap
                .retain(|Reverse((_, s, n))| current.get(n).is_some_and(|c| c.0 == *s));
        }
        due
    }

    /// The earliest deadline in force, if any (a stale entry may make it
    /// early: waking for nothing is harmless, sleeping past one is not).
    pub(super) fn next(&self) -> Option<i64> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    fn push(&mut self, name: String, at: i64) {
        self.seq += 1;
        self.current.insert(name.clone(), (self.seq, at));
        self.heap.push(Reverse((at, self.seq, name)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_deadline_of_a_credential_wins() {
        let mut d = Deadlines::default();
        d.set("a".into(), Some(10));
        d.set("a".into(), Some(30));
        d.set("b".into(), Some(20));
        assert_eq!(d.due(15), Vec::<String>::new());
        assert_eq!(d.due(25), vec!["b".to_owned()]);
        assert_eq!(d.due(30), vec!["a".to_owned()]);
        assert_eq!(d.due(100), Vec::<String>::new());
    }

    #[test]
    fn by_only_brings_a_deadline_forward() {
        let mut d = Deadlines::default();
        d.set("a".into(), Some(50));
        d.by("a".into(), 80);
        assert_eq!(d.due(60), vec!["a".to_owned()]);
        d.set("a".into(), Some(50));
        d.by("a".into(), 20);
        assert_eq!(d.due(25), vec!["a".to_owned()]);
        assert_eq!(d.due(60), Vec::<String>::new());
        // A credential without a deadline gets one.
        d.by("c".into(), 5);
        assert_eq!(d.due(5), vec!["c".to_owned()]);
    }

    #[test]
    fn a_forgotten_credential_never_comes_due_and_stale_entries_are_swept() {
        let mut d = Deadlines::default();
        d.set("a".into(), Some(10));
        d.set("a".into(), None);
        assert!(d.due(100).is_empty());
        for i in 0..5000 {
            d.set("x".into(), Some(1_000_000 + i));
        }
        d.due(0);
        assert!(d.heap.len() <= 1025, "{}", d.heap.len());
        assert_eq!(d.next(), Some(1_004_999));
    }
}
