//! The tokenizer stored in a GGUF file's metadata, rebuilt as a
//! `tokenizers::Tokenizer`: `tokenizer.ggml.model = "gpt2"` (byte-level BPE)
//! from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, the
//! pre-tokenizer named by `tokenizer.ggml.pre`, control tokens
//! (`token_type == 3`) as special added tokens, the bos/eos/padding ids and
//! `tokenizer.chat_template`.
//!
//! Pre-tokenizers follow llama.cpp's `llm_tokenizer_bpe` (`src/llama-vocab.cpp`,
//! <https://github.com/ggml-org/llama.cpp/blob/b4600/src/llama-vocab.cpp>), written the
//! way Hugging Face's `tokenizer.json` files write them:
//!
//! - `gpt2`, `mpt`, `olmo`, `jais`: GPT-2's regex (`ByteLevel`, `use_regex`).
//! - `smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`,
//!   `minerva-7b`: every digit alone (`Digits(individual_digits)`), then GPT-2's regex.
//!   SmolLM2's own `tokenizer.json` has this pair.
//! - `default` (or no `tokenizer.ggml.pre`): llama.cpp's default BPE splits:
//!   runs of punctuation, GPT-2's regex, runs of digits, groups of three digits.
//!
//! Limits: only byte-level BPE (`gpt2`); SentencePiece (`llama`), WordPiece
//! (`bert`) and the other `tokenizer.ggml.pre` values are refused by name.

use super::{Gguf, GgufError, GgufResult};
use crate::hub::tokenizer::{Specials, TextTokenizer};
use std::path::Path;
use tokenizers::{
    decoders::byte_level::ByteLevel,
    models::bpe::{Vocab, BPE},
    pre_tokenizers::{
        digits::Digits,
        sequence::Sequence,
        split::{Split, SplitPattern},
    },
    processors::template::TemplateProcessing,
    AddedToken, PaddingParams, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

/// llama.cpp's token types (`llama_token_type`).
pub mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
    pub const BYTE: i64 = 6;
}

/// GPT-2's pre-tokenizer regex (also ByteLevel's, less its final `|\s+`).
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

const PRE_GPT2: &[&str] = &["gpt2", "mpt", "olmo", "jais"];
const PRE_DIGITS: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
];

/// A GGUF file's tokenizer and what generation needs beside it.
#[derive(Clone)]
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// `tokenizer.chat_template` (Jinja, as in `tokenizer_config.json`).
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.pre` ("default" when absent).
    pub pre: String,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("pre", &self.pre)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl GgufTokenizer {
    /// As afinar's [`TextTokenizer`] (padding off, truncation at `max_length`,
    /// pad id = `tokenizer.ggml.padding_token_id`, else eos), with the
    /// decoder's special tokens and chat template.
    pub fn text_tokenizer(&self, source: &Path, max_length: usize) -> crate::Result<TextTokenizer> {
        let mut t = self.tokenizer.clone();
        if let Some(pad_id) = self.pad_id.or(self.eos_id) {
            let pad_token = t.id_to_token(pad_id).unwrap_or_default();
            t.with_padding(Some(PaddingParams {
                pad_id,
                pad_token,
                ..Default::default()
            }));
        }
        let mut tt = TextTokenizer::from_tokenizer(t, source, max_length)?;
        let tok_str = |id: Option<u32>| {
            id.and_then(|i| self.tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let mut eos_ids: Vec<u32> = self.eos_id.into_iter().collect();
        // ChatML templates end a turn with <|im_end|>: generation stops there too.
        if let Some(id) = self.tokenizer.token_to_id("<|im_end|>") {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        tt.set_pad_id(self.pad_id.or(self.eos_id).unwrap_or(0));
        tt.specials = Some(Specials {
            bos_id: self.bos_id,
            eos_ids,
            bos_token: tok_str(self.bos_id),
            eos_token: tok_str(self.eos_id),
            chat_template: self.chat_template.clone(),
        });
        Ok(tt)
    }
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, String> {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel as BL;
    let split = |re: &str| -> Result<PreTokenizerWrapper, String> {
        Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(Into::into)
        .map_err(|e| format!("regex `{re}`: {e}"))
    };
    if PRE_GPT2.contains(&pre) {
        return Ok(BL::new(false, true, true).into());
    }
    if PRE_DIGITS.contains(&pre) {
        return Ok(Sequence::new(vec![
            Digits::new(true).into(),
            BL::new(false, true, true).into(),
        ])
        .into());
    }
    if pre == "default" {
        return Ok(Sequence::new(vec![
            split(r"[\p{P}\$\+<=>\^~\|]+")?,
            split(GPT2_REGEX)?,
            split(r"\p{N}+")?,
            split(r"[0-9][0-9][0-9]")?,
            BL::new(false, true, false).into(),
        ])
        .into());
    }
    Err(format!(
        "tokenizer.ggml.pre `{pre}` is not supported; supported: {}, {}, default",
        PRE_GPT2.join(", "),
        PRE_DIGITS.join(", ")
    ))
}

/// Build the tokenizer of a GGUF file from its metadata.
pub fn tokenizer_from_gguf(g: &Gguf) -> GgufResult<GgufTokenizer> {
    let path = g.path().to_path_buf();
    let meta = |key: &str, msg: String| GgufError::Metadata {
        path: path.clone(),
        key: key.to_string(),
        msg,
    };
    let model = g.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(meta(
            "tokenizer.ggml.model",
            format!("`{model}` is not supported; supported: gpt2 (byte-level BPE)"),
        ));
    }
    let pre = g
        .opt_str("tokenizer.ggml.pre")?
        .unwrap_or("default")
        .to_string();
    let pre_tok = pre_tokenizer(&pre).map_err(|m| meta("tokenizer.ggml.pre", m))?;

    let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
    let types = match g.get("tokenizer.ggml.token_type") {
        Some(_) => g.get_int_array("tokenizer.ggml.token_type")?,
        None => vec![token_type::NORMAL; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(meta(
            "tokenizer.ggml.token_type",
            format!("{} types for {} tokens", types.len(), tokens.len()),
        ));
    }
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        // A repeated string keeps its first id, as a JSON vocab would lose the others.
        vocab.entry(t.to_string()).or_insert(id as u32);
    }
    let merges = g
        .get_str_array("tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    meta(
                        "tokenizer.ggml.merges",
                        format!("merge {i} `{m}` is not two tokens separated by a space"),
                    )
                })
        })
        .collect::<GgufResult<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| meta("tokenizer.ggml.merges", format!("cannot build BPE: {e}")))?;

    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(ByteLevel::default()));

    let id_key = |key: &str| -> GgufResult<Option<u32>> {
        let id = g.opt_u32(key)?;
        match id {
            Some(i) if i as usize >= tokens.len() => Err(meta(
                key,
                format!("id {i} is outside the vocabulary of {}", tokens.len()),
            )),
            _ => Ok(id),
        }
    };
    let bos_id = id_key("tokenizer.ggml.bos_token_id")?;
    let eos_id = id_key("tokenizer.ggml.eos_token_id")?;
    let pad_id = id_key("tokenizer.ggml.padding_token_id")?;

    // What llama.cpp adds around a text; transformers' GGUF conversion does the same.
    let add_bos = g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let (mut single, mut pair, mut specials) = (Vec::new(), Vec::new(), Vec::new());
    let bos = bos_id.map(|i| (tokens[i as usize].to_string(), i));
    let eos = eos_id.map(|i| (tokens[i as usize].to_string(), i));
    if let (true, Some((b, i))) = (add_bos, &bos) {
        single.push(b.clone());
        pair.push(b.clone());
        specials.push((b.clone(), *i));
    }
    single.push("$A".to_string());
    pair.push("$A".to_string());
    if let (true, Some((e, _))) = (add_eos, &eos) {
        single.push(e.clone());
        pair.push(e.clone());
    }
    if let (true, Some((b, _))) = (add_bos, &bos) {
        pair.push(format!("{b}:1"));
    }
    pair.push("$B:1".to_string());
    if let (true, Some((e, i))) = (add_eos, &eos) {
        pair.push(format!("{e}:1"));
        specials.push((e.clone(), *i));
    }
    let template = TemplateProcessing::builder()
        .try_single(single.join(" "))
        .and_then(|b| b.try_pair(pair.join(" ")))
        .map_err(|e| meta("tokenizer.ggml.add_bos_token", e.to_string()))?
        .special_tokens(specials)
        .build()
        .map_err(|e| meta("tokenizer.ggml.add_bos_token", e.to_string()))?;
    tok.with_post_processor(Some(template));

    // Control tokens never split and are skipped by `decode(.., true)`;
    // user-defined ones never split but decode as text.
    let added = |want: i64, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == want)
            .map(|(s, _)| AddedToken::from(s.to_string(), special))
            .collect()
    };
    tok.add_special_tokens(&added(token_type::CONTROL, true));
    tok.add_tokens(&added(token_type::USER_DEFINED, false));

    Ok(GgufTokenizer {
        tokenizer: tok,
        bos_id,
        eos_id,
        pad_id,
        chat_template: g.opt_str("tokenizer.chat_template")?.map(str::to_string),
        pre,
    })
}
