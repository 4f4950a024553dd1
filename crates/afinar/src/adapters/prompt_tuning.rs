//! Prompt tuning (Lester et al. 2021, seed ref [6]): `num_virtual_tokens`
//! trainable embeddings prepended to every input of a frozen decoder.
//! Follows PEFT 0.21 `tuners/prompt_tuning/`: one tensor
//! `prompt_embeddings` `[num_virtual_tokens, token_dim]`, initialised at
//! random (N(0, 1), nn.Embedding's default), from sampled vocabulary
//! embeddings, or from the embeddings of a text repeated to length.

use super::AdapterConfig;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::Rng;

/// The parameter name, in the store and in `adapter_model.safetensors`.
pub const KEY: &str = "prompt_embeddings";

/// The initial soft prompt `[n, C]` from the token embedding table `[V, C]`.
pub fn init(
    cfg: &AdapterConfig,
    embed: &Tensor,
    tokenizer: &tokenizers::Tokenizer,
    rng: &mut impl Rng,
) -> Result<Tensor> {
    let n = cfg.num_virtual_tokens;
    let (v, c) = embed.dims2()?;
    match cfg.prompt_tuning_init.to_ascii_lowercase().as_str() {
        "random" => crate::params::normal_init(&[n, c], 1.0, rng),
        "sample_vocab" => {
            let ids: Vec<u32> = (0..n).map(|_| rng.gen_range(0..v as u32)).collect();
            Ok(embed.index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?)
        }
        "text" => {
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
        other => Err(Error::msg(format!("prompt_tuning_init `{other}`"))),
    }
}
