//! `train.device`: `"cpu"`, `"cuda"` or `"cuda:N"` (a mode that carries a
//! number), parsed by hand.

use serde::de::{Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;

/// `train.device`: written as a string (`"cpu"`, `"cuda"`, `"cuda:N"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// The CUDA device of this ordinal (`"cuda"` is 0).
    Cuda(usize),
}

impl DeviceSpec {
    /// The forms `train.device` takes, for error messages.
    pub const FORMS: &'static str = r#""cpu", "cuda" or "cuda:N""#;

    pub fn is_cpu(self) -> bool {
        self == DeviceSpec::Cpu
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("{s:?} is not a device: use {}", DeviceSpec::FORMS)),
        }
    }
}

/// As written in the config: `cpu` or `cuda:N`.
impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DeviceSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(DeviceSpec::FORMS)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DeviceSpec, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}
