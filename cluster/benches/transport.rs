//! The TCP transport's throughput for hook pieces on loopback, next to this machine's
//! memory bandwidth (a copy of the same bytes): the physical limit of any transport that
//! lands a tensor in the receiver's memory.
//!
//! `cargo bench -p flexmodel-cluster --bench transport`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flexmodel_cluster::transport::{Frame, FrameKind, Hello, Hub, Token};

/// A piece of `blocks.*.hook_resid_post` for 4 × 128 tokens of SmolLM2 (d_model 576),
/// and a 16× larger one.
const PIECES: [(&str, usize); 2] = [
    ("resid_1.2MB", 4 * 128 * 576),
    ("18.9MB", 16 * 4 * 128 * 576),
];

fn transport(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let token = Token::random();
    let hub = Hub::bind(any, token.clone(), runtime.handle()).unwrap();
    let client = Hub::bind(any, token, runtime.handle()).unwrap();
    let hello = Hello {
        group: "bench".into(),
        member: 0,
    };
    let sender = client
        .dial(hub.local_addr(), &hello, Duration::from_secs(5))
        .unwrap();
    let receiver = hub
        .accept(&hello, Instant::now() + Duration::from_secs(5))
        .unwrap();
    let mut group = c.benchmark_group("loopback");
    for (name, elements) in PIECES {
        let piece = Tensor::rand(0f32, 1.0, elements, &Device::Cpu).unwrap();
        group.throughput(Throughput::Bytes(4 * elements as u64));
        group.bench_function(format!("tcp_piece_{name}"), |b| {
            b.iter(|| {
                let frame = Frame::tensor(FrameKind::Piece, 1, 7, 0, &piece).unwrap();
                sender.send(frame).unwrap();
                let got = receiver.inbox().recv().unwrap();
                got.to_tensor().unwrap()
            })
        });
        let source = vec![1u8; 4 * elements];
        let mut target = vec![0u8; 4 * elements];
        group.bench_function(format!("memcpy_{name}"), |b| {
            b.iter(|| {
                target.copy_from_slice(std::hint::black_box(&source));
                std::hint::black_box(&target);
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).sample_size(30);
    targets = transport
}
criterion_main!(benches);
