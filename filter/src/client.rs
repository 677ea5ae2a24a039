//! Who the client is: the peer address, or an X-Forwarded-For entry when proxies in front of us are trusted.
//!
//! Convention (Envoy's `xff_num_trusted_hops`): the proxy appends the peer to X-Forwarded-For before the filter runs
//! (Envoy with `use_remote_address: true`; our bundled proxy does the same), so the right-most entry is the peer. With N
//! trusted hops the client is the entry N places from the right. The left-most entries are whatever the client wrote
//! and are never trusted. Without enough entries, the peer is the client.

/// The peer's IP without its port (`1.2.3.4:5678` -> `1.2.3.4`, `[::1]:80` -> `::1`).
pub fn ip_of(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        // a bare IPv6 address has several colons and no port
        Some((ip, port)) if !ip.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => ip,
        _ => address,
    }
}

/// The client's IP, given the peer address, the X-Forwarded-For header and the trusted hop count.
pub fn client_ip<'a>(peer: &'a str, xff: Option<&'a str>, trusted_hops: u32) -> &'a str {
    if trusted_hops == 0 {
        return ip_of(peer);
    }
    let Some(xff) = xff else { return ip_of(peer) };
    match xff.rsplit(',').nth(trusted_hops as usize) {
        Some(entry) if !entry.trim().is_empty() => ip_of(entry.trim()),
        _ => ip_of(peer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strips_ports() {
        assert_eq!(ip_of("10.0.0.1:443"), "10.0.0.1");
        assert_eq!(ip_of("[2001:db8::1]:443"), "2001:db8::1");
        assert_eq!(ip_of("2001:db8::1"), "2001:db8::1");
        assert_eq!(ip_of("10.0.0.1"), "10.0.0.1");
    }

    #[test]
    fn counts_trusted_hops_from_the_right() {
        let xff = "6.6.6.6, 1.1.1.1, 10.0.0.9";
        assert_eq!(client_ip("10.0.0.9:1", Some(xff), 0), "10.0.0.9");
        assert_eq!(client_ip("10.0.0.9:1", Some(xff), 1), "1.1.1.1");
        assert_eq!(client_ip("10.0.0.9:1", Some(xff), 2), "6.6.6.6");
        assert_eq!(client_ip("10.0.0.9:1", Some(xff), 3), "10.0.0.9", "too few entries: the peer");
        assert_eq!(client_ip("10.0.0.9:1", None, 1), "10.0.0.9");
        assert_eq!(client_ip("10.0.0.9:1", Some(" , "), 1), "10.0.0.9");
    }

    proptest! {
        /// Whatever a client prepends, with N trusted hops the answer only depends on the N+1 right-most entries.
        #[test]
        fn client_prefix_cannot_change_the_answer(prefix in "[0-9a-f.:, ]{0,40}", hops in 1u32..3) {
            let tail = "1.1.1.1, 2.2.2.2, 3.3.3.3";
            let a = client_ip("3.3.3.3:9", Some(tail), hops).to_string();
            let spoofed = format!("{prefix},{tail}");
            prop_assert_eq!(client_ip("3.3.3.3:9", Some(&spoofed), hops), a.as_str());
        }
    }
}
