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

use super::canonical;
use crate::adapters::{peft, AdapterConfig, AdapterType, PeftTask};
use crate::config::Plan;
use crate::data::sft::{
    pack, pad_batch, read_sft, Role, SftBatch, SftEncoder, SftExample, SftFormat, SftTokens,
};
use crate::data::{seeded_split, FieldPath};
use crate::event::Event;
use crate::export;
use crate::generate::GenerateConfig;
use crate::heads::CausalLm;
use crate::hub::chat_template::ChatTemplate;
use crate::hub::tokenizer::TextTokenizer;
use crate::models::{self, Family, Inputs, LoadOpts, LoadedModel};
use crate::nn::DropoutRng;
use crate::params::{ParamStore, Selector};
use crate::train::{run_loop, Fingerprint, Objective, RunWriter, Split, TrainOptions, TrainReport};
use crate::{Error, Result};
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub(crate) fn sft_format(plan: &Plan) -> Result<SftFormat> {
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
pub(crate) struct Scored {
    pub prompt: SftExample,
    pub answer: String,
}

pub(crate) fn scored(ex: &SftExample) -> Option<Scored> {
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
    model: &'a CausalLm,
    tok: &'a TextTokenizer,
    max_positions: usize,
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
    /// Token-weighted mean loss over a set, and the token count.
    fn loss_on(&self, rows: &[SftTokens]) -> Result<(f64, usize)> {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].len());
        let (mut sum, mut n) = (0f64, 0usize);
        for chunk in order.chunks(self.eval_bs.max(1)) {
            let refs: Vec<&SftTokens> = chunk.iter().map(|&i| &rows[i]).collect();
            let b = pad_batch(&refs, self.tok.pad_id())?;
            let inp = Inputs::from_sft_batch(&b)?;
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
            self.tok,
            self.max_positions,
            self.template,
            rows,
            self.max_new_tokens,
        )
    }
}

pub(crate) fn exact_match(
    model: &CausalLm,
    prefix: Option<&candle_core::Tensor>,
    tok: &TextTokenizer,
    max_positions: usize,
    template: Option<&ChatTemplate>,
    rows: &[Scored],
    max_new_tokens: usize,
) -> Result<f64> {
    if rows.is_empty() {
        return Ok(f64::NAN);
    }
    let cfg = GenerateConfig {
        max_new_tokens,
        eos_ids: tok.eos_ids().to_vec(),
        ..Default::default()
    };
    let decode = |ids: &[u32]| tok.decode(ids, true);
    let mut hits = 0usize;
    for r in rows {
        let text = match &r.prompt {
            SftExample::Chat(m) => template
                .ok_or_else(|| Error::msg("chat rows need a chat template"))?
                .render(m, true)?,
            SftExample::PromptCompletion { prompt, .. } => prompt.clone(),
        };
        let ids = tok.encode_raw(&text, false)?;
        let g = crate::generate::generate(
            model,
            prefix,
            &ids,
            max_positions,
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
                self.tok.pad_id(),
            )?,
        };
        let tokens = b.attention_mask.iter().filter(|&&m| m != 0).count();
        let inp = Inputs::from_sft_batch(&b)?;
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
    fn save(&self, store: &ParamStore) -> Result<()> {
        self.saver.save(store)
    }
    fn data_fingerprint(&self) -> String {
        let mut f = Fingerprint::new();
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

/// Writes an SFT (or DPO) run's models.
pub(crate) struct Saver<'a> {
    pub dir: PathBuf,
    /// The base model (folder or GGUF file), recorded beside an adapter.
    pub base: PathBuf,
    pub family: Family,
    pub base_config: &'a serde_json::Value,
    pub tok: &'a TextTokenizer,
    pub adapter: Option<&'a AdapterConfig>,
    /// The task recorded in the adapter's note ("sft", "dpo").
    pub task: &'static str,
}

impl Saver<'_> {
    /// `<run>/model/` (adapters merged in) and for an adapter run
    /// `<run>/adapter/`; prompt tuning writes the adapter alone (a soft
    /// prompt does not merge into the weights).
    pub fn save(&self, store: &ParamStore) -> Result<()> {
        if let Some(ad) = self.adapter {
            let note = serde_json::json!({ "base_model_path": self.base, "task": self.task });
            export::write_adapter_folder(
                &self.dir.join("adapter"),
                store,
                ad,
                &self.base,
                PeftTask::CausalLm,
                peft::LM_META,
                &note,
            )?;
            if ad.kind() == AdapterType::PromptTuning {
                return Ok(());
            }
        }
        save_lm(
            &self.dir.join("model"),
            store,
            self.family,
            self.base_config,
            self.tok,
        )
    }
}

/// Save the model in `store` (adapters merged) as an HF folder that
/// transformers' `AutoModelForCausalLM` and `afinar generate` load.
pub fn save_lm(
    dir: &Path,
    store: &ParamStore,
    family: Family,
    base_config: &serde_json::Value,
    tok: &TextTokenizer,
) -> Result<()> {
    export::write_model_folder(
        dir,
        export::model_tensors(store)?,
        &export::causal_lm_config(base_config, family),
        family,
        tok,
    )
}

/// The rows of each held-out task (`data.heldout_tasks`: one file a task,
/// capped by `data.max_rows_per_file`), by task name; none without it.
pub(crate) fn heldout_rows(
    plan: &Plan,
    format: &SftFormat,
) -> Result<Vec<(String, Vec<SftExample>)>> {
    let d = &plan.config.data;
    match &d.heldout_tasks {
        Some(h) => read_rows(
            &crate::data::resolve_files(h)?,
            format,
            d.max_rows_per_file,
            d.split_seed,
        ),
        None => Ok(vec![]),
    }
}

/// Read the rows of `files`, at most `cap` per file (a seeded choice).
pub(crate) fn read_rows(
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

/// Train a decoder LM on instructions as `plan` says.
pub fn train(plan: &Plan, opts: &TrainOptions, on: &mut dyn FnMut(Event)) -> Result<TrainReport> {
    let t0 = Instant::now();
    let c = &plan.config;
    let d = &c.data;
    let model_path = c.model.source().resolve(on)?;
    let selector = if c.adapter.is_some() {
        Selector::none()
    } else {
        Selector::all()
    };
    let load_opts = LoadOpts {
        quantized: c.model.base_dtype == crate::config::BaseDtype::Quantized,
        max_length: None,
    };
    let LoadedModel {
        mut cfg,
        raw_config,
        mut store,
        tokenizer: tok,
        ..
    } = models::load_model(&model_path, selector, load_opts)?;
    let family = cfg.family();
    super::require_decoder(plan, family, &model_path, "sft")?;
    cfg.set_dropout(
        c.model.hidden_dropout_prob,
        c.model.attention_probs_dropout_prob,
    );
    let max_len = c.model.max_length.min(cfg.max_positions());
    let specials = tok.specials.clone().unwrap_or_default();
    let template = specials
        .chat_template
        .as_deref()
        .map(|t| ChatTemplate::new(t, &specials.bos_token, &specials.eos_token))
        .transpose()?;
    let format = sft_format(plan)?;
    let enc = SftEncoder {
        tokenizer: tok.raw(),
        template: template.as_ref(),
        eos_id: specials.eos_ids.first().copied(),
        max_length: max_len,
        overflow: d.overflow.unwrap_or_default(),
    };

    // ---- data: every training file's rows, split by row (seeded)
    let files = crate::data::resolve_files(&d.train)?;
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
        let rows = read_rows(
            &crate::data::resolve_files(spec)?,
            &format,
            None,
            d.split_seed,
        )?;
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
        for (task, ex) in heldout_rows(plan, &format)? {
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

    // ---- model (+ adapter, or a soft prompt)
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c.seeds.init);
    let mut adapter_cfg =
        super::attach_adapter(plan, &mut store, family, PeftTask::CausalLm, &mut rng, on)?;
    let mut prompt_dim = None;
    if let Some(AdapterConfig::PromptTuning(pt)) = adapter_cfg.as_mut() {
        let embed = store
            .iter()
            .find(|(n, _)| n.ends_with("embed_tokens.weight") || n.ends_with("wte.weight"))
            .map(|(_, p)| p.tensor.clone())
            .ok_or_else(|| Error::msg("prompt tuning: the model has no token embedding"))?;
        let shape = crate::adapters::prompt_tuning::attach(
            &mut store,
            pt,
            &embed,
            tok.raw(),
            (cfg.num_layers(), cfg.num_heads()),
            &mut rng,
        )?;
        prompt_dim = Some(shape);
        on(Event::Info(format!(
            "adapter: prompt tuning, {} virtual tokens",
            pt.num_virtual_tokens
        )));
    }
    let device = crate::device(c.train.device)?;
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
    let mut model = CausalLm::build(&store, &cfg)?;
    model.set_gradient_checkpointing(c.train.gradient_checkpointing);
    let prompt = prompt_dim
        .map(|shape| store.get(crate::adapters::prompt_tuning::KEY, &shape))
        .transpose()?;
    models::check_unused(&mut store, models::other_heads(family, true), &mut |w| {
        on(Event::Warning(w))
    })?;
    on(Event::Info(store.summary()));

    let run = RunWriter::create(&opts.run_dir, plan, opts.resume)?;
    let packed = if d.packing {
        let p = pack(&train_rows, max_len, tok.pad_id())?;
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
        tok: &tok,
        max_positions: cfg.max_positions(),
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
            base: canonical(&model_path),
            family,
            base_config: &raw_config,
            tok: &tok,
            adapter: adapter_cfg.as_ref(),
            task: "sft",
        },
    };
    // Before training: the same test metrics of the model as loaded (a
    // resumed run has them).
    if n_gen > 0 && !opts.resume {
        crate::train::test_before(&obj, &run, on)?;
    }
    run_loop(plan, opts, &store, &obj, &run, t0, on)
}
