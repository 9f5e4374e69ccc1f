//! Who may connect: a job's secret token, and the HMAC-SHA256 challenge–response that
//! opens every connection.
//!
//! ```text
//! dialer                                       acceptor
//!   Hello { group, member, nonce_d }       →
//!                                          ←   Challenge { nonce_a, proof_a }
//!   Proof { proof_d }                      →
//!                                          ←   Welcome
//!
//! proof_a = HMAC-SHA256(token, "flexmodel/v1 accept" ‖ nonce_d ‖ nonce_a ‖ group ‖ member)
//! proof_d = HMAC-SHA256(token, "flexmodel/v1 dial"   ‖ nonce_a ‖ nonce_d ‖ group ‖ member)
//! ```
//!
//! Each side draws a fresh 32-byte nonce, so neither proof can be replayed, and each
//! proves that it holds the token before the other acts on anything it sends. Proofs are
//! compared in constant time. The token itself never crosses the wire.

use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::{Error, Result};

/// The bytes of a nonce.
const NONCE_BYTES: usize = 32;

/// A job's secret: every process of the job holds the same one.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Vec<u8>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// The token in `path`: its contents without surrounding whitespace. A file that
    /// others can read is used, with a warning; an empty or unreadable one is an error.
    pub fn read(path: &Path) -> Result<Token> {
        let bad = |reason: String| Error::BadToken {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let secret = bytes.trim_ascii();
        if secret.is_empty() {
            return Err(bad("the file is empty".into()));
        }
        // A secret others can read is no secret: refused, not used with a warning.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(bad(format!(
                    "it is open to group or others (mode {mode:o}): `chmod 600 {}` it",
                    path.display()
                )));
            }
        }
        Ok(Token(secret.to_vec()))
    }

    /// A fresh random token (for a job of this machine's processes alone).
    pub fn random() -> Token {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Token(hex(&bytes).into_bytes())
    }

    /// The secret's bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Writes the token to a new file at `path` that only its owner can read.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(path)?.write_all(&self.0)
    }

    fn mac(
        &self,
        role: &str,
        first: &[u8],
        second: &[u8],
        group: &str,
        member: usize,
    ) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
        for part in [
            role.as_bytes(),
            first,
            second,
            group.as_bytes(),
            &(member as u64).to_le_bytes(),
        ] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac
    }

    /// The proof of the side playing `role` over the nonces, first its peer's.
    pub(crate) fn prove(
        &self,
        role: Role,
        theirs: &[u8],
        mine: &[u8],
        group: &str,
        member: usize,
    ) -> Vec<u8> {
        self.mac(role.label(), theirs, mine, group, member)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Whether `proof` is the proof of the peer playing `role` (compared in constant time).
    pub(crate) fn verify(
        &self,
        role: Role,
        proof: &[u8],
        mine: &[u8],
        theirs: &[u8],
        group: &str,
        member: usize,
    ) -> bool {
        self.mac(role.label(), mine, theirs, group, member)
            .verify_slice(proof)
            .is_ok()
    }
}

/// The two sides of a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Dialer,
    Acceptor,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Role::Dialer => "flexmodel/v1 dial",
            Role::Acceptor => "flexmodel/v1 accept",
        }
    }
}

/// A fresh nonce.
pub(crate) fn nonce() -> Vec<u8> {
    let mut bytes = vec![0u8; NONCE_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// The messages of the handshake.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Handshake {
    /// The dialer: which group it joins, as which member, and its nonce.
    Hello {
        group: String,
        member: usize,
        nonce: Vec<u8>,
    },
    /// The acceptor: its nonce and its proof.
    Challenge { nonce: Vec<u8>, proof: Vec<u8> },
    /// The dialer's proof.
    Proof { proof: Vec<u8> },
    /// The acceptor took the dialer's proof.
    Welcome,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_only_for_its_token_role_nonces_and_identity() {
        let (token, other) = (Token::random(), Token::random());
        let (dialer, acceptor) = (nonce(), nonce());
        let proof = token.prove(Role::Acceptor, &dialer, &acceptor, "tp.dp0.pp0", 1);
        assert!(token.verify(Role::Acceptor, &proof, &dialer, &acceptor, "tp.dp0.pp0", 1));
        assert!(!other.verify(Role::Acceptor, &proof, &dialer, &acceptor, "tp.dp0.pp0", 1));
        assert!(!token.verify(Role::Dialer, &proof, &dialer, &acceptor, "tp.dp0.pp0", 1));
        assert!(!token.verify(Role::Acceptor, &proof, &acceptor, &dialer, "tp.dp0.pp0", 1));
        assert!(!token.verify(Role::Acceptor, &proof, &dialer, &acceptor, "tp.dp0.pp0", 2));
        assert!(!token.verify(Role::Acceptor, &proof, &dialer, &nonce(), "tp.dp0.pp0", 1));
        assert!(!token.verify(
            Role::Acceptor,
            &proof[..31],
            &dialer,
            &acceptor,
            "tp.dp0.pp0",
            1
        ));
    }

    #[test]
    fn a_token_file_is_trimmed_and_an_empty_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let open = Token::read(&path).unwrap_err().to_string();
            assert!(open.contains("open to group or others"), "{open}");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert_eq!(Token::read(&path).unwrap(), Token(b"s3cret".to_vec()));
        std::fs::write(&path, "\n").unwrap();
        let err = Token::read(&path).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        let written = dir.path().join("written");
        let token = Token::random();
        token.write(&written).unwrap();
        assert_eq!(Token::read(&written).unwrap(), token);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&written).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
