//! Sticky-session cookies: which endpoint a client is pinned to, signed so that a client cannot choose.
//!
//! The value is `<base64url(endpoint id)>.<expiry, unix seconds>.<base64url(HMAC-SHA256(secret, "v1|" id "|" expiry))>`.
//! It names the endpoint by id, never by address (an address is not something to hand to clients, and ids survive an
//! endpoint moving). A value that does not verify (tampered, expired, garbage, another secret) decodes to nothing and
//! the request is balanced as if it had no cookie: never an error to the client.

use std::cell::RefCell;
use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::StickyConfig;
use crate::cookie;

type HmacSha256 = Hmac<Sha256>;

/// Longest cookie value we try to verify (ids are at most 128 bytes).
const MAX_VALUE_LEN: usize = 512;

/// Cookies of the sticky name verified per request, in header order: a browser sends the name more than once only
/// when cookies of several paths or domains carry it. Each check is an HMAC, so an unbounded number would let one
/// request of 600 forged values cost 20 plain requests' CPU; beyond this many, the rest are not looked at.
pub const MAX_CHECKED_VALUES: usize = 2;

/// Cookie values verified recently, kept per codec (a new secret starts empty). A returning client sends the same
/// value on every request; its HMAC is checked once, then looked up. Only values that verified are kept, so a client
/// cannot fill it with forgeries; it is emptied when full.
const MAX_VERIFIED: usize = 1024;

#[derive(Clone)]
pub struct StickyCodec {
    mac: HmacSha256,
    verified: RefCell<HashMap<String, (String, u64)>>,
}

impl std::fmt::Debug for StickyCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StickyCodec(..)")
    }
}

impl StickyCodec {
    pub fn new(secret: &[u8]) -> Option<StickyCodec> {
        HmacSha256::new_from_slice(secret).ok().map(|mac| StickyCodec { mac, verified: RefCell::default() })
    }

    fn tag(&self, id: &str, expires: u64) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(b"v1|");
        mac.update(id.as_bytes());
        mac.update(b"|");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    pub fn encode(&self, id: &str, expires_unix_s: u64) -> String {
        let tag = self.tag(id, expires_unix_s).finalize().into_bytes();
        format!("{}.{}.{}", B64.encode(id), expires_unix_s, B64.encode(tag))
    }

    /// The endpoint id and expiry (unix seconds) of a valid, unexpired value.
    pub fn decode(&self, value: &str, now_unix_s: u64) -> Option<(String, u64)> {
        if let Some((id, expires)) = self.verified.borrow().get(value) {
            return (*expires > now_unix_s).then(|| (id.clone(), *expires));
        }
        let (id, expires) = self.verify(value)?;
        if let Ok(mut verified) = self.verified.try_borrow_mut() {
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(value.to_string(), (id.clone(), expires));
        }
        (expires > now_unix_s).then_some((id, expires))
    }

    /// The endpoint id and expiry a value's signature vouches for (expired or not).
    fn verify(&self, value: &str) -> Option<(String, u64)> {
        if value.len() > MAX_VALUE_LEN {
            return None;
        }
        let mut parts = value.split('.');
        let (id, expires, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let id = String::from_utf8(B64.decode(id).ok()?).ok()?;
        let expires: u64 = expires.parse().ok()?;
        let tag = B64.decode(tag).ok()?;
        // constant-time comparison
        self.tag(&id, expires).verify_slice(&tag).ok()?;
        Some((id, expires))
    }

    /// How many verified values are kept.
    #[cfg(test)]
    fn verified_len(&self) -> usize {
        self.verified.borrow().len()
    }
}

/// What a request's cookies say about its session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pin {
    /// The endpoint id and expiry (unix seconds) of the first valid value.
    pub pinned: Option<(String, u64)>,
    /// Values of the cookie's name were sent, and none was valid.
    pub invalid: bool,
}

/// Reads the session cookie `name` from a `Cookie` header: at most [`MAX_CHECKED_VALUES`] values are verified.
pub fn resolve(codec: &StickyCodec, cookie_header: Option<&str>, name: &str, now_unix_s: u64) -> Pin {
    let Some(header) = cookie_header else { return Pin::default() };
    let mut seen = false;
    for value in cookie::values(header, name).take(MAX_CHECKED_VALUES) {
        seen = true;
        if let Some(pinned) = codec.decode(value, now_unix_s) {
            return Pin { pinned: Some(pinned), invalid: false };
        }
    }
    Pin { pinned: None, invalid: seen }
}

/// The expiry (unix seconds) of a new cookie for a client served by endpoint `served`, or `None` when its cookie may
/// stay: same endpoint and still in the first half of its life (a sliding session without a cookie per reply).
pub fn renewal(pinned: Option<&(String, u64)>, served: &str, now_ms: u64, ttl_ms: u64) -> Option<u64> {
    let renew = match pinned {
        Some((id, expires)) if id == served => expires.saturating_mul(1000) < now_ms.saturating_add(ttl_ms / 2),
        _ => true,
    };
    renew.then(|| (now_ms + ttl_ms) / 1000)
}

/// The `Set-Cookie` header value for `value`.
pub fn set_cookie(config: &StickyConfig, value: &str) -> String {
    let mut s = format!("{}={}; Max-Age={}; Path=/", config.cookie_name, value, config.ttl.0 / 1000);
    if config.http_only {
        s.push_str("; HttpOnly");
    }
    if config.secure {
        s.push_str("; Secure");
    }
    s.push_str("; SameSite=");
    s.push_str(config.same_site.as_str());
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Millis, SameSite};
    use proptest::prelude::*;

    fn codec() -> StickyCodec {
        StickyCodec::new(b"0123456789abcdef-secret").unwrap()
    }

    #[test]
    fn round_trip_until_expiry() {
        let c = codec();
        let v = c.encode("av-1", 1_000);
        assert_eq!(c.decode(&v, 999), Some(("av-1".to_string(), 1_000)));
        assert_eq!(c.decode(&v, 1_000), None, "expired");
        assert!(!v.contains("127.0.0.1"));
    }

    #[test]
    fn tampering_and_other_secrets_are_rejected() {
        let c = codec();
        let v = c.encode("av-1", 5_000);
        let other = StickyCodec::new(b"another-secret-of-16+").unwrap();
        assert_eq!(other.decode(&v, 0), None);
        // swap the id, keep the tag
        let forged = format!("{}.{}", B64.encode("av-2"), v.split_once('.').unwrap().1);
        assert_eq!(c.decode(&forged, 0), None);
        // push the expiry
        let parts: Vec<&str> = v.split('.').collect();
        assert_eq!(c.decode(&format!("{}.9999999999.{}", parts[0], parts[2]), 0), None);
        for garbage in ["", ".", "..", "a.b.c", "a.b.c.d", "%%%.1.%%%", &"x".repeat(10_000)] {
            assert_eq!(c.decode(garbage, 0), None);
        }
    }

    #[test]
    fn a_verified_value_is_kept_and_still_expires() {
        let c = codec();
        let v = c.encode("av-1", 1_000);
        assert_eq!(c.decode(&v, 10), Some(("av-1".to_string(), 1_000)));
        assert_eq!(c.verified_len(), 1);
        // the second time it is looked up (the id changed under it would show), and its expiry still holds
        c.verified.borrow_mut().insert(v.clone(), ("looked-up".into(), 1_000));
        assert_eq!(c.decode(&v, 11), Some(("looked-up".to_string(), 1_000)));
        assert_eq!(c.decode(&v, 1_000), None, "expired");
        // forgeries are never kept
        let forged = format!("{}.{}", B64.encode("av-2"), v.split_once('.').unwrap().1);
        for _ in 0..10 {
            assert_eq!(c.decode(&forged, 0), None);
        }
        assert_eq!(c.verified_len(), 1);
        // bounded
        for i in 0..MAX_VERIFIED as u64 + 5 {
            assert!(c.decode(&c.encode("av-1", 2_000 + i), 0).is_some());
        }
        assert!(c.verified_len() <= MAX_VERIFIED);
        // another secret keeps its own
        assert_eq!(StickyCodec::new(b"another-secret-of-16+").unwrap().decode(&v, 10), None);
    }

    proptest! {
        #[test]
        fn never_panics_and_never_accepts_noise(s in ".{0,200}") {
            prop_assert_eq!(codec().decode(&s, 0), None);
        }

        #[test]
        fn any_single_byte_change_is_rejected(pos in 0usize..80, byte in 0u8..128) {
            let c = codec();
            let v = c.encode("av-7", 10_000);
            let mut b = v.clone().into_bytes();
            let pos = pos % b.len();
            prop_assume!(b[pos] != byte);
            b[pos] = byte;
            if let Ok(s) = String::from_utf8(b) {
                // base64 without padding may ignore the last char's low bits; the id must never change
                let d = c.decode(&s, 0);
                prop_assert!(d.is_none() || d.map(|(id, _)| id).as_deref() == Some("av-7"));
            }
        }
    }

    #[test]
    fn resolves_the_first_valid_value_and_renews_in_the_second_half_of_life() {
        let c = codec();
        let good = c.encode("av-1", 2_000);
        let header = format!("S=garbage; S={good}");
        assert_eq!(resolve(&c, Some(&header), "S", 1_000).pinned, Some(("av-1".into(), 2_000)));
        assert!(resolve(&c, Some("S=garbage"), "S", 0).invalid);
        assert_eq!(resolve(&c, Some("other=1"), "S", 0), Pin::default());
        // a third value is not checked
        let header = format!("S=x; S=y; S={good}");
        assert_eq!(resolve(&c, Some(&header), "S", 1_000), Pin { pinned: None, invalid: true });
        let pinned = ("av-1".to_string(), 2_000);
        assert_eq!(renewal(Some(&pinned), "av-1", 1_000_000, 1_800_000), None, "early in its life");
        assert_eq!(renewal(Some(&pinned), "av-1", 1_500_000, 1_800_000), Some(3_300));
        assert_eq!(renewal(Some(&pinned), "av-2", 1_000_000, 1_800_000), Some(2_800), "another endpoint served");
        assert_eq!(renewal(None, "av-1", 1_000_000, 1_800_000), Some(2_800));
    }

    #[test]
    fn set_cookie_carries_the_attributes() {
        let mut cfg = StickyConfig { ttl: Millis(3_600_000), ..StickyConfig::default() };
        assert_eq!(
            set_cookie(&cfg, "v"),
            "AGENTE_VENDEDOR_SESSION=v; Max-Age=3600; Path=/; HttpOnly; Secure; SameSite=Lax"
        );
        cfg.http_only = false;
        cfg.secure = false;
        cfg.same_site = SameSite::Strict;
        assert_eq!(set_cookie(&cfg, "v"), "AGENTE_VENDEDOR_SESSION=v; Max-Age=3600; Path=/; SameSite=Strict");
    }
}
