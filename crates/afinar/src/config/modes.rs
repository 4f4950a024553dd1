//! Typed modes of a run config: a mode is a unit-variant enum written as
//! its name (`preset = "head_only"`). Deserialised through [`mode`], a
//! value that is not one of the names — another string, or a number, a
//! boolean, a table — fails naming the valid ones, which serde's derived
//! enums only do for a string. `train.device` (`"cuda:N"` carries a
//! number) is [`DeviceSpec`], parsed by hand.

use serde::de::{DeserializeOwned, Deserializer, Error as _, IntoDeserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::marker::PhantomData;

/// The names a derived enum deserialises from (serde's `VARIANTS`, aliases
/// included): asked to deserialise from a deserializer that only records
/// the names it is offered.
fn names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe(Option<&'static [&'static str]>);
    type E = serde::de::value::Error;
    impl<'de> Deserializer<'de> for &mut Probe {
        type Error = E;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, E> {
            Err(E::custom("not an enum"))
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, E> {
            self.0 = Some(variants);
            Err(E::custom("names only"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map struct identifier ignored_any
        }
    }
    let mut probe = Probe(None);
    let _ = T::deserialize(&mut probe);
    probe.0.unwrap_or(&[])
}

/// "`a` or `b`", "one of `a`, `b`, `c`": as serde lists expected variants.
fn one_of(names: &[&str]) -> String {
    let q: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match q.len() {
        2 => format!("{} or {}", q[0], q[1]),
        _ => format!("one of {}", q.join(", ")),
    }
}

/// Deserialise a mode (`#[serde(deserialize_with = "mode")]`): its name,
/// or an error naming every valid name.
pub(crate) fn mode<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
    struct V<T>(PhantomData<T>);
    impl<'de, T: DeserializeOwned> Visitor<'de> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(&one_of(names::<T>()))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            // The derived impl: "unknown variant `x`, expected ...".
            T::deserialize(v.into_deserializer())
        }
    }
    d.deserialize_any(V(PhantomData))
}

/// [`mode`] for an optional key (`#[serde(default, deserialize_with = "opt_mode")]`).
pub(crate) fn opt_mode<'de, D: Deserializer<'de>, T: DeserializeOwned>(
    d: D,
) -> Result<Option<T>, D::Error> {
    mode(d).map(Some)
}

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
