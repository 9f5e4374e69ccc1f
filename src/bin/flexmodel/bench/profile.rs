//! `bench --profile`: where the passes' time goes, per kind of op (the model's `op`
//! spans) and, in the hooked passes, per hook point and phase (the `hook.*` spans).

use std::collections::BTreeMap;
use std::time::Duration;

use flexmodel::telemetry::{HookPhase, OP_KINDS, OpTotals, PhaseTotals, Profile};

type HookTotals = BTreeMap<(String, HookPhase), PhaseTotals>;
type OpSums = BTreeMap<String, OpTotals>;

/// The spans of one pass.
#[derive(Default)]
pub(super) struct Spans {
    hooks: HookTotals,
    ops: OpSums,
}

impl Spans {
    /// What `profile` summed since it was last taken (nothing without a profile).
    pub(super) fn take(profile: Option<&Profile>) -> Self {
        match profile {
            Some(p) => Self {
                hooks: p.hooks.take(),
                ops: p.ops.take(),
            },
            None => Self::default(),
        }
    }
}

/// The sums over the timed passes of one variant.
#[derive(Default)]
struct VariantTotals {
    passes: u32,
    pass_ms: f64,
    spans: Spans,
}

/// The sums over the timed passes, per variant.
pub(super) struct Totals(Vec<VariantTotals>);

impl Totals {
    /// Nothing yet, for `variants` variants.
    pub(super) fn new(variants: usize) -> Self {
        Self((0..variants).map(|_| VariantTotals::default()).collect())
    }

    /// Adds one pass of variant `variant` that took `pass_ms`.
    pub(super) fn add(&mut self, variant: usize, pass_ms: f64, spans: Spans) {
        let into = &mut self.0[variant];
        into.passes += 1;
        into.pass_ms += pass_ms;
        for (key, t) in spans.hooks {
            let entry = into.spans.hooks.entry(key).or_default();
            entry.calls += t.calls;
            entry.time += t.time;
            entry.bytes += t.bytes;
        }
        for (kind, t) in spans.ops {
            let entry = into.spans.ops.entry(kind).or_default();
            entry.calls += t.calls;
            entry.time += t.time;
        }
    }

    /// Prints the mean time per pass in each kind of op, per variant (`labels` names
    /// them), with the time outside any op span; returns the same as JSON, per label.
    pub(super) fn print_ops(&self, labels: &[&str]) -> serde_json::Value {
        let mut kinds: Vec<String> = OP_KINDS.iter().map(|k| k.to_string()).collect();
        for v in &self.0 {
            kinds.extend(
                v.spans
                    .ops
                    .keys()
                    .filter(|k| !kinds.contains(k))
                    .cloned()
                    .collect::<Vec<_>>(),
            );
        }
        let columns: Vec<(&str, &VariantTotals)> = labels.iter().copied().zip(&self.0).collect();
        println!(
            "op profile: mean ms per pass (and share of the pass) by kind of op, summed over the shards of this process"
        );
        print!("{:<22}", "op");
        for (label, _) in &columns {
            print!(" {label:>18}");
        }
        println!();
        let per_pass =
            |v: &VariantTotals, d: Duration| d.as_secs_f64() * 1e3 / f64::from(v.passes.max(1));
        let mut json = serde_json::Map::new();
        let row = |name: &str, ms: &dyn Fn(&VariantTotals) -> f64| {
            print!("{name:<22}");
            for (_, v) in &columns {
                let pass = v.pass_ms / f64::from(v.passes.max(1));
                print!(" {:>9.1} ({:>5.1}%)", ms(v), 100.0 * ms(v) / pass);
            }
            println!();
        };
        for kind in &kinds {
            let ms = |v: &VariantTotals| v.spans.ops.get(kind).map_or(0.0, |t| per_pass(v, t.time));
            row(kind, &ms);
        }
        let in_ops = |v: &VariantTotals| {
            v.spans
                .ops
                .values()
                .map(|t| per_pass(v, t.time))
                .sum::<f64>()
        };
        let pass = |v: &VariantTotals| v.pass_ms / f64::from(v.passes.max(1));
        row("outside op spans", &|v| pass(v) - in_ops(v));
        row("pass (mean)", &pass);
        for (label, v) in &columns {
            let ms: serde_json::Map<String, serde_json::Value> = kinds
                .iter()
                .map(|k| {
                    (
                        k.clone(),
                        serde_json::json!(v.spans.ops.get(k).map_or(0.0, |t| per_pass(v, t.time))),
                    )
                })
                .chain([(
                    "outside".to_string(),
                    serde_json::json!(pass(v) - in_ops(v)),
                )])
                .collect();
            json.insert(label.to_string(), ms.into());
        }
        json.into()
    }

    /// Prints the hook profile of variant `variant`'s passes (see `print_hooks`).
    pub(super) fn print_hooks(&self, variant: usize, unhooked_ms: f64, hooked_ms: f64) {
        let v = &self.0[variant];
        print_hooks(&v.spans.hooks, v.passes, unhooked_ms, hooked_ms);
    }
}

/// How many hook points the profile lists one by one (the slowest first).
const PROFILE_ROWS: usize = 25;

/// Prints, per hook point, the mean time per pass in each phase and the megabytes of the
/// point's tensors per pass, then the totals and the overhead of the hooked passes
/// against the unhooked ones.
fn print_hooks(totals: &HookTotals, passes: u32, unhooked_ms: f64, hooked_ms: f64) {
    let per_pass = |d: std::time::Duration| d.as_secs_f64() * 1e3 / f64::from(passes);
    let mut points: BTreeMap<&str, [f64; 4]> = BTreeMap::new();
    let mut bytes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut phase_sums = [0.0; 4];
    for ((point, phase), t) in totals {
        let i = HookPhase::ALL.iter().position(|p| p == phase).unwrap_or(0);
        points.entry(point).or_default()[i] += per_pass(t.time);
        // Each phase handles the same tensor (or its pieces): count it once.
        let point_bytes = bytes.entry(point).or_default();
        *point_bytes = (*point_bytes).max(t.bytes / u64::from(passes));
        phase_sums[i] += per_pass(t.time);
    }
    let mut rows: Vec<(&str, [f64; 4])> = points.into_iter().collect();
    rows.sort_by(|a, b| b.1.iter().sum::<f64>().total_cmp(&a.1.iter().sum::<f64>()));
    println!(
        "hook profile: mean ms per pass over {passes} hooked passes ({} hook points, slowest first)",
        rows.len()
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "hook point", "gather", "edit", "scatter", "store", "total", "MB"
    );
    let row = |name: &str, t: &[f64; 4], mb: f64| {
        println!(
            "{name:<40} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {mb:>10.2}",
            t[0],
            t[1],
            t[2],
            t[3],
            t.iter().sum::<f64>()
        );
    };
    for (name, t) in rows.iter().take(PROFILE_ROWS) {
        row(name, t, bytes[name] as f64 / 1e6);
    }
    if rows.len() > PROFILE_ROWS {
        let mut rest = [0.0; 4];
        for (_, t) in &rows[PROFILE_ROWS..] {
            for (r, v) in rest.iter_mut().zip(t) {
                *r += v;
            }
        }
        let mb: u64 = rows[PROFILE_ROWS..].iter().map(|(n, _)| bytes[n]).sum();
        row(
            &format!("({} more points)", rows.len() - PROFILE_ROWS),
            &rest,
            mb as f64 / 1e6,
        );
    }
    let all_mb: u64 = bytes.values().sum();
    row("all hook points", &phase_sums, all_mb as f64 / 1e6);
    println!(
        "hooked pass {hooked_ms:.1} ms vs unhooked {unhooked_ms:.1} ms (medians): overhead {:+.1} ms ({:+.1}%), of which {:.1} ms inside hook spans",
        hooked_ms - unhooked_ms,
        100.0 * (hooked_ms / unhooked_ms - 1.0),
        phase_sums.iter().sum::<f64>()
    );
}
