//! The `afinar` binary: argv, progress bars, exit codes. Everything else is
//! in the library.

mod lm;

use afinar::config::Plan;
use afinar::methods::classify;
use afinar::train::{self, Event, TrainOptions};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

// glibc's malloc returns large freed blocks to the OS and page-faults them
// back in on the next step; mimalloc keeps them (a tenth of a step here).
// Guarded: a chat template's render holds at most 256 MiB (afinar::mem_guard).
#[global_allocator]
static GLOBAL: afinar::mem_guard::Guarded<mimalloc::MiMalloc> =
    afinar::mem_guard::Guarded(mimalloc::MiMalloc);

#[derive(Parser)]
#[command(
    name = "afinar",
    version,
    about = "Fine-tune pretrained models: full, partly frozen, new heads"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch the pinned real assets (model + data) into the cache, sha256-checked.
    Fetch {
        /// Asset name, or `all`.
        #[arg(default_value = "all")]
        name: String,
    },
    /// Train as a run config says, or continue a stopped run (`--resume RUN`).
    Train {
        #[arg(required_unless_present = "resume")]
        config: Option<PathBuf>,
        /// Override a config key: `--set train.lr=3e-5` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Run folder (default: runs/<config name>-<UTC time>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in this folder from its latest checkpoint, with
        /// the config saved there (the same losses as a run never stopped).
        #[arg(long, value_name = "RUN", conflicts_with_all = ["config", "set", "out"])]
        resume: Option<PathBuf>,
    },
    /// Evaluate a run (its test split) or a model folder on a data file.
    Eval {
        run: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
        /// A data file read with the run's field paths, or for a model folder
        /// the fields `text` and `label` (default: the run's test split).
        /// Image models: a folder of class folders, or an IDX image file.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Image models: the IDX label file of an IDX `--data` file.
        #[arg(long, requires = "data")]
        data_labels: Option<PathBuf>,
    },
    /// Build preference pairs (JSONL rows of `prompt`, `chosen`, `rejected`,
    /// TRL's format) for reward models and DPO (docs/preference-data.md).
    Pairs {
        #[command(subcommand)]
        cmd: PairsCmd,
    },
    /// Weak supervision: labelling rules and their analysis
    /// (docs/weak-supervision.md).
    Weak {
        #[command(subcommand)]
        cmd: WeakCmd,
    },
    /// The reward of (prompt, completion) rows, with a reward model run.
    Score {
        run: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
        /// JSONL rows with `prompt` and `completion` (strings, or chat
        /// messages: the completion's are assistant turns).
        #[arg(long)]
        file: PathBuf,
        /// Write the rows with their `reward` here instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Predict labels for texts, or for images with an image model.
    Predict {
        run: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
        /// Image models: a PNG or JPEG file (repeat the flag for several).
        #[arg(long, conflicts_with_all = ["text", "file"])]
        image: Vec<PathBuf>,
        #[arg(long, conflicts_with = "file")]
        text: Option<String>,
        #[arg(long, requires = "text")]
        text_pair: Option<String>,
        /// A JSONL file of {"text": ..., "text_pair": ...} rows.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Write predictions (JSONL) here instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Export a run: `--merged OUT` (an HF checkpoint with adapters merged in,
    /// for transformers) and/or `--adapter OUT` (the PEFT adapter folder).
    Export {
        run: PathBuf,
        #[arg(long)]
        merged: Option<PathBuf>,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Decoder runs: a GGUF file of the merged model (llama.cpp, ollama).
        #[arg(long)]
        gguf: Option<PathBuf>,
        /// Weight type of the GGUF file: f16, q8_0 or f32.
        #[arg(long, default_value = "f16")]
        gguf_type: String,
    },
    /// Tensor names, shapes, dtypes and parameter count of a checkpoint.
    Inspect { path: PathBuf },
    /// Continue a prompt with a decoder LM (asset name, HF folder, .gguf file).
    Generate {
        model: String,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user turn with the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Keep a GGUF's linear weights quantised (dequantised per matmul):
        /// less memory, same numbers.
        #[arg(long)]
        quantized: bool,
        #[command(flatten)]
        sample: lm::SampleArgs,
    },
    /// Chat interactively with a decoder LM (applies its chat template).
    Chat {
        model: String,
        /// A system message to start the conversation with.
        #[arg(long)]
        system: Option<String>,
        /// Keep a GGUF's linear weights quantised (dequantised per matmul).
        #[arg(long)]
        quantized: bool,
        #[command(flatten)]
        sample: lm::SampleArgs,
    },
}

#[derive(Subcommand)]
enum WeakCmd {
    /// Apply a run config's `[weak]` rules to its data and print Snorkel's
    /// analysis (coverage, overlaps, conflicts, accuracy on the labelled
    /// validation split) and the label model's numbers; no training.
    Analyse {
        config: PathBuf,
        /// Override config values, as `afinar train --set`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Folder for analysis.json and analysis.txt (default
        /// runs/<config stem>-weak-analysis).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Rules listed in the printed table (all are saved).
        #[arg(long, default_value_t = 40)]
        top: usize,
    },
}

#[derive(Subcommand)]
enum PairsCmd {
    /// On-policy pairs from SFT rows (OpenAI evals' `input` + `ideal`):
    /// chosen = the ideal answer, rejected = MODEL's own greedy answer where
    /// it is wrong. Resumable: rerun the same command after a stop.
    Generate {
        /// An asset name, an HF folder or a .gguf file (a decoder with a chat template).
        model: String,
        /// A file, a folder of task files, or `asset:NAME/SUB`.
        #[arg(long)]
        data: String,
        /// A `.jsonl` file, or a folder for one file per task.
        #[arg(long)]
        out: PathBuf,
        /// At most this many rows per task file (the seeded choice SFT's
        /// `data.max_rows_per_file` makes with the same seed).
        #[arg(long)]
        max_rows_per_file: Option<usize>,
        /// The seed of that choice (SFT's `data.split_seed`).
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value_t = 48)]
        max_new_tokens: usize,
        /// Keep a GGUF's linear weights quantised (dequantised per matmul).
        #[arg(long)]
        quantized: bool,
    },
    /// Pairs from multiple-choice items (a user turn listing `A. ...`
    /// options, `ideal` the letter): chosen = the right option, rejected =
    /// a seeded random wrong one, each with its text.
    FromChoices {
        /// A JSONL file or `asset:NAME/FILE` (default: the `logiqa` asset's
        /// logiqa-logical-reasoning-plus.jsonl; its plain items:
        /// `asset:logiqa/logiqa.jsonl`).
        #[arg(
            long,
            default_value = "asset:logiqa/logiqa-logical-reasoning-plus.jsonl"
        )]
        data: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

fn main() {
    afinar::keep_freed_memory();
    // A usage error exits 1 like every other error (clap's default is 2);
    // --help and --version print and exit 0.
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 1 } else { 0 });
    });
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            // A library error that shows its source (`path: io error`) also
            // returns it as the next cause: print each text once.
            let mut shown = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !shown.ends_with(&c) {
                    eprintln!("  caused by: {c}");
                }
                shown = c;
            }
            1
        }
    };
    std::process::exit(code);
}

fn init_threads(n: Option<usize>) {
    afinar::init_threads(n);
}

/// `AFINAR_SIMD` (the vector level of afinar's CPU kernels, `simd`)
/// checked before any work: a bad value is an error, not a panic mid-run.
fn check_simd() -> Result<()> {
    afinar::simd::check_env().map_err(anyhow::Error::msg)?;
    Ok(())
}

fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn run(cli: Cli) -> Result<i32> {
    check_simd()?;
    match cli.cmd {
        Cmd::Fetch { name } => {
            let cache = afinar::hub::assets::cache_dir()?;
            let p = afinar::hub::assets::fetch(&name, &cache, &mut print_event)?;
            println!("{}", p.display());
            Ok(0)
        }
        Cmd::Export {
            run,
            merged,
            adapter,
            gguf,
            gguf_type,
        } => {
            if merged.is_none() && adapter.is_none() && gguf.is_none() {
                bail!("give --merged OUT, --adapter OUT and/or --gguf OUT.gguf");
            }
            // Every argument is checked before anything is loaded or written.
            let ty: afinar::export::gguf::ExportType = gguf_type
                .parse()
                .map_err(|e| anyhow::anyhow!("--gguf-type: {e}"))?;
            if !run.exists() {
                bail!("{}: no such run folder", run.display());
            }
            for out in merged.iter().chain(adapter.iter()) {
                afinar::runs::check_output_folder(&run, out)?;
            }
            if let Some(g) = &gguf {
                afinar::runs::check_output_gguf(g)?;
            }
            init_threads(None);
            if afinar::runs::kind_of(&run) == afinar::runs::RunKind::Lm {
                afinar::runs::export_lm(
                    &run,
                    merged.as_deref(),
                    adapter.as_deref(),
                    gguf.as_deref().map(|g| (g, ty)),
                )?;
            } else {
                if gguf.is_some() {
                    bail!(
                        "--gguf is for decoder LMs; {} is a sequence classifier",
                        run.display()
                    );
                }
                afinar::runs::export_classifier(&run, merged.as_deref(), adapter.as_deref())?;
            }
            for p in merged.iter().chain(adapter.iter()).chain(gguf.iter()) {
                println!("{}", p.display());
            }
            Ok(0)
        }
        Cmd::Generate {
            model,
            prompt,
            chat,
            quantized,
            sample,
        } => lm::cmd_generate(&model, &prompt, chat, quantized, &sample),
        Cmd::Chat {
            model,
            system,
            quantized,
            sample,
        } => lm::cmd_chat(&model, system.as_deref(), quantized, &sample),
        Cmd::Inspect { path } => {
            print!("{}", afinar::hub::inspect::describe(&path)?);
            Ok(0)
        }
        Cmd::Train {
            config,
            set,
            out,
            resume,
        } => match (config, resume) {
            (_, Some(run)) => cmd_train(&run.join("config.toml"), &[], Some(run), true),
            (Some(config), None) => cmd_train(&config, &set, out, false),
            (None, None) => bail!("give a run config, or --resume RUN"),
        },
        Cmd::Eval {
            run,
            load,
            data,
            data_labels,
        } => {
            if afinar::methods::image::is_image_model(&run) {
                cmd_eval_images(&run, data.as_deref(), data_labels.as_deref())
            } else if data_labels.is_some() {
                bail!(
                    "--data-labels is for image models (IDX files); {} is a text model",
                    run.display()
                )
            } else {
                cmd_eval(&run, &load.options(), data.as_deref())
            }
        }
        Cmd::Pairs { cmd } => cmd_pairs(cmd),
        Cmd::Weak {
            cmd:
                WeakCmd::Analyse {
                    config,
                    set,
                    out,
                    top,
                },
        } => {
            let plan = Plan::load(&config, &set)?;
            if plan.config.weak.is_none() {
                bail!(
                    "{}: no [weak] section: nothing to analyse",
                    config.display()
                );
            }
            let data = afinar::methods::cosine::prepare(&plan, &mut print_event)?;
            let stem = config
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "run".into());
            let dir =
                out.unwrap_or_else(|| PathBuf::from("runs").join(format!("{stem}-weak-analysis")));
            data.save(&plan, &dir)?;
            print!("{}", afinar::weak::render(&data.analysis, &data.rules, top));
            println!("saved {}", dir.join("analysis.json").display());
            Ok(0)
        }
        Cmd::Score {
            run,
            load,
            file,
            output,
        } => cmd_score(&run, &load.options(), &file, output.as_deref()),
        Cmd::Predict {
            run,
            load,
            image,
            text,
            text_pair,
            file,
            output,
        } => {
            if afinar::methods::image::is_image_model(&run) {
                cmd_predict_images(&run, &image, output)
            } else if !image.is_empty() {
                bail!(
                    "--image needs an image model; {} is a text model: give --text or --file",
                    run.display()
                )
            } else {
                cmd_predict(&run, &load.options(), text, text_pair, file, output)
            }
        }
    }
}

/// What the library reports outside a training run, on stderr: notes as
/// they are, warnings as `warning: ...`, download progress redrawn in place.
fn print_event(ev: Event) {
    match ev {
        Event::Info(s) => eprintln!("{s}"),
        Event::Warning(s) => eprintln!("warning: {s}"),
        Event::Progress {
            what,
            done,
            total,
            finished,
        } => draw_progress(&what, done, total, finished),
        Event::Start { .. } | Event::Step { .. } | Event::Eval { .. } => {}
    }
}

/// One line per downloaded file on a terminal's stderr, redrawn with `\r`:
/// `model.safetensors:  42% of 90.9 MB` (`model.safetensors: 12 MB` without
/// a size), ended with the transfer. Nothing when stderr is not a terminal.
fn draw_progress(what: &str, done: u64, total: Option<u64>, finished: bool) {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return;
    }
    let line = match total {
        Some(t) if t > 0 => format!(
            "{what}: {:>3}% of {:.1} MB",
            done.saturating_mul(100) / t,
            t as f64 / 1e6
        ),
        _ => format!("{what}: {} MB", done / 1_000_000),
    };
    eprint!("\r{line}");
    if finished {
        eprintln!();
    }
}

fn cmd_train(config: &Path, set: &[String], out: Option<PathBuf>, resume: bool) -> Result<i32> {
    if resume {
        let run = out.as_deref().unwrap_or(Path::new("."));
        if !run.is_dir() {
            bail!("--resume {}: no such run folder", run.display());
        }
        if run.join("results.json").exists() {
            bail!(
                "--resume {}: this run finished (results.json is there): nothing to resume",
                run.display()
            );
        }
        if !config.is_file() {
            bail!(
                "--resume {}: not a run folder (no config.toml)",
                run.display()
            );
        }
    }
    // Stopped before its first checkpoint: the run starts again, in its
    // folder (a `model/` it saved just before the kill is replaced).
    let requested = resume;
    let resume = resume && {
        let run = out.as_deref().unwrap_or(Path::new("."));
        // A weak-supervision run's first stage checkpoints in `stage1/`.
        let has = !train::checkpoint::list(run)?.is_empty()
            || !train::checkpoint::list(&run.join("stage1"))?.is_empty();
        if !has {
            eprintln!(
                "{}: no checkpoint yet: starting the run again from step 0",
                run.display()
            );
        }
        has
    };
    let plan = Plan::load(config, set)?;
    init_threads(plan.config.train.threads);
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into());
    let run_dir =
        out.unwrap_or_else(|| PathBuf::from("runs").join(format!("{stem}-{}", utc_stamp())));
    if !requested {
        if run_dir.join("results.json").exists() {
            bail!(
                "run folder {} already holds a finished run: choose another --out",
                run_dir.display()
            );
        }
        let unfinished = run_dir.join("model").exists()
            || run_dir.join("stage1").exists()
            || train::checkpoint::list(&run_dir).is_ok_and(|l| !l.is_empty());
        if unfinished {
            bail!(
                "run folder {} holds an unfinished run: continue it with `afinar train --resume {}`, or choose another --out",
                run_dir.display(),
                run_dir.display()
            );
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: finishing the step and saving a checkpoint (Ctrl-C again to quit now)");
        });
    }
    eprintln!("run folder: {}", run_dir.display());
    let bar = ProgressBar::hidden();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut on = |ev: Event| match ev {
        Event::Info(s) => bar.suspend(|| eprintln!("{s}")),
        Event::Warning(s) => bar.suspend(|| eprintln!("warning: {s}")),
        Event::Progress {
            what,
            done,
            total,
            finished,
        } => bar.suspend(|| draw_progress(&what, done, total, finished)),
        Event::Start { total_steps, step } => {
            if tty {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
            bar.set_length(total_steps as u64);
            bar.set_position(step as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .unwrap(),
            );
        }
        Event::Step {
            step,
            epoch,
            loss,
            lr,
            tokens_per_s,
            total_steps,
        } => {
            bar.set_position(step as u64);
            bar.set_message(format!(
                "epoch {epoch} loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"
            ));
            if !tty && (step % 50 == 0 || step == total_steps) {
                eprintln!("step {step}/{total_steps} epoch {epoch} loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s");
            }
        }
        Event::Eval {
            step,
            split,
            metrics,
            best,
        } => {
            let m: Vec<String> = metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            bar.suspend(|| {
                eprintln!(
                    "[{split} @ step {step}] {}{}",
                    m.join("  "),
                    if best { "  (best)" } else { "" }
                )
            });
        }
    };
    let report = afinar::methods::train(
        &plan,
        &TrainOptions {
            run_dir: run_dir.clone(),
            stop,
            resume,
        },
        &mut on,
    )?;
    bar.finish_and_clear();
    if report.interrupted {
        eprintln!(
            "stopped at step {}; continue with: afinar train --resume {}",
            report.steps,
            run_dir.display()
        );
        return Ok(130);
    }
    let best: Vec<String> = report
        .best_validation
        .iter()
        .map(|(k, v)| format!("{k} {v:.4}"))
        .collect();
    match report.best_step {
        Some(s) => eprintln!(
            "done: {} steps in {:.1} s; best validation at step {s}: {}",
            report.steps,
            report.wall_s,
            best.join("  ")
        ),
        None => eprintln!(
            "done: {} steps in {:.1} s; no validation ran",
            report.steps, report.wall_s
        ),
    }
    if let Some(t) = &report.test {
        let m: Vec<String> = t.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        println!("test: {}", m.join("  "));
    }
    // A prompt-tuning run has no merged model: its result is the adapter.
    if run_dir.join("model").is_dir() {
        println!("model: {}", run_dir.join("model").display());
    }
    if run_dir.join("adapter").is_dir() {
        println!("adapter: {}", run_dir.join("adapter").display());
    }
    Ok(0)
}

/// For a PEFT adapter folder made by Python PEFT (what its files do not say).
#[derive(clap::Args, Debug)]
struct LoadArgs {
    /// The base model of a PEFT adapter folder: a model folder or an asset
    /// name (default: the adapter's base_model_name_or_path).
    #[arg(long)]
    base: Option<String>,
    /// Class names of a PEFT adapter's classifier, in id order: `neg,pos`.
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// Truncation length for a PEFT adapter folder (default: the model's maximum).
    #[arg(long)]
    max_length: Option<usize>,
}

impl LoadArgs {
    fn options(&self) -> afinar::runs::LoadOptions {
        afinar::runs::LoadOptions {
            base: self.base.clone(),
            labels: self.labels.clone(),
            max_length: self.max_length,
        }
    }
}

fn cmd_pairs(cmd: PairsCmd) -> Result<i32> {
    match cmd {
        PairsCmd::Generate {
            model,
            data,
            out,
            max_rows_per_file,
            seed,
            max_new_tokens,
            quantized,
        } => {
            init_threads(None);
            let files = afinar::data::resolve_files(&data)?;
            let m = lm::load(&model, quantized)?;
            let sp = m.src.tokenizer.specials.clone().unwrap_or_default();
            let src = sp.chat_template.as_deref().with_context(|| {
                format!("{model}: the tokenizer has no chat template (the prompts are chats)")
            })?;
            let template =
                afinar::hub::chat_template::ChatTemplate::new(src, &sp.bos_token, &sp.eos_token)?;
            let opts = afinar::methods::pairs::GenerateOptions {
                files,
                max_rows_per_file,
                seed,
                max_new_tokens,
                out: out.clone(),
            };
            let r = afinar::methods::pairs::generate_pairs(
                &m.model,
                &m.src.tokenizer,
                &template,
                m.src.cfg.max_positions(),
                &opts,
                &mut print_event,
            )?;
            eprintln!(
                "{} rows: {} pairs, {} answered right (no pair), {:.0} s",
                r.rows, r.pairs, r.model_right, r.wall_s
            );
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(0)
        }
        PairsCmd::FromChoices { data, out, seed } => {
            let files = afinar::data::resolve_files(&data)?;
            let [file] = files.as_slice() else {
                bail!("--data {data}: one file, found {}", files.len());
            };
            let r = afinar::methods::pairs::pairs_from_choices(file, seed, &out)?;
            eprintln!("{} items: {} pairs in {}", r.items, r.pairs, out.display());
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(0)
        }
    }
}

fn cmd_score(
    run: &Path,
    load: &afinar::runs::LoadOptions,
    file: &Path,
    output: Option<&Path>,
) -> Result<i32> {
    init_threads(None);
    let rm = afinar::runs::load_run_with(run, load)?;
    if rm.model.head.task != afinar::heads::TaskKind::Scalar {
        bail!(
            "{}: not a reward model (its head is {:?}; `afinar predict` scores classifiers)",
            run.display(),
            rm.model.head.task
        );
    }
    let mode = rm
        .plan
        .as_ref()
        .and_then(|p| p.config.data.truncation_mode)
        .unwrap_or_default();
    let scores = afinar::methods::reward::score_file(&rm, file, mode)?;
    let mut text = String::new();
    for (line, r) in &scores {
        text.push_str(&serde_json::json!({"line": line, "reward": r}).to_string());
        text.push('\n');
    }
    match output {
        Some(o) => afinar::fsutil::write_atomic(o, text.as_bytes())?,
        None => print!("{text}"),
    }
    Ok(0)
}

fn cmd_eval(run: &Path, load: &afinar::runs::LoadOptions, data: Option<&Path>) -> Result<i32> {
    init_threads(None);
    // Preference runs: their own metrics.
    let plan = run
        .join("config.toml")
        .is_file()
        .then(|| Plan::load(&run.join("config.toml"), &[]))
        .transpose()?;
    use afinar::config::TaskType;
    if let Some(k @ (TaskType::Sft | TaskType::Ppo)) = plan.as_ref().map(|p| p.config.task.kind) {
        let name = if k == TaskType::Sft {
            "an SFT"
        } else {
            "a PPO"
        };
        anyhow::bail!(
            "{}: {name} run is a language model: `afinar eval` reads classifier, reward-model and DPO runs. Its test metrics (before and after) are in {}; `afinar generate {}` answers prompts",
            run.display(),
            run.join("results.json").display(),
            run.join("model").display()
        );
    }
    if let Some(plan) = plan.filter(|p| p.config.task.kind == afinar::config::TaskType::Dpo) {
        let (n, m) = afinar::methods::dpo::eval_run(run, &plan, data, &mut print_event)?;
        let v = serde_json::json!({ "data": data, "pairs": n, "metrics": m });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let rm = afinar::runs::load_run_with(run, load)?;
    if let Some(plan) = rm
        .plan
        .as_ref()
        .filter(|p| p.config.task.kind == afinar::config::TaskType::Reward)
    {
        let (n, m) = afinar::methods::reward::eval_run(&rm, plan, data)?;
        let v = serde_json::json!({ "data": data, "pairs": n, "metrics": m });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let (examples, path) = match data {
        Some(p) => {
            let (spec, format) = match rm.plan.as_ref() {
                Some(plan) => classify::data_spec(plan)?,
                // A model folder has no run config: the fields `predict --file` reads.
                None => (
                    afinar::data::DataSpec {
                        text: afinar::data::FieldPath::parse("text")?,
                        text_pair: None,
                        label: Some(afinar::data::FieldPath::parse("label")?),
                    },
                    None,
                ),
            };
            (
                afinar::data::read_examples(p, &spec, format)?,
                p.to_path_buf(),
            )
        }
        None => {
            let plan = rm
                .plan
                .as_ref()
                .context("give --data FILE to evaluate a model folder")?;
            let s = classify::load_splits(plan)?;
            s.test
                .context("the run's config has no test split: give --data FILE")?
        }
    };
    let task = rm.model.head.task;
    let enc = classify::encode(&rm.tok, &examples, task, rm.labels.as_ref(), &path)?;
    let (m, _) = classify::evaluate(&rm.model, &enc, rm.tok.pad_id(), 64)?;
    let v: serde_json::Value = serde_json::json!({ "data": path, "rows": enc.len(), "metrics": m });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}

/// `afinar eval` of an image run or model folder.
fn cmd_eval_images(run: &Path, data: Option<&Path>, labels: Option<&Path>) -> Result<i32> {
    init_threads(None);
    let (path, n, m) = afinar::methods::image::eval_run(run, data, labels)?;
    let v = serde_json::json!({ "data": path, "images": n, "metrics": m });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}

/// `afinar predict --image F...` with an image model: one JSON line per
/// image, its label and class probabilities.
fn cmd_predict_images(run: &Path, images: &[PathBuf], output: Option<PathBuf>) -> Result<i32> {
    if images.is_empty() {
        bail!(
            "{} is an image model: give --image FILE (PNG or JPEG; repeat for several)",
            run.display()
        );
    }
    init_threads(None);
    let (classes, probs) = afinar::methods::image::predict_files(run, images)?;
    let mut lines = Vec::new();
    for (f, p) in images.iter().zip(probs) {
        let best = afinar::methods::classify::argmax(&p);
        let scores: serde_json::Map<String, serde_json::Value> = classes
            .iter()
            .zip(&p)
            .map(|(c, v)| (c.clone(), serde_json::json!(v)))
            .collect();
        lines.push(serde_json::to_string(&serde_json::json!({
            "image": f, "label": classes[best], "score": p[best], "scores": scores
        }))?);
    }
    let text = lines.join("\n") + "\n";
    match output {
        Some(o) => afinar::fsutil::write_atomic(&o, text.as_bytes())?,
        None => print!("{text}"),
    }
    Ok(0)
}

fn cmd_predict(
    run: &Path,
    load: &afinar::runs::LoadOptions,
    text: Option<String>,
    text_pair: Option<String>,
    file: Option<PathBuf>,
    output: Option<PathBuf>,
) -> Result<i32> {
    if text.is_none() && file.is_none() {
        bail!("give --text TEXT or --file FILE (JSONL rows with a `text` field)");
    }
    init_threads(None);
    let rm = afinar::runs::load_run_with(run, load)?;
    let rows: Vec<(String, Option<String>)> = match (text, file) {
        (Some(t), _) => vec![(t, text_pair)],
        (None, Some(f)) => {
            let fh = std::fs::File::open(&f).with_context(|| format!("{}", f.display()))?;
            let mut rows = Vec::new();
            for (i, line) in std::io::BufReader::new(fh).lines().enumerate() {
                let line =
                    line.with_context(|| format!("{}:{}: not UTF-8 text", f.display(), i + 1))?;
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(&line)
                    .with_context(|| format!("{}:{}: malformed JSON", f.display(), i + 1))?;
                let t = v["text"].as_str().with_context(|| {
                    format!("{}:{}: no string field `text`", f.display(), i + 1)
                })?;
                rows.push((t.to_string(), v["text_pair"].as_str().map(String::from)));
            }
            if rows.is_empty() {
                bail!("{}: no rows", f.display());
            }
            rows
        }
        (None, None) => unreachable!("checked above"),
    };
    let mut lines = Vec::new();
    for chunk in rows.chunks(64) {
        let texts: Vec<&str> = chunk.iter().map(|r| r.0.as_str()).collect();
        let pairs: Option<Vec<Option<&str>>> = if chunk.iter().any(|r| r.1.is_some()) {
            Some(chunk.iter().map(|r| r.1.as_deref()).collect())
        } else {
            None
        };
        let enc = rm.tok.encode_batch(&texts, pairs.as_deref())?;
        let ids: Vec<&[u32]> = enc.iter().map(|e| e.0.as_slice()).collect();
        let types: Vec<&[u32]> = enc.iter().map(|e| e.1.as_slice()).collect();
        let (inputs, _) = classify::inputs_of(&ids, &types, rm.tok.pad_id())?;
        let logits = rm.model.forward(&inputs, None)?.to_vec2::<f32>()?;
        for ((t, p), l) in chunk.iter().zip(logits) {
            let mut v = serde_json::json!({ "text": t, "logits": l });
            if let Some(p) = p {
                v["text_pair"] = serde_json::json!(p);
            }
            if let Some(lm) = &rm.labels {
                let i = classify::argmax(&l);
                v["label"] = serde_json::json!(lm.label(i));
                v["score"] = serde_json::json!(afinar::metrics::softmax(&l)[i]);
            } else {
                v["value"] = serde_json::json!(l[0]);
            }
            lines.push(v.to_string());
        }
    }
    let text = lines.join("\n") + "\n";
    match output {
        Some(p) => afinar::fsutil::write_atomic(&p, text.as_bytes())?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(0)
}
