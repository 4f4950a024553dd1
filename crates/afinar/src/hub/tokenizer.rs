//! Text tokenizers: a `tokenizer.json` read with the `tokenizers` crate, or a
//! BERT WordPiece tokenizer rebuilt from `vocab.txt` for checkpoints that ship
//! no `tokenizer.json` (the pipeline of transformers' `BertTokenizerFast`:
//! BertNormalizer, BertPreTokenizer, WordPiece, `[CLS] A [SEP] B [SEP]`).
//!
//! Padding stored in the file is switched off: all-MiniLM's `tokenizer.json`
//! pads every text to 128, and the batcher pads each batch to its longest row
//! instead. Truncation is set to `max_length` (special tokens included),
//! longest-first for pairs, as transformers' `truncation=True` does.

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::{
    decoders::wordpiece::WordPiece as WordPieceDecoder, models::wordpiece::WordPiece,
    normalizers::bert::BertNormalizer, pre_tokenizers::bert::BertPreTokenizer,
    processors::bert::BertProcessing, AddedToken, EncodeInput, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const VOCAB_FILE: &str = "vocab.txt";
/// Files that travel with a tokenizer when it is saved beside a checkpoint.
pub const COMPANION_FILES: &[&str] = &[
    "tokenizer_config.json",
    VOCAB_FILE,
    "special_tokens_map.json",
];

/// One encoded text: token ids and token type (segment) ids, special tokens included.
pub type Encoded = (Vec<u32>, Vec<u32>);

/// What a decoder's tokenizer brings beside its vocabulary: the special
/// tokens generation and chat rendering need, and the chat template
/// (`tokenizer_config.json` / `chat_template.jinja` / `generation_config.json`
/// of an HF folder, or a GGUF file's metadata). Empty for an encoder.
#[derive(Debug, Clone, Default)]
pub struct Specials {
    pub bos_id: Option<u32>,
    /// Every id that ends generation (config, generation config, eos token).
    pub eos_ids: Vec<u32>,
    pub bos_token: String,
    pub eos_token: String,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
}

/// One tokenizer type for every family: padding off, truncation at
/// `max_length` for sequence tasks ([`encode`](Self::encode)), untruncated
/// ids for SFT and generation ([`encode_raw`](Self::encode_raw)), the pad id
/// batches use, and a decoder's [`Specials`].
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The same tokenizer without truncation.
    raw: Tokenizer,
    max_length: usize,
    /// A decoder's special tokens and chat template (set by the model loader).
    pub specials: Option<Specials>,
    pad_id: u32,
    /// The file it was read from (`tokenizer.json` or `vocab.txt`), for errors and `save`.
    path: PathBuf,
    /// Built in memory (from `vocab.txt` or a GGUF file): `save` serialises it
    /// instead of copying `path`.
    from_vocab: bool,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// A special-token entry of `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_field(cfg: &serde_json::Value, key: &str, default: &str) -> String {
    match &cfg[key] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or(default)
            .to_string(),
        _ => default.to_string(),
    }
}

fn build_wordpiece(vocab_path: &Path) -> Result<Tokenizer> {
    let dir = vocab_path.parent().unwrap_or(Path::new("."));
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg: serde_json::Value = if cfg_path.is_file() {
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::file(&cfg_path, e.to_string()))?
    } else {
        serde_json::Value::Null
    };
    let lowercase = cfg["do_lower_case"].as_bool().unwrap_or(true);
    let chinese = cfg["tokenize_chinese_chars"].as_bool().unwrap_or(true);
    // transformers: strip_accents None means "follow lowercase".
    let strip_accents = cfg["strip_accents"].as_bool();
    let unk = token_field(&cfg, "unk_token", "[UNK]");
    let cls = token_field(&cfg, "cls_token", "[CLS]");
    let sep = token_field(&cfg, "sep_token", "[SEP]");
    let pad = token_field(&cfg, "pad_token", "[PAD]");
    let mask = token_field(&cfg, "mask_token", "[MASK]");

    let path_str = vocab_path
        .to_str()
        .ok_or_else(|| Error::file(vocab_path, "path is not UTF-8"))?;
    let vocab =
        WordPiece::read_file(path_str).map_err(|e| Error::file(vocab_path, e.to_string()))?;
    let id = |t: &str| {
        vocab.get(t).copied().ok_or_else(|| {
            Error::file(
                vocab_path,
                format!("special token `{t}` is not in the vocabulary"),
            )
        })
    };
    let (cls_id, sep_id) = (id(&cls)?, id(&sep)?);
    id(&unk)?;
    let model = WordPiece::builder()
        .vocab(vocab.clone())
        .unk_token(unk.clone())
        .build()
        .map_err(|e| Error::file(vocab_path, e.to_string()))?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::new(
        true,
        chinese,
        strip_accents,
        lowercase,
    )))
    .with_pre_tokenizer(Some(BertPreTokenizer))
    .with_post_processor(Some(BertProcessing::new(
        (sep.clone(), sep_id),
        (cls.clone(), cls_id),
    )))
    .with_decoder(Some(WordPieceDecoder::default()));
    // Special tokens in the text stay whole, as in the slow and fast BERT tokenizers.
    let specials: Vec<AddedToken> = [pad, unk, cls, sep, mask]
        .into_iter()
        .filter(|t| vocab.contains_key(t))
        .map(|t| AddedToken::from(t, true))
        .collect();
    tok.add_special_tokens(&specials);
    Ok(tok)
}

impl TextTokenizer {
    /// Load `tokenizer.json` (or build from `vocab.txt` when `path` names one, or when
    /// `path` is an absent `tokenizer.json` with a `vocab.txt` beside it).
    pub fn from_file(path: impl AsRef<Path>, max_length: usize) -> Result<Self> {
        let path = path.as_ref();
        let is_vocab = path.extension().is_some_and(|e| e == "txt");
        if is_vocab {
            return Self::finish(build_wordpiece(path)?, path, true, max_length);
        }
        if !path.exists() {
            let vocab = path.with_file_name(VOCAB_FILE);
            if vocab.is_file() {
                return Self::finish(build_wordpiece(&vocab)?, &vocab, true, max_length);
            }
            return Err(Error::file(
                path,
                format!(
                    "not found, and no {VOCAB_FILE} beside it to build a WordPiece tokenizer from"
                ),
            ));
        }
        let tok = Tokenizer::from_file(path)
            .map_err(|e| Error::file(path, format!("cannot load tokenizer: {e}")))?;
        Self::finish(tok, path, false, max_length)
    }

    /// Load the tokenizer of a model folder: `tokenizer.json`, else `vocab.txt`.
    pub fn from_dir(dir: impl AsRef<Path>, max_length: usize) -> Result<Self> {
        Self::from_file(dir.as_ref().join(TOKENIZER_FILE), max_length)
    }

    /// Wrap a tokenizer built in memory (from a GGUF file's metadata, say).
    /// `source` names where it came from in errors; `save` writes it out as a
    /// `tokenizer.json` (without truncation) rather than copying `source`.
    /// Its pad id is the one in its padding settings, if any.
    pub fn from_tokenizer(inner: Tokenizer, source: &Path, max_length: usize) -> Result<Self> {
        Self::finish(inner, source, true, max_length)
    }

    fn finish(
        mut inner: Tokenizer,
        path: &Path,
        from_vocab: bool,
        max_length: usize,
    ) -> Result<Self> {
        if max_length == 0 {
            return Err(Error::file(path, "max_length must be at least 1"));
        }
        // Read the pad id before padding is switched off: the file's padding config knows it best.
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .or_else(|| inner.token_to_id("<pad>"))
            .unwrap_or(0);
        inner.with_padding(None);
        let mut raw = inner.clone();
        raw.with_truncation(None)
            .map_err(|e| Error::file(path, format!("cannot switch truncation off: {e}")))?;
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| {
                Error::file(path, format!("cannot set truncation to {max_length}: {e}"))
            })?;
        Ok(Self {
            inner,
            raw,
            max_length,
            specials: None,
            pad_id,
            path: path.to_path_buf(),
            from_vocab,
        })
    }

    /// Ids and type ids of `text` (and `pair`), with special tokens, truncated to `max_length`.
    pub fn encode(&self, text: &str, pair: Option<&str>) -> Result<Encoded> {
        let input: EncodeInput = match pair {
            Some(p) => (text, p).into(),
            None => text.into(),
        };
        let enc = self
            .inner
            .encode(input, true)
            .map_err(|e| Error::file(&self.path, format!("encoding failed: {e}")))?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    /// `encode` over many texts (in parallel, by the `tokenizers` crate's rayon pool).
    /// `pairs`, when given, must be as long as `texts`.
    /// Encode texts, each with its optional second segment (a row without a
    /// pair is encoded alone, not with an empty pair).
    pub fn encode_batch(
        &self,
        texts: &[&str],
        pairs: Option<&[Option<&str>]>,
    ) -> Result<Vec<Encoded>> {
        let inputs: Vec<EncodeInput> = match pairs {
            Some(p) => {
                if p.len() != texts.len() {
                    return Err(Error::msg(format!(
                        "encode_batch: {} texts but {} pairs",
                        texts.len(),
                        p.len()
                    )));
                }
                texts
                    .iter()
                    .zip(p)
                    .map(|(a, b)| match b {
                        Some(b) => (*a, *b).into(),
                        None => (*a).into(),
                    })
                    .collect()
            }
            None => texts.iter().map(|t| (*t).into()).collect(),
        };
        let encs = self
            .inner
            .encode_batch(inputs, true)
            .map_err(|e| Error::file(&self.path, format!("encoding failed: {e}")))?;
        Ok(encs
            .into_iter()
            .map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec()))
            .collect())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::file(&self.path, format!("decoding failed: {e}")))
    }

    /// Ids of `text` without truncation (SFT rows, generation prompts):
    /// special tokens added by the post-processor only if `add_special`.
    pub fn encode_raw(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self
            .raw
            .encode(text, add_special)
            .map_err(|e| Error::file(&self.path, format!("encoding failed: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// The id batches are padded with.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Pad with `id` (a decoder's `pad_token_id`, else its eos).
    pub fn set_pad_id(&mut self, id: u32) {
        self.pad_id = id;
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The ids that end generation (none for an encoder).
    pub fn eos_ids(&self) -> &[u32] {
        self.specials.as_ref().map_or(&[], |s| s.eos_ids.as_slice())
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.specials.as_ref()?.chat_template.as_deref()
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The wrapped `tokenizers::Tokenizer` (padding off, truncation on).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The wrapped tokenizer without truncation.
    pub fn raw(&self) -> &Tokenizer {
        &self.raw
    }

    /// Save beside an exported checkpoint: the original `tokenizer.json` byte for
    /// byte (its padding and truncation settings unchanged), plus the companion files
    /// found next to it. A tokenizer built from `vocab.txt` is written out as a
    /// `tokenizer.json` without padding or truncation.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let dest = dir.join(TOKENIZER_FILE);
        if self.from_vocab {
            let mut t = self.inner.clone();
            t.with_truncation(None)
                .map_err(|e| Error::file(&dest, e.to_string()))?;
            let json = t
                .to_string(true)
                .map_err(|e| Error::file(&dest, e.to_string()))?;
            crate::fsutil::write_atomic(&dest, json.as_bytes())?;
        } else {
            copy_atomic(&self.path, &dest)?;
        }
        let src_dir = self.path.parent().unwrap_or(Path::new("."));
        for name in COMPANION_FILES {
            let src = src_dir.join(name);
            if src.is_file() {
                copy_atomic(&src, &dir.join(name))?;
            }
        }
        if let Some(sp) = &self.specials {
            // A decoder's: what transformers' tokenizer and generate() read,
            // written from what afinar loaded (a GGUF file has no such files).
            let tok_config = serde_json::json!({
                "chat_template": sp.chat_template,
                "bos_token": sp.bos_token,
                "eos_token": sp.eos_token,
                "pad_token": self.id_to_token(self.pad_id),
                "model_max_length": self.max_length,
                "tokenizer_class": "PreTrainedTokenizerFast",
            });
            crate::fsutil::write_json(&dir.join("tokenizer_config.json"), &tok_config)?;
            let gen = serde_json::json!({ "eos_token_id": sp.eos_ids, "bos_token_id": sp.bos_id });
            crate::fsutil::write_json(&dir.join("generation_config.json"), &gen)?;
        }
        Ok(())
    }
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_str(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .map(String::from)
        .or_else(|| v.get("content")?.as_str().map(String::from))
}

/// Token ids in a config: a number or a list of numbers.
pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl TextTokenizer {
    /// A decoder folder's special tokens and chat template: `config.json`
    /// (`raw`: bos / eos / pad ids), `tokenizer_config.json` (tokens, the
    /// template as transformers 4.x keeps it), `chat_template.jinja`
    /// (transformers 5), `generation_config.json` (more eos ids). Sets the
    /// pad id: `pad_token_id`, else the first eos id.
    pub fn read_lm_specials(&mut self, dir: &Path, raw: &serde_json::Value) -> Result<()> {
        let tc_file = dir.join("tokenizer_config.json");
        let tc = if tc_file.is_file() {
            crate::hub::config::read_config_value(&tc_file)?
        } else {
            serde_json::Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
        } else {
            match &tc["chat_template"] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(a) => a
                    .iter()
                    .find(|t| t["name"] == "default")
                    .or_else(|| a.first())
                    .and_then(|t| t["template"].as_str().map(String::from)),
                _ => None,
            }
        };
        let bos_token = token_str(&tc["bos_token"]).unwrap_or_default();
        let eos_token = token_str(&tc["eos_token"]).unwrap_or_default();
        let mut eos_ids = ids_of(&raw["eos_token_id"]);
        let gen = dir.join("generation_config.json");
        if gen.is_file() {
            for id in ids_of(&crate::hub::config::read_config_value(&gen)?["eos_token_id"]) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        if let Some(id) = self.token_to_id(&eos_token) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        self.pad_id = ids_of(&raw["pad_token_id"])
            .first()
            .copied()
            .or(eos_ids.first().copied())
            .unwrap_or(0);
        self.specials = Some(Specials {
            bos_id: ids_of(&raw["bos_token_id"]).first().copied(),
            eos_ids,
            bos_token,
            eos_token,
            chat_template,
        });
        Ok(())
    }
}

fn copy_atomic(src: &Path, dest: &Path) -> Result<()> {
    if same_file(src, dest) {
        return Ok(());
    }
    let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
    crate::fsutil::write_atomic(dest, &bytes)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fetched all-MiniLM-L6-v2 (skipped when absent, failing under CI).
    fn minilm_dir() -> Option<PathBuf> {
        crate::hub::assets::testing::real_asset("all-minilm-l6-v2")
    }

    #[test]
    fn real_minilm_tokenizer() {
        let Some(dir) = minilm_dir() else { return };
        let tok = TextTokenizer::from_file(dir.join(TOKENIZER_FILE), 8).unwrap();
        let (ids, types) = tok.encode("hello world", None).unwrap();
        assert_eq!(ids, vec![101, 7592, 2088, 102]); // no padding to 128
        assert_eq!(types, vec![0; 4]);
        assert_eq!(tok.pad_id(), 0);
        let (ids, _) = tok
            .encode("one two three four five six seven eight nine ten", None)
            .unwrap();
        assert_eq!(ids.len(), 8);
        assert_eq!((ids[0], ids[7]), (101, 102));
        let (ids, types) = tok.encode("hello", Some("world")).unwrap();
        assert_eq!(ids, vec![101, 7592, 102, 2088, 102]);
        assert_eq!(types, vec![0, 0, 0, 1, 1]);
        let batch = tok.encode_batch(&["hello world", "hello"], None).unwrap();
        assert_eq!(batch[0].0.len(), 4);
        assert_eq!(batch[1].0, vec![101, 7592, 102]);
        assert!(tok
            .encode_batch(&["a"], Some(&[Some("b"), Some("c")]))
            .is_err());
        // A row without a pair in a batch with pairs is encoded alone.
        let mixed = tok
            .encode_batch(&["hello world", "hello"], Some(&[None, Some("world")]))
            .unwrap();
        assert_eq!(mixed[0], batch[0]);

        // The vocab.txt route must tokenise exactly as tokenizer.json does.
        let wp = TextTokenizer::from_file(dir.join(VOCAB_FILE), 64).unwrap();
        let full = TextTokenizer::from_file(dir.join(TOKENIZER_FILE), 64).unwrap();
        for text in [
            "Hello, World!",
            "Café déjà vu — naïve résumé",
            "unaffable 東京 [SEP] x",
            "  spaces\tand\nlines  ",
        ] {
            assert_eq!(
                wp.encode(text, Some("second part")).unwrap(),
                full.encode(text, Some("second part")).unwrap(),
                "{text}"
            );
        }
        assert_eq!(wp.pad_id(), 0);

        // save copies the original bytes (padding config included) and the companions.
        let out = tempfile::tempdir().unwrap();
        tok.save(out.path()).unwrap();
        assert_eq!(
            std::fs::read(out.path().join(TOKENIZER_FILE)).unwrap(),
            std::fs::read(dir.join(TOKENIZER_FILE)).unwrap()
        );
        for f in COMPANION_FILES {
            assert!(out.path().join(f).is_file(), "{f}");
        }
        // A vocab-built tokenizer saves a tokenizer.json that loads and agrees.
        let out2 = tempfile::tempdir().unwrap();
        wp.save(out2.path()).unwrap();
        let back = TextTokenizer::from_dir(out2.path(), 64).unwrap();
        assert_eq!(
            back.encode("Hello, World!", None).unwrap(),
            full.encode("Hello, World!", None).unwrap()
        );
    }

    #[test]
    fn wordpiece_from_vocab_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "Hello", ",",
            "!",
        ];
        std::fs::write(dir.path().join(VOCAB_FILE), vocab.join("\n")).unwrap();
        // No tokenizer.json: from_dir falls back to vocab.txt; lowercase by default.
        let tok = TextTokenizer::from_dir(dir.path(), 16).unwrap();
        assert_eq!(
            tok.encode("Hello worlds!", None).unwrap().0,
            vec![2, 5, 6, 7, 10, 3]
        );
        assert_eq!(tok.encode("zebra", None).unwrap().0, vec![2, 1, 3]);
        assert_eq!(tok.pad_id(), 0);
        // do_lower_case = false keeps case.
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"do_lower_case": false, "unk_token": {"content": "[UNK]"}}"#,
        )
        .unwrap();
        let tok = TextTokenizer::from_dir(dir.path(), 16).unwrap();
        assert_eq!(tok.encode("Hello", None).unwrap().0, vec![2, 8, 3]);
        // Truncation counts the special tokens.
        let tok = TextTokenizer::from_dir(dir.path(), 3).unwrap();
        assert_eq!(tok.encode("hello world", None).unwrap().0, vec![2, 5, 3]);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = TextTokenizer::from_dir(dir.path(), 8)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("vocab.txt"),
            "{err}"
        );
        std::fs::write(dir.path().join(TOKENIZER_FILE), "{not json").unwrap();
        let err = TextTokenizer::from_dir(dir.path(), 8)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("cannot load"),
            "{err}"
        );
        std::fs::write(dir.path().join(VOCAB_FILE), "a\nb\n").unwrap();
        let err = TextTokenizer::from_file(dir.path().join(VOCAB_FILE), 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("vocab.txt") && err.contains("[CLS]"), "{err}");
    }
}
