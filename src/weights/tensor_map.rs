//! Weights held in memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::{WeightSource, missing};
use crate::Result;

/// Named tensors in memory (random test models, converted checkpoints).
#[derive(Debug, Clone, Default)]
pub struct TensorMap {
    origin: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

impl TensorMap {
    /// A map of `tensors`; `origin` says where they came from in error messages.
    pub fn new(origin: impl Into<PathBuf>, tensors: BTreeMap<String, Tensor>) -> Self {
        Self {
            origin: origin.into(),
            tensors,
        }
    }

    /// Every tensor of `source`, read into memory.
    pub fn read_all(source: &dyn WeightSource) -> Result<Self> {
        let tensors = source
            .names()
            .into_iter()
            .map(|name| Ok((name.clone(), source.tensor(&name)?)))
            .collect::<Result<_>>()?;
        Ok(Self::new(source.origin(), tensors))
    }

    /// The tensors by name.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }
}

impl WeightSource for TensorMap {
    fn origin(&self) -> &Path {
        &self.origin
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn fingerprint(&self) -> Result<String> {
        super::fingerprint::of_tensors(self.tensors.iter().map(|(n, t)| (n.as_str(), t)))
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| missing(&self.origin, name))?;
        Ok(t.to_dtype(DType::F32)?)
    }

    /// In memory, a slice is a copy of only its part.
    fn reads_slices(&self) -> bool {
        true
    }
}
