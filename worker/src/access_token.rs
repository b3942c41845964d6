//! A user's access token as the worker holds it in memory.

use secrecy::SecretString;

/// A decrypted access token and the ciphertext it came from (to tell, after a 401, whether someone
/// else has refreshed in the meantime).
#[derive(Clone)]
pub struct AccessToken {
    pub secret: SecretString,
    pub ciphertext: String,
}
