//! The corpus of a dataset: one stream of token ids, from a tokenized text, a tokens
//! file or memory, read in order from any position and cut into sequences by the plan.
//!
//! A tokens file is read as it is needed, never whole: its ids, line after line, are the
//! stream. A text is tokenized whole (tokenizers differ in how they treat a text cut in
//! two), so its ids, 4 bytes each, stay in memory.

use std::fs::File;
use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::text::token_batch::parse_tokens_line;
use crate::weights::fingerprint::hex;
use crate::{Error, Result, Tokenizer};

/// The token ids a dataset is cut from.
#[derive(Debug, Clone)]
pub struct Corpus {
    source: Source,
    len: usize,
}

#[derive(Debug, Clone)]
enum Source {
    Ids(Vec<u32>),
    TokensFile { path: PathBuf, vocab_size: usize },
}

impl Corpus {
    /// The corpus of `ids`.
    pub fn from_ids(ids: Vec<u32>) -> Self {
        Self {
            len: ids.len(),
            source: Source::Ids(ids),
        }
    }

    /// The corpus of the text file at `path`, tokenized by `tokenizer`.
    pub fn from_text(path: &Path, tokenizer: &Tokenizer) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let ids = tokenizer.encode(&text)?;
        if ids.is_empty() {
            return Err(Error::NoTokens { what: "the text" });
        }
        Ok(Self::from_ids(ids))
    }

    /// The corpus of the tokens file at `path` (ids separated by whitespace, lines one
    /// after the other), every id checked against `vocab_size` and counted now; the ids
    /// themselves are read when the dataset is written.
    pub fn from_tokens_file(path: &Path, vocab_size: usize) -> Result<Self> {
        let source = Source::TokensFile {
            path: path.to_path_buf(),
            vocab_size,
        };
        let mut len = 0;
        for id in FileIds::open(path, vocab_size)? {
            id?;
            len += 1;
        }
        if len == 0 {
            return Err(Error::BadTokensFile {
                path: path.to_path_buf(),
                line: None,
                problem: "no token ids".into(),
            });
        }
        Ok(Self { source, len })
    }

    /// The number of token ids.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no token id (only a corpus made from no ids).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ids from the `start`th on, in order.
    pub(crate) fn ids_from(
        &self,
        start: usize,
    ) -> Result<Box<dyn Iterator<Item = Result<u32>> + '_>> {
        Ok(match &self.source {
            Source::Ids(ids) => Box::new(ids.iter().skip(start).map(|&id| Ok(id))),
            Source::TokensFile { path, vocab_size } => {
                Box::new(FileIds::open(path, *vocab_size)?.skip(start))
            }
        })
    }

    /// The SHA-256 of the first `n` ids (little-endian u32 each), in hex.
    pub(crate) fn fingerprint(&self, n: usize) -> Result<String> {
        let mut hasher = Sha256::new();
        for id in self.ids_from(0)?.take(n) {
            hasher.update(id?.to_le_bytes());
        }
        Ok(hex(hasher))
    }
}

/// The ids of a tokens file, read line by line.
struct FileIds {
    path: PathBuf,
    vocab_size: usize,
    lines: Lines<BufReader<File>>,
    line: usize,
    pending: std::vec::IntoIter<u32>,
}

impl FileIds {
    fn open(path: &Path, vocab_size: usize) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            vocab_size,
            lines: BufReader::new(file).lines(),
            line: 0,
            pending: Vec::new().into_iter(),
        })
    }
}

impl Iterator for FileIds {
    type Item = Result<u32>;

    fn next(&mut self) -> Option<Result<u32>> {
        loop {
            if let Some(id) = self.pending.next() {
                return Some(Ok(id));
            }
            let text = match self.lines.next()? {
                Ok(text) => text,
                Err(e) => return Some(Err(Error::io(&self.path, e))),
            };
            self.line += 1;
            match parse_tokens_line(&self.path, self.line, &text, self.vocab_size) {
                Ok(ids) => self.pending = ids.into_iter(),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokens_file_is_one_stream_of_its_lines_from_any_position() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "1 2 3\n\n4 5\n6\n").unwrap();
        let corpus = Corpus::from_tokens_file(file.path(), 10).unwrap();
        assert_eq!(corpus.len(), 6);
        let from = |start| -> Vec<u32> {
            corpus
                .ids_from(start)
                .unwrap()
                .map(|id| id.unwrap())
                .collect()
        };
        assert_eq!(from(0), [1, 2, 3, 4, 5, 6]);
        assert_eq!(from(4), [5, 6]);
        let memory = Corpus::from_ids(vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(
            corpus.fingerprint(6).unwrap(),
            memory.fingerprint(6).unwrap()
        );
        assert_ne!(
            corpus.fingerprint(5).unwrap(),
            memory.fingerprint(6).unwrap()
        );
    }

    #[test]
    fn a_bad_tokens_file_is_refused_naming_its_line() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "1 2\n3 x\n").unwrap();
        let e = Corpus::from_tokens_file(file.path(), 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":2:") && e.contains("\"x\" is not a token id"),
            "{e}"
        );
        std::fs::write(file.path(), "1 2\n3 10\n").unwrap();
        let e = Corpus::from_tokens_file(file.path(), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the vocabulary (size 10)"), "{e}");
        std::fs::write(file.path(), "\n \n").unwrap();
        let e = Corpus::from_tokens_file(file.path(), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no token ids"), "{e}");
    }
}
