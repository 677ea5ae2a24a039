//! Smooth weighted round robin (nginx's algorithm, 2011).
//!
//! Every pick adds each candidate's weight to its running value, takes the highest, and subtracts the total weight
//! from the winner. Over any window of `sum(weights)` picks each candidate is chosen exactly `weight` times, and the
//! picks are interleaved (weights 5:1:1 give `a a b a c a a`, never `a a a a a b c`), so no endpoint gets a burst.
//! Candidates that drop out (ejected, draining) are simply not offered; their running value is kept, so they re-enter
//! smoothly. State is per worker: each worker's sequence is exact, so their sum is too.

/// Running values, indexed like the table's endpoints.
#[derive(Debug, Clone, Default)]
pub struct Swrr {
    current: Vec<i64>,
    /// Where the rotation over equal weights stands (see [`Swrr::rotate`]).
    cursor: usize,
}

impl Swrr {
    pub fn new(len: usize) -> Self {
        Swrr { current: vec![0; len], cursor: 0 }
    }

    /// Carries running values over to a new table, matching endpoints by position in `mapping` (old index per new
    /// index, `None` for new endpoints).
    pub fn remap(&self, mapping: &[Option<usize>]) -> Self {
        Swrr {
            current: mapping.iter().map(|old| old.and_then(|o| self.current.get(o).copied()).unwrap_or(0)).collect(),
            cursor: self.cursor,
        }
    }

    /// The pick when every candidate has the same weight, in O(1): smooth weighted round robin over equal weights is a
    /// rotation in candidate order (from fresh values it picks `0, 1, 2, ...`), so it is done as one. Costs the same
    /// with 3 endpoints as with 1,000, where [`Swrr::pick`] walks them all.
    pub fn rotate(&mut self, candidates: &[usize]) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let i = candidates.get(self.cursor % candidates.len()).copied();
        self.cursor = self.cursor.wrapping_add(1);
        i
    }

    /// Picks among `(index, weight)` candidates (weights above 0). `None` if there are none.
    pub fn pick(&mut self, candidates: impl Iterator<Item = (usize, u32)> + Clone) -> Option<usize> {
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        for (i, w) in candidates {
            let Some(cur) = self.current.get_mut(i) else {
                continue;
            };
            *cur = cur.saturating_add(i64::from(w));
            total += i64::from(w);
            if best.is_none_or(|(_, b)| *cur > b) {
                best = Some((i, *cur));
            }
        }
        let (i, _) = best?;
        if let Some(cur) = self.current.get_mut(i) {
            *cur -= total;
        }
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn interleaves_without_bursts() {
        let mut s = Swrr::new(3);
        let w = [(0usize, 5u32), (1, 1), (2, 1)];
        let seq: Vec<usize> = (0..7).filter_map(|_| s.pick(w.iter().copied())).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn a_rotation_is_the_same_sequence_as_equal_weights() {
        let cands = [0usize, 2, 3, 7];
        let (mut smooth, mut rotating) = (Swrr::new(8), Swrr::new(8));
        for _ in 0..12 {
            assert_eq!(rotating.rotate(&cands), smooth.pick(cands.iter().map(|&i| (i, 100))));
        }
        assert_eq!(Swrr::new(1).rotate(&[]), None);
    }

    #[test]
    fn no_candidates_no_pick() {
        let mut s = Swrr::new(2);
        assert_eq!(s.pick(std::iter::empty()), None);
    }

    proptest! {
        /// Over one full cycle (sum of weights) each endpoint is picked exactly `weight` times.
        #[test]
        fn exact_proportions(weights in prop::collection::vec(1u32..50, 1..8), cycles in 1usize..4) {
            let mut s = Swrr::new(weights.len());
            let cands: Vec<(usize, u32)> = weights.iter().copied().enumerate().collect();
            let total: u32 = weights.iter().sum();
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..(total as usize * cycles) {
                let i = s.pick(cands.iter().copied()).unwrap();
                counts[i] += 1;
            }
            for (c, w) in counts.iter().zip(&weights) {
                prop_assert_eq!(*c, w * cycles as u32);
            }
        }

        /// No bursts: at every point of the sequence each endpoint's count stays within one pick per endpoint of its
        /// exact share (a bursty weighted round robin drifts by up to its largest weight).
        #[test]
        fn counts_track_the_shares_at_every_prefix(weights in prop::collection::vec(1u32..40, 2..6)) {
            let mut s = Swrr::new(weights.len());
            let cands: Vec<(usize, u32)> = weights.iter().copied().enumerate().collect();
            let total: u32 = weights.iter().sum();
            let mut counts = vec![0f64; weights.len()];
            for n in 1..=(total * 2) {
                counts[s.pick(cands.iter().copied()).unwrap()] += 1.0;
                for (c, w) in counts.iter().zip(&weights) {
                    let ideal = f64::from(n) * f64::from(*w) / f64::from(total);
                    prop_assert!((c - ideal).abs() < weights.len() as f64, "n={} count {} ideal {:.2}", n, c, ideal);
                }
            }
        }
    }
}
