//! Seeded train/validation/test split of one file's rows.
//!
//! Each row gets a key from splitmix64 (Steele, Lea & Flood 2014; constants
//! as in Vigna's reference, https://prng.di.unimi.it/splitmix64.c) of its
//! index and the seed; rows sorted by key are cut into consecutive pieces.
//! The algorithm is spelled out exactly so that the Python twin
//! `scripts/reference/afinar_split.py` reproduces it bit for bit:
//!
//! ```text
//! key(i) = splitmix64(seed ^ splitmix64(i))      i = 0-based row in file order
//! order  = indices sorted by (key(i), i)
//! n_train = floor(n * r_train); n_val = floor(n * r_val); test = the rest
//! ```

use crate::{Error, Result};

/// One splitmix64 output step for state `x` (all arithmetic wrapping).
#[inline(always)]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Row indices of each part, each in split order (not file order).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Split {
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
    pub test: Vec<usize>,
}

/// `data.max_rows`: the indices of a seeded sample of at most `max` of `n`
/// rows, in file order (all of them without `max` or when `max >= n`).
pub fn sample_rows(n: usize, max: Option<usize>, seed: u64) -> Vec<usize> {
    match max {
        Some(m) if m < n => {
            let key = |i: usize| splitmix64(seed ^ 0x6d61_785f_726f_7773 ^ splitmix64(i as u64));
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| key(i));
            order.truncate(m);
            order.sort_unstable();
            order
        }
        _ => (0..n).collect(),
    }
}

/// Split `n` rows with `ratios = [train, validation, test]`, which must be
/// finite, `>= 0` and sum to 1 (within 1e-6).
pub fn seeded_split(n: usize, ratios: [f64; 3], seed: u64) -> Result<Split> {
    if ratios.iter().any(|r| !r.is_finite() || *r < 0.0) {
        return Err(Error::Data(format!(
            "split ratios {ratios:?} must be finite and >= 0"
        )));
    }
    let sum: f64 = ratios.iter().sum();
    if (sum - 1.0).abs() > 1e-6 {
        return Err(Error::Data(format!(
            "split ratios {ratios:?} sum to {sum}, expected 1"
        )));
    }
    let mut keyed: Vec<(u64, usize)> = (0..n)
        .map(|i| (splitmix64(seed ^ splitmix64(i as u64)), i))
        .collect();
    keyed.sort_unstable();
    let order: Vec<usize> = keyed.into_iter().map(|(_, i)| i).collect();

    let n_train = ((n as f64) * ratios[0]).floor() as usize;
    // Ratios may sum to 1 + 1e-6; never let the pieces overrun n.
    let n_train = n_train.min(n);
    let n_val = (((n as f64) * ratios[1]).floor() as usize).min(n - n_train);
    Ok(Split {
        train: order[..n_train].to_vec(),
        validation: order[n_train..n_train + n_val].to_vec(),
        test: order[n_train + n_val..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_reference_values() {
        // splitmix64.c with state 0: the first output is the mix of 0x9E3779B97F4A7C15.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        // Successive outputs of the generator seeded with 0 (state += golden each call).
        assert_eq!(splitmix64(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(
            splitmix64(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(2)),
            0x06C4_5D18_8009_454F
        );
    }

    #[test]
    fn sizes_disjoint_cover_and_deterministic() {
        let s = seeded_split(1000, [0.8, 0.1, 0.1], 42).unwrap();
        assert_eq!(
            (s.train.len(), s.validation.len(), s.test.len()),
            (800, 100, 100)
        );
        let mut all: Vec<usize> = s
            .train
            .iter()
            .chain(&s.validation)
            .chain(&s.test)
            .copied()
            .collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_eq!(s, seeded_split(1000, [0.8, 0.1, 0.1], 42).unwrap());
        assert_ne!(
            s.train,
            seeded_split(1000, [0.8, 0.1, 0.1], 43).unwrap().train
        );
        // Floors: 7 * 0.5 = 3.5 -> 3, 7 * 0.25 = 1.75 -> 1, the rest (3) is test.
        let s = seeded_split(7, [0.5, 0.25, 0.25], 0).unwrap();
        assert_eq!((s.train.len(), s.validation.len(), s.test.len()), (3, 1, 3));
        let s = seeded_split(0, [0.8, 0.1, 0.1], 0).unwrap();
        assert!(s.train.is_empty() && s.test.is_empty());
    }

    #[test]
    fn bad_ratios_are_errors() {
        assert!(seeded_split(10, [0.8, 0.1, 0.2], 0)
            .unwrap_err()
            .to_string()
            .contains("sum to"));
        assert!(seeded_split(10, [1.1, -0.1, 0.0], 0)
            .unwrap_err()
            .to_string()
            .contains(">= 0"));
        assert!(seeded_split(10, [f64::NAN, 0.5, 0.5], 0).is_err());
        assert!(seeded_split(10, [0.8, 0.1, 0.1 + 5e-7], 0).is_ok());
    }

    #[test]
    fn matches_independent_python_computation() {
        // First indices for n=1000, seed=42, (0.8, 0.1, 0.1), computed with a
        // separate Python transcription of the algorithm in the module docs.
        let s = seeded_split(1000, [0.8, 0.1, 0.1], 42).unwrap();
        assert_eq!(&s.train[..5], &PY_TRAIN_HEAD);
        assert_eq!(&s.validation[..5], &PY_VAL_HEAD);
        assert_eq!(&s.test[..5], &PY_TEST_HEAD);
    }
    const PY_TRAIN_HEAD: [usize; 5] = [933, 670, 33, 452, 981];
    const PY_VAL_HEAD: [usize; 5] = [527, 864, 731, 338, 534];
    const PY_TEST_HEAD: [usize; 5] = [117, 736, 686, 65, 382];

    /// The golden file written by `scripts/reference/afinar_split.py`:
    /// sizes and the first 20 indices of each part for n=1000, seed 42,
    /// ratios (0.8, 0.1, 0.1), plus raw splitmix64 values and row keys.
    #[test]
    fn matches_golden_fixture() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/split_golden.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let g: serde_json::Value = serde_json::from_str(&text).unwrap();
        let u = |v: &serde_json::Value| v.as_u64().unwrap();
        let list = |k: &str| -> Vec<u64> { g[k].as_array().unwrap().iter().map(u).collect() };
        let r: Vec<f64> = g["ratios"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let (n, seed) = (u(&g["n"]) as usize, u(&g["seed"]));

        for (x, want) in g["splitmix64"].as_object().unwrap() {
            assert_eq!(splitmix64(x.parse().unwrap()), u(want), "splitmix64({x})");
        }
        let keys: Vec<u64> = (0..5).map(|i| splitmix64(seed ^ splitmix64(i))).collect();
        assert_eq!(keys, list("key_first5"));

        let s = seeded_split(n, [r[0], r[1], r[2]], seed).unwrap();
        assert_eq!(
            [s.train.len(), s.validation.len(), s.test.len()].map(|x| x as u64),
            [u(&g["n_train"]), u(&g["n_val"]), u(&g["n_test"])]
        );
        let head = |v: &[usize]| v[..20].iter().map(|&i| i as u64).collect::<Vec<_>>();
        assert_eq!(head(&s.train), list("train_first20"));
        assert_eq!(head(&s.validation), list("val_first20"));
        assert_eq!(head(&s.test), list("test_first20"));
    }
}
