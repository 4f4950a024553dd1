//! Text generation with a decoder: prefill the prompt into the KV cache, then
//! one token at a time; greedy, temperature, top-k and top-p (nucleus)
//! sampling as transformers' `generate` applies them (temperature, then
//! top-k, then top-p); stop at an end-of-sequence id or a stop string.

use crate::heads::CausalLm;
use crate::models::KvCache;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax).
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: u64,
    /// Stop when the generated text contains one of these (cut before it).
    pub stop: Vec<String>,
    /// Stop at one of these token ids (not included in the text).
    pub eos_ids: Vec<u32>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop: vec![],
            eos_ids: vec![],
        }
    }
}

impl GenerateConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0) || !self.temperature.is_finite() {
            return Err(Error::msg(format!(
                "temperature {} must be >= 0",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::msg(format!("top_p {p} must be in (0, 1]")));
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::msg("top_k must be > 0".to_string()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
}

/// Pick the next token from `logits` [V].
pub fn sample(logits: &[f32], cfg: &GenerateConfig, rng: &mut impl Rng) -> u32 {
    if cfg.temperature == 0.0 {
        return argmax(logits) as u32;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let scaled: Vec<f32> = logits.iter().map(|l| l / cfg.temperature).collect();
    idx.sort_unstable_by(|&a, &b| scaled[b].total_cmp(&scaled[a]));
    if let Some(k) = cfg.top_k {
        idx.truncate(k.min(idx.len()));
    }
    let max = scaled[idx[0]];
    let mut probs: Vec<f32> = idx.iter().map(|&i| (scaled[i] - max).exp()).collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if let Some(top_p) = cfg.top_p {
        // Keep the smallest prefix whose mass reaches top_p (at least one).
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let s: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
    }
    let u: f32 = rng.gen();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return idx[i] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Generate from `prompt` ids, after an optional soft prompt `[P, C]`
/// (prompt tuning) in front of the prompt's token embeddings. `decode`
/// turns ids into text (for stop strings and the result); `on_text`
/// receives each new piece of text as it is produced (streaming).
pub fn generate(
    model: &CausalLm,
    prefix: Option<&Tensor>,
    prompt: &[u32],
    max_positions: usize,
    cfg: &GenerateConfig,
    decode: &dyn Fn(&[u32]) -> Result<String>,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generated> {
    cfg.validate()?;
    let prefix_len = match prefix {
        Some(p) => p.dim(0)?,
        None => 0,
    };
    if prompt.is_empty() {
        return Err(Error::msg("generate: empty prompt".to_string()));
    }
    if prefix_len + prompt.len() >= max_positions {
        return Err(Error::msg(format!(
            "generate: the prompt has {} tokens (+ {prefix_len} virtual), the model's context is {max_positions}",
            prompt.len()
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut cache = KvCache::new();
    let ids = Tensor::from_slice(prompt, (1, prompt.len()), &Device::Cpu)?;
    let mut hidden = match prefix {
        None => model.body.forward_cached(&ids, &mut cache)?,
        Some(p) => {
            let x = Tensor::cat(&[&p.unsqueeze(0)?, &model.body.embed(&ids)?], 1)?;
            model.body.forward_cached_embeds(&x, &mut cache)?
        }
    };
    let mut out: Vec<u32> = Vec::new();
    let mut text = String::new();
    let mut stop = StopReason::MaxTokens;
    while out.len() < cfg.max_new_tokens {
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?;
        let logits = model.logits(&last)?.flatten_all()?.to_vec1::<f32>()?;
        let next = sample(&logits, cfg, &mut rng);
        if cfg.eos_ids.contains(&next) {
            stop = StopReason::Eos;
            break;
        }
        out.push(next);
        let full = decode(&out)?;
        if let Some(cut) = cfg.stop.iter().filter_map(|s| full.find(s.as_str())).min() {
            let piece = full[..cut].get(text.len()..).unwrap_or("");
            on_text(piece);
            text = full[..cut].to_string();
            stop = StopReason::StopString;
            break;
        }
        // Emit only complete characters (a multi-byte character may span tokens).
        if !full.ends_with('\u{FFFD}') {
            if let Some(piece) = full.get(text.len()..) {
                on_text(piece);
            }
            text = full;
        }
        if cache.len + 1 >= max_positions {
            stop = StopReason::ContextFull;
            break;
        }
        let ids = Tensor::from_slice(&[next], (1, 1), &Device::Cpu)?;
        hidden = model.body.forward_cached(&ids, &mut cache)?;
    }
    if stop != StopReason::StopString {
        let full = decode(&out)?;
        if let Some(piece) = full.get(text.len()..) {
            on_text(piece);
        }
        text = full;
    }
    Ok(Generated {
        ids: out,
        text,
        stop,
    })
}

/// One row's continuation from [`generate_batch`]: the new ids, up to and
/// including the first end-of-sequence id; each id's log-probability under
/// the distribution it was drawn from before top-k / top-p (the logits
/// divided by the temperature; greedy: by 1), and that distribution's
/// entropy.
#[derive(Debug, Clone, PartialEq)]
pub struct Continuation {
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub entropy: Vec<f32>,
    /// Ended by an end-of-sequence id (the last of `ids`).
    pub eos: bool,
}

/// `log_softmax(logits / t)` at `id`, and the entropy of that distribution.
pub fn logprob_and_entropy(logits: &[f32], t: f32, id: usize) -> (f32, f32) {
    let inv = if t > 0.0 { 1.0 / t } else { 1.0 };
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) * inv;
    let (mut z, mut ez) = (0f64, 0f64);
    for &l in logits {
        let x = (l * inv - max) as f64;
        let e = x.exp();
        z += e;
        ez += e * x;
    }
    let lz = z.ln();
    let lp = (logits[id] * inv - max) as f64 - lz;
    (lp as f32, (lz - ez / z) as f32)
}

/// Sample from the full distribution `softmax(logits / t)` (no top-k /
/// top-p): one pass, no sort.
fn sample_full(logits: &[f32], t: f32, rng: &mut impl Rng) -> u32 {
    let inv = 1.0 / t;
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let z: f64 = logits
        .iter()
        .map(|&l| (((l - max) * inv) as f64).exp())
        .sum();
    let u = rng.gen::<f64>() * z;
    let mut acc = 0f64;
    for (i, &l) in logits.iter().enumerate() {
        acc += (((l - max) * inv) as f64).exp();
        if u < acc {
            return i as u32;
        }
    }
    argmax(logits) as u32
}

/// Generate for a batch of prompts at once through one KV cache: prompts
/// are left-padded (padding never attended to, positions counted from each
/// row's first token), every step decodes one token for the rows not yet
/// ended. Row `r` samples with `rngs[r]`, so its continuation does not
/// depend on the other rows. Stops at `max_new_tokens`, an end-of-sequence
/// id, or the context's end. Stop strings are not applied.
pub fn generate_batch(
    model: &CausalLm,
    prompts: &[&[u32]],
    max_positions: usize,
    cfg: &GenerateConfig,
    rngs: &mut [rand_chacha::ChaCha8Rng],
) -> Result<Vec<Continuation>> {
    cfg.validate()?;
    let b = prompts.len();
    if rngs.len() != b {
        return Err(Error::msg(format!(
            "generate_batch: {} random streams for {b} prompts",
            rngs.len()
        )));
    }
    if b == 0 {
        return Ok(vec![]);
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::msg(format!("generate_batch: prompt {i} is empty")));
    }
    let l = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    if l >= max_positions {
        return Err(Error::msg(format!(
            "generate: a prompt has {l} tokens, the model's context is {max_positions}"
        )));
    }
    let pads: Vec<usize> = prompts.iter().map(|p| l - p.len()).collect();
    let mut ids = Vec::with_capacity(b * l);
    for (p, &pad) in prompts.iter().zip(&pads) {
        ids.extend(std::iter::repeat_n(p[0], pad));
        ids.extend_from_slice(p);
    }
    let mut cache = KvCache::with_left_padding(pads);
    let mut hidden = model
        .body
        .forward_cached(&Tensor::from_vec(ids, (b, l), &Device::Cpu)?, &mut cache)?;
    let mut out: Vec<Continuation> = (0..b)
        .map(|_| Continuation {
            ids: vec![],
            logprobs: vec![],
            entropy: vec![],
            eos: false,
        })
        .collect();
    let mut done = vec![false; b];
    let full = cfg.top_k.is_none() && cfg.top_p.is_none_or(|p| p >= 1.0);
    for _ in 0..cfg.max_new_tokens {
        let t = hidden.dim(1)?;
        let logits = model
            .logits(&hidden.narrow(1, t - 1, 1)?)?
            .to_vec2::<f32>()?;
        let mut next = vec![0u32; b];
        for r in 0..b {
            if done[r] {
                next[r] = *out[r].ids.last().unwrap_or(&prompts[r][0]);
                continue;
            }
            let lg = &logits[r];
            let id = if cfg.temperature > 0.0 && full {
                sample_full(lg, cfg.temperature, &mut rngs[r])
            } else {
                sample(lg, cfg, &mut rngs[r])
            };
            let (lp, h) = logprob_and_entropy(lg, cfg.temperature, id as usize);
            let o = &mut out[r];
            o.ids.push(id);
            o.logprobs.push(lp);
            o.entropy.push(h);
            if cfg.eos_ids.contains(&id) {
                o.eos = true;
                done[r] = true;
            }
            next[r] = id;
        }
        if done.iter().all(|&d| d) || cache.len + 1 >= max_positions {
            break;
        }
        let step = Tensor::from_vec(next, (b, 1), &Device::Cpu)?;
        hidden = model.body.forward_cached(&step, &mut cache)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_respects_greedy_top_k_and_top_p() {
        let logits = [1.0, 3.0, 2.0, -1.0];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let greedy = GenerateConfig::default();
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let sampled = |top_k, top_p| GenerateConfig {
            temperature: 1.0,
            top_k,
            top_p,
            ..Default::default()
        };
        let k1 = sampled(Some(1), None);
        for _ in 0..20 {
            assert_eq!(sample(&logits, &k1, &mut rng), 1);
        }
        let k2 = sampled(Some(2), None);
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            seen[sample(&logits, &k2, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[3], 0, "top-k 2 keeps ids 1 and 2: {seen:?}");
        // p(1) = e^3 / (e^3 + e^2) = 0.73 of the top-2 mass.
        assert!((seen[1] as f32 / 400.0 - 0.73).abs() < 0.08, "{seen:?}");
        // top-p 0.5: id 1 alone has 0.66 of the full mass.
        let p = sampled(None, Some(0.5));
        for _ in 0..50 {
            assert_eq!(sample(&logits, &p, &mut rng), 1);
        }
        assert!(GenerateConfig {
            top_p: Some(1.5),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(GenerateConfig {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
