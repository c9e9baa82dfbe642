//! Panel sessions: a cookie `warren_admin=<expiry>.<HMAC-SHA256(key, expiry)>`
//! with the key derived from the admin token, so every replica accepts it and
//! changing the admin token ends every session. HttpOnly, SameSite=Strict.
//! Cross-site requests are refused by [`same_origin`].

use std::time::Duration;

use axum::http::{HeaderMap, header};
use sha2::{Digest as _, Sha256};

pub const COOKIE: &str = "warren_admin";

/// SHA-256.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Constant-time equality of two digests.
pub fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hmac(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

/// Signs and verifies session cookies.
#[derive(Clone)]
pub struct SessionKey {
    key: [u8; 32],
    lifetime: Duration,
}

impl SessionKey {
    pub fn new(admin_token: &str, lifetime: Duration) -> Self {
        let mut material = b"warren-admin-session\0".to_vec();
        material.extend_from_slice(admin_token.as_bytes());
        Self {
            key: digest(&material),
            lifetime,
        }
    }

    /// A cookie value valid from `now_unix` for the session lifetime.
    pub fn issue(&self, now_unix: i64) -> String {
        let expiry = now_unix + i64::try_from(self.lifetime.as_secs()).unwrap_or(3600);
        format!(
            "{expiry}.{}",
            hex::encode(hmac(&self.key, expiry.to_string().as_bytes()))
        )
    }

    /// Whether `value` is a cookie we issued that has not expired.
    pub fn verify(&self, value: &str, now_unix: i64) -> bool {
        let Some((expiry, mac)) = value.split_once('.') else {
            return false;
        };
        let Ok(expiry_at) = expiry.parse::<i64>() else {
            return false;
        };
        let Ok(mac) = hex::decode(mac) else {
            return false;
        };
        let Ok(mac) = <[u8; 32]>::try_from(mac.as_slice()) else {
            return false;
        };
        same_digest(&mac, &hmac(&self.key, expiry.as_bytes())) && expiry_at > now_unix
    }

    /// The session cookie from a request's headers, if valid.
    pub fn from_headers(&self, headers: &HeaderMap, now_unix: i64) -> bool {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(name, value)| name == COOKIE && self.verify(value, now_unix))
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

/// `Set-Cookie` for a session (or, with `None`, one that ends it).
pub fn set_cookie(value: Option<&str>, lifetime: Duration, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match value {
        Some(value) => format!(
            "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            lifetime.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

/// Refuses cross-site requests: `Sec-Fetch-Site` must be `same-origin` or
/// `none` when present, and `Origin`, when present, must name this host.
pub fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match (url::Url::parse(origin), host) {
        (Ok(origin), Some(host)) => {
            let origin_host = match (origin.host_str(), origin.port()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_string(),
                _ => return false,
            };
            origin_host.eq_ignore_ascii_case(host)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn cookies_verify_expire_and_resist_tampering() {
        let key = SessionKey::new("an-admin-token-long-enough", Duration::from_secs(60));
        let cookie = key.issue(1000);
        assert!(key.verify(&cookie, 1000));
        assert!(!key.verify(&cookie, 1060), "expired");
        let forged = cookie.replacen("1060", "9999", 1);
        assert!(!key.verify(&forged, 1000));
        let other = SessionKey::new("another-admin-token-entirely", Duration::from_secs(60));
        assert!(!other.verify(&cookie, 1000));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {COOKIE}={cookie}")).unwrap(),
        );
        assert!(key.from_headers(&headers, 1001));
        assert!(
            set_cookie(Some(&cookie), key.lifetime(), false).contains("HttpOnly; SameSite=Strict")
        );
    }

    #[test]
    fn cross_site_requests_are_refused() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        assert!(same_origin(&headers(&[("host", "a:8080")])));
        assert!(same_origin(&headers(&[
            ("host", "a:8080"),
            ("origin", "http://a:8080"),
            ("sec-fetch-site", "same-origin")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "a:8080"),
            ("sec-fetch-site", "cross-site")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "a:8080"),
            ("origin", "http://evil:8080")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "a:8080"),
            ("origin", "null")
        ])));
    }
}
