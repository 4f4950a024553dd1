//! docs/security.md: no network unless a hub download is asked for, and
//! outputs only inside the run or export folder given. (Pickle refusals,
//! shard names outside a model folder and export targets that would replace
//! something are rows of the bad-input catalogue, tests/bad_inputs.rs.)

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `afinar ARGS` in `cwd` with every route to the network closed: the
/// proxies ureq honours and `HF_ENDPOINT` point at a port nobody listens
/// on, and the cache (where a hub download would go) is an empty folder.
fn offline(cwd: &Path, port: u16, args: &[&str]) -> Out {
    let closed = format!("http://127.0.0.1:{port}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_afinar"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("RUST_BACKTRACE")
        .env_remove("HF_TOKEN")
        .env("AFINAR_CACHE", cwd.join("cache"))
        .env("HF_ENDPOINT", &closed);
    for v in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env(v, &closed);
    }
    let out = cmd.output().expect("spawn afinar");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every path under `dir`.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    walk(dir).into_iter().collect()
}

/// Training, evaluation, prediction, export, SFT with a chat template and
/// generation all run with the network closed (any request would fail the
/// command); a `model.hub` run, the one that asks for a download, does try
/// and fails clearly, which shows the closed routes are really in the way.
/// Each command writes only inside the folder it was given.
#[test]
fn nothing_reaches_the_network_and_outputs_stay_in_their_folder() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    let port = closed_port();
    let s = |p: &Path| p.display().to_string();
    std::fs::create_dir(d.join("cache")).unwrap();
    let cfg = tiny_config_file(d);

    // Classification: train, eval, predict, export.
    let inputs = tree(d);
    let run = d.join("run");
    offline(
        d,
        port,
        &[
            "train",
            &s(&cfg),
            "--set",
            "train.epochs=2",
            "--out",
            &s(&run),
        ],
    )
    .ok();
    let new: Vec<_> = tree(d).difference(&inputs).cloned().collect();
    assert!(
        new.iter().all(|p| p.starts_with(&run)),
        "train wrote outside its run folder: {new:?}"
    );
    assert!(run.join("model/model.safetensors").is_file());
    offline(d, port, &["eval", &s(&run)]).ok();
    offline(d, port, &["predict", &s(&run), "--text", "a fine day"]).ok();
    let before = tree(d);
    let out = d.join("exported");
    offline(d, port, &["export", &s(&run), "--merged", &s(&out)]).ok();
    let new: Vec<_> = tree(d).difference(&before).cloned().collect();
    assert!(
        !new.is_empty() && new.iter().all(|p| p.starts_with(&out)),
        "export wrote outside its folder: {new:?}"
    );

    // Decoder SFT on chat rows (the model's Jinja chat template), then chat generation.
    let llama = fixture().join("../llama-tiny");
    let rows: String = (0..20)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "system", "content": "Answer."},
                {"role": "user", "content": format!("q{i}")},
                {"role": "assistant", "content": format!("a{i}")},
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    let data = write(d, "chat.jsonl", &rows);
    let sft = write(
        d,
        "sft.toml",
        &format!(
            "[model]\npath = {}\nmax_length = 64\n[task]\ntype = \"sft\"\n\
             [data]\ntrain = {}\nmessages = \"messages\"\nsplit = [0.7, 0.15, 0.15]\n\
             [train]\nepochs = 1\nbatch_size = 8\nlr = 1e-2\neval_every = 1\nthreads = 1\n\
             [adapter]\ntype = \"lora\"\nr = 4\ntarget_modules = [\"q_proj\", \"v_proj\"]\n",
            q(&llama),
            q(&data)
        ),
    );
    let before = tree(d);
    let sft_run = d.join("sft-run");
    offline(d, port, &["train", &s(&sft), "--out", &s(&sft_run)]).ok();
    let new: Vec<_> = tree(d).difference(&before).cloned().collect();
    assert!(
        new.iter().all(|p| p.starts_with(&sft_run)),
        "SFT wrote outside its run folder: {new:?}"
    );
    let g = offline(
        d,
        port,
        &[
            "generate",
            &s(&llama),
            "--chat",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "3",
        ],
    );
    g.ok();
    assert!(
        std::fs::read_dir(d.join("cache")).unwrap().next().is_none(),
        "something was cached"
    );

    // The control: a hub model is the one thing that goes to the network.
    let hub = write(
        d,
        "hub.toml",
        &std::fs::read_to_string(&cfg).unwrap().replace(
            &format!("path = {}", q(&fixture())),
            "hub = \"org/some-bert\"",
        ),
    );
    offline(
        d,
        port,
        &["train", &s(&hub), "--out", &s(&d.join("hub-run"))],
    )
    .fails_with(&[
        "hub model org/some-bert@main: config.json: cannot reach",
        &format!("http://127.0.0.1:{port}"),
    ]);
    assert!(!d.join("hub-run").exists());
}
