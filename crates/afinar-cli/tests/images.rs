//! Image classification from the command line (issue 17): a run on the
//! tiny MobileNetV2 (`tests/fixtures/mobilenet/tiny.pth`, read weights-only)
//! over class folders of PNG images, with the first stages frozen; what it
//! leaves (`model/` with torchvision's keys and int64 `num_batches_tracked`,
//! a config torchvision's loader reads), `eval` and `predict` on images, an
//! exact resume (running statistics included), and the start-up line.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Class folders `dark` / `light` of 8x8 grey PNGs (6 each, a little noise).
fn images(d: &Path) -> PathBuf {
    let root = d.join("images");
    for (k, (class, base)) in [("dark", 40u8), ("light", 200u8)].into_iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..6u8 {
            let px: Vec<u8> = (0..64u8)
                .map(|p| {
                    base.wrapping_add((p.wrapping_mul(37) ^ i.wrapping_mul(11) ^ k as u8) % 23)
                })
                .collect();
            let mut bytes = Vec::new();
            {
                let mut enc = png::Encoder::new(&mut bytes, 8, 8);
                enc.set_color(png::ColorType::Grayscale);
                enc.set_depth(png::BitDepth::Eight);
                let mut w = enc.write_header().unwrap();
                w.write_image_data(&px).unwrap();
            }
            std::fs::write(root.join(class).join(format!("{i}.png")), bytes).unwrap();
        }
    }
    root
}

fn config(d: &Path, extra: &str) -> PathBuf {
    let data = images(d);
    write(
        d,
        "img.toml",
        &format!(
            "[model]\npath = {}\n[task]\ntype = \"image_classification\"\n\
             [data]\ntrain = {}\nsplit = [0.67, 0.33, 0.0]\ntest = {}\n[image]\nsize = 32\n\
             [freeze]\nfrozen = [\"features.0-6\"]\n\
             [train]\nmax_steps = 6\nbatch_size = 4\nlr = 1e-3\neval_every = 3\nlog_every = 1\nthreads = 1\n{extra}",
            q(&fixture().join("../mobilenet/tiny.pth")),
            q(&data),
            q(&data)
        ),
    )
}

fn train(d: &Path, cfg: &Path, run: &Path, extra: &[&str]) -> Out {
    let mut args = vec!["train".to_string(), cfg.display().to_string()];
    for e in extra {
        args.push(e.to_string());
    }
    args.push("--out".into());
    args.push(run.display().to_string());
    afinar_p(d, &args)
}

#[test]
fn train_eval_predict_on_images() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let cfg = config(d, "");
    let run = d.join("run");
    let out = train(d, &cfg, &run, &[]);
    out.ok();
    let err = out.stderr.clone();
    // features.0-6 hold 18 of the 52 batch-norm layers.
    assert!(
        err.contains("batch norm: 18 of 52 layers frozen (running statistics), 34 take batch statistics in training"),
        "{err}"
    );
    assert!(
        err.contains("trainable params:") && err.contains("frozen params:"),
        "{err}"
    );
    assert!(err.contains("classifier.1 [4, 1280] of"), "{err}"); // the tiny head: 4 classes, replaced by 2
                                                                 // The saved model: torchvision's keys, the int64 counter, the config.
    let st = std::fs::read(run.join("model/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let names = st.names();
    assert!(names.iter().any(|n| *n == "features.18.1.running_var"));
    assert!(names.iter().any(|n| *n == "classifier.1.weight"));
    assert_eq!(
        st.tensor("features.0.1.num_batches_tracked")
            .unwrap()
            .dtype(),
        safetensors::Dtype::I64
    );
    assert_eq!(st.tensor("classifier.1.weight").unwrap().shape(), [2, 1280]);
    // 52 layers x 5 tensors (weight, bias, mean, var, count) + 52 convs + the head's 2.
    assert_eq!(names.len(), 52 * 5 + 52 + 2);
    let cfgj = read_json(&run.join("model/config.json"));
    assert_eq!(cfgj["model_type"], "mobilenet_v2");
    assert_eq!(cfgj["num_classes"], 2);
    assert_eq!(cfgj["id2label"]["0"], "dark");
    assert_eq!(cfgj["image_size"], 32);
    // Frozen stages: their running statistics did not move (eval-mode BN).
    let before = afinar::hub::pth::read(&fixture().join("../mobilenet/tiny.pth")).unwrap();
    let get = |n: &str| -> Vec<f32> {
        let t = st.tensor(n).unwrap();
        t.data()
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let orig = |n: &str| before.iter().find(|(k, _)| k == n).unwrap().1.to_f32();
    assert_eq!(
        get("features.3.conv.1.1.running_mean"),
        orig("features.3.conv.1.1.running_mean")
    );
    assert_ne!(
        get("features.9.conv.1.1.running_mean"),
        orig("features.9.conv.1.1.running_mean")
    );
    // eval on the run (its test split) and on a folder, predict on files.
    let ev = afinar(d, &["eval", &run.display().to_string()]);
    ev.ok();
    let v: serde_json::Value = serde_json::from_str(&ev.stdout).unwrap();
    assert_eq!(v["images"], 12);
    let acc = v["metrics"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let results = read_json(&run.join("results.json"));
    let ev2 = afinar(
        d,
        &[
            "eval",
            &run.join("model").display().to_string(),
            "--data",
            &d.join("images").display().to_string(),
        ],
    );
    ev2.ok();
    let v2: serde_json::Value = serde_json::from_str(&ev2.stdout).unwrap();
    // The model folder alone gives the run's own test metrics.
    let tm = &results["test"];
    assert!(
        (v2["metrics"]["accuracy"].as_f64().unwrap() - tm["accuracy"].as_f64().unwrap()).abs()
            < 1e-9,
        "{v2} vs {tm}"
    );
    let img = d.join("images/light/3.png").display().to_string();
    let pr = afinar(
        d,
        &[
            "predict",
            &run.display().to_string(),
            "--image",
            &img,
            "--image",
            &d.join("images/dark/0.png").display().to_string(),
        ],
    );
    pr.ok();
    let lines: Vec<serde_json::Value> = pr
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let sum: f64 = lines[0]["scores"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((sum - 1.0).abs() < 1e-5, "{sum}");
    assert!(["dark", "light"].contains(&lines[0]["label"].as_str().unwrap()));
    // Text options on an image model, and --image on nothing, are refused.
    afinar(d, &["predict", &run.display().to_string(), "--text", "hi"])
        .fails_with(&["is an image model: give --image FILE"]);
    let junk = write(d, "junk.png", "not a png");
    afinar(
        d,
        &[
            "predict",
            &run.display().to_string(),
            "--image",
            &junk.display().to_string(),
        ],
    )
    .fails_with(&["junk.png", "not a PNG or JPEG image"]);
}

#[test]
fn resume_continues_exactly_with_running_statistics() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let cfg = config(d, "save_every = 3\n");
    let full = d.join("full");
    train(d, &cfg, &full, &[]).ok();
    // The same run as if stopped after step 3: its folder without what came later.
    let part = d.join("part");
    copy_dir(&full, &part);
    std::fs::remove_dir_all(part.join("checkpoint-6")).unwrap();
    std::fs::remove_file(part.join("results.json")).unwrap();
    afinar(d, &["train", "--resume", &part.display().to_string()]).ok();
    // Weights and running statistics at step 6, bit for bit.
    let a = std::fs::read(full.join("checkpoint-6/trainable.safetensors")).unwrap();
    let b = std::fs::read(part.join("checkpoint-6/trainable.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&a).unwrap();
    assert!(
        st.names().iter().any(|n| n.ends_with("running_mean")),
        "checkpoints keep the running statistics"
    );
    assert!(
        a == b,
        "the resumed run's step-6 state differs from the uninterrupted one"
    );
    let losses = |r: &Path| -> Vec<String> {
        metrics(r)
            .iter()
            .map(|m| format!("{} {} {}", m["step"], m["loss"], m["eval_loss"]))
            .collect()
    };
    assert_eq!(losses(&full), losses(&part));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}
