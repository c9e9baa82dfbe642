//! Token secrets: `wrn_` + 64 hex digits (256 random bits) + 8 hex digits of
//! CRC-32 over the random part. The checksum lets the sender refuse a
//! mistyped or truncated secret without a database round trip; only the
//! SHA-256 of the whole string is stored.

use sha2::{Digest as _, Sha256};

/// Every secret starts with this.
pub const PREFIX: &str = "wrn_";
const RANDOM_HEX: usize = 64;
const CHECK_HEX: usize = 8;
/// Length of a well-formed secret.
pub const SECRET_LEN: usize = PREFIX.len() + RANDOM_HEX + CHECK_HEX;

/// The SHA-256 of a secret: what the database stores and looks up.
pub type SecretHash = [u8; 32];

/// A freshly generated secret. Shown once, at creation; never stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(…{})", self.hint())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the operating system's random source failed: {0}")]
pub struct RandomError(String);

impl Secret {
    /// 256 bits from the operating system's random source.
    pub fn generate() -> Result<Self, RandomError> {
        let mut random = [0u8; 32];
        getrandom::fill(&mut random).map_err(|e| RandomError(e.to_string()))?;
        let body = hex::encode(random);
        let check = crc32fast::hash(body.as_bytes());
        Ok(Self(format!("{PREFIX}{body}{check:08x}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> SecretHash {
        hash(&self.0)
    }

    /// The last four characters, to recognise a token in lists.
    pub fn hint(&self) -> &str {
        &self.0[self.0.len() - 4..]
    }
}

/// Whether `candidate` has the shape and checksum of a secret we issued.
pub fn well_formed(candidate: &str) -> bool {
    let Some(rest) = candidate.strip_prefix(PREFIX) else {
        return false;
    };
    if rest.len() != RANDOM_HEX + CHECK_HEX
        || !rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return false;
    }
    let (body, check) = rest.split_at(RANDOM_HEX);
    u32::from_str_radix(check, 16).is_ok_and(|c| c == crc32fast::hash(body.as_bytes()))
}

/// SHA-256 of a secret string.
pub fn hash(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_well_formed_and_distinct() {
        let a = Secret::generate().unwrap();
        let b = Secret::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), SECRET_LEN);
        assert!(well_formed(a.as_str()));
        assert_ne!(a.hash(), b.hash());
        assert!(!format!("{a:?}").contains(&a.as_str()[4..20]));
    }

    #[test]
    fn any_single_character_change_is_caught() {
        let secret = Secret::generate().unwrap();
        let s = secret.as_str();
        for i in PREFIX.len()..s.len() {
            let mut bytes = s.as_bytes().to_vec();
            bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
            let changed = String::from_utf8(bytes).unwrap();
            assert!(!well_formed(&changed), "change at {i} not caught");
        }
    }

    #[test]
    fn malformed_shapes_are_refused() {
        let s = Secret::generate().unwrap().as_str().to_string();
        assert!(!well_formed(""));
        assert!(!well_formed(&s[..s.len() - 1]));
        assert!(!well_formed(&format!("{s}0")));
        assert!(!well_formed(&s.replacen("wrn_", "wrx_", 1)));
        assert!(!well_formed(&s.to_uppercase()));
    }
}
