//! `flexmodel workers`: the members of a job, one line each.

use std::path::PathBuf;

use clap::Args;
use flexmodel_cluster::membership::{ClusterUrl, EtcdJob, MemberRecord};

/// What `workers` takes.
#[derive(Args, Debug)]
pub struct WorkersArgs {
    /// The job: `etcd://HOST:PORT[,HOST:PORT...]/JOB`.
    #[arg(long, value_name = "URL")]
    cluster: ClusterUrl,
    /// The job's token file. Listing reads only etcd, so it is not needed; it is taken
    /// so that every command of a job can be given the same options.
    #[arg(long, value_name = "F")]
    token_file: Option<PathBuf>,
}

pub fn run(args: WorkersArgs) -> anyhow::Result<()> {
    let _ = args.token_file;
    let job = EtcdJob::connect(&args.cluster)?;
    let rows: Vec<[String; 7]> = job.members()?.iter().map(row).collect();
    let mut widths = [0; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    use std::io::Write as _;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

/// A member's line: id, host, address, device, rank, model, state (`-` where none).
fn row(member: &MemberRecord) -> [String; 7] {
    let slice = member.slice.as_ref();
    [
        member.id.clone(),
        member.host.clone(),
        member.address.clone(),
        member.device.clone(),
        slice.map_or("-".into(), |s| s.rank.to_string()),
        slice.map_or("-".into(), |s| s.model.clone()),
        member.state.name().to_string(),
    ]
}
