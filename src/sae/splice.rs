//! SAEs spliced into a shard's pass: at each host point, the value the host's hooks give
//! back goes through the SAE (its own points hooked like any other), and the model
//! continues with the SAE's output.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use flexmodel_cluster::Collective;

use super::{SaeConfig, SparseAutoencoder};
use crate::hooks::{HookLayer, ModelPoints, SaeSite};
use crate::models::Stage;
use crate::{Error, HookPoint, Result};

/// An SAE to splice into a model: the directory SAELens saved it in, the hook point it
/// reads, and whether the model continues with the input (the reconstruction plus its
/// error, the default) or with the reconstruction alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaeAttachment {
    /// The directory with `cfg.json` and `sae_weights.safetensors`.
    pub dir: PathBuf,
    /// The hook point's name (`blocks.6.hook_resid_post`).
    pub hook: String,
    /// Whether the error term is added back: the model's outputs are then unchanged
    /// unless something inside the SAE is edited.
    pub error_term: bool,
}

impl SaeAttachment {
    /// The SAE in `dir` at `hook`, with the error term on.
    pub fn new(dir: impl Into<PathBuf>, hook: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            hook: hook.into(),
            error_term: true,
        }
    }

    /// The same SAE, the model continuing with its reconstruction alone.
    pub fn without_error_term(self) -> Self {
        Self {
            error_term: false,
            ..self
        }
    }

    /// Its configuration (`cfg.json`), checked against the model's `points`; returns
    /// `points` with the SAE's points added.
    pub fn splice_into(&self, points: ModelPoints) -> Result<(ModelPoints, SaeConfig)> {
        let config = SaeConfig::read(&self.dir.join(super::CONFIG_FILE))?;
        let host = points
            .parse(&self.hook)
            .map_err(|e| Error::InvalidArgument {
                argument: "sae",
                problem: format!("{} (for the SAE in {})", e, self.dir.display()),
            })?;
        let d_model = points.sizes().d_model;
        if config.d_in != d_model {
            return Err(Error::InvalidArgument {
                argument: "sae",
                problem: format!(
                    "the SAE in {} reads d_in = {} values, but {} has d_model = {d_model}",
                    self.dir.display(),
                    config.d_in,
                    self.hook
                ),
            });
        }
        Ok((points.with_sae(host, config.d_sae)?, config))
    }
}

/// `DIR@HOOK`, as the command line's `--sae` takes it (the last `@` separates them).
impl FromStr for SaeAttachment {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        match spec.rsplit_once('@') {
            Some((dir, hook)) if !dir.is_empty() && !hook.is_empty() => {
                Ok(SaeAttachment::new(dir, hook))
            }
            _ => Err(Error::InvalidArgument {
                argument: "sae",
                problem: format!("{spec:?} is not DIR@HOOK"),
            }),
        }
    }
}

impl std::fmt::Display for SaeAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.dir.display(), self.hook)
    }
}

/// `points` with the points of every SAE of `saes` added, in order, and each SAE's
/// layer and configuration.
pub fn splice_all(
    points: ModelPoints,
    saes: &[SaeAttachment],
) -> Result<(ModelPoints, Vec<(usize, SaeConfig)>)> {
    let mut configs = Vec::with_capacity(saes.len());
    let mut points = points;
    for sae in saes {
        let (more, config) = sae.splice_into(points)?;
        points = more;
        let layer = points.splices().last().and_then(|s| s.host.layer());
        configs.push((layer.unwrap_or(0), config));
    }
    Ok((points, configs))
}

/// One shard's SAEs: the share of each SAE its tensor-parallel rank holds, for the SAEs
/// at points of its pipeline stage.
#[derive(Clone, Default)]
pub struct ShardSaes {
    saes: Vec<Spliced>,
    collective: Option<Arc<dyn Collective>>,
}

#[derive(Clone)]
struct Spliced {
    host: HookPoint,
    sae: Arc<SparseAutoencoder>,
    error_term: bool,
}

impl ShardSaes {
    /// The shares of `saes` (spliced at `points`' splices, in the same order) for the
    /// tensor-parallel rank of `collective` on pipeline `stage`, on `device`.
    pub fn load(
        saes: &[SaeAttachment],
        points: &ModelPoints,
        stage: &Stage,
        collective: Arc<dyn Collective>,
        device: &Device,
    ) -> Result<Self> {
        let tp = collective.tp_rank();
        let mut loaded = Vec::new();
        for (attachment, splice) in saes.iter().zip(points.splices()) {
            let in_stage = splice
                .host
                .layer()
                .is_some_and(|l| stage.layers.contains(&l));
            if !in_stage {
                continue;
            }
            let sae = SparseAutoencoder::load(&attachment.dir, tp)?.to_device(device)?;
            loaded.push(Spliced {
                host: splice.host,
                sae: Arc::new(sae),
                error_term: attachment.error_term,
            });
        }
        Ok(Self {
            saes: loaded,
            collective: Some(collective),
        })
    }

    /// Whether no SAE is spliced into this shard.
    pub fn is_empty(&self) -> bool {
        self.saes.is_empty()
    }

    /// The bytes of SAE weights this shard holds.
    pub fn weight_bytes(&self) -> usize {
        self.saes.iter().map(|s| s.sae.weight_bytes()).sum()
    }

    /// `hooks` with these SAEs spliced in.
    pub fn around<'a>(&'a self, hooks: &'a mut dyn HookLayer) -> SplicedHooks<'a> {
        SplicedHooks { hooks, saes: self }
    }
}

/// A hook layer with SAEs spliced in: at a host point, the SAE runs on the value its
/// hooks give back, its own points going through the same hooks.
pub struct SplicedHooks<'a> {
    hooks: &'a mut dyn HookLayer,
    saes: &'a ShardSaes,
}

impl HookLayer for SplicedHooks<'_> {
    fn wants(&self, point: HookPoint) -> bool {
        self.hooks.wants(point)
    }

    fn hook(&mut self, point: HookPoint, value: Tensor) -> Result<Tensor> {
        let value = self.hooks.hook(point, value)?;
        let (Some(spliced), Some(collective)) = (
            self.saes.saes.iter().find(|s| s.host == point),
            &self.saes.collective,
        ) else {
            return Ok(value);
        };
        let HookPoint::Block { layer, site: host } = point else {
            return Err(Error::Internal("an SAE spliced outside a block"));
        };
        let hooks = &mut *self.hooks;
        let mut hook =
            |site: SaeSite, v: Tensor| hooks.hook(HookPoint::Sae { layer, host, site }, v);
        // The SAE computes in f32 whatever the model's dtype.
        let dtype = value.dtype();
        let x = value.to_dtype(DType::F32)?;
        let out = spliced
            .sae
            .forward(&x, spliced.error_term, &mut hook, collective)?;
        Ok(out.to_dtype(dtype)?)
    }
}

/// The SAE attachments, as a worker is told them after the model's name
/// (`MODEL --sae DIR@HOOK ...`): see [`describe`].
pub(crate) fn parse_description(description: &str) -> Result<(String, Vec<SaeAttachment>)> {
    let mut parts = description.split(SAE_FLAG);
    let model = parts.next().unwrap_or_default().to_string();
    let saes = parts
        .map(|part| match part.strip_prefix(RECONS_ONLY) {
            Some(rest) => Ok(rest.parse::<SaeAttachment>()?.without_error_term()),
            None => part.parse(),
        })
        .collect::<Result<_>>()?;
    Ok((model, saes))
}

/// `model` and `saes` as one line a worker is told: `MODEL --sae DIR@HOOK ...` (an SAE
/// without its error term marked `!`), the model's name alone without SAEs.
pub(crate) fn describe(model: &str, saes: &[SaeAttachment]) -> String {
    let mut line = model.to_string();
    for sae in saes {
        line.push_str(SAE_FLAG);
        if !sae.error_term {
            line.push_str(RECONS_ONLY);
        }
        line.push_str(&sae.to_string());
    }
    line
}

const SAE_FLAG: &str = " --sae ";
const RECONS_ONLY: &str = "!";
