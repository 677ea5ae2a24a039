//! The balancing algorithms, each in its own module, as plain functions and state over endpoint indices.
//!
//! They never see the proxy: the worker engine (`crate::worker`) gives them the candidates (healthy, weight above 0, not
//! ejected), the loads, the time and the randomness, and turns their choice into the ordered upstream list.

pub mod ewma;
pub mod p2c;
pub mod random;
pub mod ring;
pub mod swrr;

/// The most upstreams listed per request: the primary and two retries.
pub const MAX_UPSTREAMS: usize = 3;

/// Completes `order` (which holds the primary, and maybe more) with the candidates that follow the primary in table
/// order, wrapping, up to `limit` entries (at most [`MAX_UPSTREAMS`]). As the primary rotates, so do the retries, so a
/// failed endpoint's retries spread over the others.
pub fn fill_retries(order: &mut Vec<usize>, candidates: &[usize], limit: usize) {
    let limit = limit.min(MAX_UPSTREAMS);
    let Some(&primary) = order.first() else {
        return;
    };
    let n = candidates.len();
    // a primary from elsewhere (another zone) still rotates the start
    // candidate lists are ascending endpoint indices (see `Snapshot::new_session_candidates`)
    let start = candidates.binary_search(&primary).map_or(primary % n.max(1), |p| p + 1);
    for k in 0..n {
        if order.len() >= limit {
            break;
        }
        if let Some(&c) = candidates.get((start + k) % n)
            && !order.contains(&c)
        {
            order.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_follow_the_primary_and_are_distinct() {
        let mut o = vec![2];
        fill_retries(&mut o, &[0, 1, 2, 3], MAX_UPSTREAMS);
        assert_eq!(o, vec![2, 3, 0]);
        let mut o = vec![1];
        fill_retries(&mut o, &[1], MAX_UPSTREAMS);
        assert_eq!(o, vec![1]);
        let mut o = vec![5];
        fill_retries(&mut o, &[0, 1], MAX_UPSTREAMS);
        assert_eq!(o, vec![5, 1, 0], "a primary that is not a candidate rotates the start too");
        let mut o = vec![];
        fill_retries(&mut o, &[0, 1], MAX_UPSTREAMS);
        assert!(o.is_empty());
        let mut o = vec![1];
        fill_retries(&mut o, &[0, 1, 2], 2);
        assert_eq!(o, vec![1, 2], "up to the limit");
    }
}
