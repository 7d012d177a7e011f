//! CDP API key credentials and ES256 JWT minting.
//!
//! A CDP key is a key name (`organizations/{org}/apiKeys/{id}`) and an EC P-256 private key in
//! PEM. Each request carries a fresh JWT (`Authorization: Bearer ...`) valid for 120 s whose
//! `uri` claim is `"METHOD host/path"`, without scheme or query string.

use std::{fmt, time::SystemTime};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use p256::{
    SecretKey,
    ecdsa::{Signature, SigningKey, VerifyingKey, signature::Signer, signature::Verifier},
    pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding},
};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// How long a minted JWT is valid (Coinbase rejects tokens older than 2 minutes).
pub const JWT_LIFETIME_SECS: u64 = 120;

/// A CDP API key: its name and its EC P-256 private key.
///
/// The private key never leaves this struct: `Debug` prints a redaction, the struct is not
/// `Serialize`, and the key material is zeroized when dropped (p256's `SigningKey` zeroizes on
/// drop; the PEM text passed in is copied only into a zeroizing buffer).
#[derive(Clone)]
pub struct Credentials {
    key_name: String,
    signing_key: SigningKey,
}

// The only key material is `signing_key`, and p256's `SigningKey` zeroizes its secret scalar on
// drop (it is `ZeroizeOnDrop` itself); the key name is not secret. So every `Credentials`,
// clones included, leaves no key behind when dropped. Asserted in tests/it/secrets.rs.
impl zeroize::ZeroizeOnDrop for Credentials {}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("key_name", &self.key_name)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

/// The claims of a Coinbase REST JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The key name.
    pub sub: String,
    /// Always `"cdp"`.
    pub iss: String,
    /// Not before (UNIX seconds).
    pub nbf: u64,
    /// Expiry (UNIX seconds), `nbf + 120`.
    pub exp: u64,
    /// `"METHOD host/path"`; absent on WebSocket tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    kid: String,
    nonce: String,
    typ: String,
}

impl Credentials {
    /// Build credentials from a key name and a PEM private key (SEC1 `EC PRIVATE KEY` as
    /// Coinbase issues it, or PKCS#8 `PRIVATE KEY`). Literal `\n` sequences, as found in
    /// keys pasted into environment variables or JSON, are accepted.
    ///
    /// # Errors
    /// [`Error::Config`] if the key name is empty or the PEM is not a P-256 private key. The
    /// message never echoes the key.
    pub fn from_pem(key_name: impl Into<String>, private_key_pem: &str) -> Result<Self> {
        let key_name = key_name.into();
        if key_name.trim().is_empty() {
            return Err(Error::Config("the CDP API key name is empty".into()));
        }
        let pem = Zeroizing::new(private_key_pem.trim().replace("\\n", "\n"));
        let secret = SecretKey::from_sec1_pem(&pem)
            .or_else(|_| SecretKey::from_pkcs8_pem(&pem))
            .map_err(|_| {
                Error::Config(
                    "the CDP API private key is not a P-256 EC key in PEM form (expected -----BEGIN EC PRIVATE KEY----- or -----BEGIN PRIVATE KEY-----); Ed25519 keys are not supported".into(),
                )
            })?;
        Ok(Credentials { key_name, signing_key: SigningKey::from(&secret) })
    }

    /// Read `COINBASE_API_KEY` (key name) and `COINBASE_API_SECRET` (PEM), the variable names
    /// of Coinbase's official SDK.
    ///
    /// # Errors
    /// [`Error::Config`] naming the missing variable, or as [`from_pem`](Self::from_pem).
    pub fn from_env() -> Result<Self> {
        let name = std::env::var("COINBASE_API_KEY")
            .map_err(|_| Error::Config("COINBASE_API_KEY is not set (the CDP API key name)".into()))?;
        let pem = Zeroizing::new(std::env::var("COINBASE_API_SECRET").map_err(|_| {
            Error::Config("COINBASE_API_SECRET is not set (the CDP API private key PEM)".into())
        })?);
        Credentials::from_pem(name, &pem)
    }

    /// Generate a fresh random key (for tests and the simulated exchange).
    pub fn generate(key_name: impl Into<String>) -> Self {
        Credentials { key_name: key_name.into(), signing_key: SigningKey::random(&mut OsRng) }
    }

    /// The key name (not secret).
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// The public half of the key as PEM (`-----BEGIN PUBLIC KEY-----`), e.g. to let the
    /// simulated exchange verify this key's tokens.
    pub fn public_key_pem(&self) -> String {
        VerifyingKey::from(&self.signing_key).to_public_key_pem(LineEnding::LF).unwrap_or_default()
    }

    /// Mint a JWT for one REST request. `host` is the API host (with port, if any), `path`
    /// the request path without query string.
    pub fn rest_jwt(&self, method: &str, host: &str, path: &str) -> String {
        self.mint(Some(format!("{method} {host}{path}")), unix_now())
    }

    /// Mint a JWT for a WebSocket subscribe message (no `uri` claim).
    pub fn ws_jwt(&self) -> String {
        self.mint(None, unix_now())
    }

    pub(crate) fn mint(&self, uri: Option<String>, now: u64) -> String {
        let mut nonce = [0u8; 32];
        OsRng.fill_bytes(&mut nonce);
        let header = Header {
            alg: "ES256".into(),
            kid: self.key_name.clone(),
            nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
            typ: "JWT".into(),
        };
        let claims = Claims {
            sub: self.key_name.clone(),
            iss: "cdp".into(),
            nbf: now,
            exp: now + JWT_LIFETIME_SECS,
            uri,
        };
        let h = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap_or_default());
        let c = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signing_input = format!("{h}.{c}");
        let sig: Signature = self.signing_key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Why a token was rejected by [`verify_jwt`].
pub type VerifyError = String;

/// Parse a public key PEM (`-----BEGIN PUBLIC KEY-----`, P-256).
///
/// # Errors
/// [`Error::Config`] if the PEM is not a P-256 public key.
pub fn parse_public_key_pem(pem: &str) -> Result<VerifyingKey> {
    VerifyingKey::from_public_key_pem(pem.trim())
        .map_err(|_| Error::Config("not a P-256 public key in PEM form (-----BEGIN PUBLIC KEY-----)".into()))
}

/// Decode a JWT without verifying it: its header `alg` and its claims. Used to accept any
/// well-formed token when no key is configured.
///
/// # Errors
/// A short reason when the token is not three base64url JSON segments.
pub fn decode_unverified(token: &str) -> std::result::Result<(String, serde_json::Value), VerifyError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(_s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("token is not three dot-separated segments".into());
    };
    let header: serde_json::Value = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("token header is not base64url JSON")?;
    let alg = header.get("alg").and_then(|a| a.as_str()).ok_or("token header has no alg")?.to_string();
    let claims: serde_json::Value = URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("token claims are not base64url JSON")?;
    Ok((alg, claims))
}

/// Verify an ES256 REST token against `key`: signature, `nbf`/`exp` (with `leeway_secs`) at
/// `now` (UNIX seconds), and a `uri` claim of `"{method} {any host}{path}"` (a leading
/// `http://` or `https://` before the host is tolerated, as some clients send it).
///
/// # Errors
/// A short reason for the rejection.
pub fn verify_jwt(
    token: &str,
    key: &VerifyingKey,
    method: &str,
    path: &str,
    now: u64,
    leeway_secs: u64,
) -> std::result::Result<Claims, VerifyError> {
    let (alg, _) = decode_unverified(token)?;
    if alg != "ES256" {
        return Err(format!("unsupported alg {alg}"));
    }
    let (signing_input, sig_b64) = token.rsplit_once('.').ok_or("malformed token")?;
    let sig_bytes = URL_SAFE_NO_PAD.decode(sig_b64).map_err(|_| "signature is not base64url")?;
    let sig = Signature::from_slice(&sig_bytes).map_err(|_| "signature is not 64 bytes r||s")?;
    key.verify(signing_input.as_bytes(), &sig).map_err(|_| "bad signature")?;
    let claims_b64 = signing_input.split('.').nth(1).ok_or("malformed token")?;
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(claims_b64)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("claims do not parse")?;
    if claims.nbf > now + leeway_secs {
        return Err("token not yet valid".into());
    }
    if claims.exp + leeway_secs < now {
        return Err("token expired".into());
    }
    let uri = claims.uri.as_deref().ok_or("token has no uri claim")?;
    let (m, rest) = uri.split_once(' ').ok_or("uri claim is not \"METHOD host/path\"")?;
    let rest = rest.trim_start_matches("https://").trim_start_matches("http://");
    let claimed_path = rest.find('/').map(|i| &rest[i..]).unwrap_or("");
    if !m.eq_ignore_ascii_case(method) || claimed_path != path {
        return Err(format!("uri claim {uri:?} does not match {method} {path}"));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_has_every_claim_and_verifies() {
        let creds = Credentials::generate("organizations/o/apiKeys/k");
        let token = creds.mint(Some("GET api.coinbase.com/api/v3/brokerage/accounts".into()), 1_700_000_000);
        let (alg, claims) = decode_unverified(&token).unwrap();
        assert_eq!(alg, "ES256");
        assert_eq!(claims["sub"], "organizations/o/apiKeys/k");
        assert_eq!(claims["iss"], "cdp");
        assert_eq!(claims["nbf"], 1_700_000_000u64);
        assert_eq!(claims["exp"], 1_700_000_120u64);
        assert_eq!(claims["uri"], "GET api.coinbase.com/api/v3/brokerage/accounts");
        assert!(claims.get("aud").is_none() && claims.get("iat").is_none());
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap())
                .unwrap();
        assert_eq!(header["kid"], "organizations/o/apiKeys/k");
        assert_eq!(header["typ"], "JWT");
        let nonce = header["nonce"].as_str().unwrap();
        assert_eq!(nonce.len(), 64);
        assert!(nonce.chars().all(|c| c.is_ascii_hexdigit()));

        let key = parse_public_key_pem(&creds.public_key_pem()).unwrap();
        let ok = verify_jwt(&token, &key, "GET", "/api/v3/brokerage/accounts", 1_700_000_010, 0).unwrap();
        assert_eq!(ok.exp - ok.nbf, JWT_LIFETIME_SECS);
        // wrong path, expired, not yet valid, other key, tampered
        assert!(verify_jwt(&token, &key, "GET", "/api/v3/brokerage/orders", 1_700_000_010, 0).is_err());
        assert!(verify_jwt(&token, &key, "GET", "/api/v3/brokerage/accounts", 1_700_000_200, 0).is_err());
        assert!(verify_jwt(&token, &key, "GET", "/api/v3/brokerage/accounts", 1_699_999_000, 0).is_err());
        let other = parse_public_key_pem(&Credentials::generate("x").public_key_pem()).unwrap();
        assert!(verify_jwt(&token, &other, "GET", "/api/v3/brokerage/accounts", 1_700_000_010, 0).is_err());
        let mut tampered = token.clone();
        tampered.insert(tampered.len() - 5, 'A');
        assert!(verify_jwt(&tampered, &key, "GET", "/api/v3/brokerage/accounts", 1_700_000_010, 0).is_err());
        // Two tokens differ by nonce.
        assert_ne!(
            token,
            creds.mint(Some("GET api.coinbase.com/api/v3/brokerage/accounts".into()), 1_700_000_000)
        );
    }

    #[test]
    fn pem_forms_and_errors() {
        let sk = SigningKey::random(&mut OsRng);
        let secret = SecretKey::from(sk.as_nonzero_scalar());
        let sec1 = secret.to_sec1_pem(LineEnding::LF).unwrap();
        assert!(sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"));
        Credentials::from_pem("k", &sec1).unwrap();
        let escaped = sec1.replace('\n', "\\n");
        Credentials::from_pem("k", &escaped).unwrap();
        let pkcs8 = p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&secret, LineEnding::LF).unwrap();
        Credentials::from_pem("k", &pkcs8).unwrap();

        let bad = "-----BEGIN EC PRIVATE KEY-----\nTOPSECRETMATERIAL\n-----END EC PRIVATE KEY-----";
        let err = Credentials::from_pem("k", bad).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        assert!(!err.to_string().contains("TOPSECRETMATERIAL"));
        assert!(matches!(Credentials::from_pem(" ", &sec1), Err(Error::Config(_))));
    }

    #[test]
    fn debug_is_redacted() {
        let sk = SigningKey::random(&mut OsRng);
        let secret = SecretKey::from(sk.as_nonzero_scalar());
        let pem = secret.to_sec1_pem(LineEnding::LF).unwrap();
        let creds = Credentials::from_pem("organizations/o/apiKeys/k", &pem).unwrap();
        let dbg = format!("{creds:?}");
        assert!(dbg.contains("<redacted>") && dbg.contains("apiKeys/k"));
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!dbg.contains(&body[..20]));
    }
}
