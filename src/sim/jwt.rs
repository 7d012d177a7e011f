//! Bearer-JWT checks for the private endpoints.
//!
//! Without a configured public key, any well-formed token passes: three base64url segments
//! whose header decodes to a JSON object with a string `alg`. With a public key (P-256 or
//! Ed25519), the token must also carry the key's `alg` (`ES256` or `EdDSA`) and a valid 64-byte
//! signature (raw `r || s`, or Ed25519's `R || S` checked strictly), be within `nbf`/`exp` (real
//! system time, 5 s leeway), and have a `uri` claim equal to `"{METHOD} {host}{path}"` for any
//! host (with or without an `http://` or `https://` prefix, as ccxt sends it) and the request
//! path without its query. ccxt's EdDSA-style `uris` array is accepted in place of `uri`.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::Value;

use crate::coinbase::auth::VerifyingKey;

/// Seconds of clock skew tolerated on `nbf` and `exp`.
/// The default leeway of `nbf`/`exp` checks ([`SimBuilder::jwt_leeway`](super::SimBuilder::jwt_leeway)).
pub(crate) const LEEWAY_SECS: i64 = 5;

/// Why a request was not authenticated; the text goes into the 401 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthError {
    Missing,
    Malformed,
    Algorithm,
    Signature,
    Expired,
    NotYetValid,
    Uri,
}

impl AuthError {
    pub(crate) fn message(self) -> &'static str {
        match self {
            AuthError::Missing => "missing bearer token",
            AuthError::Malformed => "malformed JWT",
            AuthError::Algorithm => "JWT alg does not match the key (ES256 for P-256, EdDSA for Ed25519)",
            AuthError::Signature => "invalid JWT signature",
            AuthError::Expired => "JWT expired",
            AuthError::NotYetValid => "JWT not yet valid",
            AuthError::Uri => "JWT uri claim does not match the request",
        }
    }
}

fn b64(segment: &str) -> Result<Vec<u8>, AuthError> {
    URL_SAFE_NO_PAD.decode(segment.trim_end_matches('=')).map_err(|_| AuthError::Malformed)
}

fn json_object(segment: &str) -> Result<serde_json::Map<String, Value>, AuthError> {
    match serde_json::from_slice(&b64(segment)?) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(AuthError::Malformed),
    }
}

/// The exchange's "now" (UNIX seconds) and how far outside `nbf`..`exp` a token may be.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) now: i64,
    pub(crate) leeway: i64,
}

/// The system time in UNIX seconds.
pub(crate) fn system_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Check the `Authorization` header value of a request to `method path`.
pub(crate) fn check(
    authorization: Option<&[u8]>,
    key: Option<&VerifyingKey>,
    method: &str,
    path: &str,
    window: Window,
) -> Result<(), AuthError> {
    let raw = authorization.ok_or(AuthError::Missing)?;
    let raw = std::str::from_utf8(raw).map_err(|_| AuthError::Malformed)?;
    let token = match raw.trim().split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => return Err(AuthError::Missing),
    };
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(AuthError::Malformed);
    };
    let header = json_object(h)?;
    let alg = header.get("alg").and_then(Value::as_str).ok_or(AuthError::Malformed)?;
    let signature = b64(s)?;
    let Some(key) = key else {
        b64(c)?;
        return Ok(());
    };
    if alg != key.algorithm().jwt_alg() {
        return Err(AuthError::Algorithm);
    }
    let signed = &token[..h.len() + 1 + c.len()];
    if !key.verify_signature(signed.as_bytes(), &signature) {
        return Err(AuthError::Signature);
    }

    let claims = json_object(c)?;
    let Window { now, leeway } = window;
    let exp = claims.get("exp").and_then(Value::as_i64).ok_or(AuthError::Malformed)?;
    if now > exp.saturating_add(leeway) {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_i64().ok_or(AuthError::Malformed)?;
        if nbf > now.saturating_add(leeway) {
            return Err(AuthError::NotYetValid);
        }
    }
    let uri_ok = |v: &Value| v.as_str().is_some_and(|u| uri_matches(u, method, path));
    let ok = match (claims.get("uri"), claims.get("uris")) {
        (Some(uri), _) => uri_ok(uri),
        (None, Some(Value::Array(uris))) => uris.iter().any(uri_ok),
        _ => false,
    };
    if ok { Ok(()) } else { Err(AuthError::Uri) }
}

/// Whether `uri` is `"{method} [http[s]://]{host}{path}"` for some non-empty host.
fn uri_matches(uri: &str, method: &str, path: &str) -> bool {
    let Some((m, rest)) = uri.split_once(' ') else {
        return false;
    };
    if m != method {
        return false;
    }
    let rest = rest.strip_prefix("http://").or_else(|| rest.strip_prefix("https://")).unwrap_or(rest);
    match rest.find('/') {
        Some(i) if i > 0 => &rest[i..] == path,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    /// The system clock with the default leeway.
    fn window() -> Window {
        Window { now: system_now(), leeway: LEEWAY_SECS }
    }

    use super::*;
    use p256::{
        ecdsa::signature::Signer,
        pkcs8::{EncodePublicKey, LineEnding},
    };

    /// A signing key of either type, to sign hand-made headers and claims.
    enum Key {
        Ec(p256::ecdsa::SigningKey),
        Ed(ed25519_dalek::SigningKey),
    }

    impl Key {
        fn ec() -> Key {
            Key::Ec(p256::ecdsa::SigningKey::random(&mut rand_core::OsRng))
        }

        fn ed() -> Key {
            let mut seed = [0u8; 32];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
            Key::Ed(ed25519_dalek::SigningKey::from_bytes(&seed))
        }

        fn alg(&self) -> &'static str {
            match self {
                Key::Ec(_) => "ES256",
                Key::Ed(_) => "EdDSA",
            }
        }

        fn header(&self) -> String {
            format!(r#"{{"alg":"{}","kid":"k","nonce":"ab","typ":"JWT"}}"#, self.alg())
        }

        fn sign(&self, message: &[u8]) -> Vec<u8> {
            match self {
                Key::Ec(k) => Signer::<p256::ecdsa::Signature>::sign(k, message).to_vec(),
                Key::Ed(k) => k.sign(message).to_vec(),
            }
        }

        /// The public half, the way the simulator gets it: as PEM.
        fn public(&self) -> VerifyingKey {
            let pem = match self {
                Key::Ec(k) => k.verifying_key().to_public_key_pem(LineEnding::LF).unwrap(),
                Key::Ed(k) => k.verifying_key().to_public_key_pem(LineEnding::LF).unwrap(),
            };
            VerifyingKey::from_public_key_pem(&pem).unwrap()
        }
    }

    fn token(key: &Key, header: &str, claims: &str) -> String {
        let signed = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(key.sign(signed.as_bytes())))
    }

    fn now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    const PATH: &str = "/api/v3/brokerage/accounts";

    fn claims(uri: &str, nbf: i64, exp: i64) -> String {
        format!(r#"{{"sub":"k","iss":"cdp","nbf":{nbf},"exp":{exp},"uri":"{uri}"}}"#)
    }

    #[test]
    fn uri_forms() {
        let ok = ["GET api.coinbase.com/x", "GET http://127.0.0.1:1/x", "GET https://h/x"];
        for u in ok {
            assert!(uri_matches(u, "GET", "/x"), "{u}");
        }
        let bad = ["GET /x", "POST h/x", "GET h/x?a=1", "GET h/y", "GETh/x", "GET h"];
        for u in bad {
            assert!(!uri_matches(u, "GET", "/x"), "{u}");
        }
    }

    /// The same table for an EC P-256 key (ES256) and an Ed25519 key (EdDSA).
    #[test]
    fn verification_table_for_both_algorithms() {
        for (sk, other, other_type) in [(Key::ec(), Key::ec(), Key::ed()), (Key::ed(), Key::ed(), Key::ec())]
        {
            let vk = sk.public();
            let header = sk.header();
            let alg = sk.alg();
            let t = now();
            let good_uri = format!("GET api.coinbase.com{PATH}");
            let bearer = |tok: String| format!("Bearer {tok}").into_bytes();
            type Row = (Option<Vec<u8>>, Result<(), AuthError>);
            let rows: Vec<Row> = vec![
                (Some(bearer(token(&sk, &header, &claims(&good_uri, t, t + 120)))), Ok(())),
                (
                    Some(bearer(token(
                        &sk,
                        &header,
                        &claims(&format!("GET http://127.0.0.1:9{PATH}"), t, t + 120),
                    ))),
                    Ok(()),
                ),
                (None, Err(AuthError::Missing)),
                (Some(b"Basic abc".to_vec()), Err(AuthError::Missing)),
                (Some(bearer("garbage".into())), Err(AuthError::Malformed)),
                (Some(bearer("a.b.c".into())), Err(AuthError::Malformed)),
                (
                    Some(bearer(token(&other, &header, &claims(&good_uri, t, t + 120)))),
                    Err(AuthError::Signature),
                ),
                // A 64-byte signature of the other algorithm, under this key's alg.
                (
                    Some(bearer(token(&other_type, &header, &claims(&good_uri, t, t + 120)))),
                    Err(AuthError::Signature),
                ),
                (
                    Some(bearer(token(&sk, &header, &claims(&good_uri, t - 300, t - 100)))),
                    Err(AuthError::Expired),
                ),
                (
                    Some(bearer(token(&sk, &header, &claims(&good_uri, t + 100, t + 220)))),
                    Err(AuthError::NotYetValid),
                ),
                (
                    Some(bearer(token(&sk, &header, &claims("GET h/api/v3/brokerage/products", t, t + 120)))),
                    Err(AuthError::Uri),
                ),
                (
                    Some(bearer(token(&other_type, &other_type.header(), &claims(&good_uri, t, t + 120)))),
                    Err(AuthError::Algorithm),
                ),
                (
                    Some(bearer(token(&sk, r#"{"alg":"none"}"#, &claims(&good_uri, t, t + 120)))),
                    Err(AuthError::Algorithm),
                ),
            ];
            for (i, (header, expected)) in rows.into_iter().enumerate() {
                assert_eq!(
                    check(header.as_deref(), Some(&vk), "GET", PATH, window()),
                    expected,
                    "{alg} row {i}"
                );
            }
        }
    }

    #[test]
    fn without_a_key_any_well_formed_token_passes() {
        let sk = Key::ec();
        let tok = token(&sk, &sk.header(), "{}");
        assert_eq!(check(Some(format!("Bearer {tok}").as_bytes()), None, "GET", "/", window()), Ok(()));
        let no_alg = token(&sk, r#"{"typ":"JWT"}"#, "{}");
        assert_eq!(
            check(Some(format!("Bearer {no_alg}").as_bytes()), None, "GET", "/", window()),
            Err(AuthError::Malformed)
        );
        assert_eq!(check(Some(b"Bearer x.y.z.w"), None, "GET", "/", window()), Err(AuthError::Malformed));
        assert_eq!(check(Some(&[0xFF, 0xFE]), None, "GET", "/", window()), Err(AuthError::Malformed));
    }
}
