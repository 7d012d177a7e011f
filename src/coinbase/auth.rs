//! CDP API key credentials and JWT minting: EdDSA for Ed25519 keys, ES256 for EC P-256 keys.
//!
//! A CDP key is a key name (`organizations/{org}/apiKeys/{id}`, or a bare key id for newer
//! keys) and a private key. Ed25519 has been the portal's default key type since February 2025;
//! older keys are EC P-256. [`Credentials`] reads every form the portal hands out and detects
//! the key type from the key itself:
//!
//! | secret | looks like | key type, JWT `alg` |
//! |---|---|---|
//! | SEC1 PEM | `-----BEGIN EC PRIVATE KEY-----` | P-256, `ES256` |
//! | PKCS#8 PEM | `-----BEGIN PRIVATE KEY-----` | P-256, `ES256`; or Ed25519, `EdDSA` |
//! | raw base64 (the portal's Ed25519 secret) | 88 characters ending in `==` (64 bytes: seed, public key) or 44 (32 bytes: seed) | Ed25519, `EdDSA` |
//!
//! The portal's downloaded `cdp_api_key.json` (`name` or `id`, and `privateKey`) is read by
//! [`Credentials::from_json_file`].
//!
//! Each request carries a fresh JWT (`Authorization: Bearer ...`) valid for 120 s: header
//! `{"alg","kid":<key name>,"nonce":<64 hex>,"typ":"JWT"}`, claims
//! `{"sub":<key name>,"iss":"cdp","nbf","exp":nbf+120,"uri"}`, where `uri` is
//! `"METHOD host/path"` without scheme or query string (WebSocket tokens have no `uri`).

use std::{fmt, path::Path, time::SystemTime};

use base64::{
    DecodeSliceError, Engine as _, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose::URL_SAFE_NO_PAD},
};
use p256::{
    ecdsa::signature::{Signer, Verifier},
    pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding},
};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// How long a minted JWT is valid (Coinbase rejects tokens older than 2 minutes).
pub const JWT_LIFETIME_SECS: u64 = 120;

/// The JWT signature algorithm of a CDP key, detected from the key itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyAlgorithm {
    /// An Ed25519 key; its tokens are `EdDSA` (the CDP default since February 2025).
    EdDsa,
    /// An EC P-256 key; its tokens are `ES256` (ECDSA over SHA-256, raw `r || s` signatures).
    Es256,
}

impl KeyAlgorithm {
    /// The JWT header's `alg` for this key type: `"EdDSA"` or `"ES256"`.
    pub const fn jwt_alg(self) -> &'static str {
        match self {
            KeyAlgorithm::EdDsa => "EdDSA",
            KeyAlgorithm::Es256 => "ES256",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.jwt_alg())
    }
}

/// A CDP API key: its name and its private key (Ed25519 or EC P-256).
///
/// The private key never leaves this struct: `Debug` prints a redaction, the struct is not
/// `Serialize`, errors about a key describe its form but never quote it, and the key material
/// is zeroized when dropped (both `ed25519_dalek::SigningKey` and p256's `SigningKey` zeroize on
/// drop; the secret text passed in is copied only into zeroizing buffers).
///
/// # Examples
///
/// ```
/// use tickshare::{Credentials, coinbase::auth::KeyAlgorithm};
///
/// // An Ed25519 secret as the CDP portal shows it: base64 of the 32-byte seed followed by the
/// // 32-byte public key (here RFC 8032's first test key, never a real one).
/// let secret = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2DXWpgBgrEKt9VL/tPJZAc6DuFy89qmIyWvAhpo9wdRGg==";
/// let creds = Credentials::from_secret("d2efa49a-0000-4000-8000-000000000000", secret)?;
/// assert_eq!(creds.algorithm(), KeyAlgorithm::EdDsa);
/// let jwt = creds.rest_jwt("GET", "api.coinbase.com", "/api/v3/brokerage/accounts");
/// assert_eq!(jwt.split('.').count(), 3);
/// # Ok::<(), tickshare::Error>(())
/// ```
#[derive(Clone)]
pub struct Credentials {
    key_name: String,
    signing_key: SigningKey,
}

/// The private key, by type. Both variants zeroize their secret on drop.
#[derive(Clone)]
enum SigningKey {
    EdDsa(ed25519_dalek::SigningKey),
    Es256(p256::ecdsa::SigningKey),
}

// The only key material is `signing_key`, and both of its variants zeroize their secret on drop
// (`ed25519_dalek::SigningKey` with its "zeroize" feature, p256's `SigningKey` always; both are
// `ZeroizeOnDrop`); the key name is not secret. So every `Credentials`, clones included, leaves
// no key behind when dropped. Asserted in tests/it/secrets.rs.
impl zeroize::ZeroizeOnDrop for Credentials {}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("key_name", &self.key_name)
            .field("algorithm", &self.algorithm())
            .field("private_key", &"<redacted>")
            .finish()
    }
}

/// The public half of a CDP key (Ed25519 or EC P-256): checks the signatures of the JWTs its
/// [`Credentials`] mint. Not secret.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey(PublicKey);

#[derive(Clone, PartialEq, Eq)]
enum PublicKey {
    EdDsa(ed25519_dalek::VerifyingKey),
    Es256(p256::ecdsa::VerifyingKey),
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey").field("algorithm", &self.algorithm()).finish_non_exhaustive()
    }
}

impl VerifyingKey {
    /// Parse a public key in PEM (`-----BEGIN PUBLIC KEY-----`, SubjectPublicKeyInfo), P-256 or
    /// Ed25519, as [`Credentials::public_key_pem`] writes it.
    ///
    /// # Errors
    /// [`Error::Config`] if the PEM is neither a P-256 nor an Ed25519 public key.
    pub fn from_public_key_pem(pem: &str) -> Result<Self> {
        let pem = pem.trim();
        if let Ok(key) = p256::ecdsa::VerifyingKey::from_public_key_pem(pem) {
            return Ok(VerifyingKey(PublicKey::Es256(key)));
        }
        ed25519_dalek::VerifyingKey::from_public_key_pem(pem).map(|k| VerifyingKey(PublicKey::EdDsa(k))).map_err(
            |_| {
                Error::Config(
                    "the JWT public key is neither a P-256 nor an Ed25519 public key in PEM form (-----BEGIN PUBLIC KEY-----)"
                        .into(),
                )
            },
        )
    }

    /// The key type, and so the `alg` its tokens must carry.
    pub fn algorithm(&self) -> KeyAlgorithm {
        match self.0 {
            PublicKey::EdDsa(_) => KeyAlgorithm::EdDsa,
            PublicKey::Es256(_) => KeyAlgorithm::Es256,
        }
    }

    /// The key as PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn to_public_key_pem(&self) -> String {
        match &self.0 {
            PublicKey::EdDsa(k) => k.to_public_key_pem(LineEnding::LF),
            PublicKey::Es256(k) => k.to_public_key_pem(LineEnding::LF),
        }
        .unwrap_or_default()
    }

    /// Whether `signature` is this key's signature of `message`, in a JWT's encoding: 64 bytes,
    /// raw `r || s` for ES256 or `R || S` for EdDSA (checked strictly: no small-order keys,
    /// no non-canonical `S`).
    pub fn verify_signature(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.0 {
            PublicKey::EdDsa(k) => ed25519_dalek::Signature::from_slice(signature)
                .is_ok_and(|sig| k.verify_strict(message, &sig).is_ok()),
            PublicKey::Es256(k) => {
                p256::ecdsa::Signature::from_slice(signature).is_ok_and(|sig| k.verify(message, &sig).is_ok())
            }
        }
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

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    kid: &'a str,
    nonce: &'a str,
    typ: &'static str,
}

/// The portal's `cdp_api_key.json`. `privateKey` is taken raw (still JSON-escaped, borrowed
/// from the zeroizing file buffer): serde_json would unescape it through a scratch buffer it
/// frees without zeroizing.
#[derive(Deserialize)]
struct KeyFile<'a> {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default, rename = "privateKey", borrow)]
    private_key: Option<&'a RawValue>,
}

const SEC1_PEM: &str = "-----BEGIN EC PRIVATE KEY-----";
const PKCS8_PEM: &str = "-----BEGIN PRIVATE KEY-----";

/// Standard base64 with or without padding, as the portal's secrets come.
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
/// The URL-safe alphabet, in case a secret went through a tool that re-encoded it.
const BASE64URL_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

impl Credentials {
    /// Build credentials from a key name and the private key in any form the CDP portal gives
    /// it, detecting the key type: SEC1 PEM (`-----BEGIN EC PRIVATE KEY-----`, P-256), PKCS#8
    /// PEM (`-----BEGIN PRIVATE KEY-----`, P-256 or Ed25519), or the raw base64 Ed25519 secret
    /// (a 32-byte seed, or 64 bytes of seed and public key, whose public half must match).
    ///
    /// The key name is `organizations/{org}/apiKeys/{id}` or, for newer keys, the bare key id;
    /// surrounding whitespace is dropped. In the secret, JSON-style escapes (`\n` above all, as
    /// in keys pasted into environment variables) are decoded, and one pair of surrounding
    /// double quotes is dropped.
    ///
    /// # Errors
    /// [`Error::Config`] if the key name is empty or the secret is none of the forms above. The
    /// message names the form that failed, never the key.
    pub fn from_secret(key_name: impl Into<String>, secret: &str) -> Result<Self> {
        let key_name = checked_key_name(key_name.into())?;
        Ok(Credentials { key_name, signing_key: parse_secret(secret, true)? })
    }

    /// Build credentials from a key name and a PEM private key: SEC1 `EC PRIVATE KEY` (P-256,
    /// as Coinbase issued ECDSA keys) or PKCS#8 `PRIVATE KEY` (P-256 or Ed25519). Literal `\n`
    /// sequences are accepted. For the portal's raw base64 Ed25519 secret use
    /// [`from_secret`](Self::from_secret), which takes every form.
    ///
    /// # Errors
    /// [`Error::Config`] if the key name is empty or the text is not one of those PEM keys. The
    /// message never echoes the key.
    pub fn from_pem(key_name: impl Into<String>, private_key_pem: &str) -> Result<Self> {
        let key_name = checked_key_name(key_name.into())?;
        Ok(Credentials { key_name, signing_key: parse_secret(private_key_pem, false)? })
    }

    /// Build credentials from the text of the CDP portal's `cdp_api_key.json`: the key name
    /// from `name` (or, if absent, `id`) and the secret from `privateKey`, in any form
    /// [`from_secret`](Self::from_secret) takes. Other fields are ignored.
    ///
    /// # Errors
    /// [`Error::Config`] if the text is not a JSON object with those string fields, or as
    /// [`from_secret`](Self::from_secret). The message never quotes the file.
    pub fn from_json(json: &str) -> Result<Self> {
        // serde would also take a struct from a JSON array, by position; the file is an object.
        let parsed = if json.trim_start().starts_with('{') {
            serde_json::from_str::<KeyFile<'_>>(json).map_err(|e| (e.line(), e.column()))
        } else {
            Err((1, 1))
        };
        let file = parsed.map_err(|(line, column)| {
            Error::Config(format!(
                "the CDP API key JSON is not an object with string fields \"name\" (or \"id\") and \"privateKey\" (line {line}, column {column})"
            ))
        })?;
        let name = file.name.filter(|n| !n.trim().is_empty()).or(file.id).ok_or_else(|| {
            Error::Config("the CDP API key JSON has neither a \"name\" nor an \"id\" field".into())
        })?;
        let raw = file
            .private_key
            .ok_or_else(|| Error::Config("the CDP API key JSON has no \"privateKey\" field".into()))?
            .get();
        let escaped = raw
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .ok_or_else(|| Error::Config("the CDP API key JSON's \"privateKey\" is not a string".into()))?;
        Credentials::from_secret(name, escaped)
    }

    /// Read the CDP portal's downloaded key file (`cdp_api_key.json`), as
    /// [`from_json`](Self::from_json).
    ///
    /// # Errors
    /// [`Error::Config`] naming the path if it cannot be read, or as
    /// [`from_json`](Self::from_json).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map(Zeroizing::new).map_err(|e| {
            Error::Config(format!("could not read the CDP API key file {}: {e}", path.display()))
        })?;
        Credentials::from_json(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Read `COINBASE_API_KEY` (key name) and `COINBASE_API_SECRET` (private key in any form
    /// [`from_secret`](Self::from_secret) takes: PEM with real or literal `\n` newlines, or the
    /// raw base64 Ed25519 secret), the variable names of Coinbase's official SDK.
    ///
    /// # Errors
    /// [`Error::Config`] naming the missing variable, or as [`from_secret`](Self::from_secret).
    pub fn from_env() -> Result<Self> {
        Credentials::from_lookup(|var| std::env::var(var).ok())
    }

    /// [`from_env`](Self::from_env) over any variable lookup (tests cannot set variables: that
    /// is `unsafe` in edition 2024, and this crate forbids `unsafe`).
    pub(crate) fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let name = var("COINBASE_API_KEY").ok_or_else(|| {
            Error::Config("COINBASE_API_KEY is not set (the CDP API key name or id)".into())
        })?;
        let key_name = checked_key_name(name)
            .map_err(|_| Error::Config("COINBASE_API_KEY is empty (the CDP API key name or id)".into()))?;
        let secret = Zeroizing::new(var("COINBASE_API_SECRET").ok_or_else(|| {
            Error::Config(
                "COINBASE_API_SECRET is not set (the CDP API private key: PEM or the base64 Ed25519 secret)"
                    .into(),
            )
        })?);
        let signing_key = parse_secret(&secret, true).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("COINBASE_API_SECRET: {m}")),
            other => other,
        })?;
        Ok(Credentials { key_name, signing_key })
    }

    /// Generate a fresh random EC P-256 (ES256) key, for tests and the simulated exchange.
    pub fn generate(key_name: impl Into<String>) -> Self {
        let signing_key = SigningKey::Es256(p256::ecdsa::SigningKey::random(&mut OsRng));
        Credentials { key_name: key_name.into(), signing_key }
    }

    /// Generate a fresh random Ed25519 (EdDSA) key, for tests and the simulated exchange.
    pub fn generate_ed25519(key_name: impl Into<String>) -> Self {
        let mut seed = Zeroizing::new([0u8; ed25519_dalek::SECRET_KEY_LENGTH]);
        OsRng.fill_bytes(seed.as_mut());
        let signing_key = SigningKey::EdDsa(ed25519_dalek::SigningKey::from_bytes(&seed));
        Credentials { key_name: key_name.into(), signing_key }
    }

    /// The key name (not secret).
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// The key type, detected when the key was read.
    pub fn algorithm(&self) -> KeyAlgorithm {
        match self.signing_key {
            SigningKey::EdDsa(_) => KeyAlgorithm::EdDsa,
            SigningKey::Es256(_) => KeyAlgorithm::Es256,
        }
    }

    /// The public half of the key, which verifies this key's tokens.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey(match &self.signing_key {
            SigningKey::EdDsa(k) => PublicKey::EdDsa(k.verifying_key()),
            SigningKey::Es256(k) => PublicKey::Es256(*k.verifying_key()),
        })
    }

    /// The public half of the key as PEM (`-----BEGIN PUBLIC KEY-----`), e.g. to let the
    /// simulated exchange verify this key's tokens
    /// ([`SimBuilder::jwt_public_key_pem`](crate::sim::SimBuilder::jwt_public_key_pem)).
    pub fn public_key_pem(&self) -> String {
        self.verifying_key().to_public_key_pem()
    }

    /// Mint a JWT for one REST request. `host` is the API host (with port, if any), `path`
    /// the request path without query string.
    pub fn rest_jwt(&self, method: &str, host: &str, path: &str) -> String {
        self.mint(Some(format!("{method} {host}{path}")), unix_now())
    }

    /// As [`rest_jwt`](Credentials::rest_jwt), with `nbf` = `unix_secs` (the exchange's clock,
    /// e.g. the system time corrected by [`CoinbaseClient::sync_clock`](crate::CoinbaseClient::sync_clock)).
    pub fn rest_jwt_at(&self, method: &str, host: &str, path: &str, unix_secs: u64) -> String {
        self.mint(Some(format!("{method} {host}{path}")), unix_secs)
    }

    /// Mint a JWT for a WebSocket subscribe message (no `uri` claim).
    pub fn ws_jwt(&self) -> String {
        self.mint(None, unix_now())
    }

    pub(crate) fn mint(&self, uri: Option<String>, now: u64) -> String {
        let mut nonce = [0u8; 32];
        OsRng.fill_bytes(&mut nonce);
        let nonce = hex(&nonce);
        let header =
            Header { alg: self.algorithm().jwt_alg(), kid: &self.key_name, nonce: &nonce, typ: "JWT" };
        let claims = Claims {
            sub: self.key_name.clone(),
            iss: "cdp".into(),
            nbf: now,
            exp: now.saturating_add(JWT_LIFETIME_SECS),
            uri,
        };
        let h = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap_or_default());
        let c = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signing_input = format!("{h}.{c}");
        let signature = match &self.signing_key {
            SigningKey::EdDsa(k) => {
                let sig: ed25519_dalek::Signature = k.sign(signing_input.as_bytes());
                URL_SAFE_NO_PAD.encode(sig.to_bytes())
            }
            SigningKey::Es256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(signing_input.as_bytes());
                URL_SAFE_NO_PAD.encode(sig.to_bytes())
            }
        };
        format!("{signing_input}.{signature}")
    }
}

fn checked_key_name(key_name: String) -> Result<String> {
    let trimmed = key_name.trim();
    if trimmed.is_empty() {
        return Err(Error::Config("the CDP API key name is empty".into()));
    }
    Ok(if trimmed.len() == key_name.len() { key_name } else { trimmed.to_string() })
}

/// Read a private key in any accepted form (`raw_allowed`: also the base64 Ed25519 secret).
/// Every error names the form, never the content.
fn parse_secret(secret: &str, raw_allowed: bool) -> Result<SigningKey> {
    let text = unescape(secret.trim()).ok_or_else(|| {
        Error::Config(
            "the CDP API private key contains a backslash that is not a JSON escape (\\n, \\r, \\t, \\\", \\\\, \\/, \\uXXXX)"
                .into(),
        )
    })?;
    let mut text = text.trim();
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        text = inner.trim();
    }
    if text.is_empty() {
        return Err(Error::Config("the CDP API private key is empty".into()));
    }
    if text.contains("-----BEGIN") {
        return parse_pem(text);
    }
    if !raw_allowed {
        return Err(Error::Config(
            "the CDP API private key is not PEM (expected -----BEGIN EC PRIVATE KEY----- or -----BEGIN PRIVATE KEY-----); use Credentials::from_secret for the base64 Ed25519 secret"
                .into(),
        ));
    }
    parse_raw_ed25519(text)
}

fn parse_pem(pem: &str) -> Result<SigningKey> {
    if pem.starts_with(SEC1_PEM) {
        let secret = p256::SecretKey::from_sec1_pem(pem).map_err(|_| {
            Error::Config(
                "the CDP API private key is SEC1 PEM (-----BEGIN EC PRIVATE KEY-----) but not a valid P-256 key"
                    .into(),
            )
        })?;
        return Ok(SigningKey::Es256(p256::ecdsa::SigningKey::from(&secret)));
    }
    if pem.starts_with(PKCS8_PEM) {
        if let Ok(secret) = p256::SecretKey::from_pkcs8_pem(pem) {
            return Ok(SigningKey::Es256(p256::ecdsa::SigningKey::from(&secret)));
        }
        return ed25519_dalek::SigningKey::from_pkcs8_pem(pem).map(SigningKey::EdDsa).map_err(|_| {
            Error::Config(
                "the CDP API private key is PKCS#8 PEM (-----BEGIN PRIVATE KEY-----) but neither a valid P-256 nor a valid Ed25519 key"
                    .into(),
            )
        });
    }
    Err(Error::Config(
        "the CDP API private key is PEM of an unsupported kind (expected -----BEGIN EC PRIVATE KEY----- or -----BEGIN PRIVATE KEY-----)"
            .into(),
    ))
}

/// The portal's Ed25519 secret: base64 of a 32-byte seed, or of 64 bytes (seed, then public
/// key) whose second half must be the seed's public key. Decoded into a zeroizing buffer.
fn parse_raw_ed25519(text: &str) -> Result<SigningKey> {
    const KEYPAIR: usize = ed25519_dalek::KEYPAIR_LENGTH;
    const SEED: usize = ed25519_dalek::SECRET_KEY_LENGTH;
    let mut buf = Zeroizing::new([0u8; KEYPAIR]);
    let decoded = match BASE64_LENIENT.decode_slice(text, buf.as_mut()) {
        Err(DecodeSliceError::DecodeError(_)) => BASE64URL_LENIENT.decode_slice(text, buf.as_mut()),
        decoded => decoded,
    };
    let len = match decoded {
        Ok(len) => len,
        Err(DecodeSliceError::OutputSliceTooSmall) => {
            return Err(Error::Config(
                "the CDP API private key is neither PEM nor a raw Ed25519 secret: its base64 decodes to more than 64 bytes"
                    .into(),
            ));
        }
        Err(DecodeSliceError::DecodeError(_)) => {
            return Err(Error::Config(
                "the CDP API private key is neither PEM (-----BEGIN ...) nor base64 (the portal's Ed25519 secret)"
                    .into(),
            ));
        }
    };
    if len == SEED {
        let seed: &[u8; SEED] = buf[..SEED].try_into().map_err(|_| length_error(len))?;
        return Ok(SigningKey::EdDsa(ed25519_dalek::SigningKey::from_bytes(seed)));
    }
    if len == KEYPAIR {
        return ed25519_dalek::SigningKey::from_keypair_bytes(&buf).map(SigningKey::EdDsa).map_err(|_| {
            Error::Config(
                "the CDP API private key is a 64-byte Ed25519 secret whose second half is not the public key of its first (damaged or mixed up?)"
                    .into(),
            )
        });
    }
    Err(length_error(len))
}

fn length_error(len: usize) -> Error {
    Error::Config(format!(
        "the CDP API private key is base64 of {len} bytes; a raw Ed25519 secret is 32 bytes (seed) or 64 (seed and public key)"
    ))
}

/// Decode JSON string escapes into a zeroizing buffer. The output is never longer than the
/// input, so it is allocated once and never moved. `None` on a malformed escape.
fn unescape(s: &str) -> Option<Zeroizing<String>> {
    let mut out = Zeroizing::new(String::with_capacity(s.len()));
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            '"' => out.push('"'),
            '\\' => out.push('\\'),
            '/' => out.push('/'),
            'u' => {
                let mut code = 0u32;
                for _ in 0..4 {
                    code = code * 16 + chars.next()?.to_digit(16)?;
                }
                out.push(char::from_u32(code)?);
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Lower-case hex, without a `format!` per byte (the nonce is minted on every request).
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Why a token was rejected by [`verify_jwt`].
pub type VerifyError = String;

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

/// Verify a REST token against `key`: an `alg` matching the key's type (`EdDSA` or `ES256`),
/// the signature, `nbf`/`exp` (with `leeway_secs`) at `now` (UNIX seconds), and a `uri` claim
/// of `"{method} {any host}{path}"` (a leading `http://` or `https://` before the host is
/// tolerated, as some clients send it).
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
    if alg != key.algorithm().jwt_alg() {
        return Err(format!("alg {alg} does not match the {} key", key.algorithm()));
    }
    let (signing_input, sig_b64) = token.rsplit_once('.').ok_or("malformed token")?;
    let sig_bytes = URL_SAFE_NO_PAD.decode(sig_b64).map_err(|_| "signature is not base64url")?;
    if !key.verify_signature(signing_input.as_bytes(), &sig_bytes) {
        return Err("bad signature".into());
    }
    let claims_b64 = signing_input.split('.').nth(1).ok_or("malformed token")?;
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(claims_b64)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("claims do not parse")?;
    if claims.nbf > now.saturating_add(leeway_secs) {
        return Err("token not yet valid".into());
    }
    if claims.exp.saturating_add(leeway_secs) < now {
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
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    use ed25519_dalek::pkcs8::EncodePrivateKey as _;

    use super::*;

    const ACCOUNTS: &str = "GET api.coinbase.com/api/v3/brokerage/accounts";
    const PATH: &str = "/api/v3/brokerage/accounts";
    const T0: u64 = 1_700_000_000;

    fn segment(token: &str, i: usize) -> serde_json::Value {
        let seg = token.split('.').nth(i).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(seg).unwrap()).unwrap()
    }

    /// Every claim and header field, the signature checked by the signature crates
    /// themselves (not through this module), and `verify_jwt`'s rejections.
    #[test]
    fn jwt_has_every_claim_and_verifies_for_both_algorithms() {
        for creds in [
            Credentials::generate("organizations/o/apiKeys/k"),
            Credentials::generate_ed25519("organizations/o/apiKeys/k"),
        ] {
            let alg = creds.algorithm().jwt_alg();
            let token = creds.mint(Some(ACCOUNTS.into()), T0);
            let (decoded_alg, claims) = decode_unverified(&token).unwrap();
            assert_eq!(decoded_alg, alg);
            assert_eq!(claims["sub"], "organizations/o/apiKeys/k");
            assert_eq!(claims["iss"], "cdp");
            assert_eq!(claims["nbf"], T0);
            assert_eq!(claims["exp"], T0 + 120);
            assert_eq!(claims["uri"], ACCOUNTS);
            assert_eq!(claims.as_object().unwrap().len(), 5, "{claims}");
            let header = segment(&token, 0);
            assert_eq!(header["alg"], alg);
            assert_eq!(header["kid"], "organizations/o/apiKeys/k");
            assert_eq!(header["typ"], "JWT");
            assert_eq!(header.as_object().unwrap().len(), 4, "{header}");
            let nonce = header["nonce"].as_str().unwrap();
            assert_eq!(nonce.len(), 64);
            assert!(nonce.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));

            let (input, sig) = token.rsplit_once('.').unwrap();
            let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
            assert_eq!(sig.len(), 64);
            let pem = creds.public_key_pem();
            match creds.algorithm() {
                KeyAlgorithm::EdDsa => {
                    let vk = ed25519_dalek::VerifyingKey::from_public_key_pem(&pem).unwrap();
                    let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
                    vk.verify_strict(input.as_bytes(), &sig).unwrap();
                }
                KeyAlgorithm::Es256 => {
                    let vk = p256::ecdsa::VerifyingKey::from_public_key_pem(&pem).unwrap();
                    let sig = p256::ecdsa::Signature::from_slice(&sig).unwrap();
                    vk.verify(input.as_bytes(), &sig).unwrap();
                }
            }

            let key = VerifyingKey::from_public_key_pem(&pem).unwrap();
            assert_eq!(key, creds.verifying_key());
            assert_eq!(key.algorithm(), creds.algorithm());
            let ok = verify_jwt(&token, &key, "GET", PATH, T0 + 10, 0).unwrap();
            assert_eq!(ok.exp - ok.nbf, JWT_LIFETIME_SECS);
            // wrong path, expired, not yet valid, other key, tampered
            assert!(verify_jwt(&token, &key, "GET", "/api/v3/brokerage/orders", T0 + 10, 0).is_err());
            assert!(verify_jwt(&token, &key, "GET", PATH, T0 + 200, 0).is_err());
            assert!(verify_jwt(&token, &key, "GET", PATH, T0 - 1000, 0).is_err());
            for other in [Credentials::generate("x"), Credentials::generate_ed25519("x")] {
                assert!(verify_jwt(&token, &other.verifying_key(), "GET", PATH, T0 + 10, 0).is_err());
            }
            let mut tampered = token.clone();
            tampered.insert(tampered.len() - 5, 'A');
            assert!(verify_jwt(&tampered, &key, "GET", PATH, T0 + 10, 0).is_err());
            // Two tokens differ by nonce.
            assert_ne!(token, creds.mint(Some(ACCOUNTS.into()), T0));
            // WebSocket tokens have no uri.
            assert!(segment(&creds.ws_jwt(), 1).get("uri").is_none());
        }
    }

    #[test]
    fn an_alg_that_does_not_match_the_key_is_rejected() {
        let ed = Credentials::generate_ed25519("k");
        let token = ed.mint(Some(ACCOUNTS.into()), T0);
        // Claim ES256 on an EdDSA-signed token: rejected before any signature check.
        let (_, rest) = token.split_once('.').unwrap();
        let forged_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","kid":"k","nonce":"00","typ":"JWT"}"#);
        let forged = format!("{forged_header}.{rest}");
        let err = verify_jwt(&forged, &ed.verifying_key(), "GET", PATH, T0, 0).unwrap_err();
        assert!(err.contains("does not match the EdDSA key"), "{err}");
        let es = Credentials::generate("k");
        assert!(verify_jwt(&token, &es.verifying_key(), "GET", PATH, T0, 0).is_err());
    }

    /// One random key in each form the portal (or OpenSSL) writes.
    struct Forms {
        ec_public: String,
        sec1: String,
        ec_pkcs8: String,
        ed_public: String,
        ed_pkcs8_v2: String,
        ed_pkcs8_v1: String,
        ed_raw32: String,
        ed_raw64: String,
    }

    fn forms() -> Forms {
        let ec = p256::SecretKey::random(&mut OsRng);
        let ed = Credentials::generate_ed25519("k");
        let SigningKey::EdDsa(ed_key) = &ed.signing_key else { unreachable!() };
        let v1 = ed25519_dalek::pkcs8::KeypairBytes { secret_key: ed_key.to_bytes(), public_key: None };
        Forms {
            ec_public: ec.public_key().to_public_key_pem(LineEnding::LF).unwrap(),
            sec1: ec.to_sec1_pem(LineEnding::LF).unwrap().to_string(),
            ec_pkcs8: p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&ec, LineEnding::LF).unwrap().to_string(),
            ed_public: ed.public_key_pem(),
            ed_pkcs8_v2: ed_key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
            ed_pkcs8_v1: v1.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
            ed_raw32: STANDARD.encode(ed_key.to_bytes()),
            ed_raw64: STANDARD.encode(ed_key.to_keypair_bytes()),
        }
    }

    #[test]
    fn every_key_form_is_read_and_its_type_detected() {
        let f = forms();
        assert!(f.sec1.starts_with(SEC1_PEM) && f.ec_pkcs8.starts_with(PKCS8_PEM));
        assert!(f.ed_pkcs8_v1.starts_with(PKCS8_PEM) && f.ed_pkcs8_v2.starts_with(PKCS8_PEM));
        assert_eq!((f.ed_raw32.len(), f.ed_raw64.len()), (44, 88));
        let escaped = |s: &str| s.replace('\n', "\\n");
        let raw64 = f.ed_raw64.as_str();
        let cases: Vec<(&str, String, &str)> = vec![
            ("SEC1 PEM", f.sec1.clone(), &f.ec_public),
            ("SEC1 PEM, \\n escapes", escaped(&f.sec1), &f.ec_public),
            ("SEC1 PEM, CRLF", f.sec1.replace('\n', "\r\n"), &f.ec_public),
            ("PKCS#8 PEM, P-256", f.ec_pkcs8.clone(), &f.ec_public),
            ("PKCS#8 PEM, P-256, \\n escapes", escaped(&f.ec_pkcs8), &f.ec_public),
            ("PKCS#8 v2 PEM, Ed25519", f.ed_pkcs8_v2.clone(), &f.ed_public),
            ("PKCS#8 v1 PEM, Ed25519", f.ed_pkcs8_v1.clone(), &f.ed_public),
            ("PKCS#8 PEM, Ed25519, \\n escapes", escaped(&f.ed_pkcs8_v2), &f.ed_public),
            ("raw 32 bytes", f.ed_raw32.clone(), &f.ed_public),
            ("raw 64 bytes", raw64.to_string(), &f.ed_public),
            ("raw 64 bytes, unpadded", raw64.trim_end_matches('=').to_string(), &f.ed_public),
            ("raw 64 bytes, quoted, trailing newline", format!("\"{raw64}\"\n"), &f.ed_public),
            ("raw 64 bytes, JSON-escaped slashes", raw64.replace('/', "\\/"), &f.ed_public),
            ("raw 64 bytes, base64url", URL_SAFE.encode(STANDARD.decode(raw64).unwrap()), &f.ed_public),
        ];
        for (what, secret, public) in &cases {
            let creds = Credentials::from_secret("organizations/o/apiKeys/k", secret)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(&creds.public_key_pem(), public, "{what}");
            let expected = if public == &f.ed_public { KeyAlgorithm::EdDsa } else { KeyAlgorithm::Es256 };
            assert_eq!(creds.algorithm(), expected, "{what}");
            // from_pem takes exactly the PEM forms.
            let pem = Credentials::from_pem("k", secret);
            assert_eq!(pem.is_ok(), what.contains("PEM"), "{what}");
        }
        // Bare key ids (newer Ed25519 keys) are key names; surrounding whitespace is dropped.
        let uuid = "d2efa49a-1234-4abc-8def-0123456789ab";
        let creds = Credentials::from_secret(format!(" {uuid}\n"), raw64).unwrap();
        assert_eq!(creds.key_name(), uuid);
        assert_eq!(segment(&creds.ws_jwt(), 0)["kid"], uuid);
        assert!(matches!(Credentials::from_secret(" ", raw64), Err(Error::Config(_))));
    }

    /// Substrings of `secret` that must not appear in an error: the whole of it and every
    /// 12-character window of its base64 (PEM body or raw secret).
    fn needles(secret: &str) -> Vec<String> {
        let body: String = secret.lines().filter(|l| !l.starts_with("-----")).collect();
        let body = body.replace("\\n", "");
        let mut out: Vec<String> =
            body.as_bytes().windows(12).map(|w| String::from_utf8_lossy(w).into_owned()).collect();
        if secret.trim().len() >= 12 {
            out.push(secret.to_string());
        }
        out
    }

    fn assert_quotes_nothing(what: &str, e: &Error, secrets: &[&str]) {
        assert!(matches!(e, Error::Config(_)), "{what}: {e:?}");
        for text in [e.to_string(), format!("{e:?}")] {
            for s in secrets {
                for n in needles(s) {
                    assert!(!text.contains(&n), "{what}: the error quotes {n:?}: {text}");
                }
            }
        }
    }

    /// Spoil a PEM's body with a character outside base64.
    fn spoil(pem: &str) -> String {
        let start = pem.find('\n').unwrap() + 20;
        let mut out = pem.to_string();
        out.replace_range(start..start + 1, "!");
        out
    }

    #[test]
    fn a_bad_key_of_each_form_is_a_config_error_that_quotes_nothing() {
        let f = forms();
        let raw64 = STANDARD.decode(&f.ed_raw64).unwrap();
        let mut mismatched = raw64.clone();
        mismatched[40] ^= 1;
        let truncated = |pem: &str| {
            let mut lines: Vec<&str> = pem.lines().collect();
            lines.remove(1);
            lines.join("\n")
        };
        let mut bad_raw = f.ed_raw64.clone();
        bad_raw.replace_range(10..11, "!");
        let cases: Vec<(&str, String, &str)> = vec![
            ("SEC1, bad base64", spoil(&f.sec1), "SEC1 PEM"),
            ("SEC1, truncated", truncated(&f.sec1), "SEC1 PEM"),
            ("SEC1 label on a PKCS#8 body", f.ec_pkcs8.replace("PRIVATE KEY", "EC PRIVATE KEY"), "SEC1 PEM"),
            ("PKCS#8 P-256, bad base64", spoil(&f.ec_pkcs8), "PKCS#8 PEM"),
            ("PKCS#8 P-256, truncated", truncated(&f.ec_pkcs8), "PKCS#8 PEM"),
            ("PKCS#8 Ed25519, bad base64", spoil(&f.ed_pkcs8_v2), "PKCS#8 PEM"),
            ("PKCS#8 Ed25519, truncated", truncated(&f.ed_pkcs8_v2), "PKCS#8 PEM"),
            ("RSA label", f.sec1.replace("EC PRIVATE KEY", "RSA PRIVATE KEY"), "unsupported kind"),
            ("public key PEM", f.ed_public.clone(), "unsupported kind"),
            ("raw, not base64", bad_raw, "nor base64"),
            ("raw 31 bytes", STANDARD.encode(&raw64[..31]), "base64 of 31 bytes"),
            ("raw 48 bytes", STANDARD.encode(&raw64[..48]), "base64 of 48 bytes"),
            ("raw 65 bytes", STANDARD.encode([raw64.as_slice(), &[0]].concat()), "more than 64 bytes"),
            ("raw 64 bytes, mismatched public half", STANDARD.encode(&mismatched), "second half"),
            ("bad escape", f.sec1.replace('\n', "\\x"), "backslash"),
            ("empty", String::new(), "is empty"),
            ("blank, quoted", "\"  \"\n".into(), "is empty"),
        ];
        for (what, secret, expected) in &cases {
            let e = Credentials::from_secret("organizations/o/apiKeys/k", secret).unwrap_err();
            assert!(e.to_string().contains(expected), "{what}: {e}");
            let originals = [f.sec1.as_str(), &f.ec_pkcs8, &f.ed_pkcs8_v2, &f.ed_raw64, &f.ed_raw32];
            assert_quotes_nothing(what, &e, &originals);
            assert_quotes_nothing(what, &e, &[secret.as_str()]);
        }
        let e = Credentials::from_pem("k", &f.ed_raw64).unwrap_err();
        assert!(e.to_string().contains("not PEM"), "{e}");
        assert_quotes_nothing("from_pem of a raw secret", &e, &[&f.ed_raw64]);
    }

    #[test]
    fn the_key_file_json_forms() {
        let f = forms();
        let json = |fields: &str| format!("{{{fields}}}");
        let key = serde_json::to_string(&f.sec1).unwrap(); // a JSON string with \n escapes
        assert!(key.contains("\\n"));
        let ed = serde_json::to_string(&f.ed_raw64).unwrap();
        let by_name = Credentials::from_json(&json(&format!(
            r#""name":"organizations/o/apiKeys/k","privateKey":{key}"#
        )))
        .unwrap();
        assert_eq!(
            (by_name.key_name(), by_name.algorithm()),
            ("organizations/o/apiKeys/k", KeyAlgorithm::Es256)
        );
        assert_eq!(by_name.public_key_pem(), f.ec_public);
        let by_id = Credentials::from_json(&json(&format!(r#""id":"d2efa49a","privateKey":{ed}"#))).unwrap();
        assert_eq!((by_id.key_name(), by_id.algorithm()), ("d2efa49a", KeyAlgorithm::EdDsa));
        assert_eq!(by_id.public_key_pem(), f.ed_public);
        let both = Credentials::from_json(&json(&format!(r#""id":"i","name":"n","privateKey":{ed},"x":1"#)));
        assert_eq!(both.unwrap().key_name(), "n", "name wins over id, other fields are ignored");
        let empty_name = Credentials::from_json(&json(&format!(r#""name":"","id":"i","privateKey":{ed}"#)));
        assert_eq!(empty_name.unwrap().key_name(), "i");

        let bad_key = serde_json::to_string(&spoil(&f.sec1)).unwrap();
        let cases = [
            (json(&format!(r#""privateKey":{ed}"#)), "neither a \"name\" nor an \"id\""),
            (json(r#""name":"n""#), "no \"privateKey\""),
            (json(r#""name":"n","privateKey":5"#), "is not a string"),
            (json(&format!(r#""name":"n","privateKey":{bad_key}"#)), "SEC1 PEM"),
            (format!("[{ed}]"), "not an object"),
            (format!(r#"{{"name":"n","privateKey":{ed}"#), "not an object"),
            (format!(r#"{{"name":5,"privateKey":{ed}}}"#), "not an object"),
        ];
        for (text, expected) in &cases {
            let e = Credentials::from_json(text).unwrap_err();
            assert!(e.to_string().contains(expected), "{text}: {e}");
            assert_quotes_nothing(text, &e, &[&f.sec1, &f.ed_raw64]);
        }
    }

    #[test]
    fn the_environment_takes_every_form() {
        let f = forms();
        let env = |name: &str, secret: &str| {
            let (name, secret) = (name.to_string(), secret.to_string());
            Credentials::from_lookup(move |var| match var {
                "COINBASE_API_KEY" => Some(name.clone()),
                "COINBASE_API_SECRET" => Some(secret.clone()),
                _ => None,
            })
        };
        let escaped_sec1 = f.sec1.replace('\n', "\\n");
        let escaped_ed = f.ed_pkcs8_v2.replace('\n', "\\n");
        for (secret, public) in [
            (&escaped_sec1, &f.ec_public),
            (&f.sec1, &f.ec_public),
            (&escaped_ed, &f.ed_public),
            (&f.ed_raw64, &f.ed_public),
            (&f.ed_raw32, &f.ed_public),
        ] {
            assert_eq!(&env("organizations/o/apiKeys/k", secret).unwrap().public_key_pem(), public);
        }
        let e = env("k", &spoil(&f.sec1).replace('\n', "\\n")).unwrap_err();
        assert!(e.to_string().contains("COINBASE_API_SECRET: the CDP API private key is SEC1"), "{e}");
        assert_quotes_nothing("env", &e, &[&f.sec1, &escaped_sec1]);
        let e = env(" ", &f.ed_raw64).unwrap_err();
        assert!(e.to_string().contains("COINBASE_API_KEY is empty"), "{e}");
        let e = Credentials::from_lookup(|_| None).unwrap_err();
        assert!(e.to_string().contains("COINBASE_API_KEY is not set"), "{e}");
        let e = Credentials::from_lookup(|v| (v == "COINBASE_API_KEY").then(|| "k".into())).unwrap_err();
        assert!(e.to_string().contains("COINBASE_API_SECRET is not set"), "{e}");
    }

    #[test]
    fn unescape_decodes_json_escapes_and_rejects_others() {
        let got = unescape(r#"a\nb\r\t\"\\\/\u0041\u00e9"#).unwrap();
        assert_eq!(got.as_str(), "a\nb\r\t\"\\/Aé");
        for bad in [r"\x", r"\", r"\u12", r"\uZZZZ", r"\ud800"] {
            assert!(unescape(bad).is_none(), "{bad}");
        }
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }

    #[test]
    fn debug_is_redacted_for_both_key_types() {
        let f = forms();
        for (secret, alg) in [(&f.sec1, "Es256"), (&f.ed_raw64, "EdDsa"), (&f.ed_pkcs8_v2, "EdDsa")] {
            let creds = Credentials::from_secret("organizations/o/apiKeys/k", secret).unwrap();
            for dbg in [format!("{creds:?}"), format!("{creds:#?}")] {
                assert!(
                    dbg.contains("<redacted>") && dbg.contains("apiKeys/k") && dbg.contains(alg),
                    "{dbg}"
                );
                for n in needles(secret) {
                    assert!(!dbg.contains(&n), "{dbg}");
                }
            }
            assert!(format!("{:?}", creds.verifying_key()).contains(alg));
        }
    }
}
