//! Weighted random choice: each candidate with probability weight / total. Randomness is an argument.

/// A uniform choice among `candidates` (all of the same weight), in O(1).
pub fn pick_uniform(candidates: &[usize], rng: &mut fastrand::Rng) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    candidates.get(rng.usize(..candidates.len())).copied()
}

pub fn pick(candidates: &[(usize, u32)], rng: &mut fastrand::Rng) -> Option<usize> {
    let total: u64 = candidates.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut r = rng.u64(..total);
    for (i, w) in candidates {
        let w = u64::from(*w);
        if r < w {
            return Some(*i);
        }
        r -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_weights() {
        let mut rng = fastrand::Rng::with_seed(9);
        let mut hits = [0u32; 2];
        for _ in 0..40_000 {
            hits[pick(&[(0, 1), (1, 3)], &mut rng).unwrap()] += 1;
        }
        assert!((9_000..11_000).contains(&hits[0]), "{hits:?}");
        assert_eq!(pick(&[], &mut rng), None);
        assert_eq!(pick(&[(4, 0)], &mut rng), None);
    }
}
