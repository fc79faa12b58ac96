//! What libtorch sees on this machine: CUDA, devices, cuDNN, streams; and a real kernel run.

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
