//! Injected faults, for testing that a failing worker stops the run cleanly.

use crate::{Result, RuntimeError};

/// What the injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The worker thread panics.
    Panic,
    /// The worker returns an error.
    Error,
    /// The worker's features become NaN, so its first module's loss is NaN.
    Nan,
    /// The worker stops answering (sleeps for an hour).
    Hang,
    /// The whole process is killed with SIGKILL, as an out-of-memory kill or a lost node
    /// ends it: no error, no cleanup.
    Kill,
}

/// A fault for worker `worker` at training step `step` (1-based, counted from the start of
/// this process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Worker index.
    pub worker: usize,
    /// Step at which it strikes.
    pub step: u64,
    /// What happens.
    pub kind: FaultKind,
}

impl Fault {
    /// Parses `WORKER:STEP:KIND`, KIND one of panic, error, nan, hang, kill.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = || {
            RuntimeError::Config(format!(
                "fault {spec:?} is not WORKER:STEP:panic|error|nan|hang|kill"
            ))
        };
        let mut it = spec.split(':');
        let worker = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let step = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let kind = match it.next() {
            Some("panic") => FaultKind::Panic,
            Some("error") => FaultKind::Error,
            Some("nan") => FaultKind::Nan,
            Some("hang") => FaultKind::Hang,
            Some("kill") => FaultKind::Kill,
            _ => return Err(bad()),
        };
        if it.next().is_some() {
            return Err(bad());
        }
        Ok(Self { worker, step, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            Fault::parse("1:3:nan").unwrap(),
            Fault {
                worker: 1,
                step: 3,
                kind: FaultKind::Nan
            }
        );
        assert_eq!(Fault::parse("0:7:kill").unwrap().kind, FaultKind::Kill);
        assert!(Fault::parse("1:3").is_err());
        assert!(Fault::parse("1:x:panic").is_err());
        assert!(Fault::parse("1:3:boom").is_err());
    }
}
