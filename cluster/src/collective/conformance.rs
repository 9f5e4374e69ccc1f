//! One suite of tests that every implementation of [`Collective`] passes: the in-process
//! channels, TCP between hubs on loopback, the group of one, and with the `nccl` feature
//! on a machine with at least four GPUs (the largest group here), NCCL.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::transport::{Hub, Token};
use crate::{
    Collective, Error, InProcessCollective, PassControl, SingleRank, TcpCollective, TpRank,
    split_evenly,
};

/// The implementations under test.
#[derive(Debug, Clone, Copy)]
enum Transport {
    InProcess,
    Tcp,
    /// NCCL, member `m` on GPU `m`, joined over TCP.
    #[cfg(feature = "nccl")]
    Nccl,
}

/// The transports this machine can test.
fn transports() -> Vec<Transport> {
    #[allow(unused_mut)]
    let mut all = vec![Transport::InProcess, Transport::Tcp];
    #[cfg(feature = "nccl")]
    if crate::gpu_count().is_ok_and(|n| n >= 4) {
        all.push(Transport::Nccl);
    }
    all
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// The members `0..size` of a new group over `transport`, all sharing `control`.
fn group(
    transport: Transport,
    size: usize,
    control: &Arc<PassControl>,
) -> Vec<Box<dyn Collective>> {
    match transport {
        Transport::InProcess => InProcessCollective::group(size, control.clone())
            .unwrap()
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Collective>)
            .collect(),
        #[cfg(feature = "nccl")]
        Transport::Nccl => {
            let joins: Vec<_> = group(Transport::Tcp, size, control)
                .into_iter()
                .enumerate()
                .map(|(member, tcp)| {
                    std::thread::spawn(move || {
                        let device = crate::DeviceSpec::Cuda(Some(member))
                            .device(member)
                            .unwrap();
                        crate::NcclCollective::over(tcp.as_ref(), &device)
                            .unwrap()
                            .expect("one GPU per member")
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| Box::new(j.join().unwrap()) as Box<dyn Collective>)
                .collect()
        }
        Transport::Tcp => {
            let handle = runtime().handle();
            let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let token = Token::random();
            let hubs: Vec<Arc<Hub>> = (0..size)
                .map(|_| Arc::new(Hub::bind(any, token.clone(), handle).unwrap()))
                .collect();
            let addresses: Vec<SocketAddr> = hubs.iter().map(|h| h.local_addr()).collect();
            let deadline = Instant::now() + Duration::from_secs(10);
            let joins: Vec<_> = (0..size)
                .map(|member| {
                    let (hub, addresses, control) =
                        (hubs[member].clone(), addresses.clone(), control.clone());
                    std::thread::spawn(move || {
                        let rank = TpRank::new(member, size).unwrap();
                        TcpCollective::connect("test", rank, &addresses, &hub, control, deadline)
                            .unwrap()
                    })
                })
                .collect();
            joins
                .into_iter()
                .map(|j| Box::new(j.join().unwrap()) as Box<dyn Collective>)
                .collect()
        }
    }
}

/// Runs `work` on every member of a group of `size`, each on its own thread.
fn on_threads<T: Send + 'static>(
    transport: Transport,
    size: usize,
    work: impl Fn(&dyn Collective) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let control = Arc::new(PassControl::default());
    control.begin(1);
    let work = Arc::new(work);
    let handles: Vec<_> = group(transport, size, &control)
        .into_iter()
        .map(|c| {
            let work = work.clone();
            std::thread::spawn(move || work(c.as_ref()))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Member `member`'s distinct random tensor of `shape`.
fn random(member: usize, shape: &[usize]) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(member as u64);
    let n = shape.iter().product::<usize>();
    let values: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn all_reduce_gives_every_member_the_same_sum() {
    for transport in transports() {
        // Fewer elements than members, an uneven split, and a large tensor.
        for (size, shape) in [
            (3, vec![2]),
            (3, vec![2, 5, 7]),
            (4, vec![3, 1024]),
            (2, vec![1, 1]),
        ] {
            let member_shape = shape.clone();
            let sums = on_threads(transport, size, move |c| {
                let x = random(c.tp_rank().rank(), &member_shape);
                let sum = c.all_reduce_sum(&x).unwrap();
                assert_eq!(sum.dims(), member_shape.as_slice());
                flat(&sum)
            });
            let mut expected = vec![0f64; sums[0].len()];
            for m in 0..size {
                for (e, v) in expected.iter_mut().zip(flat(&random(m, &shape))) {
                    *e += v as f64;
                }
            }
            for sum in &sums {
                assert_eq!(
                    sum, &sums[0],
                    "{transport:?}: every member has the same bits"
                );
            }
            let worst = sums[0]
                .iter()
                .zip(&expected)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-6, "{transport:?} size {size}: off by {worst}");
        }
    }
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    for transport in transports() {
        let gathered = on_threads(transport, 3, |c| {
            let x = random(c.tp_rank().rank(), &[2, 3]);
            c.all_gather(&x, 1).unwrap()
        });
        let expected = Tensor::cat(
            &[random(0, &[2, 3]), random(1, &[2, 3]), random(2, &[2, 3])],
            1,
        )
        .unwrap();
        for g in &gathered {
            assert_eq!(flat(g), flat(&expected), "{transport:?}");
        }
    }
}

#[test]
fn reduce_scatter_gives_each_member_its_part_of_the_sum() {
    for transport in transports() {
        // 7 rows over 3 members: parts of 3, 2 and 2 rows.
        let parts = on_threads(transport, 3, |c| {
            let x = random(c.tp_rank().rank(), &[7, 2]);
            c.reduce_scatter_sum(&x, 0).unwrap()
        });
        let sum =
            ((random(0, &[7, 2]) + random(1, &[7, 2])).unwrap() + random(2, &[7, 2])).unwrap();
        for (member, (part, rows)) in parts.iter().zip(split_evenly(7, 3)).enumerate() {
            let expected = sum.narrow(0, rows.start, rows.len()).unwrap();
            assert_eq!(flat(part), flat(&expected), "{transport:?} member {member}");
        }
    }
}

#[test]
fn broadcast_copies_the_root() {
    for transport in transports() {
        let got = on_threads(transport, 3, |c| {
            flat(&c.broadcast(&random(c.tp_rank().rank(), &[4]), 2).unwrap())
        });
        assert_eq!(got, vec![flat(&random(2, &[4])); 3], "{transport:?}");
    }
}

#[test]
fn send_and_recv_pass_along_a_pipeline_in_every_dtype() {
    for transport in transports() {
        for dtype in [DType::F32, DType::BF16, DType::U32] {
            let got = on_threads(transport, 3, move |c| {
                let me = c.tp_rank().rank();
                let x = match me {
                    0 => Tensor::new(&[1f32, 10.0], &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                    _ => c.recv(me - 1).unwrap(),
                };
                assert_eq!(x.dtype(), dtype);
                let x = x.affine(2.0, 0.0).unwrap();
                if me < 2 {
                    c.send(&x, me + 1).unwrap();
                }
                flat(&x.to_dtype(DType::F32).unwrap())
            });
            assert_eq!(got[2], [8.0, 80.0], "{transport:?} {dtype:?}");
        }
    }
}

#[test]
fn an_aborted_pass_unblocks_receivers() {
    for transport in transports() {
        let control = Arc::new(PassControl::default());
        control.begin(1);
        let mut members = group(transport, 2, &control);
        let silent = members.pop().unwrap();
        let waiter = members.pop().unwrap();
        let waiting = std::thread::spawn(move || waiter.recv(1).map(|_| ()));
        std::thread::sleep(Duration::from_millis(50));
        control.abort();
        assert!(
            matches!(waiting.join().unwrap(), Err(Error::Aborted)),
            "{transport:?}"
        );
        drop(silent);
    }
}

#[test]
fn a_vanished_peer_is_an_error_not_a_hang() {
    for transport in transports() {
        let control = Arc::new(PassControl::default());
        let mut members = group(transport, 2, &control);
        drop(members.pop());
        let started = Instant::now();
        let result = members[0].recv(1);
        assert!(
            matches!(result, Err(Error::PeerGone(1))),
            "{transport:?}: {result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

#[test]
fn messages_of_an_earlier_pass_are_dropped() {
    for transport in transports() {
        let control = Arc::new(PassControl::default());
        let mut members = group(transport, 2, &control);
        let (b, a) = (members.pop().unwrap(), members.pop().unwrap());
        control.begin(1);
        a.send(&random(1, &[2]), 1).unwrap();
        // Over TCP the first message must have arrived before the pass changes.
        std::thread::sleep(Duration::from_millis(100));
        control.begin(2);
        a.send(&random(2, &[2]), 1).unwrap();
        assert_eq!(
            flat(&b.recv(0).unwrap()),
            flat(&random(2, &[2])),
            "{transport:?}"
        );
    }
}

#[test]
fn a_group_of_one_is_the_identity() {
    let x = random(0, &[3, 2]);
    let one = SingleRank;
    assert_eq!(flat(&one.all_reduce_sum(&x).unwrap()), flat(&x));
    assert_eq!(flat(&one.all_gather(&x, 1).unwrap()), flat(&x));
    assert_eq!(flat(&one.broadcast(&x, 0).unwrap()), flat(&x));
    assert!(matches!(one.send(&x, 1), Err(Error::RankOutOfRange { .. })));
}
