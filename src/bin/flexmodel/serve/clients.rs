//! The clients' tokens: a file of them, one per line, that only its owner can read.

use std::path::Path;

use anyhow::{Context, bail};

/// The bearer tokens the server accepts.
pub struct ClientTokens(Vec<Vec<u8>>);

impl ClientTokens {
    /// The tokens of `path`: one per non-empty line (surrounding blanks ignored); the
    /// file must be open to its owner alone.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the clients' tokens {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                bail!(
                    "{} is open to group or others (mode {mode:o}): `chmod 600` it",
                    path.display()
                );
            }
        }
        let tokens: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if tokens.is_empty() {
            bail!("{} holds no token", path.display());
        }
        Ok(Self(tokens))
    }

    /// Whether `presented` is one of the tokens, compared in time that does not depend
    /// on where it differs.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.0.iter().fold(false, |found, token| {
            let same = token.len() == presented.len()
                && token
                    .iter()
                    .zip(presented)
                    .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                    == 0;
            found | same
        })
    }
}
