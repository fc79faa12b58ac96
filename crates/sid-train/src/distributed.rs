//! One rank of a multi-process run (the variables torchrun sets: `RANK`, `WORLD_SIZE`, …):
//! the rendezvous through c10d's TCPStore, the checks every rank makes there, and the
//! process groups the stage pipeline links over ([`sid_runtime::ranks`]).
//!
//! Rank 0 is the coordinator: it loads the data, resolves the config (the stage cut
//! included), publishes it in the store, runs stage 1 of replica 1 and writes every output.
//! Every other rank reads that config, builds the same stages from the same seed, keeps its
//! own (replica r's stage s is rank r·K + s) and serves it until rank 0 closes the pipeline.

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sid_dist::{Backend, DistEnv, Group, Store};
use sid_runtime::ranks::{rank_of, Liveness, DOWN, GRADS};
use sid_runtime::Ranks;
use tch::Device;

use crate::{Result, RunConfig, TrainError};

/// This process's rendezvous with the other ranks.
pub struct Rendezvous {
    env: DistEnv,
    store: Arc<Store>,
    device: Device,
    timeout: Duration,
    /// Where this run's keys live in the store: `sid`, or `sid/restart-N` after restart N (a
    /// store torchrun's agent serves outlives the ranks, and keeps the keys of every try).
    prefix: String,
    /// The address Gloo binds to (`SID_GLOO_HOST`; empty: the machine's own name).
    gloo_host: String,
}

/// Which restart this process belongs to: torchrun's `TORCHELASTIC_RESTART_COUNT`, which
/// sid-launch's own supervision (`--max-restarts`) sets for its ranks too; `None` outside
/// either. A value that is not a count is refused, naming it.
pub fn restart_env() -> Result<Option<u32>> {
    let Ok(v) = std::env::var("TORCHELASTIC_RESTART_COUNT") else {
        return Ok(None);
    };
    let bad =
        || sid_dist::DistError::Env(format!("TORCHELASTIC_RESTART_COUNT={v:?} is not a count"));
    Ok(Some(v.trim().parse().map_err(|_| bad())?))
}

/// What every rank must share whatever its settings: the program and the world size.
fn program(world: usize) -> String {
    format!("sid {} world {world}", env!("CARGO_PKG_VERSION"))
}

/// The fingerprint of a rank that takes every setting from rank 0 (resuming on a machine
/// without the run directory).
fn follower(world: usize) -> String {
    format!("{} follows rank 0", program(world))
}

/// What every rank must agree on: the program and the settings that shape the computation.
fn fingerprint(cfg: &RunConfig, world: usize) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut shared = cfg.clone();
    // Where a rank finds its data or writes caches may differ between nodes.
    shared.data.data_dir = None;
    shared.data.cache_dir = None;
    shared.to_toml().hash(&mut h);
    format!("{} config {:016x}", program(world), h.finish())
}

/// The device of this rank: the `LOCAL_RANK`-th GPU of `--gpus`, or the CPU.
fn rank_device(cfg: &RunConfig, env: &DistEnv) -> Result<Device> {
    let listed = cfg.runtime.gpus.devices();
    if listed.iter().all(|d| *d == Device::Cpu) {
        return Ok(Device::Cpu);
    }
    let Some(Device::Cuda(i)) = listed.get(env.local_rank).copied() else {
        return Err(TrainError::Device(format!(
            "--gpus {}: local rank {} has no GPU in the list ({} listed; give one per process on the node)",
            cfg.runtime.gpus,
            env.local_rank,
            listed.len()
        )));
    };
    crate::devices::present(&cfg.runtime.gpus.to_string(), vec![Device::Cuda(i)])?;
    Ok(Device::Cuda(i))
}

impl Rendezvous {
    /// Serves (rank 0) or reaches the store at `MASTER_ADDR:MASTER_PORT` and checks that
    /// every rank runs the same program with the same settings; waits at most the step
    /// timeout for the others, then names the ranks that did not come. `follows_rank0`: this
    /// rank (not rank 0) has no settings of its own to compare — it resumes on a machine
    /// without the run directory — and takes rank 0's (only the program and world size must
    /// match).
    pub fn join(env: DistEnv, cfg: &RunConfig, follows_rank0: bool) -> Result<Self> {
        let device = rank_device(cfg, &env)?;
        let timeout = Duration::from_secs_f64(cfg.runtime.step_timeout);
        let (rank, world) = (env.rank, env.world_size);
        let (addr, port) = (env.master_addr.clone(), env.master_port);
        let store = Store::connect(&addr, port, env.serves_store(), world, timeout)?;
        let local = matches!(addr.as_str(), "127.0.0.1" | "localhost");
        let default_host = if local { "127.0.0.1" } else { "" };
        let rdv = Self {
            env,
            store: Arc::new(store),
            device,
            timeout,
            prefix: match restart_env()? {
                Some(n) if n > 0 => format!("sid/restart-{n}"),
                _ => "sid".into(),
            },
            gloo_host: std::env::var("SID_GLOO_HOST").unwrap_or_else(|_| default_host.into()),
        };
        let mine = match follows_rank0 {
            true => follower(world),
            false => fingerprint(cfg, world),
        };
        rdv.set(&format!("fingerprint/{rank}"), &mine)?;
        let secs = timeout.as_secs();
        let late = |r: usize| {
            TrainError::Config(format!(
                "rank {r} did not join within {secs} s (WORLD_SIZE={world}, store {addr}:{port}): are all {world} ranks started with the same WORLD_SIZE?"
            ))
        };
        let differ = |r: usize, theirs: &str| {
            TrainError::Config(format!(
                "rank {r} runs another program or other settings than rank {rank} ({theirs} vs {mine}); start every rank with the same sid-launch and flags"
            ))
        };
        if rank == 0 {
            for r in 1..world {
                let theirs = rdv
                    .get(&format!("fingerprint/{r}"), timeout)
                    .map_err(|_| late(r))?;
                if theirs != mine && theirs != follower(world) {
                    rdv.set("verdict", "mismatch")?;
                    return Err(differ(r, &theirs));
                }
            }
            rdv.set("verdict", "ok")?;
        } else {
            let theirs = rdv.get("fingerprint/0", timeout).map_err(|_| late(0))?;
            // A follower checks the program and world only: it takes rank 0's settings.
            let same = match follows_rank0 {
                true => theirs.starts_with(&format!("{} config ", program(world))),
                false => theirs == mine,
            };
            if !same {
                return Err(differ(0, &theirs));
            }
            if rdv.get("verdict", timeout).map_err(|_| late(0))? != "ok" {
                return Err(TrainError::Config(
                    "rank 0 found a rank with other settings; see its message".into(),
                ));
            }
        }
        Ok(rdv)
    }

    /// The store key `name` of this try of the run.
    fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    /// Sets the store key `name` of this try of the run to `value`.
    fn set(&self, name: &str, value: &str) -> Result<()> {
        Ok(self.store.set(&self.key(name), value.as_bytes())?)
    }

    /// The text under the store key `name` of this try of the run, waiting at most `wait`.
    fn get(&self, name: &str, wait: Duration) -> Result<String> {
        let bytes = self.store.get(&self.key(name), wait)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Every rank's text under the store key `what/<rank>`, by rank.
    fn of_every_rank(&self, what: &str) -> Result<Vec<String>> {
        let get = |r: usize| self.get(&format!("{what}/{r}"), self.timeout);
        (0..self.world()).map(get).collect()
    }

    /// What rank 0 publishes, which may take it long (loading data, timing blocks).
    fn get_from_rank0(&self, name: &str) -> Result<String> {
        self.get(name, self.timeout.max(Duration::from_secs(600)))
    }

    /// Joins the process group `name` as its member `rank` of `size` (Gloo binds to
    /// `gloo_host`; NCCL has no use for it).
    fn group(&self, name: &str, rank: usize, size: usize, backend: Backend) -> Result<Arc<Group>> {
        let (store, key, host) = (&self.store, self.key(name), &self.gloo_host);
        let group = Group::new(store, &key, rank, size, backend, host, self.timeout)?;
        Ok(Arc::new(group))
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.env.rank
    }

    /// Ranks in the job.
    pub fn world(&self) -> usize {
        self.env.world_size
    }

    /// This rank's device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Intra-op threads for a CPU rank: the node's cores shared by its ranks.
    pub fn cpu_threads(&self) -> i32 {
        let local = std::env::var("LOCAL_WORLD_SIZE").ok();
        let local: usize = local.and_then(|v| v.parse().ok()).unwrap_or(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / local.max(1)).max(1) as i32
    }

    /// Rank 0: hands the resolved config (stage cut and data shape included) to the others.
    pub fn publish_config(&self, cfg: &RunConfig) -> Result<()> {
        // The data shape is resolved from the data, which only rank 0 loads. Set first: a rank
        // that finds the config finds the shape.
        let shape = serde_json::to_string(&cfg.data.loaded_shape).expect("a shape serialises");
        self.set("shape", &shape)?;
        self.set("config", &cfg.to_toml())
    }

    /// Rank 0: tells the others where the run lives (they write their telemetry there).
    pub fn publish_run_dir(&self, dir: &Path) -> Result<()> {
        self.set("run-dir", &dir.to_string_lossy())
    }

    /// Every other rank: the run directory rank 0 writes (created here if this node has not
    /// got it, e.g. another machine).
    pub fn wait_run_dir(&self) -> Result<PathBuf> {
        let dir = PathBuf::from(self.get_from_rank0("run-dir")?);
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        Ok(dir)
    }

    /// Every other rank: the config rank 0 resolved. Rank 0 may take long (loading data,
    /// timing blocks); if it fails first, its store goes away and this returns at once.
    pub fn wait_config(&self) -> Result<RunConfig> {
        let text = self.get_from_rank0("config").map_err(|e| {
            // Rank 0 is gone or stuck: a lost rank, not a setting (a restart may get past it).
            TrainError::Runtime(sid_runtime::RuntimeError::Link(format!(
                "rank {}: rank 0 did not publish the run's config ({e})",
                self.rank()
            )))
        })?;
        let mut cfg = RunConfig::from_toml(&text)?;
        let shape = self.get_from_rank0("shape")?;
        cfg.data.loaded_shape = serde_json::from_str(&shape).ok().flatten();
        Ok(cfg)
    }

    /// Joins the process groups of a pipeline of `stages` stages × `replicas` replicas:
    /// every rank (Gloo), and the replicas of this rank's stage (NCCL for CUDA when built in,
    /// else Gloo).
    pub fn groups(&self, stages: usize, replicas: usize, backprop: bool) -> Result<Ranks> {
        let (rank, world) = (self.rank(), self.world());
        if stages * replicas != world {
            return Err(TrainError::Config(format!(
                "--stages {stages} × --data-parallel {replicas} = {} ranks, but WORLD_SIZE is {world}",
                stages * replicas
            )));
        }
        let (device, node) = (crate::devices::device_name(self.device), hostname());
        let on = node.as_ref().map_or(String::new(), |h| format!(" on {h}"));
        let name = format!("rank {rank}, {device}{on}");
        self.set(&format!("name/{rank}"), &name)?;
        let place = format!("{device}@{}", node.unwrap_or_default());
        self.set(&format!("device/{rank}"), &place)?;
        let world_group = self.group("world", rank, world, Backend::Gloo)?;
        let names = self.of_every_rank("name")?;
        // Every rank has set its place before it joined the world group.
        let places = self.of_every_rank("device")?;
        let replica_group = if replicas > 1 {
            let stage = rank % stages;
            // NCCL refuses two ranks on one GPU: replicas sharing a GPU sum over Gloo.
            let on = (0..replicas).map(|i| &places[i * stages + stage]);
            let shared_gpu = on.collect::<HashSet<_>>().len() < replicas;
            let nccl = self.device.is_cuda() && sid_dist::available().1 && !shared_gpu;
            let backend = if nccl { Backend::Nccl } else { Backend::Gloo };
            let name = format!("replicas-of-stage-{stage}");
            Some(self.group(&name, rank / stages, replicas, backend)?)
        } else {
            None
        };
        Ok(Ranks {
            world: world_group,
            replicas,
            replica_group,
            names,
            liveness: Some(self.heartbeat()),
            direct: self.direct_links(stages, replicas, backprop, &places)?,
        })
    }

    /// The links of this rank whose tensors can go GPU to GPU (both ends on CUDA, on
    /// different GPUs, NCCL built in, `SID_LINKS` not `gloo`): a two-rank NCCL group each,
    /// the sender its rank 0. Every rank walks the links in the same order.
    fn direct_links(
        &self,
        stages: usize,
        replicas: usize,
        backprop: bool,
        places: &[String],
    ) -> Result<BTreeMap<(usize, usize, u32), Arc<Group>>> {
        let mut out = BTreeMap::new();
        let wanted = std::env::var("SID_LINKS").map_or(true, |v| v != "gloo");
        if !(wanted && self.device.is_cuda() && sid_dist::available().1) {
            return Ok(out);
        }
        let mut links = Vec::new();
        for r in 0..replicas {
            if r > 0 {
                links.push((0, rank_of(r, 0, stages), DOWN));
            }
            for s in 0..stages.saturating_sub(1) {
                let (a, b) = (rank_of(r, s, stages), rank_of(r, s + 1, stages));
                links.push((a, b, DOWN));
                if backprop {
                    links.push((b, a, GRADS));
                }
            }
        }
        let cuda = |r: usize| places[r].starts_with("cuda");
        let me = self.rank();
        for (from, to, tag) in links {
            if (from != me && to != me) || !cuda(from) || !cuda(to) || places[from] == places[to] {
                continue;
            }
            let name = format!("link-{from}-{to}-{tag}");
            let g = self.group(&name, usize::from(me == to), 2, Backend::Nccl)?;
            out.insert((from, to, tag), g);
        }
        Ok(out)
    }

    /// Rank 0 beats (a counter in the store, every second, while this process lives); the
    /// others get a check that fails once the store is gone (rank 0 serves it) or the beat
    /// has stopped for the step timeout (a store torchrun's agent serves outlives rank 0).
    fn heartbeat(&self) -> Liveness {
        let (key, store) = (self.key("heartbeat"), self.store.clone());
        if self.rank() == 0 {
            std::thread::Builder::new()
                .name("sid-heartbeat".into())
                .spawn(move || {
                    while store.add(&key, 1).is_ok() {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                })
                .expect("spawning the heartbeat thread");
            return Arc::new(|| Ok(()));
        }
        let limit = self.timeout;
        let last = Mutex::new((-1i64, Instant::now()));
        Arc::new(move || {
            let beat = store
                .add(&key, 0)
                .map_err(|e| format!("lost rank 0: the rendezvous store is gone ({e})"))?;
            let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
            if beat != last.0 {
                *last = (beat, Instant::now());
            } else if last.1.elapsed() > limit {
                let secs = limit.as_secs();
                return Err(format!("lost rank 0: no heartbeat for {secs} s"));
            }
            Ok(())
        })
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_ignore_paths_but_not_settings() {
        let a = RunConfig::default();
        let mut b = a.clone();
        b.data.data_dir = Some("/elsewhere".into());
        assert_eq!(fingerprint(&a, 2), fingerprint(&b, 2));
        b.optim.lr *= 2.0;
        assert_ne!(fingerprint(&a, 2), fingerprint(&b, 2));
        assert_ne!(fingerprint(&a, 2), fingerprint(&a, 3));
    }
}
