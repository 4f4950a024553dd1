//! The KV cache of generation: keys and values of the positions seen so
//! far, per layer and batch row, and attention of new queries over them
//! (inference only, no backward).

use crate::nn;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// Keys and values of the positions seen so far, per layer and batch row:
/// `layers[l].0[row]` is `[len, kv_heads * head_dim]` row-major.
#[derive(Default)]
pub struct KvCache {
    pub layers: Vec<(Vec<Vec<f32>>, Vec<Vec<f32>>)>,
    pub len: usize,
    /// Per batch row, how many of its first positions are left padding
    /// (batched generation from prompts of different lengths): they are
    /// never attended to, and the row's positions count from after them.
    pub pads: Vec<usize>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
    /// A cache for a batch whose row `r` starts with `pads[r]` positions of
    /// left padding.
    pub fn with_left_padding(pads: Vec<usize>) -> Self {
        KvCache {
            pads,
            ..Self::default()
        }
    }
    /// Ready the cache of an `n`-layer model for the new positions of input
    /// embeddings `x` `[B, Tn, C]`: their position ids `[B * Tn]`
    /// (continuing the cache), how many positions it held before, and Tn.
    /// [`Self::end_step`] counts them in once every layer has run.
    pub fn begin_step(&mut self, n: usize, x: &Tensor) -> Result<(Arc<Vec<u32>>, usize, usize)> {
        let (b, tn, _) = x.dims3()?;
        self.ensure_layers(n, b);
        let t_past = self.len;
        if !self.pads.is_empty() && self.pads.len() != b {
            return Err(Error::msg(format!(
                "KV cache: {} rows of left padding for a batch of {b}",
                self.pads.len()
            )));
        }
        // A left-padded row's first real token is its position 0 (padding
        // positions get 0 too: nothing attends to them).
        let pad = |r: usize| self.pads.get(r).copied().unwrap_or(0);
        let positions = Arc::new(
            (0..b)
                .flat_map(|r| (t_past..t_past + tn).map(move |p| p.saturating_sub(pad(r)) as u32))
                .collect(),
        );
        Ok((positions, t_past, tn))
    }

    /// The step's `tn` positions are in every layer's cache.
    pub fn end_step(&mut self, tn: usize) {
        self.len += tn;
    }

    pub fn ensure_layers(&mut self, n: usize, b: usize) {
        if self.layers.len() != n {
            self.layers = (0..n)
                .map(|_| (vec![Vec::new(); b], vec![Vec::new(); b]))
                .collect();
        }
    }
}

/// Append the new keys/values to `cache` and attend the new queries to every
/// cached position (causal) but a row's left padding (`pads`, empty: none).
/// q [B, Tn, Hq*D], k/v [B, Tn, Hkv*D].
#[allow(clippy::too_many_arguments)]
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cache: &mut (Vec<Vec<f32>>, Vec<Vec<f32>>),
    pads: &[usize],
    b: usize,
    tn: usize,
    t_past: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
) -> Result<Tensor> {
    let kvd = kv_heads * d;
    // On a GPU the new token's q/k/v come over to the CPU cache (generation
    // only: there is no GPU kernel for the cached path yet).
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    };
    let (kf, vf, qf) = (host(k)?, host(v)?, host(q)?);
    let t_total = t_past + tn;
    let mut kc = Vec::with_capacity(b * t_total * kvd);
    let mut vc = Vec::with_capacity(b * t_total * kvd);
    for r in 0..b {
        cache.0[r].extend_from_slice(&kf[r * tn * kvd..(r + 1) * tn * kvd]);
        cache.1[r].extend_from_slice(&vf[r * tn * kvd..(r + 1) * tn * kvd]);
        if cache.0[r].len() != t_total * kvd {
            return Err(Error::msg(
                "KV cache length out of step with the positions".to_string(),
            ));
        }
        kc.extend_from_slice(&cache.0[r]);
        vc.extend_from_slice(&cache.1[r]);
    }
    let mut out = vec![0f32; b * tn * heads * d];
    let sh = nn::CacheShape {
        b,
        t_new: tn,
        t_total,
        heads,
        kv_heads,
        d,
    };
    let mask: Option<Vec<f32>> = (pads.iter().any(|&p| p > 0)).then(|| {
        (0..b)
            .flat_map(|r| (0..t_total).map(move |j| if j < pads[r] { 0.0 } else { 1.0 }))
            .collect()
    });
    nn::attention_with_cache(&qf, &kc, &vc, mask.as_deref(), sh, &mut out);
    let out = Tensor::from_vec(out, (b, tn, heads * d), &Device::Cpu)?;
    Ok(out.to_device(q.device())?.to_dtype(q.dtype())?)
}
