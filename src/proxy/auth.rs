//! Client authentication: a bearer JWT signed by the proxy's own CDP key, or a local token.

use crate::coinbase::auth::{VerifyingKey, unix_now, verify_jwt};
use hyper::HeaderMap;

/// Seconds of clock skew tolerated on a client JWT's `nbf` and `exp`.
const LEEWAY_SECS: u64 = 5;

/// The header a client may carry a local token in (ccxt's `headers` option can set it).
pub(super) const TOKEN_HEADER: &str = "x-tickshare-token";

/// [`TOKEN_HEADER`] as a header name, built once (a lookup by `&str` parses it every request).
static TOKEN_HEADER_NAME: hyper::header::HeaderName = hyper::header::HeaderName::from_static(TOKEN_HEADER);

pub(super) struct Auth {
    key: VerifyingKey,
    tokens: Vec<String>,
}

impl Auth {
    pub(super) fn new(key: VerifyingKey, tokens: Vec<String>) -> Self {
        Auth { key, tokens }
    }

    /// Whether the request may be served. `path` is without query (what a JWT's `uri` names).
    pub(super) fn check(&self, headers: &HeaderMap, method: &str, path: &str) -> bool {
        if let Some(t) = headers.get(&TOKEN_HEADER_NAME).and_then(|v| v.to_str().ok())
            && self.is_token(t.trim())
        {
            return true;
        }
        let Some(raw) = headers.get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some((scheme, token)) = raw.trim().split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return false;
        }
        let token = token.trim();
        if self.is_token(token) {
            return true;
        }
        // `iss`/`aud`/`iat` are not checked: ccxt's ES256 tokens carry `iss: coinbase-cloud`
        // and an `aud`, the SDK's `iss: cdp` and none (COINBASE.md §4.1).
        verify_jwt(token, &self.key, method, path, unix_now(), LEEWAY_SECS).is_ok()
    }

    fn is_token(&self, given: &str) -> bool {
        // Compare every configured token in constant time (per byte), so timing tells nothing.
        self.tokens.iter().fold(false, |ok, t| ok | ct_eq(t.as_bytes(), given.as_bytes()))
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coinbase::Credentials;
    use hyper::header::{AUTHORIZATION, HeaderValue};

    #[test]
    fn tokens_and_jwts() {
        let creds = Credentials::generate("organizations/o/apiKeys/k");
        let auth = Auth::new(creds.verifying_key(), vec!["t".repeat(20)]);
        let path = "/api/v3/brokerage/accounts";
        let with = |name: &str, v: String| {
            let mut h = HeaderMap::new();
            h.insert(
                hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(&v).unwrap(),
            );
            h
        };
        assert!(!auth.check(&HeaderMap::new(), "GET", path));
        assert!(auth.check(&with("authorization", format!("Bearer {}", "t".repeat(20))), "GET", path));
        assert!(auth.check(&with(TOKEN_HEADER, "t".repeat(20)), "GET", path));
        assert!(!auth.check(&with(TOKEN_HEADER, "t".repeat(19)), "GET", path));
        let sdk = creds.rest_jwt("GET", "api.coinbase.com", path);
        assert!(auth.check(&with(AUTHORIZATION.as_str(), format!("Bearer {sdk}")), "GET", path));
        assert!(!auth.check(&with(AUTHORIZATION.as_str(), format!("Bearer {sdk}")), "POST", path));
        assert!(!auth.check(
            &with(AUTHORIZATION.as_str(), format!("Bearer {sdk}")),
            "GET",
            "/api/v3/brokerage/orders"
        ));
        let ccxt = creds.rest_jwt("GET", "http://127.0.0.1:8787", path);
        assert!(auth.check(&with(AUTHORIZATION.as_str(), format!("Bearer {ccxt}")), "GET", path));
        let other = Credentials::generate("x").rest_jwt("GET", "h", path);
        assert!(!auth.check(&with(AUTHORIZATION.as_str(), format!("Bearer {other}")), "GET", path));
    }
}
