//! The proxy-wasm ABI's serialized header map, as the filter sends it (local replies, calls to the supervisor): a
//! little-endian `u32` count, then each pair's key and value lengths (`u32` each), then each key and value, each
//! followed by a NUL byte.

/// Serializes pairs into the ABI's format.
pub fn encode(pairs: &[(&str, &str)]) -> Vec<u8> {
    let data: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + 8 * pairs.len() + data);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_layout() {
        let bytes = encode(&[(":status", "429"), ("a", "")]);
        let mut expected = vec![2, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(b":status\x00429\x00a\x00\x00");
        assert_eq!(bytes, expected);
    }

    #[test]
    fn empty_map_is_a_zero_count() {
        assert_eq!(encode(&[]), vec![0, 0, 0, 0]);
    }
}
