//! The deployment secret: 32 random bytes made at the first start and kept in the state file (mode 0600), so that
//! they survive restarts. Two things come from it, each under its own label so that one never reveals the other:
//! - the signature on the labels of the containers the autoscaler starts: only a container carrying a valid one is
//!   adopted as ours after a restart (any other container with the service label is someone else's);
//! - each service's hash seed, sent in its endpoint table: consistent-hash placement and rate-limit slots then depend
//!   on a value clients cannot know, so they cannot craft keys that pile onto one instance or one slot.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Secret([u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<Secret> for String {
    fn from(s: Secret) -> String {
        hex(&s.0)
    }
}

impl TryFrom<String> for Secret {
    type Error = String;
    fn try_from(s: String) -> Result<Secret, String> {
        let bytes = unhex(&s).ok_or("the secret must be 64 hexadecimal digits")?;
        Ok(Secret(bytes.try_into().map_err(|_| "the secret must be 64 hexadecimal digits")?))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

/// What a container label signature covers: everything the autoscaler believes about the container.
pub struct LabelClaims<'a> {
    pub service: &'a str,
    pub instance: &'a str,
    pub port: &'a str,
    pub name: &'a str,
}

impl Secret {
    /// New random bytes from the operating system.
    pub fn generate() -> Result<Secret, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(Secret(bytes))
    }

    #[cfg(test)]
    pub fn from_bytes(bytes: [u8; 32]) -> Secret {
        Secret(bytes)
    }

    fn mac(&self, purpose: &str, parts: &[&str]) -> [u8; 32] {
        // a 32-byte key is always accepted
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(purpose.as_bytes());
        for p in parts {
            // length-prefixed: no two different part lists give the same input
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p.as_bytes());
        }
        mac.finalize().into_bytes().into()
    }

    /// The hash seed of `service`'s table (16 hex digits).
    pub fn hash_seed(&self, service: &str) -> String {
        hex(&self.mac("equilibrio hash seed v1", &[service])[..8])
    }

    /// The signature label value for a container the autoscaler starts.
    pub fn sign(&self, c: &LabelClaims<'_>) -> String {
        hex(&self.mac("equilibrio container labels v1", &[c.service, c.instance, c.port, c.name]))
    }

    /// Whether `signature` is this secret's for these claims (constant time).
    pub fn verify(&self, c: &LabelClaims<'_>, signature: &str) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.sign(c).as_bytes().ct_eq(signature.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims<'a>(instance: &'a str, port: &'a str) -> LabelClaims<'a> {
        LabelClaims { service: "av", instance, port, name: "av-i1" }
    }

    #[test]
    fn a_signature_verifies_only_for_the_same_claims_and_secret() {
        let s = Secret::from_bytes([7; 32]);
        let sig = s.sign(&claims("i1", "8080"));
        assert!(s.verify(&claims("i1", "8080"), &sig));
        assert!(!s.verify(&claims("i1", "8081"), &sig), "another port");
        assert!(!s.verify(&claims("i2", "8080"), &sig), "another instance");
        assert!(!Secret::from_bytes([8; 32]).verify(&claims("i1", "8080"), &sig), "another secret");
        assert!(!s.verify(&claims("i1", "8080"), ""), "no signature");
    }

    #[test]
    fn parts_cannot_be_shifted_between_fields() {
        let s = Secret::from_bytes([1; 32]);
        let a = s.sign(&LabelClaims { service: "a", instance: "bc", port: "1", name: "n" });
        let b = s.sign(&LabelClaims { service: "ab", instance: "c", port: "1", name: "n" });
        assert_ne!(a, b);
    }

    #[test]
    fn round_trips_as_hex_and_refuses_anything_else() {
        let s = Secret::generate().unwrap();
        let text: String = s.clone().into();
        assert_eq!(text.len(), 64);
        assert_eq!(Secret::try_from(text).unwrap(), s);
        assert!(Secret::try_from("zz".repeat(32)).is_err());
        assert!(Secret::try_from("ab".to_string()).is_err());
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn seeds_differ_per_service_and_secret() {
        let s = Secret::from_bytes([3; 32]);
        assert_eq!(s.hash_seed("av").len(), 16);
        assert_ne!(s.hash_seed("av"), s.hash_seed("other"));
        assert_ne!(s.hash_seed("av"), Secret::from_bytes([4; 32]).hash_seed("av"));
    }
}
