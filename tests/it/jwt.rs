//! CDP keys of both types (issue 15, "Real Coinbase, first contact"): the JWTs `Credentials`
//! mint for Ed25519 (EdDSA) and EC P-256 (ES256) keys, checked field by field and verified with
//! the signature crates directly; the portal's key file and the environment; and the simulated
//! exchange verifying an Ed25519 key's tokens over real HTTP.

use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use ed25519_dalek::pkcs8::{DecodePublicKey, EncodePrivateKey, spki::der::pem::LineEnding};
use p256::ecdsa::signature::Verifier;
use serde_json::Value;
use tickshare::{Credentials, Error, MarketDataSource, coinbase::auth::KeyAlgorithm, sim::SimExchange};

const KEY_NAME: &str = "organizations/o/apiKeys/k";
const PATH: &str = "/api/v3/brokerage/accounts";

fn segment(token: &str, i: usize) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').nth(i).unwrap()).unwrap()).unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A fresh key pair of each type, made here with the signature crates: the secret in the form
/// the portal hands out, and the public key to check against.
struct Pair {
    alg: &'static str,
    secret: String,
    public_pem: String,
}

fn ed25519_pair() -> Pair {
    let mut seed = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
    let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
    Pair {
        alg: "EdDSA",
        secret: STANDARD.encode(sk.to_keypair_bytes()),
        public_pem: ed25519_dalek::pkcs8::EncodePublicKey::to_public_key_pem(
            &sk.verifying_key(),
            LineEnding::LF,
        )
        .unwrap(),
    }
}

fn p256_pair() -> Pair {
    let sk = p256::SecretKey::random(&mut rand_core::OsRng);
    Pair {
        alg: "ES256",
        secret: sk.to_sec1_pem(LineEnding::LF).unwrap().to_string(),
        public_pem: p256::pkcs8::EncodePublicKey::to_public_key_pem(&sk.public_key(), LineEnding::LF)
            .unwrap(),
    }
}

/// Verify `token`'s signature with the signature crate of `alg`, from the public key PEM.
fn signature_verifies(alg: &str, public_pem: &str, token: &str) -> bool {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    match alg {
        "EdDSA" => {
            let vk = ed25519_dalek::VerifyingKey::from_public_key_pem(public_pem).unwrap();
            let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
            vk.verify_strict(input.as_bytes(), &sig).is_ok()
        }
        "ES256" => {
            let vk = p256::ecdsa::VerifyingKey::from_public_key_pem(public_pem).unwrap();
            let sig = p256::ecdsa::Signature::from_slice(&sig).unwrap();
            vk.verify(input.as_bytes(), &sig).is_ok()
        }
        other => panic!("no verifier for {other}"),
    }
}

#[test]
fn tokens_of_both_key_types_carry_every_claim_and_verify() {
    for pair in [ed25519_pair(), p256_pair()] {
        let creds = Credentials::from_secret(KEY_NAME, &pair.secret).unwrap();
        assert_eq!(creds.algorithm().jwt_alg(), pair.alg);
        assert_eq!(creds.public_key_pem(), pair.public_pem);
        let before = now();
        let token = creds.rest_jwt("GET", "api.coinbase.com", PATH);
        let after = now();

        let header = segment(&token, 0);
        assert_eq!(header["alg"], pair.alg);
        assert_eq!(header["kid"], KEY_NAME);
        assert_eq!(header["typ"], "JWT");
        let nonce = header["nonce"].as_str().unwrap();
        assert!(nonce.len() == 64 && nonce.bytes().all(|b| b.is_ascii_hexdigit()), "{nonce}");
        assert_eq!(header.as_object().unwrap().len(), 4, "{header}");

        let claims = segment(&token, 1);
        assert_eq!(claims["sub"], KEY_NAME);
        assert_eq!(claims["iss"], "cdp");
        let nbf = claims["nbf"].as_u64().unwrap();
        assert!((before..=after).contains(&nbf), "nbf {nbf} is now");
        assert_eq!(claims["exp"].as_u64().unwrap(), nbf + 120);
        assert_eq!(claims["uri"], format!("GET api.coinbase.com{PATH}"), "no scheme, no query");
        assert_eq!(claims.as_object().unwrap().len(), 5, "no aud, no iat: {claims}");

        assert!(signature_verifies(pair.alg, &pair.public_pem, &token), "{}", pair.alg);
        let other = if pair.alg == "EdDSA" { ed25519_pair() } else { p256_pair() };
        assert!(!signature_verifies(pair.alg, &other.public_pem, &token));

        let ws = creds.ws_jwt();
        assert!(segment(&ws, 1).get("uri").is_none());
        assert!(signature_verifies(pair.alg, &pair.public_pem, &ws));
    }
}

#[test]
fn generated_keys_of_both_types_sign_verifiable_tokens() {
    for creds in [Credentials::generate(KEY_NAME), Credentials::generate_ed25519(KEY_NAME)] {
        let alg = creds.algorithm().jwt_alg();
        let token = creds.rest_jwt("GET", "127.0.0.1:1", PATH);
        assert_eq!(segment(&token, 0)["alg"], alg);
        assert!(signature_verifies(alg, &creds.public_key_pem(), &token), "{alg}");
        let key = creds.verifying_key();
        assert_eq!(key.algorithm(), creds.algorithm());
        assert_eq!(key.to_public_key_pem(), creds.public_key_pem());
        tickshare::coinbase::auth::verify_jwt(&token, &key, "GET", PATH, now(), 5).unwrap();
    }
    assert_eq!(Credentials::generate("k").algorithm(), KeyAlgorithm::Es256);
    assert_eq!(Credentials::generate_ed25519("k").algorithm(), KeyAlgorithm::EdDsa);
}

/// A path in the temporary directory, unique to this process and call, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn with(contents: &str) -> TempFile {
        static N: AtomicU32 = AtomicU32::new(0);
        let name =
            format!("tickshare-cdp-key-{}-{}.json", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn the_portal_key_file_with_name_or_id() {
    let ed = ed25519_pair();
    let ec = p256_pair();
    // What the portal writes: the PEM's newlines are JSON `\n` escapes.
    let ec_json = serde_json::json!({"name": KEY_NAME, "privateKey": ec.secret}).to_string();
    assert!(ec_json.contains("\\n"));
    let uuid = "d2efa49a-1234-4abc-8def-0123456789ab";
    let ed_json = serde_json::json!({"id": uuid, "privateKey": ed.secret}).to_string();
    for (json, name, pair) in [(&ec_json, KEY_NAME, &ec), (&ed_json, uuid, &ed)] {
        let file = TempFile::with(json);
        let creds = Credentials::from_json_file(&file.0).unwrap();
        assert_eq!(creds.key_name(), name);
        assert_eq!(creds.algorithm().jwt_alg(), pair.alg);
        assert_eq!(creds.public_key_pem(), pair.public_pem);
        let token = creds.rest_jwt("GET", "api.coinbase.com", PATH);
        assert_eq!(segment(&token, 0)["kid"], name);
        assert!(signature_verifies(pair.alg, &pair.public_pem, &token));
    }

    // A damaged key in the file: the error names the file and the form, never the key.
    let mut damaged = ed.secret.clone();
    damaged.replace_range(20..21, "!");
    let file = TempFile::with(&serde_json::json!({"name": KEY_NAME, "privateKey": damaged}).to_string());
    let e = Credentials::from_json_file(&file.0).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e:?}");
    assert!(e.to_string().contains(&file.0.display().to_string()), "{e}");
    for text in [e.to_string(), format!("{e:?}")] {
        assert!(!text.contains(&ed.secret[..30]) && !text.contains(&damaged[..30]), "{text}");
    }
    let missing = std::env::temp_dir().join("tickshare-no-such-key-file.json");
    let e = Credentials::from_json_file(&missing).unwrap_err();
    assert!(matches!(e, Error::Config(_)) && e.to_string().contains("could not read"), "{e}");
}

/// Run in a child process by `from_env_reads_escaped_pem_and_raw_secrets` (setting variables
/// in this process would need `unsafe`); a no-op otherwise.
#[test]
fn from_env_child() {
    let Ok(expected) = std::env::var("TICKSHARE_TEST_FROM_ENV") else { return };
    match Credentials::from_env() {
        Ok(creds) => {
            assert_eq!(creds.algorithm().jwt_alg(), expected);
            println!("PUBLIC={}", creds.public_key_pem().replace('\n', "|"));
        }
        Err(e) => {
            assert_eq!(expected, "error", "{e}");
            println!("ERROR={e} DEBUG={e:?}");
        }
    }
}

#[test]
fn from_env_reads_escaped_pem_and_raw_secrets() {
    let ed = ed25519_pair();
    let ec = p256_pair();
    let mut seed = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
    let ed_sk = ed25519_dalek::SigningKey::from_bytes(&seed);
    let ed_pkcs8 = ed_sk.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let ed_pkcs8_public =
        ed25519_dalek::pkcs8::EncodePublicKey::to_public_key_pem(&ed_sk.verifying_key(), LineEnding::LF)
            .unwrap();
    let mut damaged = ec.secret.replace('\n', "\\n");
    damaged.replace_range(50..51, "!");
    let cases = [
        (ec.secret.replace('\n', "\\n"), "ES256", Some(&ec.public_pem)),
        (ed_pkcs8.replace('\n', "\\n"), "EdDSA", Some(&ed_pkcs8_public)),
        (ed.secret.clone(), "EdDSA", Some(&ed.public_pem)),
        (damaged, "error", None),
    ];
    for (secret, expected, public) in &cases {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["jwt::from_env_child", "--exact", "--nocapture", "--test-threads=1"])
            .env("TICKSHARE_TEST_FROM_ENV", expected)
            .env("COINBASE_API_KEY", KEY_NAME)
            .env("COINBASE_API_SECRET", secret)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{expected}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("1 passed"), "the child ran the test: {stdout}");
        match public {
            Some(public) => {
                assert!(stdout.contains(&format!("PUBLIC={}", public.replace('\n', "|"))), "{stdout}")
            }
            None => {
                assert!(stdout.contains("ERROR=configuration error: COINBASE_API_SECRET: "), "{stdout}");
                let body: String = secret.split("\\n").filter(|l| !l.starts_with("-----")).collect();
                for window in body.as_bytes().windows(16) {
                    assert!(!stdout.contains(std::str::from_utf8(window).unwrap()), "{stdout}");
                }
            }
        }
    }
}

/// The simulated exchange given an Ed25519 key's public half verifies its EdDSA tokens: a
/// client with that key reads accounts over real HTTP; another Ed25519 key, or an ES256 key,
/// is turned away.
#[tokio::test]
async fn the_sim_verifies_an_ed25519_key_and_accounts_are_read() {
    let pair = ed25519_pair();
    let creds = Credentials::from_secret("d2efa49a-1234-4abc-8def-0123456789ab", &pair.secret).unwrap();
    assert_eq!(creds.algorithm(), KeyAlgorithm::EdDsa);
    let sim = SimExchange::builder().jwt_public_key_pem(&pair.public_pem).start().await.unwrap();
    let client = sim.client_builder().credentials(creds).build().unwrap();
    let accounts = client.accounts().await.unwrap();
    assert!(!accounts.is_empty());
    assert_eq!(sim.stats().auth_failures, 0);

    for stranger in
        [Credentials::generate_ed25519("d2efa49a"), Credentials::generate("organizations/o/apiKeys/k")]
    {
        let client = sim.client_builder().credentials(stranger).max_retries(0).build().unwrap();
        let e = client.accounts().await.unwrap_err();
        assert!(matches!(e, Error::Unauthorized(_)), "{e:?}");
    }
    assert_eq!(sim.stats().auth_failures, 2);
}

/// The same for ES256, from a SEC1 PEM, so both algorithms pass through the same server.
#[tokio::test]
async fn the_sim_verifies_a_p256_key_and_accounts_are_read() {
    let pair = p256_pair();
    let creds = Credentials::from_secret(KEY_NAME, &pair.secret).unwrap();
    let sim = SimExchange::builder().jwt_public_key_pem(&creds.public_key_pem()).start().await.unwrap();
    let client = sim.client_builder().credentials(creds).build().unwrap();
    assert!(!client.accounts().await.unwrap().is_empty());
    let wrong =
        sim.client_builder().credentials(Credentials::generate_ed25519(KEY_NAME)).max_retries(0).build();
    assert!(matches!(wrong.unwrap().accounts().await, Err(Error::Unauthorized(_))));
}
