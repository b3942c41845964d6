//! Token encryption at rest: AES-256-GCM, with associated data binding each ciphertext to its row
//! and column (a token copied into another row or column fails to decrypt), and a key id in the
//! stored value so older keys keep working during a rotation.
//!
//! Stored form: `v1.<key id>.<base64(nonce ‖ ciphertext ‖ tag)>`, key id = first 8 hex digits of
//! SHA-256(key).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::config::TokenKeyArgs;

const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("TOKEN_ENCRYPTION_KEY is not set; calsync refuses to start without it")]
    MissingKey,
    #[error("{0} must be base64 of exactly 32 bytes")]
    BadKey(&'static str),
    #[error("stored token is not in the v1 format")]
    Format,
    #[error("stored token was encrypted with key {0}, which is neither the current nor a previous key")]
    UnknownKey(String),
    #[error("stored token does not decrypt for this row and column")]
    Decrypt,
}

impl CryptoError {
    /// True when the stored value itself is wrong for where it is (copied from another row, or
    /// corrupted): that row's problem, not the process's configuration. Only a key the process
    /// does not hold ([`CryptoError::UnknownKey`]) is a configuration error.
    pub fn is_integrity(&self) -> bool {
        matches!(self, Self::Format | Self::Decrypt)
    }
}

/// What a ciphertext is bound to (table, row key, column). Decrypting with any other binding fails.
#[derive(Debug, Clone)]
pub struct Binding {
    pub table: &'static str,
    pub row: String,
    pub column: &'static str,
}

impl Binding {
    fn associated_data(&self) -> Vec<u8> {
        format!("calsync:{}:{}:{}", self.table, self.row, self.column).into_bytes()
    }
}

struct Key {
    id: String,
    cipher: Aes256Gcm,
}

impl Key {
    fn parse(encoded: &str, variable: &'static str) -> Result<Self, CryptoError> {
        let bytes = B64.decode(encoded.trim()).map_err(|_| CryptoError::BadKey(variable))?;
        if bytes.len() != 32 {
            return Err(CryptoError::BadKey(variable));
        }
        let id = hex::encode(&Sha256::digest(&bytes)[..4]);
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| CryptoError::BadKey(variable))?;
        Ok(Self { id, cipher })
    }
}

/// Encrypts with the current key; decrypts with whichever configured key the value names.
pub struct TokenCipher {
    current: Key,
    previous: Vec<Key>,
    failures: KeyFailures,
}

/// The last time a stored value named a key this process does not hold, and why: the process
/// lacks the key it was written with (a rotation rolled out half-way), an operator's configuration
/// error, which readiness reports until it has stopped happening for a while. A value that fails
/// its integrity check is one row's problem and never makes the process unready.
#[derive(Clone, Default)]
pub struct KeyFailures(Arc<Mutex<Option<(Instant, String)>>>);

impl KeyFailures {
    fn record(&self, error: &CryptoError) {
        let reason = if error.is_integrity() { "integrity" } else { "unknown_key" };
        metrics::counter!("calsync_token_decrypt_failures_total", "reason" => reason).increment(1);
        if !error.is_integrity() {
            *self.0.lock().expect("key failures lock") = Some((Instant::now(), error.to_string()));
        }
    }

    /// Why a value last failed to decrypt, if that was less than `within` ago.
    pub fn recent(&self, within: Duration) -> Option<String> {
        let last = self.0.lock().expect("key failures lock");
        last.as_ref().filter(|(at, _)| at.elapsed() < within).map(|(_, why)| why.clone())
    }
}

impl TokenCipher {
    pub fn from_settings(args: &TokenKeyArgs) -> Result<Self, CryptoError> {
        let current = args.token_encryption_key.as_ref().ok_or(CryptoError::MissingKey)?;
        let current = Key::parse(current.expose_secret(), "TOKEN_ENCRYPTION_KEY")?;
        let previous = args
            .token_encryption_previous_keys
            .iter()
            .filter(|k| !k.expose_secret().trim().is_empty())
            .map(|k| Key::parse(k.expose_secret(), "TOKEN_ENCRYPTION_PREVIOUS_KEYS"))
            .collect::<Result<_, _>>()?;
        Ok(Self { current, previous, failures: KeyFailures::default() })
    }

    /// A handle on this cipher's decryption failures (for readiness).
    pub fn failures(&self) -> KeyFailures {
        self.failures.clone()
    }

    /// The id of the key new values are encrypted with.
    pub fn current_key_id(&self) -> &str {
        &self.current.id
    }

    pub fn encrypt(&self, plaintext: &str, binding: Binding) -> String {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let nonce = Nonce::try_from(&nonce_bytes[..]).expect("nonce is 12 bytes");
        let aad = binding.associated_data();
        let sealed = self
            .current
            .cipher
            .encrypt(&nonce, Payload { msg: plaintext.as_bytes(), aad: &aad })
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&sealed);
        format!("v1.{}.{}", self.current.id, B64.encode(out))
    }

    pub fn decrypt(&self, stored: &str, binding: Binding) -> Result<SecretString, CryptoError> {
        self.open(stored, binding).inspect_err(|error| self.failures.record(error))
    }

    fn open(&self, stored: &str, binding: Binding) -> Result<SecretString, CryptoError> {
        let mut parts = stored.splitn(3, '.');
        let (Some("v1"), Some(key_id), Some(data)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CryptoError::Format);
        };
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == key_id)
            .ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        let raw = B64.decode(data).map_err(|_| CryptoError::Format)?;
        if raw.len() < NONCE_LEN {
            return Err(CryptoError::Format);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_from(nonce).map_err(|_| CryptoError::Format)?;
        let aad = binding.associated_data();
        let plain = key.cipher.decrypt(&nonce, Payload { msg: sealed, aad: &aad }).map_err(|_| CryptoError::Decrypt)?;
        String::from_utf8(plain).map(SecretString::from).map_err(|_| CryptoError::Decrypt)
    }

    /// True when `stored` was written with an older key and should be re-encrypted.
    pub fn is_stale(&self, stored: &str) -> bool {
        stored.split('.').nth(1).is_some_and(|id| id != self.current.id)
    }
}

/// A fresh random key in the form `TOKEN_ENCRYPTION_KEY` expects (used by the demo and tests).
pub fn generate_key() -> String {
    B64.encode(rand::random::<[u8; 32]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(current: &str, previous: &[&str]) -> TokenCipher {
        TokenCipher::from_settings(&TokenKeyArgs {
            token_encryption_key: Some(SecretString::from(current.to_owned())),
            token_encryption_previous_keys: previous.iter().map(|k| SecretString::from(k.to_string())).collect(),
        })
        .unwrap()
    }

    fn binding(row: uuid::Uuid, column: &'static str) -> Binding {
        Binding { table: "calendar_connections", row: row.to_string(), column }
    }

    #[test]
    fn a_token_round_trips_for_its_own_row_and_column_only() {
        let c = cipher(&generate_key(), &[]);
        let (row, other) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let stored = c.encrypt("secret-token", binding(row, "access_token"));
        assert!(!stored.contains("secret-token"));
        assert_eq!(c.decrypt(&stored, binding(row, "access_token")).unwrap().expose_secret(), "secret-token");
        assert!(matches!(c.decrypt(&stored, binding(other, "access_token")), Err(CryptoError::Decrypt)));
        assert!(matches!(c.decrypt(&stored, binding(row, "refresh_token")), Err(CryptoError::Decrypt)));
    }

    #[test]
    fn a_previous_key_still_decrypts_after_rotation() {
        let (old, new) = (generate_key(), generate_key());
        let row = uuid::Uuid::new_v4();
        let stored = cipher(&old, &[]).encrypt("t", binding(row, "access_token"));
        let rotated = cipher(&new, &[&old]);
        assert!(rotated.is_stale(&stored));
        assert_eq!(rotated.decrypt(&stored, binding(row, "access_token")).unwrap().expose_secret(), "t");
        let without_old = cipher(&new, &[]);
        assert!(matches!(without_old.decrypt(&stored, binding(row, "access_token")), Err(CryptoError::UnknownKey(_))));
        let why = without_old.failures().recent(Duration::from_secs(60)).expect("the failure is reported");
        assert!(why.contains("neither the current nor a previous key"), "{why}");
        assert_eq!(rotated.failures().recent(Duration::from_secs(60)), None);
    }

    #[test]
    fn a_key_that_is_not_32_bytes_of_base64_is_refused() {
        let args = TokenKeyArgs {
            token_encryption_key: Some(SecretString::from("c2hvcnQ=".to_owned())),
            token_encryption_previous_keys: vec![],
        };
        assert!(matches!(TokenCipher::from_settings(&args), Err(CryptoError::BadKey("TOKEN_ENCRYPTION_KEY"))));
    }
}
