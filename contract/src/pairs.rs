//! The proxy-wasm ABI's serialized header map: a little-endian `u32` count, then each pair's key and value lengths
//! (`u32` each), then each key and value, each followed by a NUL byte. One codec for both sides of the ABI: the filter
//! sends maps in it (local replies, calls to the supervisor) and the bundled proxy reads and writes them.

/// Serializes pairs into the ABI's format.
pub fn encode<'a, I>(pairs: I) -> Vec<u8>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])> + Clone,
{
    let mut count = 0u32;
    let mut data_len = 0usize;
    for (k, v) in pairs.clone() {
        count += 1;
        data_len += k.len() + v.len() + 2;
    }
    let mut out = Vec::with_capacity(4 + 8 * count as usize + data_len);
    out.extend_from_slice(&count.to_le_bytes());
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses the ABI's format; `None` if it is truncated or inconsistent (the caller answers `BadArgument`).
pub fn decode(data: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    if data.is_empty() {
        return Some(vec![]);
    }
    let count = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    // each pair needs at least 10 bytes: refuse counts the data cannot hold before allocating
    if count > data.len() / 10 + 1 {
        return None;
    }
    let mut sizes = Vec::with_capacity(count);
    let mut pos = 4;
    for _ in 0..count {
        let k = u32::from_le_bytes(data.get(pos..pos + 4)?.try_into().ok()?) as usize;
        let v = u32::from_le_bytes(data.get(pos + 4..pos + 8)?.try_into().ok()?) as usize;
        sizes.push((k, v));
        pos += 8;
    }
    let mut pairs = Vec::with_capacity(count);
    for (k, v) in sizes {
        let key = data.get(pos..pos.checked_add(k)?)?.to_vec();
        pos += k + 1;
        let value = data.get(pos..pos.checked_add(v)?)?.to_vec();
        pos += v + 1;
        pairs.push((key, value));
    }
    if pos > data.len() {
        return None;
    }
    Some(pairs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_layout() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b":status", b"200"), (b"a", b"")];
        let data = encode(pairs.iter().copied());
        assert_eq!(&data[..4], &2u32.to_le_bytes());
        assert_eq!(&data[4..8], &7u32.to_le_bytes());
        assert_eq!(&data[20..], b":status\x00200\x00a\x00\x00");
    }

    #[test]
    fn truncated_or_lying_input_is_refused() {
        assert_eq!(decode(&[]), Some(vec![]));
        assert_eq!(decode(&[1, 0, 0, 0]), None);
        assert_eq!(decode(&[255, 255, 255, 255, 0, 0]), None);
        let mut data = encode([(&b"key"[..], &b"value"[..])]);
        data.truncate(data.len() - 3);
        assert_eq!(decode(&data), None);
    }

    #[test]
    fn empty_map_is_a_zero_count() {
        assert_eq!(encode(std::iter::empty()), vec![0, 0, 0, 0]);
    }

    proptest! {
        #[test]
        fn round_trip(pairs in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..20), proptest::collection::vec(any::<u8>(), 0..40)), 0..20)) {
            let data = encode(pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
            prop_assert_eq!(decode(&data), Some(pairs));
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&data);
        }
    }
}
