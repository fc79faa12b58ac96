//! The `--gpus` device list: `cpu`, `cpu:4`, `cpu,cpu`, `0`, `0,1,2,3`, `0,0,0,0`.

use std::fmt;
use std::str::FromStr;

use tch::Device;

use crate::{Result, TrainError};

/// Parses a device list without checking that the devices exist.
pub fn parse_devices(spec: &str) -> Result<Vec<Device>> {
    let spec = spec.trim();
    let bad = |why: String| Err(TrainError::Device(format!("--gpus {spec:?}: {why}")));
    if spec.is_empty() {
        return bad("empty device list (use cpu, cpu:4, 0 or 0,1,...)".into());
    }
    if let Some(n) = spec.strip_prefix("cpu:") {
        return match n.parse::<usize>() {
            Ok(n) if (1..=256).contains(&n) => Ok(vec![Device::Cpu; n]),
            _ => bad(format!("{n:?} is not a worker count from 1 to 256")),
        };
    }
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim) {
        match (part, part.parse::<usize>()) {
            ("cpu", _) => out.push(Device::Cpu),
            (_, Ok(i)) => out.push(Device::Cuda(i)),
            _ => return bad(format!("{part:?} is neither cpu nor a GPU index")),
        }
    }
    if out.contains(&Device::Cpu) && out.iter().any(|d| d.is_cuda()) {
        return bad("mixing cpu and GPUs is not supported".into());
    }
    Ok(out)
}

/// Parses a device list and checks that every GPU it names exists on this machine.
pub fn resolve_devices(spec: &str) -> Result<Vec<Device>> {
    present(spec, parse_devices(spec)?)
}

/// `devices` (parsed from `spec`, which the message names), after checking that every GPU
/// among them exists.
pub(crate) fn present(spec: &str, devices: Vec<Device>) -> Result<Vec<Device>> {
    let wanted = devices.iter().filter_map(|d| match d {
        Device::Cuda(i) => Some(*i),
        _ => None,
    });
    if let Some(max) = wanted.max() {
        if !tch::Cuda::is_available() {
            return Err(TrainError::Device(format!(
                "--gpus {spec}: GPU {max} requested but CUDA is not available on this machine (use --gpus cpu)"
            )));
        }
        let count = tch::Cuda::device_count() as usize;
        if max >= count {
            return Err(TrainError::Device(format!(
                "--gpus {spec}: GPU {max} does not exist; this machine has {count} GPU(s) (0..{})",
                count.saturating_sub(1)
            )));
        }
    }
    Ok(devices)
}

/// A parsed `--gpus` list: parsed once, where the setting enters (flag, `config.toml`), and
/// read as devices everywhere else. It keeps the text it was given, which is what it shows
/// and saves, so messages and `config.toml` read as the user wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceList {
    spec: String,
    devices: Vec<Device>,
}

impl DeviceList {
    /// The devices, one per worker (at least one).
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// The devices, after checking that every GPU they name exists on this machine.
    pub fn resolve(&self) -> Result<Vec<Device>> {
        present(&self.spec, self.devices.clone())
    }
}

/// One CPU worker.
impl Default for DeviceList {
    fn default() -> Self {
        "cpu".parse().expect("cpu is a device list")
    }
}

impl FromStr for DeviceList {
    type Err = TrainError;

    fn from_str(spec: &str) -> Result<Self> {
        Ok(Self {
            devices: parse_devices(spec)?,
            spec: spec.trim().to_string(),
        })
    }
}

/// The list as written (`cpu:4`, `0,1`).
impl fmt::Display for DeviceList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

// Saved as the same string as the flag, so `config.toml` keeps its `gpus = "0,1"` line.
impl serde::Serialize for DeviceList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.spec)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let spec = String::deserialize(d)?;
        spec.parse().map_err(serde::de::Error::custom)
    }
}

/// A short human name: `cpu` or `cuda:1`.
pub use sid_runtime::transport::device_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(parse_devices("cpu").unwrap(), vec![Device::Cpu]);
        assert_eq!(parse_devices("cpu:3").unwrap(), vec![Device::Cpu; 3]);
        assert_eq!(parse_devices("cpu,cpu").unwrap(), vec![Device::Cpu; 2]);
        assert_eq!(
            parse_devices("0,1, 3").unwrap(),
            vec![Device::Cuda(0), Device::Cuda(1), Device::Cuda(3)]
        );
        assert_eq!(parse_devices("0,0").unwrap(), vec![Device::Cuda(0); 2]);
    }

    #[test]
    fn rejects_nonsense_with_the_reason() {
        for (spec, why) in [
            ("", "empty"),
            ("gpu0", "neither"),
            ("cpu:0", "worker count"),
            ("cpu,0", "mixing"),
        ] {
            let e = parse_devices(spec).unwrap_err().to_string();
            assert!(e.contains(why), "{spec}: {e}");
        }
    }

    #[test]
    fn a_gpu_on_this_machine_is_checked() {
        if tch::Cuda::is_available() {
            let n = tch::Cuda::device_count();
            assert!(resolve_devices(&n.to_string())
                .unwrap_err()
                .to_string()
                .contains("does not exist"));
        } else {
            let e = resolve_devices("0").unwrap_err().to_string();
            assert!(e.contains("CUDA is not available"), "{e}");
        }
        assert_eq!(resolve_devices("cpu").unwrap(), vec![Device::Cpu]);
        assert_eq!(DeviceList::default().resolve().unwrap(), vec![Device::Cpu]);
    }

    #[test]
    fn a_device_list_keeps_its_text_and_parses_once() {
        let l: DeviceList = " 0, 1".parse().unwrap();
        assert_eq!(l.devices(), [Device::Cuda(0), Device::Cuda(1)]);
        assert_eq!(l.to_string(), "0, 1");
        let one: DeviceList = "3".parse().unwrap();
        assert_eq!(one.devices(), [Device::Cuda(3)]);
        assert_eq!(DeviceList::default(), "cpu".parse().unwrap());
        let e = "gpu0".parse::<DeviceList>().unwrap_err().to_string();
        assert!(e.contains("neither cpu nor a GPU index"), "{e}");
    }
}
