//! Prompt tuning (Lester et al. 2021, seed ref [6]): `num_virtual_tokens`
//! trainable embeddings prepended to every input of a frozen decoder.
//! Follows PEFT 0.21 `tuners/prompt_tuning/`: one tensor
//! `prompt_embeddings` `[num_virtual_tokens, token_dim]`, initialised at
//! random (N(0, 1), nn.Embedding's default), from sampled vocabulary
//! embeddings, or from the embeddings of a text repeated to length.

use super::config::{PromptTuningConfig, PromptTuningInit};
use crate::params::ParamStore;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::Rng;

/// The parameter name, in the store and in `adapter_model.safetensors`.
pub const KEY: &str = super::peft::PROMPT_EMBEDDINGS;

/// The initial soft prompt `[n, C]` from the token embedding table `[V, C]`.
pub fn init(
    cfg: &PromptTuningConfig,
    embed: &Tensor,
    tokenizer: &tokenizers::Tokenizer,
    rng: &mut impl Rng,
) -> Result<Tensor> {
    let n = cfg.num_virtual_tokens;
    let (v, c) = embed.dims2()?;
    match cfg.prompt_tuning_init {
        PromptTuningInit::Random => crate::params::normal_init(&[n, c], 1.0, rng),
        PromptTuningInit::SampleVocab => {
            let ids: Vec<u32> = (0..n).map(|_| rng.gen_range(0..v as u32)).collect();
            Ok(embed.index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?)
        }
        PromptTuningInit::Text => {
            let text = cfg.prompt_tuning_init_text.as_deref().unwrap_or_default();
            let ids = tokenizer
                .encode(text, false)
                .map_err(|e| Error::msg(format!("prompt_tuning_init_text: {e}")))?
                .get_ids()
                .to_vec();
            if ids.is_empty() {
                return Err(Error::msg(
                    "prompt_tuning_init_text encodes to no token".to_string(),
                ));
            }
            // PEFT repeats the text's tokens to fill, then truncates.
            let ids: Vec<u32> = ids.iter().cycle().take(n).copied().collect();
            Ok(embed.index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?)
        }
    }
}

/// Attach a soft prompt to a decoder's store: the base freezes, the prompt
/// `[n, C]` (from the input embedding `embed`) is the one trainable tensor,
/// and `cfg` records the model's shape as PEFT does. Returns its shape.
pub fn attach(
    store: &mut ParamStore,
    cfg: &mut PromptTuningConfig,
    embed: &Tensor,
    tokenizer: &tokenizers::Tokenizer,
    (num_layers, num_heads): (usize, usize),
    rng: &mut impl Rng,
) -> Result<[usize; 2]> {
    store.freeze_all();
    let t = init(cfg, embed, tokenizer, rng)?;
    let (n, dim) = t.dims2()?;
    cfg.token_dim = Some(dim);
    cfg.num_layers = Some(num_layers);
    cfg.num_attention_heads = Some(num_heads);
    store.insert_trainable(KEY, t)?;
    Ok([n, dim])
}
