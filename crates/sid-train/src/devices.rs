//! The `--gpus` device list: `cpu`, `cpu:4`, `cpu,cpu`, `0`, `0,1,2,3`, `0,0,0,0`.

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
    for part in spec.split(',') {
        let part = part.trim();
        match part {
            "cpu" => out.push(Device::Cpu),
            _ => match part.parse::<usize>() {
                Ok(i) => out.push(Device::Cuda(i)),
                Err(_) => return bad(format!("{part:?} is neither cpu nor a GPU index")),
            },
        }
    }
    if out.contains(&Device::Cpu) && out.iter().any(|d| d.is_cuda()) {
        return bad("mixing cpu and GPUs is not supported".into());
    }
    Ok(out)
}

/// Parses a device list and checks that every GPU it names exists on this machine.
pub fn resolve_devices(spec: &str) -> Result<Vec<Device>> {
    let devices = parse_devices(spec)?;
    let wanted: Vec<usize> = devices
        .iter()
        .filter_map(|d| {
            if let Device::Cuda(i) = d {
                Some(*i)
            } else {
                None
            }
        })
        .collect();
    if let Some(&max) = wanted.iter().max() {
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

/// A short human name: `cpu` or `cuda:1`.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

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
    }
}
