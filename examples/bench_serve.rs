//! The serving benchmark's client (`scripts/bench-serve` starts the server): `clients`
//! clients each send `requests` requests at once, and the same requests are sent again
//! one at a time; prints the requests per second and latency percentiles of both as a
//! JSON line.
//!
//! ```sh
//! cargo run --release --features client --example bench_serve -- \
//!     http://127.0.0.1:8080 tokens forward 16 4
//! ```
//!
//! `forward`: 64 tokens each (random ids, seeded per request) capturing every
//! `blocks.*.hook_resid_post`; `generate`: 16 greedy tokens after a short prompt.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flexmodel::api::{ForwardRequest, GenerateRequest};
use flexmodel::client::Client;

/// One request of the benchmark.
#[derive(Clone)]
enum Request {
    Forward(ForwardRequest),
    Generate(GenerateRequest),
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, token_file, kind, clients, requests] = args.as_slice() else {
        bail!("usage: bench_serve URL TOKEN_FILE forward|generate CLIENTS REQUESTS_PER_CLIENT");
    };
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("reading {token_file}"))?
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let (clients, per_client): (usize, usize) = (clients.parse()?, requests.parse()?);
    let all: Vec<Request> = (0..clients * per_client)
        .map(|i| match kind.as_str() {
            "forward" => Ok(Request::Forward(
                ForwardRequest::tokens([random_tokens(i as u64, 64)])
                    .hook("blocks.*.hook_resid_post"),
            )),
            "generate" => Ok(Request::Generate(
                GenerateRequest::prompts([format!("Request {i}: the capital of France is")])
                    .max_new_tokens(16),
            )),
            other => bail!("the kind is forward or generate, not {other:?}"),
        })
        .collect::<anyhow::Result<_>>()?;
    let send = |client: &Client, request: &Request| -> anyhow::Result<Duration> {
        let start = Instant::now();
        match request {
            Request::Forward(r) => drop(client.forward(r)?),
            Request::Generate(r) => drop(client.generate(r)?),
        }
        Ok(start.elapsed())
    };
    // Warm up the server (and its allocator) with one request.
    send(&Client::new(url, &token)?, &all[0])?;

    let start = Instant::now();
    let concurrent: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = all
            .chunks(per_client)
            .map(|mine| {
                let client = Client::new(url, &token);
                s.spawn(move || -> anyhow::Result<Vec<Duration>> {
                    let client = client?;
                    mine.iter().map(|r| send(&client, r)).collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a client panicked"))?)
            .collect::<anyhow::Result<Vec<Vec<_>>>>()
            .map(|v| v.concat())
    })?;
    let concurrent_s = start.elapsed().as_secs_f64();

    let client = Client::new(url, &token)?;
    let start = Instant::now();
    let alone: Vec<Duration> = all
        .iter()
        .map(|r| send(&client, r))
        .collect::<anyhow::Result<_>>()?;
    let alone_s = start.elapsed().as_secs_f64();

    let summary = |latencies: &[Duration], seconds: f64| {
        let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        serde_json::json!({
            "requests_per_s": latencies.len() as f64 / seconds,
            "p50_ms": percentile(&ms, 50.0),
            "p90_ms": percentile(&ms, 90.0),
            "p99_ms": percentile(&ms, 99.0),
        })
    };
    let json = serde_json::json!({
        "kind": kind,
        "clients": clients,
        "requests": all.len(),
        "concurrent": summary(&concurrent, concurrent_s),
        "one_at_a_time": summary(&alone, alone_s),
        "speedup": alone_s / concurrent_s,
    });
    println!("{json}");
    Ok(())
}

/// The nearest-rank `p`-th percentile of `sorted`.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `n` token ids below 49152 (SmolLM2's vocabulary) from a simple generator seeded
/// with `seed`.
fn random_tokens(seed: u64, n: usize) -> Vec<u32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % 49152) as u32
        })
        .collect()
}
