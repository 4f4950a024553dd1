//! Typed modes of a config file: a mode is a unit-variant enum written as
//! its name (`preset = "head_only"`). Deserialised through [`mode`], a
//! value that is not one of the names — another string, or a number, a
//! boolean, a table — fails naming the valid ones, which serde's derived
//! enums only do for a string. Used by every layer that reads a config
//! (`adapters`, `config`).

use serde::de::{DeserializeOwned, Deserializer, Error as _, IntoDeserializer, Visitor};
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
