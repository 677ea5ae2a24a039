//! Power of two choices (Mitzenmacher, 2001): pick two distinct candidates at random, keep the less loaded.
//!
//! Nearly as good as scanning all endpoints for the least loaded, at constant cost, and without the herd effect where
//! every worker sends to the same "least loaded" endpoint at once. Used by `least_connections` (load = in-flight / weight)
//! and `response_time` (load = peak-EWMA x (in-flight + 1) / weight). Randomness is an argument.

/// Returns `(winner, loser)`; the loser is `None` with a single candidate. `load` is called for the two picked only.
pub fn pick(
    candidates: &[usize],
    rng: &mut fastrand::Rng,
    mut load: impl FnMut(usize) -> f64,
) -> Option<(usize, Option<usize>)> {
    match candidates.len() {
        0 => None,
        1 => candidates.first().map(|&c| (c, None)),
        n => {
            let a = rng.usize(..n);
            let mut b = rng.usize(..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (*candidates.get(a)?, *candidates.get(b)?);
            let (la, lb) = (load(a), load(b));
            // ties go to the first pick, which is itself random
            if lb < la { Some((b, Some(a))) } else { Some((a, Some(b))) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_cases() {
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(pick(&[], &mut rng, |_| 0.0), None);
        assert_eq!(pick(&[7], &mut rng, |_| 0.0), Some((7, None)));
    }

    #[test]
    fn the_less_loaded_of_two_wins_and_they_differ() {
        let mut rng = fastrand::Rng::with_seed(2);
        for _ in 0..1000 {
            let (w, l) = pick(&[0, 1, 2, 3], &mut rng, |i| i as f64).unwrap();
            let l = l.unwrap();
            assert_ne!(w, l);
            assert!(w < l);
        }
    }

    #[test]
    fn a_loaded_endpoint_gets_little_traffic() {
        let mut rng = fastrand::Rng::with_seed(3);
        let loads = [10.0, 0.0, 0.0];
        let mut hits = [0; 3];
        for _ in 0..3000 {
            hits[pick(&[0, 1, 2], &mut rng, |i| loads[i]).unwrap().0] += 1;
        }
        // the loaded endpoint only wins against... nobody: it loses every pairing it is in
        assert_eq!(hits[0], 0);
        assert!(hits[1] > 1200 && hits[2] > 1200, "{hits:?}");
    }
}
