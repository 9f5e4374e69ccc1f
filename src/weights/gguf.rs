//! GGUF files (llama.cpp): metadata, tensors dequantized to f32, and the tokenizer.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::{WeightSource, missing};
use crate::error::tensor_message;
use crate::text::tokenizer::{PieceKind, Tokenizer};
use crate::{Error, Result};

/// How a family names its tensors in GGUF files, and what it undoes of llama.cpp's
/// conversion.
pub trait GgufNames: Send + Sync + std::fmt::Debug {
    /// The family's tensors, as Hugging Face and llama.cpp name them.
    fn table(&self) -> &NameTable;

    /// The GGUF name of a Hugging Face tensor name, if the family has that tensor.
    fn gguf_name(&self, hf: &str) -> Option<String> {
        self.table().gguf_name(hf)
    }

    /// The Hugging Face name of a GGUF tensor name, if the family has that tensor.
    fn hf_name(&self, gguf: &str) -> Option<String> {
        self.table().hf_name(gguf)
    }

    /// The tensor `hf` as Hugging Face holds it, from `tensor` as the file holds it
    /// (dequantized); an error says what does not fit.
    fn convert(&self, hf: &str, tensor: Tensor) -> std::result::Result<Tensor, String> {
        let _ = hf;
        Ok(tensor)
    }
}

/// A family's tensor names, each as (Hugging Face, GGUF): those outside the blocks, and
/// those inside block `i` (after `model.layers.{i}.` and `blk.{i}.`).
#[derive(Debug)]
pub struct NameTable {
    /// The tensors outside the blocks.
    pub global: &'static [(&'static str, &'static str)],
    /// The tensors of each block.
    pub block: &'static [(&'static str, &'static str)],
}

impl NameTable {
    /// The GGUF name of a Hugging Face tensor name.
    pub fn gguf_name(&self, hf: &str) -> Option<String> {
        if let Some((_, g)) = self.global.iter().find(|(h, _)| *h == hf) {
            return Some(g.to_string());
        }
        let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
        let (_, g) = self.block.iter().find(|(h, _)| *h == rest)?;
        Some(format!("blk.{layer}.{g}"))
    }

    /// The Hugging Face name of a GGUF tensor name.
    pub fn hf_name(&self, gguf: &str) -> Option<String> {
        if let Some((h, _)) = self.global.iter().find(|(_, g)| *g == gguf) {
            return Some(h.to_string());
        }
        let (layer, rest) = gguf.strip_prefix("blk.")?.split_once('.')?;
        let (h, _) = self.block.iter().find(|(_, g)| *g == rest)?;
        Some(format!("model.layers.{layer}.{h}"))
    }
}

/// A GGUF model file: its header is parsed at open, tensors are read on demand.
/// Tensors go by their Hugging Face names once [`with_names`](Self::with_names) says how
/// the file's family names them; by their GGUF names before.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    names: Option<Arc<dyn GgufNames>>,
}

impl GgufFile {
    /// Opens `path` and parses its header, metadata and tensor table.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content =
            Content::read(&mut BufReader::new(file)).map_err(|e| Error::BadWeightsFile {
                path: path.to_path_buf(),
                message: format!(
                    "not a readable GGUF file ({}); supported tensor types: F32, F16, BF16, \
                 Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K to Q6_K",
                    tensor_message(&e)
                ),
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            names: None,
        })
    }

    /// This file, its tensors named as `names` says (Hugging Face names).
    pub fn with_names(self, names: Arc<dyn GgufNames>) -> Self {
        Self {
            names: Some(names),
            ..self
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file holds a tensor of GGUF name `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The tokenizer stored in the `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`)
    /// or SentencePiece BPE (`llama`).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let model = self.string("tokenizer.ggml.model")?;
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let types = match self.content.metadata.get("tokenizer.ggml.token_type") {
            Some(_) => self
                .array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| {
                    v.to_i32()
                        .map_err(|e| self.bad_config(format!("token_type: {e}")))
                })
                .collect::<Result<Vec<_>>>()?,
            None => vec![],
        };
        match model.as_str() {
            "gpt2" => {
                let merges = self.strings("tokenizer.ggml.merges")?;
                // Token type 3 is a control token (`<|im_start|>`): matched whole, never split.
                let special: Vec<u32> = (0..tokens.len() as u32)
                    .filter(|&i| types.get(i as usize) == Some(&3))
                    .collect();
                let pre = self
                    .optional_string("tokenizer.ggml.pre")?
                    .unwrap_or_else(|| "default".to_string());
                Tokenizer::byte_level_bpe(&tokens, &merges, &special, &pre)
            }
            "llama" => {
                let scores = self
                    .array("tokenizer.ggml.scores")?
                    .iter()
                    .map(|v| {
                        v.to_f32()
                            .map_err(|e| self.bad_config(format!("scores: {e}")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let kinds: Vec<PieceKind> = match types.is_empty() {
                    true => vec![PieceKind::Normal; tokens.len()],
                    false => types.iter().map(|&t| PieceKind::of_code(t)).collect(),
                };
                // llama.cpp's defaults for a SentencePiece vocabulary.
                let add_bos = self
                    .optional_bool("tokenizer.ggml.add_bos_token")?
                    .unwrap_or(true);
                let bos = match add_bos {
                    true => self.optional_u32("tokenizer.ggml.bos_token_id")?,
                    false => None,
                };
                let space_prefix = self
                    .optional_bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                Tokenizer::sentencepiece_bpe(&tokens, &scores, &kinds, bos, space_prefix)
            }
            other => Err(Error::Tokenizer(format!(
                "{}: tokenizer model {other:?} is not supported (supported: byte-level BPE, \
                 \"gpt2\", and SentencePiece BPE, \"llama\"); use a Hugging Face directory with \
                 tokenizer.json instead",
                self.path.display()
            ))),
        }
    }

    /// The strings of the array at `key`.
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| self.bad_config(format!("{key}: {e}")))
            })
            .collect()
    }

    /// The boolean at `key`, if the key is there.
    pub fn optional_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad_config(format!("{key} must be a boolean, got {v:?}"))),
        }
    }

    /// An error naming the file: its configuration is wrong as `message` says.
    pub fn bad_config(&self, message: String) -> Error {
        Error::BadConfig {
            path: self.path.clone(),
            message,
        }
    }

    fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.bad_config(format!("metadata key {key} is missing")))
    }

    /// The string at metadata key `key`; an error if it is missing or not a string.
    pub fn string(&self, key: &str) -> Result<String> {
        let v = self.value(key)?;
        v.to_string()
            .cloned()
            .map_err(|e| self.bad_config(format!("{key}: {e}")))
    }

    /// The string at `key`, if the key is there.
    pub fn optional_string(&self, key: &str) -> Result<Option<String>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(_) => self.string(key).map(Some),
        }
    }

    /// The array at `key`; an error if it is missing or not an array.
    pub fn array(&self, key: &str) -> Result<&Vec<Value>> {
        self.value(key)?
            .to_vec()
            .map_err(|e| self.bad_config(format!("{key}: {e}")))
    }

    fn optional_u64(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.content.metadata.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| {
            self.bad_config(format!("{key} must be a non-negative integer, got {v:?}"))
        })
    }

    /// The non-negative integer at `key`, if the key is there.
    pub fn optional_usize(&self, key: &str) -> Result<Option<usize>> {
        Ok(self.optional_u64(key)?.map(|n| n as usize))
    }

    /// The non-negative 32-bit integer at `key`, if the key is there.
    pub fn optional_u32(&self, key: &str) -> Result<Option<u32>> {
        self.optional_u64(key)?
            .map(|n| {
                u32::try_from(n).map_err(|_| self.bad_config(format!("{key} = {n} is too large")))
            })
            .transpose()
    }

    /// The non-negative integer at `key`; an error if it is missing.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.optional_usize(key)?
            .ok_or_else(|| self.bad_config(format!("metadata key {key} is missing")))
    }

    /// The float at `key`, if the key is there.
    pub fn optional_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.bad_config(format!("{key} must be a float, got {v:?}"))),
        }
    }

    /// The float at `key`; an error if it is missing.
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.optional_f64(key)?
            .ok_or_else(|| self.bad_config(format!("metadata key {key} is missing")))
    }
}

impl WeightSource for GgufFile {
    fn origin(&self) -> &Path {
        &self.path
    }

    /// The file's name, length and header (metadata and tensor table), and the first
    /// and last few KiB of every tensor.
    fn fingerprint(&self) -> Result<String> {
        use std::os::unix::fs::FileExt;
        let path = self.path.as_path();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let length = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let data = self.content.tensor_data_offset;
        let mut header = vec![0u8; data.min(length) as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| Error::io(path, e))?;
        let mut infos: Vec<_> = self.content.tensor_infos.iter().collect();
        infos.sort_by_key(|(name, _)| name.as_str());
        let tensors = infos
            .into_iter()
            .map(|(_, info)| {
                let dtype = info.ggml_dtype;
                let bytes = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
                let start = (data + info.offset).min(length);
                start..(start + bytes as u64).min(length)
            })
            .collect();
        super::fingerprint::of_sampled_files([super::fingerprint::SampledFile {
            path,
            length,
            header: &header,
            tensors,
        }])
    }

    fn names(&self) -> Vec<String> {
        let gguf = self.content.tensor_infos.keys();
        let mut names: Vec<String> = match &self.names {
            Some(names) => gguf.filter_map(|g| names.hf_name(g)).collect(),
            None => gguf.cloned().collect(),
        };
        names.sort();
        names
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let gguf = match &self.names {
            Some(names) => names
                .gguf_name(name)
                .ok_or_else(|| missing(&self.path, name))?,
            None => name.to_string(),
        };
        if !self.content.tensor_infos.contains_key(&gguf) {
            return Err(missing(&self.path, &gguf));
        }
        let bad = |message: String| Error::BadTensor {
            path: self.path.clone(),
            tensor: gguf.clone(),
            message,
        };
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        // Dequantized on the host; `HeldWeights` copies each slice to the rank's device.
        let qtensor = self
            .content
            .tensor(&mut BufReader::new(file), &gguf, &Device::Cpu)
            .map_err(|e| bad(tensor_message(&e)))?;
        let t = qtensor
            .dequantize(&Device::Cpu)
            .map_err(|e| bad(tensor_message(&e)))?;
        match &self.names {
            Some(names) => names.convert(name, t).map_err(bad),
            None => Ok(t),
        }
    }
}
