//! A background thread that samples telemetry at a fixed rate into a JSON-lines file.
//!
//! Each line: seconds since start, the process's RSS, each stage thread's CPU time so far
//! (threads named `sid-stage-N`, read from `/proc/self/task`), and, where NVML loads, every
//! GPU's memory, utilisation and power.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::memory::rss_bytes;
use crate::nvml::{GpuMonitor, GpuSample};

/// One telemetry record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The rank that took it, in a multi-process run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// Seconds since the sampler started.
    pub t: f64,
    /// Process resident set, bytes.
    pub rss_bytes: Option<u64>,
    /// CPU seconds used so far by each thread named `sid-stage-N` (and `main`).
    pub thread_cpu_seconds: BTreeMap<String, f64>,
    /// One entry per GPU when NVML is available.
    pub gpus: Vec<GpuSample>,
}

/// A running sampler; [`Sampler::stop`] ends it and returns the last sample's CPU seconds of
/// each thread.
pub struct Sampler {
    /// A message (or its end) stops the thread.
    stop: Sender<()>,
    thread: Option<JoinHandle<BTreeMap<String, f64>>>,
}

impl Sampler {
    /// Starts sampling every `interval` into `path` (created or truncated); in a multi-process
    /// run every sample names `rank`. Returns the sampler and, when NVML cannot be used, the
    /// reason GPU telemetry is off (the run goes on with CPU figures only).
    pub fn start_for_rank(
        path: &Path,
        interval: Duration,
        rank: Option<usize>,
    ) -> std::io::Result<(Self, Option<crate::TelemetryError>)> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        let (monitor, off) = match GpuMonitor::open() {
            Ok(m) if m.count() > 0 => (Some(m), None),
            Ok(_) => (None, Some(crate::TelemetryError::NoGpu)),
            Err(e) => (None, Some(e)),
        };
        let (stop, stopped) = mpsc::channel();
        let sampling = std::thread::Builder::new()
            .name("sid-telemetry".into())
            .spawn(move || {
                let started = Instant::now();
                // Writes a sample as one line and returns its threads' CPU seconds.
                let mut record = || {
                    let sample = take(&monitor, started, rank);
                    if let Ok(line) = serde_json::to_string(&sample) {
                        let _ = writeln!(file, "{line}");
                    }
                    sample.thread_cpu_seconds
                };
                // A sample, then the interval unless stop() (or a drop) ends it at once.
                loop {
                    record();
                    if stopped.recv_timeout(interval) != Err(RecvTimeoutError::Timeout) {
                        break;
                    }
                }
                // The final sample covers the time since the last tick, which would otherwise
                // be missing from the file and the answer.
                let cpu_seconds = record();
                let _ = file.flush();
                cpu_seconds
            })?;
        let thread = Some(sampling);
        Ok((Self { stop, thread }, off))
    }

    /// Stops sampling (one last sample is written) and returns that sample's CPU seconds of
    /// each thread ([`thread_cpu_seconds`]).
    pub fn stop(mut self) -> BTreeMap<String, f64> {
        self.finish()
    }

    /// Ends the thread and returns what [`Sampler::stop`] does (nothing once it has ended).
    fn finish(&mut self) -> BTreeMap<String, f64> {
        let _ = self.stop.send(());
        let thread = self.thread.take();
        thread.and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.finish();
    }
}

fn take(monitor: &Option<GpuMonitor>, started: Instant, rank: Option<usize>) -> Sample {
    let gpus = monitor
        .as_ref()
        .map(|m| (0..m.count()).filter_map(|i| m.sample(i).ok()).collect())
        .unwrap_or_default();
    Sample {
        rank,
        t: started.elapsed().as_secs_f64(),
        rss_bytes: rss_bytes(),
        thread_cpu_seconds: thread_cpu_seconds(),
        gpus,
    }
}

/// CPU seconds (user + system) of this process's threads named `sid-stage-*`, `main` or
/// `sid-launch`.
pub fn thread_cpu_seconds() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = procfs::process::Process::myself().and_then(|p| p.tasks()) else {
        return out;
    };
    let ticks = procfs::ticks_per_second() as f64;
    // A thread that ends between listing and reading is skipped.
    for stat in tasks.flatten().filter_map(|t| t.stat().ok()) {
        let name = stat.comm;
        if name.starts_with("sid-stage") || name == "main" || name == "sid-launch" {
            *out.entry(name).or_insert(0.0) += (stat.utime + stat.stime) as f64 / ticks;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// This thread's own CPU time.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid out-pointer; this clock exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// A thread named `name` that burns `cpu` of its own CPU time (however long that takes on
    /// a loaded machine), says so on the first channel, and stays alive until the second one
    /// is closed, so that a sample taken in between sees all of it.
    fn busy(name: &str, cpu: Duration) -> (mpsc::Receiver<()>, mpsc::Sender<()>, JoinHandle<()>) {
        let (done_tx, done) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut x = 0u64;
                while thread_cpu() < cpu {
                    for _ in 0..10_000 {
                        x = x.wrapping_mul(31).wrapping_add(7);
                    }
                }
                std::hint::black_box(x);
                let _ = done_tx.send(());
                let _ = release_rx.recv();
            })
            .unwrap();
        (done, release, handle)
    }

    #[test]
    fn samples_cpu_figures_and_degrades_cleanly_without_nvml() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("telemetry.jsonl");
        let (sampler, off) =
            Sampler::start_for_rank(&path, Duration::from_millis(20), None).unwrap();
        let (done, release, worker) = busy("sid-stage-1", Duration::from_millis(300));
        done.recv().unwrap();
        // At least one regular tick after the work.
        std::thread::sleep(Duration::from_millis(50));
        let cpu_seconds = sampler.stop();
        drop(release);
        worker.join().unwrap();
        // This machine has no NVIDIA driver: GPU telemetry says why it is off.
        if nvml_wrapper::Nvml::init().is_err() {
            assert!(
                matches!(off, Some(crate::TelemetryError::NvmlUnavailable(_))),
                "{off:?}"
            );
        }
        let lines: Vec<Sample> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(lines.len() >= 5, "{} samples", lines.len());
        assert!(lines.iter().all(|s| s.rss_bytes > Some(0)));
        let worker = cpu_seconds.get("sid-stage-1").copied().unwrap_or(0.0);
        assert!(
            worker >= 0.25,
            "the busy worker's CPU time was seen: {cpu_seconds:?}"
        );
        assert!(lines.windows(2).all(|w| w[1].t > w[0].t));
    }

    #[test]
    fn stop_writes_a_final_sample() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("telemetry.jsonl");
        // One tick at the start, then nothing for a minute: only the final sample can see
        // the work done in between.
        let (sampler, _) = Sampler::start_for_rank(&path, Duration::from_secs(60), None).unwrap();
        let (done, release, worker) = busy("sid-stage-2", Duration::from_millis(300));
        done.recv().unwrap();
        let cpu_seconds = sampler.stop();
        drop(release);
        worker.join().unwrap();
        let lines: Vec<Sample> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "the first tick and the final sample");
        let last = &lines[1];
        assert!(
            last.t >= 0.3,
            "the final sample is taken at stop: t = {}",
            last.t
        );
        let worker = last.thread_cpu_seconds.get("sid-stage-2").copied();
        assert!(
            worker.unwrap_or(0.0) >= 0.25,
            "the final sample sees the worker's CPU time: {:?}",
            last.thread_cpu_seconds
        );
        assert_eq!(cpu_seconds, last.thread_cpu_seconds);
    }
}
