//! `afinar generate` and `afinar chat`: text from a decoder LM (an asset
//! name, an HF folder, a `.gguf` file, or a run folder).

use afinar::data::sft::{Message, Role};
use afinar::generate::{GenerateConfig, StopReason};
use afinar::heads::CausalLm;
use afinar::hub::chat_template::ChatTemplate;
use afinar::models::load::load_lm_adapter;
use afinar::models::{load_model, LoadOpts, LoadedModel, SourceFormat};
use afinar::params::Selector;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, Write};
use std::path::PathBuf;

/// Sampling options shared by `generate` and `chat`.
#[derive(clap::Args, Debug, Clone)]
pub struct SampleArgs {
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop at this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SampleArgs {
    fn config(&self, eos_ids: &[u32]) -> GenerateConfig {
        GenerateConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop.clone(),
            eos_ids: eos_ids.to_vec(),
        }
    }
}

/// An asset name (`smollm2-135m-instruct`), a folder, or a `.gguf` file.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.exists() {
        return Ok(p);
    }
    afinar::hub::assets::resolve_asset_path(spec)
        .with_context(|| format!("`{spec}` is neither a file, a folder nor an asset name"))
}

pub struct Lm {
    pub src: LoadedModel,
    pub model: CausalLm,
    /// Prompt tuning: the soft prompt in front of every input.
    pub prefix: Option<afinar::candle_core::Tensor>,
}

/// `quantized`: keep a GGUF's linear weights in their own types (dequantised
/// per matmul) instead of f32.
pub fn load(spec: &str, quantized: bool) -> Result<Lm> {
    let path = resolve_model(spec)?;
    // A run folder with an adapter, or an adapter folder: base + adapter,
    // unmerged (a run's `model/` is the merged export).
    let ad = if path.join("adapter").join("adapter_config.json").is_file() {
        Some(path.join("adapter"))
    } else if path.join("adapter_config.json").is_file() {
        Some(path.clone())
    } else {
        None
    };
    if let Some(ad) = ad {
        let opts = LoadOpts {
            quantized,
            max_length: None,
        };
        let a = load_lm_adapter(&ad, None, opts)?;
        let model = CausalLm::build(&a.model.store, &a.model.cfg)?;
        eprintln!("adapter: {:?} from {}", a.adapter.kind(), ad.display());
        return Ok(Lm {
            src: a.model,
            model,
            prefix: a.prompt,
        });
    }
    if quantized && SourceFormat::detect(&path) != Some(SourceFormat::Gguf) {
        bail!(
            "--quantized needs a .gguf model; {} is not one",
            path.display()
        );
    }
    let opts = LoadOpts {
        quantized,
        max_length: None,
    };
    let src = load_model(&path, Selector::none(), opts)?;
    if !src.cfg.family().is_decoder() {
        bail!(
            "{}: `model_type` {:?} is not a supported decoder ({}, gpt2)",
            path.join("config.json").display(),
            src.raw_config["model_type"].as_str().unwrap_or("bert"),
            afinar::models::LLAMA_TYPES.join(", ")
        );
    }
    let model = CausalLm::build(&src.store, &src.cfg)?;
    Ok(Lm {
        src,
        model,
        prefix: None,
    })
}

impl Lm {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // Chat templates write their own special tokens; plain prompts get
        // none either (as transformers' pipelines for these models).
        Ok(self.src.tokenizer.encode_raw(text, false)?)
    }

    fn template(&self) -> Result<ChatTemplate> {
        let sp = self.src.tokenizer.specials.clone().unwrap_or_default();
        let src = sp.chat_template.as_deref().with_context(|| {
            format!(
                "{}: the tokenizer has no chat template (needed for chat); use `afinar generate` without --chat",
                self.src.path.display()
            )
        })?;
        Ok(ChatTemplate::new(src, &sp.bos_token, &sp.eos_token)?)
    }

    fn run(
        &self,
        prompt_ids: &[u32],
        args: &SampleArgs,
        out: &mut dyn FnMut(&str),
    ) -> Result<afinar::generate::Generated> {
        let tok = &self.src.tokenizer;
        let decode = |ids: &[u32]| tok.decode(ids, true);
        Ok(afinar::generate::generate(
            &self.model,
            self.prefix.as_ref(),
            prompt_ids,
            self.src.cfg.max_positions(),
            &args.config(tok.eos_ids()),
            &decode,
            out,
        )?)
    }
}

pub fn cmd_generate(
    model: &str,
    prompt: &str,
    chat: bool,
    quantized: bool,
    args: &SampleArgs,
) -> Result<i32> {
    afinar::init_threads(None);
    let lm = load(model, quantized)?;
    let text = if chat {
        lm.template()?
            .render(&[Message::new(Role::User, prompt)], true)?
    } else {
        prompt.to_string()
    };
    let ids = lm.encode(&text)?;
    let mut stdout = std::io::stdout();
    let g = lm.run(&ids, args, &mut |piece| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    println!();
    eprintln!(
        "[{} tokens, stopped: {}]",
        g.ids.len(),
        match g.stop {
            StopReason::Eos => "end of sequence",
            StopReason::StopString => "stop string",
            StopReason::MaxTokens => "max_new_tokens",
            StopReason::ContextFull => "context full",
        }
    );
    Ok(0)
}

/// Interactive chat: each line is a user turn; the template is applied to the
/// whole conversation. `/reset` starts over, an empty line or EOF quits.
pub fn cmd_chat(
    model: &str,
    system: Option<&str>,
    quantized: bool,
    args: &SampleArgs,
) -> Result<i32> {
    afinar::init_threads(None);
    let lm = load(model, quantized)?;
    let tmpl = lm.template()?;
    let mut messages: Vec<Message> = system
        .map(|s| vec![Message::new(Role::System, s)])
        .unwrap_or_default();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        print!("> ");
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        let line = line.trim_end().to_string();
        if line == "/reset" {
            messages.retain(|m| m.role == Role::System);
            continue;
        }
        messages.push(Message::new(Role::User, line));
        let ids = lm.encode(&tmpl.render(&messages, true)?)?;
        if ids.len() >= lm.src.cfg.max_positions() {
            bail!(
                "the conversation no longer fits the model's context ({} tokens)",
                ids.len()
            );
        }
        let g = lm.run(&ids, args, &mut |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        })?;
        println!();
        messages.push(Message::new(Role::Assistant, g.text));
    }
    Ok(0)
}
