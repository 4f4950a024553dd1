//! Instruction SFT of a decoder LM (`task.type = "sft"`): chat rows rendered
//! with the model's own template, loss on the assistant turns only (spans from
//! template rendering, `data::sft`), optional packing; the whole model or an
//! adapter trains. Validation: loss and perplexity. Test: the same, plus
//! exact match of greedy answers on held-out rows and on whole held-out
//! tasks, before and after training.
//!
//! The saved `model/` is an HF folder (config.json, model.safetensors with
//! the adapter merged, tokenizer.json, tokenizer_config.json with the chat
//! template) that `afinar generate` and transformers load; an adapter run also
//! writes `adapter/` as PEFT does (task_type CAUSAL_LM).

use super::run::{write_dir_atomic, write_safetensors, RunWriter};
use super::{run_loop, Event, Objective, Split, TrainOptions, TrainReport};
use crate::config::Plan;
use crate::data::sft::{
    pack, pad_batch, read_sft, Overflow, Role, SftBatch, SftEncoder, SftExample, SftFormat,
    SftTokens,
};
use crate::data::{seeded_split, FieldPath};
use crate::generate::GenerateConfig;
use crate::hub::chat_template::ChatTemplate;
use crate::models::decoder::{
    load_lm_with, Decoder, DecoderConfig, DecoderInputs, LmSource, LoadOpts,
};
use crate::nn::DropoutRng;
use crate::params::{ParamStore, Selector};
use crate::{fsutil, Error, Result};
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the decoder comes from: an asset (a folder or a .gguf file), a
/// local folder or file, or a hub download (its progress to `on`).
pub fn resolve_model_path(plan: &Plan, on: &mut dyn FnMut(Event)) -> Result<PathBuf> {
    let m = &plan.config.model;
    if let Some(p) = &m.path {
        if !p.exists() {
            return Err(Error::file(
                p,
                "model path does not exist (config `model.path`)",
            ));
        }
        return Ok(p.clone());
    }
    super::resolve_model_dir(plan, on)
}

/// A data spec: a file, a folder (every `.jsonl` in it, sorted), or
/// `asset:NAME[/sub/path]`.
pub fn resolve_data_files(spec: &str) -> Result<Vec<PathBuf>> {
    let p = match spec.strip_prefix("asset:") {
        Some(rest) => {
            let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
            let root = crate::hub::assets::resolve_asset_path(name)?;
            if sub.is_empty() {
                root
            } else {
                root.join(sub)
            }
        }
        None => PathBuf::from(spec),
    };
    if p.is_file() {
        return Ok(vec![p]);
    }
    if !p.is_dir() {
        return Err(Error::file(&p, "data file or folder does not exist"));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&p)
        .map_err(|e| Error::io(&p, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::file(&p, "no .jsonl files in the data folder"));
    }
    Ok(files)
}

fn sft_format(plan: &Plan) -> Result<SftFormat> {
    let d = &plan.config.data;
    let fp = |key: &str, v: &str| {
        FieldPath::parse(v).map_err(|e| Error::Config {
            path: plan.config_path.clone(),
            msg: format!("`data.{key}`: {e}"),
        })
    };
    Ok(match (&d.messages, &d.response, &d.prompt, &d.completion) {
        (Some(m), Some(r), _, _) => SftFormat::OpenAiEvals {
            input: fp("messages", m)?,
            ideal: fp("response", r)?,
        },
        (Some(m), None, _, _) => SftFormat::Messages {
            messages: fp("messages", m)?,
        },
        (None, _, Some(p), Some(c)) => SftFormat::PromptCompletion {
            prompt: fp("prompt", p)?,
            completion: fp("completion", c)?,
        },
        _ => unreachable!("validated in Plan"),
    })
}

/// One example kept for scoring by generation: the prompt turns and the
/// expected answer.
#[derive(Clone)]
struct Scored {
    prompt: SftExample,
    answer: String,
}

fn scored(ex: &SftExample) -> Option<Scored> {
    match ex {
        SftExample::Chat(m) => {
            let last = m.last()?;
            (last.role == Role::Assistant).then(|| Scored {
                prompt: SftExample::Chat(m[..m.len() - 1].to_vec()),
                answer: last.content.trim().to_string(),
            })
        }
        SftExample::PromptCompletion { prompt, completion } => Some(Scored {
            prompt: SftExample::PromptCompletion {
                prompt: prompt.clone(),
                completion: String::new(),
            },
            answer: completion.trim().to_string(),
        }),
    }
}

/// Rows of one held-out set: token ids (for loss) and rows to generate for.
struct EvalSet {
    name: String,
    tokens: Vec<SftTokens>,
    scored: Vec<Scored>,
}

struct Sft<'a> {
    model: &'a Decoder,
    src: &'a LmSource,
    template: Option<&'a ChatTemplate>,
    packed: Option<Vec<crate::data::sft::PackedRow>>,
    train_rows: &'a [SftTokens],
    validation: &'a EvalSet,
    tests: &'a [EvalSet],
    eval_bs: usize,
    max_new_tokens: usize,
    /// Prompt tuning: the soft prompt `[P, C]`.
    prompt: Option<crate::nn::Weight>,
    saver: Saver<'a>,
}

impl Sft<'_> {
    fn batch_inputs(b: &SftBatch) -> Result<DecoderInputs> {
        let mask: Vec<f32> = b.attention_mask.iter().map(|&m| m as f32).collect();
        DecoderInputs::packed(
            b.ids.clone(),
            mask,
            b.positions.clone(),
            b.segments.clone(),
            b.batch,
            b.seq_len,
        )
    }

    /// Token-weighted mean loss over a set, and the token count.
    fn loss_on(&self, rows: &[SftTokens]) -> Result<(f64, usize)> {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].len());
        let (mut sum, mut n) = (0f64, 0usize);
        for chunk in order.chunks(self.eval_bs.max(1)) {
            let refs: Vec<&SftTokens> = chunk.iter().map(|&i| &rows[i]).collect();
            let b = pad_batch(&refs, self.src.pad_id)?;
            let inp = Self::batch_inputs(&b)?;
            let hidden = self
                .model
                .forward_prompted(self.prompt.as_ref(), &inp, None)?;
            let (loss, k) = self.model.lm_loss(&hidden, &b.labels)?;
            sum += loss.to_vec0::<f32>()? as f64 * k as f64;
            n += k;
        }
        Ok((if n > 0 { sum / n as f64 } else { f64::NAN }, n))
    }

    /// Greedy answers to the scored rows; the share that equals the answer
    /// exactly (after trimming whitespace).
    fn exact_match(&self, rows: &[Scored]) -> Result<f64> {
        let prefix = self.prompt.as_ref().map(|p| p.t.detach());
        exact_match(
            self.model,
            prefix.as_ref(),
            self.src,
            self.template,
            rows,
            self.max_new_tokens,
        )
    }
}

fn exact_match(
    model: &Decoder,
    prefix: Option<&candle_core::Tensor>,
    src: &LmSource,
    template: Option<&ChatTemplate>,
    rows: &[Scored],
    max_new_tokens: usize,
) -> Result<f64> {
    if rows.is_empty() {
        return Ok(f64::NAN);
    }
    let cfg = GenerateConfig {
        max_new_tokens,
        eos_ids: src.eos_ids.clone(),
        ..Default::default()
    };
    let tok = &src.tokenizer;
    let decode = |ids: &[u32]| -> Result<String> {
        tok.decode(ids, true)
            .map_err(|e| Error::msg(format!("decoding: {e}")))
    };
    let mut hits = 0usize;
    for r in rows {
        let text = match &r.prompt {
            SftExample::Chat(m) => template
                .ok_or_else(|| Error::msg("chat rows need a chat template"))?
                .render(m, true)?,
            SftExample::PromptCompletion { prompt, .. } => prompt.clone(),
        };
        let ids = tok
            .encode(text, false)
            .map_err(|e| Error::msg(format!("tokenizing: {e}")))?
            .get_ids()
            .to_vec();
        let g = crate::generate::generate_with_prefix(
            model,
            prefix,
            &ids,
            src.cfg.max_positions(),
            &cfg,
            &decode,
            &mut |_| {},
        )?;
        if g.text.trim() == r.answer {
            hits += 1;
        }
    }
    Ok(hits as f64 / rows.len() as f64)
}

impl Objective for Sft<'_> {
    fn train_len(&self) -> usize {
        match &self.packed {
            Some(p) => p.len(),
            None => self.train_rows.len(),
        }
    }
    fn loss(&self, idx: &[usize], drop: &DropoutRng) -> Result<(candle_core::Tensor, usize)> {
        let b = match &self.packed {
            Some(p) => SftBatch::from_packed(&idx.iter().map(|&i| &p[i]).collect::<Vec<_>>())?,
            None => pad_batch(
                &idx.iter().map(|&i| &self.train_rows[i]).collect::<Vec<_>>(),
                self.src.pad_id,
            )?,
        };
        let tokens = b.attention_mask.iter().filter(|&&m| m != 0).count();
        let inp = Self::batch_inputs(&b)?;
        let hidden = self
            .model
            .forward_prompted(self.prompt.as_ref(), &inp, Some(drop))?;
        let (loss, _) = self.model.lm_loss(&hidden, &b.labels)?;
        Ok((loss, tokens))
    }
    fn evaluate(&self, split: Split) -> Result<Option<BTreeMap<String, f64>>> {
        let mut m = BTreeMap::new();
        match split {
            Split::Validation => {
                let (loss, _) = self.loss_on(&self.validation.tokens)?;
                m.insert("loss".into(), loss);
                m.insert("perplexity".into(), loss.exp());
            }
            Split::Test => {
                for set in self.tests {
                    let (loss, _) = self.loss_on(&set.tokens)?;
                    let p = if set.name == "test" {
                        String::new()
                    } else {
                        format!("{}_", set.name)
                    };
                    if set.name == "test" {
                        m.insert("loss".into(), loss);
                    } else {
                        m.insert(format!("{p}loss"), loss);
                    }
                    m.insert(format!("{p}perplexity"), loss.exp());
                    if !set.scored.is_empty() {
                        m.insert(format!("{p}exact_match"), self.exact_match(&set.scored)?);
                    }
                }
            }
        }
        Ok(Some(m))
    }
    fn save(&self, store: &ParamStore, name: &str) -> Result<()> {
        self.saver.save(store, name)
    }
    fn data_fingerprint(&self) -> String {
        let mut f = super::Fingerprint::new();
        match &self.packed {
            Some(p) => {
                for r in p {
                    f.u32s(&r.ids);
                    f.i64s(&r.labels);
                    f.u32s(&r.positions);
                    f.u32s(&r.segments);
                }
            }
            None => {
                for r in self.train_rows {
                    f.u32s(&r.ids);
                    f.i64s(&r.labels);
                }
            }
        }
        f.finish()
    }
    fn describe_rows(&self, idx: &[usize]) -> String {
        let examples: Vec<usize> = match &self.packed {
            Some(p) => idx
                .iter()
                .flat_map(|&i| p[i].examples.iter().copied())
                .collect(),
            None => idx.to_vec(),
        };
        let mut lines: Vec<usize> = examples.iter().map(|&e| self.train_rows[e].line).collect();
        lines.sort_unstable();
        let lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        let packed = match &self.packed {
            Some(_) => format!("packed rows {idx:?}, "),
            None => String::new(),
        };
        format!(
            "{packed}training examples from data lines {}",
            lines.join(", ")
        )
    }
}

/// Writes an SFT run's models.
struct Saver<'a> {
    dir: PathBuf,
    src: &'a LmSource,
    adapter: Option<&'a crate::adapters::AdapterConfig>,
}

impl Saver<'_> {
    fn save(&self, store: &ParamStore, name: &str) -> Result<()> {
        let prompt_tuning = self
            .adapter
            .is_some_and(|a| a.kind == crate::adapters::AdapterType::PromptTuning);
        if prompt_tuning {
            // The soft prompt does not merge into the weights: the run's
            // result is the adapter alone (`<run>/adapter`).
            let dir = if name == "model" {
                self.dir.join("adapter")
            } else {
                self.dir.join(name).join("adapter")
            };
            let ad = self.adapter.expect("prompt tuning is an adapter");
            let base = std::fs::canonicalize(&self.src.path).unwrap_or(self.src.path.clone());
            return write_dir_atomic(&dir, |tmp| {
                crate::adapters::peft::save(
                    tmp,
                    store,
                    ad,
                    &base.display().to_string(),
                    "CAUSAL_LM",
                )?;
                fsutil::write_json(
                    &tmp.join(LM_META),
                    &serde_json::json!({ "base_model_path": base, "task": "sft" }),
                )
            });
        }
        if let (Some(ad), "model") = (self.adapter, name) {
            let base = std::fs::canonicalize(&self.src.path).unwrap_or(self.src.path.clone());
            write_dir_atomic(&self.dir.join("adapter"), |tmp| {
                crate::adapters::peft::save(
                    tmp,
                    store,
                    ad,
                    &base.display().to_string(),
                    "CAUSAL_LM",
                )?;
                fsutil::write_json(
                    &tmp.join(LM_META),
                    &serde_json::json!({ "base_model_path": base, "task": "sft" }),
                )
            })?;
        }
        save_lm(&self.dir.join(name), store, self.src)
    }
}

/// afinar's note beside a decoder adapter: where its base is.
pub const LM_META: &str = "afinar_lm.json";

/// Save the model in `store` (adapters merged) as an HF folder that
/// transformers' `AutoModelForCausalLM` and `afinar generate` load.
pub fn save_lm(dir: &Path, store: &ParamStore, src: &LmSource) -> Result<()> {
    let tensors: BTreeMap<String, candle_core::Tensor> = if store.adapters.is_empty() {
        store.f32_state()?
    } else {
        crate::adapters::merged_state(store)?
    };
    let gpt2 = matches!(src.cfg, DecoderConfig::Gpt2(_));
    let tensors = tensors.into_iter().map(|(n, t)| {
        // GPT-2's Conv1D weights go back to [in, out].
        if gpt2 && crate::models::gpt2::is_conv1d(&n) {
            (n, t.t().and_then(|t| t.contiguous()).expect("2-D weight"))
        } else {
            (n, t)
        }
    });
    let mut config = src.raw_config.clone();
    if config.get("architectures").is_none() {
        config["architectures"] = serde_json::json!([match src.cfg {
            DecoderConfig::Llama(_) => "LlamaForCausalLM",
            DecoderConfig::Gpt2(_) => "GPT2LMHeadModel",
        }]);
    }
    config["torch_dtype"] = serde_json::json!("float32");
    let tok_config = serde_json::json!({
        "chat_template": src.chat_template,
        "bos_token": src.bos_token,
        "eos_token": src.eos_token,
        "pad_token": src.tokenizer.id_to_token(src.pad_id),
        "model_max_length": src.cfg.max_positions(),
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let gen_config = serde_json::json!({ "eos_token_id": src.eos_ids, "bos_token_id": src.bos_id });
    let tensors: Vec<(String, candle_core::Tensor)> = tensors.collect();
    write_dir_atomic(dir, |tmp| {
        write_safetensors(&tmp.join("model.safetensors"), tensors.into_iter())?;
        fsutil::write_json(&tmp.join("config.json"), &config)?;
        fsutil::write_json(&tmp.join("tokenizer_config.json"), &tok_config)?;
        fsutil::write_json(&tmp.join("generation_config.json"), &gen_config)?;
        src.tokenizer
            .save(tmp.join("tokenizer.json"), false)
            .map_err(|e| Error::file(tmp.join("tokenizer.json"), e.to_string()))
    })
}

/// Read the rows of `files`, at most `cap` per file (a seeded choice).
fn read_rows(
    files: &[PathBuf],
    format: &SftFormat,
    cap: Option<usize>,
    seed: u64,
) -> Result<Vec<(String, Vec<SftExample>)>> {
    let mut out = Vec::new();
    for f in files {
        let rows = read_sft(f, format, Some(crate::data::Format::Jsonl))?;
        let mut ex: Vec<SftExample> = rows.rows.into_iter().map(|r| r.example).collect();
        if let Some(cap) = cap.filter(|&c| c < ex.len()) {
            let s = seeded_split(ex.len(), [1.0, 0.0, 0.0], seed)?;
            ex = s.train.iter().take(cap).map(|&i| ex[i].clone()).collect();
        }
        let task = f
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        out.push((task, ex));
    }
    Ok(out)
}

pub fn train_sft(
    plan: &Plan,
    opts: &TrainOptions,
    on: &mut dyn FnMut(Event),
) -> Result<TrainReport> {
    let t0 = Instant::now();
    let c = &plan.config;
    let d = &c.data;
    let model_path = resolve_model_path(plan, on)?;
    let selector = if c.adapter.is_some() {
        Selector::none()
    } else {
        Selector::all()
    };
    let load_opts = LoadOpts {
        quantized: c.model.base_dtype == crate::config::BaseDtype::Quantized,
    };
    let mut src = load_lm_with(&model_path, selector, load_opts)?;
    src.cfg.set_dropout(
        c.model.hidden_dropout_prob,
        c.model.attention_probs_dropout_prob,
    );
    let max_len = c.model.max_length.min(src.cfg.max_positions());
    let template = src
        .chat_template
        .as_deref()
        .map(|t| ChatTemplate::new(t, &src.bos_token, &src.eos_token))
        .transpose()?;
    let format = sft_format(plan)?;
    let overflow = match d.overflow.as_deref() {
        Some("skip") => Overflow::Skip,
        Some("error") => Overflow::Error,
        _ => Overflow::Truncate,
    };
    let enc = SftEncoder {
        tokenizer: &src.tokenizer,
        template: template.as_ref(),
        eos_id: src.eos_ids.first().copied(),
        max_length: max_len,
        overflow,
    };

    // ---- data: every training file's rows, split by row (seeded)
    let files = resolve_data_files(&d.train)?;
    let tasks = read_rows(&files, &format, d.max_rows_per_file, d.split_seed)?;
    let all: Vec<SftExample> = tasks.iter().flat_map(|(_, e)| e.iter().cloned()).collect();
    let ratios = d.split.unwrap_or([1.0, 0.0, 0.0]);
    let sp = seeded_split(all.len(), ratios, d.split_seed)?;
    let encode = |idx: &[usize], what: &str, on: &mut dyn FnMut(Event)| -> Result<Vec<SftTokens>> {
        let rows = crate::data::sft::SftRows {
            path: PathBuf::from(&d.train),
            rows: idx
                .iter()
                .map(|&i| crate::data::sft::SftRow {
                    line: i + 1,
                    example: all[i].clone(),
                })
                .collect(),
        };
        let (t, stats) = enc.encode_rows(&rows)?;
        on(Event::Info(format!("data ({what}): {stats}")));
        Ok(t)
    };
    let train_rows = encode(&sp.train, "train", on)?;
    if train_rows.is_empty() {
        return Err(Error::Data(format!("{}: no training rows", d.train)));
    }
    // A validation or test file stands for that part of the split (whose
    // ratio config validation keeps at 0).
    let read_file = |spec: &str,
                     what: &str,
                     on: &mut dyn FnMut(Event)|
     -> Result<(Vec<SftTokens>, Vec<SftExample>)> {
        let rows = read_rows(&resolve_data_files(spec)?, &format, None, d.split_seed)?;
        let ex: Vec<SftExample> = rows.into_iter().flat_map(|(_, e)| e).collect();
        let (t, stats) = enc.encode_rows(&crate::data::sft::SftRows {
            path: PathBuf::from(spec),
            rows: ex
                .iter()
                .enumerate()
                .map(|(i, example)| crate::data::sft::SftRow {
                    line: i + 1,
                    example: example.clone(),
                })
                .collect(),
        })?;
        on(Event::Info(format!("data ({what}, {spec}): {stats}")));
        Ok((t, ex))
    };
    let val_tokens = match &d.validation {
        Some(v) => read_file(v, "validation", on)?.0,
        None => encode(&sp.validation, "validation", on)?,
    };
    if val_tokens.is_empty() {
        return Err(Error::Data("the validation split is empty".into()));
    }
    let n_gen = d.generate_eval_rows.unwrap_or(50);
    let test = match &d.test {
        Some(t) => {
            let (tokens, ex) = read_file(t, "test", on)?;
            EvalSet {
                name: "test".into(),
                tokens,
                scored: ex.iter().filter_map(scored).take(n_gen).collect(),
            }
        }
        None => EvalSet {
            name: "test".into(),
            tokens: encode(&sp.test, "test", on)?,
            scored: sp
                .test
                .iter()
                .filter_map(|&i| scored(&all[i]))
                .take(n_gen)
                .collect(),
        },
    };
    let mut tests = vec![test];
    if let Some(h) = &d.heldout_tasks {
        for (task, ex) in read_rows(
            &resolve_data_files(h)?,
            &format,
            d.max_rows_per_file,
            d.split_seed,
        )? {
            let (tokens, stats) = enc.encode_rows(&crate::data::sft::SftRows {
                path: PathBuf::from(h),
                rows: ex
                    .iter()
                    .enumerate()
                    .map(|(i, e)| crate::data::sft::SftRow {
                        line: i + 1,
                        example: e.clone(),
                    })
                    .collect(),
            })?;
            on(Event::Info(format!("data (held-out task {task}): {stats}")));
            tests.push(EvalSet {
                name: format!("heldout_{task}"),
                tokens,
                scored: ex.iter().filter_map(scored).take(n_gen).collect(),
            });
        }
    }
    let val = EvalSet {
        name: "validation".into(),
        tokens: val_tokens,
        scored: vec![],
    };

    // ---- model
    let mut store = std::mem::replace(&mut src.store, ParamStore::new(Selector::none(), ""));
    let mut adapter_cfg = c.adapter.clone();
    if let (Some(ad), DecoderConfig::Gpt2(_)) = (adapter_cfg.as_mut(), &src.cfg) {
        ad.fan_in_fan_out = true; // PEFT's marker for GPT-2's Conv1D layers
    }
    let mut prompt_dim = None;
    if let Some(ad) = adapter_cfg
        .as_mut()
        .filter(|a| a.kind == crate::adapters::AdapterType::PromptTuning)
    {
        store.freeze_all();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c.seeds.init);
        let embed = store
            .iter()
            .find(|(n, _)| n.ends_with("embed_tokens.weight") || n.ends_with("wte.weight"))
            .map(|(_, p)| p.tensor.clone())
            .ok_or_else(|| Error::msg("prompt tuning: the model has no token embedding"))?;
        let init = crate::adapters::prompt_tuning::init(ad, &embed, &src.tokenizer, &mut rng)?;
        let (n, dim) = init.dims2()?;
        ad.token_dim = Some(dim);
        ad.num_layers = Some(
            src.raw_config["num_hidden_layers"]
                .as_u64()
                .or(src.raw_config["n_layer"].as_u64())
                .unwrap_or(0) as usize,
        );
        ad.num_attention_heads = Some(
            src.raw_config["num_attention_heads"]
                .as_u64()
                .or(src.raw_config["n_head"].as_u64())
                .unwrap_or(0) as usize,
        );
        store.insert_trainable(crate::adapters::prompt_tuning::KEY, init)?;
        prompt_dim = Some([n, dim]);
    } else if let Some(ad) = &c.adapter {
        store.freeze_all();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c.seeds.init);
        let linears = crate::adapters::linear_modules(&store);
        for (path, _, _) in &linears {
            if ad
                .modules_to_save
                .iter()
                .any(|m| crate::adapters::matches_key(path, m))
            {
                store.make_trainable(&format!("{path}.weight"))?;
                store.make_trainable(&format!("{path}.bias"))?;
            }
        }
        ad.apply(&mut store, &linears, &["lm_head"], &mut rng)?;
    }
    let device = crate::device(&c.train.device)?;
    if !device.is_cpu() {
        let dt = match c.model.base_dtype {
            crate::config::BaseDtype::Bf16 => candle_core::DType::BF16,
            _ => candle_core::DType::F32,
        };
        store.to_device(&device, dt)?;
        on(Event::Info(format!(
            "device: {} (frozen weights {dt:?}, trainable f32)",
            c.train.device
        )));
    }
    let mut model = Decoder::load(&store, &src.cfg)?;
    model.set_gradient_checkpointing(c.train.gradient_checkpointing);
    let prompt = prompt_dim
        .map(|shape| store.get(crate::adapters::prompt_tuning::KEY, &shape))
        .transpose()?;
    crate::models::check_unused(&mut store, &mut |w| {
        on(Event::Info(format!("warning: {w}")))
    })?;
    on(Event::Info(store.summary()));
    if let Some(ad) = &c.adapter {
        on(Event::Info(
            if ad.kind == crate::adapters::AdapterType::PromptTuning {
                format!(
                    "adapter: prompt tuning, {} virtual tokens",
                    ad.num_virtual_tokens
                )
            } else {
                format!("adapter: {:?} on {} modules", ad.kind, store.adapters.len())
            },
        ));
    }

    let run = RunWriter::create_log(&opts.run_dir, plan, opts.resume)?;
    let packed = if d.packing {
        let p = pack(&train_rows, max_len, src.pad_id)?;
        on(Event::Info(format!(
            "packing: {} examples into {} rows of {max_len} tokens",
            train_rows.len(),
            p.len()
        )));
        Some(p)
    } else {
        None
    };
    let max_new_tokens = 48;
    let obj = Sft {
        model: &model,
        src: &src,
        template: template.as_ref(),
        packed,
        train_rows: &train_rows,
        validation: &val,
        tests: &tests,
        eval_bs: c.train.eval_batch_size.unwrap_or(c.train.batch_size * 2),
        max_new_tokens,
        prompt,
        saver: Saver {
            dir: opts.run_dir.clone(),
            src: &src,
            adapter: adapter_cfg.as_ref(),
        },
    };
    // Before training: the same test metrics (loss, perplexity, exact match
    // of greedy answers) of the model as loaded (a resumed run has them).
    if n_gen > 0 && !opts.resume {
        if let Some(m) = obj.evaluate(Split::Test)? {
            run.log_eval(0, "test_before", &m)?;
            on(Event::Eval {
                step: 0,
                split: "test_before".into(),
                metrics: m,
                best: false,
            });
        }
    }
    run_loop(plan, opts, &store, &obj, &run, t0, on)
}
