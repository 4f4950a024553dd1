//! Instruction SFT end to end on the tiny random decoders (char tokenizer
//! with a ChatML template, `scripts/reference/make_tiny_lm_tokenizer.py`):
//! LoRA on a Llama, full fine-tuning of a GPT-2, with and without packing.
//! The validation loss falls, the run folder holds an HF model (and a PEFT
//! CAUSAL_LM adapter) that `afinar generate` loads, and bad SFT configs fail
//! before any weight loads.

mod common;

use common::train_out;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn config(dir: &Path, model: &str, extra: &str) -> PathBuf {
    let f = fixtures();
    let p = dir.join("sft.toml");
    std::fs::write(
        &p,
        format!(
            "[model]\npath = {:?}\nmax_length = 64\n[task]\ntype = \"sft\"\n\
             [data]\ntrain = {:?}\nmessages = \"input\"\nresponse = \"ideal\"\nsplit = [0.7, 0.15, 0.15]\ngenerate_eval_rows = 3\n\
             [train]\nepochs = 3\nbatch_size = 8\nlr = 1e-2\neval_every = 5\nthreads = 1\n{extra}\n",
            f.join(model),
            f.join("sft-tiny/train.jsonl")
        ),
    )
    .unwrap();
    p
}

fn afinar(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_afinar"))
        .args(args)
        .output()
        .unwrap()
}

fn val_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["split"] == "validation")
        .map(|v| v["eval_loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn sft_trains_saves_and_generates() {
    for (model, extra, adapter) in [
        (
            "llama-tiny",
            "[adapter]\ntype = \"lora\"\nr = 4\nlora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]",
            true,
        ),
        (
            "llama-tiny",
            "[adapter]\ntype = \"lora\"\nuse_dora = true\nr = 4\nlora_alpha = 8\ntarget_modules = \"all-linear\"",
            true,
        ),
        (
            "llama-tiny-tied",
            "[adapter]\ntype = \"ia3\"\ntarget_modules = [\"k_proj\", \"v_proj\", \"down_proj\"]\nfeedforward_modules = [\"down_proj\"]",
            true,
        ),
        (
            "gpt2-tiny",
            "[adapter]\ntype = \"lora\"\nr = 4\nlora_alpha = 8\ntarget_modules = [\"c_attn\"]",
            true,
        ),
        ("gpt2-tiny", "", false),
        ("llama-tiny-tied", "", false),
    ] {
        for packing in [false, true] {
            let d = tempfile::tempdir().unwrap();
            let cfg = config(d.path(), model, extra);
            let run = d.path().join("run");
            let mut args: Vec<&std::ffi::OsStr> =
                vec!["train".as_ref(), cfg.as_os_str(), "--out".as_ref(), run.as_os_str()];
            if packing {
                args.push("--set".as_ref());
                args.push("data.packing=true".as_ref());
            }
            let o = afinar(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{model} packing={packing}: {err}");
            assert!(err.contains("trainable%"), "{err}");
            let losses = val_losses(&run);
            assert!(losses.len() >= 2, "{model}: {losses:?}");
            assert!(
                losses.last().unwrap() < &losses[0],
                "{model} packing={packing}: validation loss did not fall: {losses:?}"
            );
            let results: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
            let test = &results["test"];
            assert!(test["perplexity"].as_f64().unwrap().is_finite(), "{results}");
            assert!(test["exact_match"].as_f64().is_some(), "{results}");
            assert_eq!(run.join("adapter").exists(), adapter, "{model}");
            if adapter {
                let ac: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
                )
                .unwrap();
                assert_eq!(ac["task_type"], "CAUSAL_LM");
                assert!(ac["peft_type"] == "LORA" || ac["peft_type"] == "IA3", "{ac}");
                if model.starts_with("gpt2") {
                    assert_eq!(ac["fan_in_fan_out"], true, "PEFT's flag for Conv1D bases");
                    continue;
                }
                // Exports: merged HF folder, the adapter, and GGUF that loads back.
                let (m2, a2, g) = (d.path().join("m2"), d.path().join("a2"), d.path().join("m.gguf"));
                let o = afinar(&[
                    "export".as_ref(), run.as_os_str(), "--merged".as_ref(), m2.as_os_str(),
                    "--adapter".as_ref(), a2.as_os_str(), "--gguf".as_ref(), g.as_os_str(),
                    "--gguf-type".as_ref(), "f32".as_ref(),
                ]);
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                assert!(m2.join("model.safetensors").is_file() && a2.join("adapter_config.json").is_file());
                for m in [&m2, &g] {
                    let o = afinar(&["generate".as_ref(), m.as_os_str(), "--prompt".as_ref(), "ab".as_ref(), "--max-new-tokens".as_ref(), "3".as_ref()]);
                    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                }
            }
            // The saved model generates.
            let model_dir = run.join("model");
            let o = afinar(&[
                "generate".as_ref(),
                model_dir.as_os_str(),
                "--chat".as_ref(),
                "--prompt".as_ref(),
                "abc".as_ref(),
                "--max-new-tokens".as_ref(),
                "5".as_ref(),
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }
}

/// Prompt tuning: the base stays frozen, only `prompt_embeddings` trains;
/// the run writes PEFT's PROMPT_TUNING adapter (no merged model), and
/// `afinar generate RUN` puts the soft prompt in front of the input.
#[test]
fn prompt_tuning_trains_saves_and_generates() {
    for init in ["random", "text"] {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(
            d.path(),
            "llama-tiny",
            &format!(
                "[adapter]\ntype = \"prompt_tuning\"\nnum_virtual_tokens = 4\nprompt_tuning_init = \"{init}\"\nprompt_tuning_init_text = \"Reverse\"",
            ),
        );
        let run = d.path().join("run");
        let o = train_out(&cfg, &run, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{init}: {err}");
        assert!(
            err.contains("trainable params: 256 ||"),
            "{init}: 4 x 64 trainable: {err}"
        );
        let losses = val_losses(&run);
        assert!(losses.last().unwrap() < &losses[0], "{init}: {losses:?}");
        let ac: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(ac["peft_type"], "PROMPT_TUNING");
        assert_eq!(ac["num_virtual_tokens"], 4);
        assert_eq!(ac["token_dim"], 64);
        assert_eq!(ac["num_transformer_submodules"], 1);
        let w = std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&w).unwrap();
        assert_eq!(st.names(), vec!["prompt_embeddings"]);
        assert_eq!(st.tensor("prompt_embeddings").unwrap().shape(), &[4, 64]);
        assert!(!run.join("model").exists(), "a soft prompt does not merge");
        let o = afinar(&[
            "generate".as_ref(),
            run.as_os_str(),
            "--chat".as_ref(),
            "--prompt".as_ref(),
            "abc".as_ref(),
            "--max-new-tokens".as_ref(),
            "4".as_ref(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && err.contains("PromptTuning"), "{err}");
    }
}

#[test]
fn bad_sft_configs_fail_naming_the_problem() {
    for (set, want) in [
        ("data.prompt=\"p\"", "data"),
        ("data.overflow=\"wrap\"", "data.overflow"),
        ("freeze.preset=\"head_only\"", "freeze"),
        ("data.train=\"nope.jsonl\"", "nope.jsonl"),
        ("adapter.type=\"prompt_tuning\"", "num_virtual_tokens"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), "llama-tiny", "");
        let run = d.path().join("run");
        let o = train_out(&cfg, &run, &[set]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{set}: {err}");
        assert!(!run.join("model").exists());
    }
    // A chat row with an unknown role names the file, line and role.
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"input\": [{\"role\": \"user\", \"content\": \"a\"}], \"ideal\": \"b\"}\n\
         {\"input\": [{\"role\": \"robot\", \"content\": \"a\"}], \"ideal\": \"b\"}\n",
    )
    .unwrap();
    let cfg = config(d.path(), "llama-tiny", "");
    let o = train_out(
        &cfg,
        &d.path().join("run"),
        &[&format!("data.train={:?}", data.display().to_string())],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("robot") && err.contains(":2"),
        "{err}"
    );
}

/// Decoder bad inputs: a truncated GGUF, a GGUF of an unsupported
/// architecture, a model without a chat template asked to chat, and an SFT
/// chat row with no assistant turn: a clear error, exit 1, nothing written.
#[test]
fn bad_decoder_inputs_fail_clearly() {
    use afinar::export::gguf::{write_llama_gguf, ExportType, TokenizerMeta};
    use afinar::hub::gguf::writer::GgufWriter;
    use afinar::hub::gguf::GgufValue;
    use afinar::models::{load_model, LoadOpts, ModelConfig};
    let d = tempfile::tempdir().unwrap();
    let src = load_model(
        &fixtures().join("llama-tiny"),
        afinar::params::Selector::none(),
        LoadOpts::default(),
    )
    .unwrap();
    let ModelConfig::Llama(cfg) = &src.cfg else {
        panic!()
    };
    let tensors = src
        .store
        .iter()
        .map(|(n, p)| (n.clone(), p.tensor.clone()))
        .collect();
    let good = d.path().join("good.gguf");
    let meta = TokenizerMeta {
        tokenizer: src.tokenizer.raw(),
        bos_id: src.tokenizer.specials.as_ref().and_then(|s| s.bos_id),
        eos_id: Some(2),
        pad_id: Some(0),
        chat_template: None,
        pre: "gpt2",
    };
    write_llama_gguf(&good, "t", cfg, &tensors, &meta, ExportType::F32).unwrap();
    // Truncated: the tensor data ends early.
    let bytes = std::fs::read(&good).unwrap();
    let cut = d.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let o = afinar(&[
        "generate".as_ref(),
        cut.as_os_str(),
        "--prompt".as_ref(),
        "a".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(1) && err.contains("truncated") && err.contains("cut.gguf"),
        "{err}"
    );
    // Another architecture.
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("mamba".into()))
        .unwrap();
    w.add_f32(
        "token_embd.weight",
        afinar::hub::gguf::quant::GgmlType::F32,
        &[2, 4],
        &[0.0; 8],
    )
    .unwrap();
    let mamba = d.path().join("mamba.gguf");
    w.write(&mamba).unwrap();
    let o = afinar(&[
        "generate".as_ref(),
        mamba.as_os_str(),
        "--prompt".as_ref(),
        "a".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(1) && err.contains("mamba") && err.contains("llama"),
        "{err}"
    );
    // No chat template: the exported GGUF above has none.
    let o = afinar(&[
        "generate".as_ref(),
        good.as_os_str(),
        "--chat".as_ref(),
        "--prompt".as_ref(),
        "a".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(1) && err.contains("no chat template"),
        "{err}"
    );
    // A chat row without an assistant turn (messages format).
    let data = d.path().join("rows.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    let cfg = config(d.path(), "llama-tiny", "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "messages = \"input\"\nresponse = \"ideal\"\n",
        "messages = \"messages\"\n",
    );
    std::fs::write(&cfg, text).unwrap();
    let run = d.path().join("run");
    let o = train_out(
        &cfg,
        &run,
        &[&format!("data.train={:?}", data.display().to_string())],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(1) && err.contains("assistant") && err.contains("rows.jsonl"),
        "{err}"
    );
    assert!(!run.join("model").exists());
}

/// `data.test` names the SFT test rows (the split's test ratio 0): they are
/// read, encoded and scored, where the file was once ignored.
#[test]
fn sft_test_rows_from_a_file() {
    let d = tempfile::tempdir().unwrap();
    let rows = std::fs::read_to_string(fixtures().join("sft-tiny/train.jsonl")).unwrap();
    let test = d.path().join("test.jsonl");
    std::fs::write(
        &test,
        rows.lines().take(6).collect::<Vec<_>>().join("\n") + "\n",
    )
    .unwrap();
    let cfg = config(d.path(), "llama-tiny", "max_steps = 2");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "split = [0.7, 0.15, 0.15]",
        &format!(
            "split = [0.85, 0.15, 0.0]\ntest = {:?}",
            test.display().to_string()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let run = d.path().join("run");
    let o = train_out(&cfg, &run, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("data (test, {}): 6 rows: 6 kept", test.display())),
        "{err}"
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    assert!(results["test"]["loss"].as_f64().is_some(), "{results}");
}
