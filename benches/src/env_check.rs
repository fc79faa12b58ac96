//! What libtorch sees on this machine: CUDA, devices, cuDNN, streams, c10d's backends; and
//! real runs: a kernel on every GPU, and NCCL at world size 1 on the first.

use clap::Parser;
use tch::{Device, Kind, Tensor};

/// Options of the environment check.
#[derive(Debug, Parser)]
pub struct Args {}

/// Prints what libtorch can use and runs a matrix product on every GPU it sees.
pub fn run(_args: Args) -> anyhow::Result<()> {
    let cuda = tch::Cuda::is_available();
    println!("libtorch threads: {}", tch::get_num_threads());
    println!("cuda available: {cuda}");
    println!("cuda devices: {}", tch::Cuda::device_count());
    println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
    println!(
        "libtorch stream functions found: {}",
        sid_runtime::streams::available()
    );
    match sid_telemetry::nvml::GpuMonitor::open() {
        Ok(m) => {
            println!(
                "NVML: driver {}, {} GPU(s)",
                m.driver_version().unwrap_or_else(|e| e.to_string()),
                m.count()
            );
            for i in 0..m.count() {
                println!(
                    "NVML gpu {i}: {}",
                    m.name(i).unwrap_or_else(|e| e.to_string())
                );
            }
        }
        Err(e) => println!("NVML: {e}"),
    }
    let (gloo, nccl) = sid_dist::available();
    println!("c10d: gloo {gloo}, nccl {nccl}");
    if cuda && nccl {
        nccl_world_of_one()?;
    }
    if cuda {
        for i in 0..tch::Cuda::device_count() as usize {
            let d = Device::Cuda(i);
            let a = Tensor::randn([2048, 2048], (Kind::Float, d));
            let t = std::time::Instant::now();
            let s = a.matmul(&a).sum(Kind::Float).double_value(&[]);
            println!("cuda:{i}: 2048x2048 matmul ran on the GPU ({:.1} ms incl. launch), checksum finite: {}", t.elapsed().as_secs_f64() * 1e3, s.is_finite());
            sid_runtime::streams::use_pool_stream(i)?;
            let b = a.matmul(&a);
            sid_runtime::streams::synchronize_current(i)?;
            println!(
                "cuda:{i}: pool stream set and synchronised; result on {:?}",
                b.device()
            );
        }
    }
    Ok(())
}

/// NCCL through sid's own c10d path at world size 1 (one GPU cannot hold two NCCL ranks): a
/// store, a process group, an all-reduce of a CUDA tensor (must keep its values) and its time.
fn nccl_world_of_one() -> anyhow::Result<()> {
    use std::time::Duration;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let timeout = Duration::from_secs(60);
    let store = sid_dist::Store::connect("127.0.0.1", port, true, 1, timeout)?;
    let g = sid_dist::Group::new(
        &store,
        "env-check",
        0,
        1,
        sid_dist::Backend::Nccl,
        "127.0.0.1",
        timeout,
    )?;
    let d = Device::Cuda(0);
    let mut t = Tensor::arange(1 << 20, (Kind::Float, d));
    let want = t.copy();
    g.all_reduce_sum(&mut t)?; // first call builds the communicator
    let mut times = Vec::new();
    for _ in 0..10 {
        tch::Cuda::synchronize(0);
        let s = std::time::Instant::now();
        g.all_reduce_sum(&mut t)?;
        tch::Cuda::synchronize(0);
        times.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let same = t.equal(&want);
    println!(
        "nccl world of 1 on cuda:0: all-reduce of 4 MiB, median {:.3} ms, values kept: {same}",
        crate::median(&times)
    );
    anyhow::ensure!(same, "NCCL all-reduce at world size 1 changed the tensor");
    Ok(())
}
