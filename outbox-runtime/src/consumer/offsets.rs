//! Which offsets may be stored: intake's bookkeeping between receiving a record and
//! storing its offset once its transaction settled.

use std::collections::{BTreeSet, HashMap};

/// Which offsets may be stored: per partition of the consumer's one topic, up to just
/// before the oldest record received and not yet settled.
///
/// Each record is tagged with its partition's *epoch* when received. A rebalance, or a
/// partition whose offsets go back without one (its position was reset: the broker lost
/// its log, or the records it held), starts a new epoch, and settlements tagged with an
/// older one are not stored: an offset of one log must never be stored against
/// another, where it would skip records nobody has read.
#[derive(Debug, Default)]
pub(super) struct OffsetTracker {
    partitions: HashMap<i32, PartitionOffsets>,
    /// The last epoch handed out; epochs never repeat.
    epochs: u64,
}

#[derive(Debug, Default)]
struct PartitionOffsets {
    epoch: u64,
    in_flight: BTreeSet<i64>,
    highest_received: Option<i64>,
    highest_settled: Option<i64>,
    stored: Option<i64>,
}

impl OffsetTracker {
    /// Records a received record; returns the epoch to tag it with.
    pub(super) fn received(&mut self, partition: i32, offset: i64) -> u64 {
        let p = self.partitions.entry(partition).or_default();
        if p.epoch == 0 || p.highest_received.is_some_and(|h| offset <= h) {
            // New, or the position went back: a fresh epoch, from this record on.
            self.epochs += 1;
            *p = PartitionOffsets {
                epoch: self.epochs,
                ..Default::default()
            };
        }
        p.highest_received = Some(offset);
        p.in_flight.insert(offset);
        p.epoch
    }

    /// After a rebalance: every partition starts a new epoch with its next record.
    pub(super) fn rebalanced(&mut self) {
        self.partitions.clear();
    }

    /// Marks `offset` (received in `epoch`) settled; returns the offset to store (the
    /// last record of an unbroken settled prefix) if it moved forward.
    pub(super) fn settled(&mut self, partition: i32, epoch: u64, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(&partition)?;
        if p.epoch != epoch || !p.in_flight.remove(&offset) {
            return None;
        }
        p.highest_settled = p.highest_settled.max(Some(offset));
        let upto = match p.in_flight.first() {
            Some(&oldest) => oldest - 1,
            None => p.highest_settled?,
        };
        if upto >= 0 && p.stored.is_none_or(|s| upto > s) {
            p.stored = Some(upto);
            Some(upto)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_stored_only_up_to_the_oldest_unsettled_record() {
        let mut t = OffsetTracker::default();
        let mut e = 0;
        for o in 10..15 {
            e = t.received(0, o);
        }
        let e1 = t.received(1, 3);
        // 10 and 11 are still in flight: nothing past 9 (the committed position stays 10).
        assert_eq!(t.settled(0, e, 12), Some(9));
        assert_eq!(t.settled(0, e, 11), None);
        assert_eq!(t.settled(0, e, 10), Some(12));
        assert_eq!(t.settled(1, e1, 3), Some(3));
        assert_eq!(t.settled(0, e, 14), None);
        assert_eq!(t.settled(0, e, 13), Some(14));
        assert_eq!(
            t.settled(0, e, 13),
            None,
            "a repeated settlement changes nothing"
        );
        assert_eq!(t.settled(9, e, 1), None, "unknown partition");
    }

    #[test]
    fn a_position_that_goes_back_starts_a_new_epoch() {
        let mut t = OffsetTracker::default();
        let old = t.received(0, 5000);
        t.received(0, 5001);
        assert_eq!(t.settled(0, old, 5000), Some(5000));
        // The broker lost its log: the partition starts again at 0 while 5001 is still
        // being settled. Its settlement must not be stored against the new log.
        let new = t.received(0, 0);
        assert_ne!(new, old);
        assert_eq!(t.settled(0, old, 5001), None, "an offset of the old log");
        assert_eq!(t.settled(0, new, 0), Some(0));
        t.received(0, 1);
        assert_eq!(t.settled(0, new, 1), Some(1));
    }

    #[test]
    fn settlements_from_before_a_rebalance_are_not_stored() {
        let mut t = OffsetTracker::default();
        let old = t.received(0, 7);
        t.rebalanced();
        // The group resumed from the committed offset 7: the same record again.
        let new = t.received(0, 7);
        assert_ne!(new, old);
        assert_eq!(t.settled(0, old, 7), None);
        assert_eq!(t.settled(0, new, 7), Some(7));
    }
}
