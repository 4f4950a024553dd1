//! Which vector width afinar's own CPU kernels run at, chosen once per
//! process at run time, so that one binary runs on every x86-64 server: the
//! build targets the x86-64 baseline (`.cargo/config.toml` sets no
//! `target-cpu`), and each kernel's inner loops are compiled three times —
//! for AVX-512 (F, BW, DQ, VL), for AVX2 + FMA, and for the baseline — by
//! [`run`], which calls the copy the CPU can execute. The matmuls go through
//! the `gemm` crate, which makes the same choice itself (its `x86-v4`
//! feature is on).
//!
//! `AFINAR_SIMD=avx512|avx2|baseline` forces a level (at most what the CPU
//! has): the tests run the kernels at each level and compare the results.
//! The loops are written so that their order of operations does not depend
//! on the width (explicit lanes for every sum), so the three copies give the
//! same bits; `gemm`'s kernels are not forced and may differ in the last bit.

use std::sync::atomic::{AtomicU8, Ordering};

/// A vector level, from narrowest to widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The x86-64 baseline (SSE2), or any other architecture.
    Baseline = 1,
    /// AVX2 + FMA (x86-64-v3: Intel since Haswell, AMD since Zen 1).
    Avx2 = 2,
    /// AVX-512 F/BW/DQ/VL (x86-64-v4: Intel Xeon since Skylake-SP, AMD since Zen 4).
    Avx512 = 3,
}

impl Level {
    /// The name `AFINAR_SIMD` takes.
    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    fn from_u8(v: u8) -> Option<Level> {
        match v {
            1 => Some(Level::Baseline),
            2 => Some(Level::Avx2),
            3 => Some(Level::Avx512),
            _ => None,
        }
    }
}

/// The widest level this CPU executes.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let v4 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl");
        let v3 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if v4 && v3 {
            return Level::Avx512;
        }
        if v3 {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// The level `AFINAR_SIMD` asks for (`None` when unset), checked against
/// the CPU: an unknown name, or a level the CPU lacks, is an error naming
/// the variable, the value and what is allowed.
pub fn requested() -> Result<Option<Level>, String> {
    let Some(v) = std::env::var_os("AFINAR_SIMD") else {
        return Ok(None);
    };
    let v = v.to_string_lossy();
    let want = match v.trim().to_ascii_lowercase().as_str() {
        "avx512" | "avx-512" | "x86-64-v4" => Level::Avx512,
        "avx2" | "x86-64-v3" => Level::Avx2,
        "baseline" | "scalar" | "sse2" | "x86-64" => Level::Baseline,
        "" | "auto" => return Ok(None),
        _ => {
            return Err(format!(
                "AFINAR_SIMD={v:?}: expected one of avx512, avx2, baseline, auto"
            ))
        }
    };
    let have = detected();
    if want > have {
        return Err(format!(
            "AFINAR_SIMD={v}: this CPU runs at most {} (its SIMD flags lack {})",
            have.name(),
            match want {
                Level::Avx512 => "avx512f/bw/dq/vl",
                _ => "avx2/fma",
            }
        ));
    }
    Ok(Some(want))
}

/// The level the kernels run at: `AFINAR_SIMD` if set, else [`detected`].
/// Decided on the first call. A bad `AFINAR_SIMD` panics here with the
/// message of [`requested`]; the CLI checks it at start-up
/// ([`check_env`]) so that users get it as an error.
pub fn level() -> Level {
    if let Some(l) = Level::from_u8(LEVEL.load(Ordering::Relaxed)) {
        return l;
    }
    let l = match requested() {
        Ok(l) => l.unwrap_or_else(detected),
        Err(e) => panic!("{e}"),
    };
    LEVEL.store(l as u8, Ordering::Relaxed);
    l
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

/// Run the kernels at `l` from now on (at most [`detected`]; `None`: as
/// [`level`] would choose). For tests and benchmarks that compare levels in
/// one process: every thread switches at once.
pub fn force(l: Option<Level>) {
    // 0: undecided, so the next `level` chooses again.
    LEVEL.store(l.map_or(0, |l| l.min(detected()) as u8), Ordering::Relaxed);
}

/// Check `AFINAR_SIMD` (see [`requested`]) and fix the level for the
/// process; returns it.
pub fn check_env() -> Result<Level, String> {
    requested()?;
    Ok(level())
}

/// Run `f` compiled for the widest level the process runs at ([`level`]).
///
/// `f`'s body is compiled into three copies of a small function, each with
/// the target features of its level, so its loops vectorise for that
/// width: `f` and what it calls must inline (closures called once do; the
/// scalar helpers they call are `#[inline]`). Call it inside each parallel
/// task, around the loops: a task's closure is a function of its own.
#[inline(always)]
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        match level() {
            // SAFETY: `level` only returns a level whose features the CPU has
            // (`detected`, or a request checked against it).
            Level::Avx512 => return unsafe { x86::v4(f) },
            Level::Avx2 => return unsafe { x86::v3(f) },
            Level::Baseline => {}
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(
        enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2,lzcnt,popcnt,f16c"
    )]
    #[inline]
    pub unsafe fn v4<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt,f16c")]
    #[inline]
    pub unsafe fn v3<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::gguf::quant::quantize_q4_1;
    use crate::hub::gguf::{GgmlType, QData, QTensor};
    use crate::nn::testing::{flat, randn};
    use crate::nn::{self, RopeTable, Weight};
    use crate::optim::{AdamW, AdamWConfig};
    use candle_core::{Device, Tensor};
    use std::sync::Arc;

    /// Every CPU kernel of afinar's own on shapes that are not multiples of
    /// any vector width, forward and backward, then an AdamW step: the
    /// outputs, gradients and updated weights, named.
    fn every_kernel() -> Vec<(String, Vec<f32>)> {
        let (b, t, c, heads, kv_heads, v, f) = (2, 37, 40, 4, 2, 53, 72);
        let w = |shape: &[usize], seed: u64| Weight::trainable(&randn(shape, seed)).unwrap();
        let x = w(&[b, t, c], 1);
        let (ln_g, ln_b, rms_w) = (w(&[c], 2), w(&[c], 3), w(&[c], 4));
        let (gate, up) = (w(&[b, t, f], 5), w(&[b, t, f], 6));
        let emb = w(&[v, c], 7);
        let scale = w(&[c], 8);
        let mut mask = vec![1f32; b * t];
        mask[t + 30..2 * t].fill(0.0);
        let mask = Arc::new(mask);
        let ids = Tensor::from_vec(
            (0..(b * t) as u32)
                .map(|i| (i * 7) % v as u32)
                .collect::<Vec<_>>(),
            (b, t),
            &Device::Cpu,
        )
        .unwrap();
        let mut out = Vec::new();
        let mut keep = |name: &str, t: &Tensor| out.push((name.to_string(), flat(t)));

        let e = nn::embedding(&emb, &ids, Some(3)).unwrap();
        let h = (x.t.clone() + e).unwrap();
        let ln = nn::layer_norm(&h, &ln_g, &ln_b, 1e-12).unwrap();
        keep("layer_norm", &ln);
        let g1 = nn::gelu(&ln).unwrap();
        let g2 = nn::gelu_tanh(&ln).unwrap();
        keep("gelu", &g1);
        keep("gelu_tanh", &g2);
        let a = nn::attention(&g1, &g2, &ln, mask.clone(), heads, Some((0.1, 11))).unwrap();
        keep("attention", &a);
        let table = Arc::new(RopeTable::new(c / heads, 10000.0, 64));
        let pos = Arc::new(
            (0..(b * t) as u32)
                .map(|i| i % t as u32)
                .collect::<Vec<_>>(),
        );
        let q = nn::rope(&a, &table, &pos, heads).unwrap();
        keep("rope", &q);
        let kv = |x: &Tensor| {
            x.narrow(2, 0, c / heads * kv_heads)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let k = nn::rope(&kv(&g2), &table, &pos, kv_heads).unwrap();
        let ca = nn::causal_attention(
            &q,
            &k,
            &kv(&ln),
            heads,
            kv_heads,
            mask,
            None,
            Some((0.1, 12)),
        )
        .unwrap();
        keep("causal_attention", &ca);
        let r = nn::rms_norm(&ca, &rms_w, 1e-6).unwrap();
        keep("rms_norm", &r);
        let sm = nn::silu_mul(&gate.t, &up.t).unwrap();
        keep("silu_mul", &sm);
        let sc = nn::scale_last(&r, &scale, None).unwrap();
        let d = nn::dropout(&sc, 0.2, 13).unwrap();
        keep("scale_last+dropout", &d);
        let targets: Vec<i64> = (0..(b * t) as i64)
            .map(|i| if i % 5 == 0 { -100 } else { i % v as i64 })
            .collect();
        let lm = nn::lm_cross_entropy(&d.reshape((b * t, c)).unwrap(), &emb, Arc::new(targets), 16)
            .unwrap();
        keep("lm_cross_entropy", &lm);
        let wq = QTensor::new(
            GgmlType::Q4_1,
            [c, 64].into(),
            QData::Owned(quantize_q4_1(&flat(&randn(&[c, 64], 14)))),
        )
        .unwrap();
        let sm64 = sm.narrow(2, 0, 64).unwrap().contiguous().unwrap();
        let ql = nn::qlinear::qlinear(&sm64, &Arc::new(wq), None).unwrap();
        keep("qlinear", &ql);
        let loss = ((lm + (ql * &d).unwrap().sum_all().unwrap()).unwrap()
            + (g1 * randn(&[b, t, c], 15)).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        keep("d x", grads.get(&x.t).unwrap());
        keep("d gate", grads.get(&gate.t).unwrap());
        keep("d up", grads.get(&up.t).unwrap());
        let ws = [
            ("ln_g", ln_g),
            ("ln_b", ln_b),
            ("rms_w", rms_w),
            ("emb", emb),
            ("scale", scale),
        ];
        for (n, w) in &ws {
            keep(&format!("d {n}"), &w.grad_tensor().unwrap().unwrap());
        }
        let params: Vec<(String, Weight)> =
            ws.iter().map(|(n, w)| (n.to_string(), w.clone())).collect();
        let mut opt = AdamW::new(params, AdamWConfig::default()).unwrap();
        let norm = opt.grad_norm().unwrap();
        out.push((
            "grad_norm".into(),
            vec![norm as f32, (norm - norm as f32 as f64) as f32],
        ));
        opt.step(1e-3, 0.5).unwrap();
        for (n, w) in &ws {
            out.push((format!("{n} after AdamW"), flat(&w.t)));
        }
        out
    }

    /// The kernels give the same bits at every level this CPU runs (the
    /// AVX2 and AVX-512 copies of each loop, and the baseline's); on an
    /// AVX2-only machine this compares two levels, on an AVX-512 one three.
    #[test]
    fn every_level_gives_the_same_bits() {
        let levels: Vec<Level> = [Level::Baseline, Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|l| *l <= detected())
            .collect();
        let mut runs = Vec::new();
        for &l in &levels {
            force(Some(l));
            assert_eq!(level(), l);
            runs.push((l, every_kernel()));
        }
        force(None);
        let (l0, want) = &runs[0];
        for (l, got) in &runs[1..] {
            for ((name, g), (_, w)) in got.iter().zip(want) {
                let first = g
                    .iter()
                    .zip(w)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert!(
                    g.len() == w.len() && first.is_none(),
                    "{name}: {} differs from {} at element {first:?} ({:?} vs {:?})",
                    l.name(),
                    l0.name(),
                    first.map(|i| g[i]),
                    first.map(|i| w[i]),
                );
            }
        }
        eprintln!(
            "levels compared: {:?}",
            levels.iter().map(|l| l.name()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn detected_level_matches_cpu_flags() {
        let l = detected();
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(
                l >= Level::Avx2,
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            );
            assert_eq!(
                l == Level::Avx512,
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("fma")
            );
        }
        assert!(level() <= l);
    }
}
