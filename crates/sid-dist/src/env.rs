//! The environment a rank runs in, as torchrun (and `sid-launch --nproc-per-node`) sets it.

use crate::{DistError, Result};

/// Where this process sits in a distributed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `RANK`.
    pub rank: usize,
    /// Ranks in the job, `WORLD_SIZE`.
    pub world_size: usize,
    /// Rank on this node, `LOCAL_RANK` (default: `rank`).
    pub local_rank: usize,
    /// The store's host, `MASTER_ADDR` (default 127.0.0.1).
    pub master_addr: String,
    /// The store's port, `MASTER_PORT` (default 29500).
    pub master_port: u16,
    /// torchrun's agent already serves the store (`TORCHELASTIC_USE_AGENT_STORE=True`): every
    /// rank, rank 0 included, connects as a client.
    pub agent_store: bool,
}

impl DistEnv {
    /// Reads the variables through `get` (`std::env::var` in production); `None` when
    /// `RANK` and `WORLD_SIZE` are both unset (not a distributed run).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let unusable = |message: &str| Err(DistError::Env(message.into()));
        let (rank, world) = match (get("RANK"), get("WORLD_SIZE")) {
            (None, None) => return Ok(None),
            (Some(r), Some(w)) => (r, w),
            (Some(_), None) => return unusable("RANK is set but WORLD_SIZE is not"),
            (None, Some(_)) => return unusable("WORLD_SIZE is set but RANK is not"),
        };
        let rank = parse("RANK", &rank, "a number")?;
        let world_size = parse("WORLD_SIZE", &world, "a number")?;
        if world_size == 0 || rank >= world_size {
            return Err(DistError::Env(format!(
                "RANK={rank} does not fit WORLD_SIZE={world_size} (ranks are 0..WORLD_SIZE-1)"
            )));
        }
        let local_rank =
            get("LOCAL_RANK").map_or(Ok(rank), |v| parse("LOCAL_RANK", &v, "a number"))?;
        let master_port =
            get("MASTER_PORT").map_or(Ok(29500), |v| parse("MASTER_PORT", &v, "a port number"))?;
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            agent_store: get("TORCHELASTIC_USE_AGENT_STORE")
                .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1"),
        }))
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Whether this rank serves the store.
    pub fn serves_store(&self) -> bool {
        self.rank == 0 && !self.agent_store
    }
}

/// The variable `name`'s value `v`, which must be `what` (its message when it is not).
fn parse<T: std::str::FromStr>(name: &str, v: &str, what: &str) -> Result<T> {
    v.trim()
        .parse()
        .map_err(|_| DistError::Env(format!("{name}={v:?} is not {what}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<DistEnv>> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_variables() {
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29611"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (3, 4, 1));
        assert_eq!((e.master_addr.as_str(), e.master_port), ("node0", 29611));
        assert!(e.agent_store && !e.serves_store());
    }

    #[test]
    fn defaults_and_absence() {
        assert_eq!(env(&[]).unwrap(), None);
        let e = env(&[("RANK", "0"), ("WORLD_SIZE", "2")]).unwrap().unwrap();
        assert_eq!((e.local_rank, e.master_port), (0, 29500));
        assert!(e.serves_store());
    }

    #[test]
    fn bad_values_are_named() {
        let msg = |p: &[(&str, &str)]| env(p).unwrap_err().to_string();
        assert!(msg(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("RANK=2"));
        assert!(msg(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\""));
        assert!(msg(&[("RANK", "0")]).contains("WORLD_SIZE is not"));
        assert!(
            msg(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "99999")])
                .contains("MASTER_PORT")
        );
    }
}
