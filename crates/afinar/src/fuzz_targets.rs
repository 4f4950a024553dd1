//! The bodies of afinar's fuzz targets: each takes arbitrary bytes and drives
//! one file parser the way afinar itself uses it, through the same code as
//! the real loaders (`Checkpoint::from_bytes` and `Gguf::from_bytes` share
//! `open`'s parser, `records_from_reader` is `read_records` without the
//! file). An `Err` is the expected answer to bad bytes; a panic, an abort, a
//! hang or an allocation sized by an untrusted length field is a bug.
//!
//! Two callers: the libFuzzer targets in `fuzz/fuzz_targets/` (`cargo fuzz`,
//! see `docs/fuzzing.md`) and the stable replay test
//! `crates/afinar/tests/fuzz_corpus.rs`, which runs every committed corpus
//! and crash file through these functions in CI.

use crate::data::sft::{self, Message, Role, SftExample, SftFormat};
use crate::data::{
    examples_from_records, records_from_reader, seeded_split, DataSpec, FieldPath, Format,
    LabelMap, Records,
};
use crate::hub::chat_template::ChatTemplate;
use crate::hub::checkpoint::Checkpoint;
use crate::hub::gguf::{self, Gguf};
use crate::models::load::gguf_params;
use crate::models::{LoadOpts, ModelConfig};
use crate::params::Selector;
use std::path::Path;

/// Inputs are small (the fuzzers run with `-max_len` of 4 to 64 KiB): no
/// single allocation needs more than this. Bigger means a size came from an
/// untrusted field without a check against the file's length.
pub const ALLOC_CAP: usize = 256 << 20;

/// The system allocator, aborting (a crash libFuzzer records) on any single
/// allocation over [`ALLOC_CAP`], and guarding [`crate::mem_guard::limit`] (a
/// chat template render that holds more than its memory limit aborts too).
/// The fuzz binaries and the replay test install it.
pub struct CappedAlloc;

fn check_size(size: usize) {
    if size > ALLOC_CAP {
        // No formatting machinery that could allocate: a fixed message, then abort.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"fuzz_targets::CappedAlloc: one allocation over ALLOC_CAP (256 MiB)\n",
        );
        std::process::abort();
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl std::alloc::GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        check_size(layout.size());
        crate::mem_guard::on_alloc(layout.size());
        std::alloc::System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        check_size(layout.size());
        crate::mem_guard::on_alloc(layout.size());
        std::alloc::System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        crate::mem_guard::on_dealloc(layout.size());
        std::alloc::System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        check_size(new);
        crate::mem_guard::on_realloc(layout.size(), new);
        std::alloc::System.realloc(ptr, layout, new)
    }
}

/// The targets by name, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/` call them.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("safetensors_header", safetensors_header),
    ("gguf", gguf),
    ("jsonl", jsonl),
    ("csv", csv),
    ("toml_config", toml_config),
    ("json_configs", json_configs),
    ("chat_template", chat_template),
    ("weak_rules", weak_rules),
    ("pth", pth),
    ("images", images),
];

/// A safetensors file: header length, JSON header, dtypes, shapes against
/// byte ranges, overlaps; then every tensor read back, the `inspect` table.
pub fn safetensors_header(data: &[u8]) {
    let Ok(ck) = Checkpoint::from_bytes("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    let _ = ck.table();
    let _ = ck.num_params();
    for name in ck.names() {
        let info = ck.info(&name).expect("a listed tensor has info");
        let bytes = ck.bytes(&name).expect("a listed tensor has bytes");
        assert!(bytes.len() <= data.len());
        if let Ok(t) = ck.load(&name) {
            assert_eq!(t.dims(), info.shape.as_slice(), "{name}");
        }
        if let Ok(t) = ck.load_f32(&name) {
            assert_eq!(t.dims(), info.shape.as_slice(), "{name}");
        }
    }
}

/// A GGUF file: header, metadata, tensor infos, every tensor dequantised,
/// and what a decoder load does with it (config, weights, tokenizer).
pub fn gguf(data: &[u8]) {
    let Ok(g) = Gguf::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    let _ = crate::hub::inspect::gguf_table(&g);
    for t in g.tensor_infos() {
        let _ = g.tensor_bytes(&t.name);
        if let Ok(q) = g.qtensor(&t.name) {
            let v = q.to_f32_vec();
            assert_eq!(v.len(), q.rows() * q.cols());
        }
        if let Ok(x) = g.tensor_f32(&t.name) {
            assert_eq!(x.dims(), t.shape().as_slice());
        }
    }
    let _ = gguf::llama_config_from_gguf(&g);
    for quantized in [false, true] {
        let _ = gguf_params(
            &g,
            Selector::none(),
            LoadOpts {
                quantized,
                max_length: None,
            },
        );
    }
    if let Ok(t) = gguf::tokenizer_from_gguf(&g) {
        if let Ok(tok) = t.text_tokenizer(g.path(), 64) {
            if let Ok((ids, _)) = tok.encode("Hello, world! 123 <|im_end|>", None) {
                let _ = tok.decode(&ids, true);
            }
        }
        if let Some(src) = &t.chat_template {
            render_chat(src);
        }
    }
}

/// JSON Lines rows, read into examples by field paths and into SFT rows.
pub fn jsonl(data: &[u8]) {
    records(data, Format::Jsonl);
}

/// The same bytes as CSV (RFC 4180 quoting) and as TSV (quotes are text).
pub fn csv(data: &[u8]) {
    records(data, Format::Csv);
    records(data, Format::Tsv);
}

/// An input may start with `#paths TEXT PAIR LABEL` (`-` for none): field
/// paths to read the rows with, fuzzed along with the rows.
fn field_specs(data: &[u8]) -> (Vec<DataSpec>, &[u8]) {
    let path = |s: &str| FieldPath::parse(s).ok();
    let spec = |t: &str, p: Option<&str>, l: Option<&str>| -> Option<DataSpec> {
        Some(DataSpec {
            text: path(t)?,
            text_pair: match p {
                Some(p) => Some(path(p)?),
                None => None,
            },
            label: match l {
                Some(l) => Some(path(l)?),
                None => None,
            },
        })
    };
    if let Some(rest) = data.strip_prefix(b"#paths ") {
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = String::from_utf8_lossy(&rest[..end]).into_owned();
        let body = rest.get(end + 1..).unwrap_or_default();
        let mut parts = line.split(' ');
        let mut next = || parts.next().filter(|s| *s != "-");
        let (t, p, l) = (next(), next(), next());
        let specs = t.and_then(|t| spec(t, p, l)).into_iter().collect();
        return (specs, body);
    }
    let specs = [
        spec("text", None, Some("label")),
        spec("sentence1", Some("sentence2"), Some("label")),
        spec("messages[-1].content", None, Some("meta.tags[0]")),
        spec("text", None, None),
    ];
    (specs.into_iter().flatten().collect(), data)
}

fn records(data: &[u8], format: Format) {
    let (specs, body) = field_specs(data);
    let path = Path::new("fuzz.data");
    let Ok(records) = records_from_reader(path, format, body) else {
        return;
    };
    for spec in &specs {
        examples(&records, spec);
    }
    for format in [
        SftFormat::messages(),
        SftFormat::prompt_completion(),
        SftFormat::openai_evals(),
    ] {
        if let Ok(rows) = sft::sft_from_records(&records, &format) {
            for row in rows.rows.iter().take(4) {
                if let SftExample::Chat(msgs) = &row.example {
                    let _ = sft::assistant_spans(chatml(), msgs);
                }
            }
        }
    }
}

fn examples(records: &Records, spec: &DataSpec) {
    let Ok(ex) = examples_from_records(records, spec) else {
        return;
    };
    for e in &ex {
        if let Some(l) = &e.label {
            let _ = (l.to_label_string(), l.as_f64());
        }
    }
    if spec.label.is_some() {
        if let Ok(map) = LabelMap::from_examples(&ex, &records.path) {
            let ids = map
                .ids(&ex, &records.path)
                .expect("the training labels map to ids");
            assert!(ids.iter().all(|&i| i < map.len()));
        }
    }
    let split = seeded_split(ex.len(), [0.8, 0.1, 0.1], 7).expect("valid ratios");
    let _ = split;
}

/// The ChatML template SmolLM2 ships, compiled once.
fn chatml() -> &'static ChatTemplate {
    static T: std::sync::OnceLock<ChatTemplate> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        ChatTemplate::new(
            "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
            "<|im_start|>",
            "<|im_end|>",
        )
        .expect("the ChatML template compiles")
    })
}

/// A run config (TOML) and its `--set` overrides: lines starting with
/// `#set KEY=VALUE` (TOML comments, so the rest still parses as the file).
/// A config that loads must save (`config.toml` in the run folder) and load
/// again, as `--resume` does.
pub fn toml_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let overrides: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("#set "))
        .map(String::from)
        .collect();
    let path = Path::new("fuzz.toml");
    let Ok(plan) = crate::config::Plan::from_str(text, path, &overrides) else {
        return;
    };
    let _ = plan.selection_metric();
    let saved = plan.to_toml().expect("a loaded config saves");
    if let Err(e) = crate::config::Plan::from_str(&saved, path, &[]) {
        panic!("a saved config does not load again: {e}\n{saved}");
    }
}

/// The JSON files beside a checkpoint: a Hugging Face `config.json` (as a
/// decoder's and as BERT's), a PEFT `adapter_config.json`, and the shard
/// names of a `model.safetensors.index.json` (a name the index check lets
/// through must stay inside the model folder).
pub fn json_configs(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.json");
    let _ = crate::adapters::peft::config_from_json(path, text);
    let Ok(raw) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    if let Ok(cfg) = ModelConfig::from_value(&raw, path) {
        let _ = (cfg.hidden_size(), cfg.vocab_size());
    }
    if let Some(map) = raw.get("weight_map").and_then(|m| m.as_object()) {
        let dir = Path::new("/models/m");
        for shard in map.values().filter_map(|v| v.as_str()) {
            if crate::hub::checkpoint::is_plain_relative(shard) {
                let p = dir.join(shard);
                assert!(
                    p.starts_with(dir)
                        && p != dir
                        && !p.components().any(|c| c == std::path::Component::ParentDir),
                    "shard `{shard}` accepted but leaves the folder: {}",
                    p.display()
                );
            }
        }
    }
    if let Ok(cfg) = serde_json::from_value::<crate::models::bert::BertConfig>(raw) {
        let _ = cfg.validate(path);
    }
}

/// A chat template (`tokenizer_config.json`'s `chat_template`, GGUF's
/// `tokenizer.chat_template`): compiled and rendered on a short chat.
pub fn chat_template(data: &[u8]) {
    if let Ok(src) = std::str::from_utf8(data) {
        render_chat(src);
    }
}

fn render_chat(src: &str) {
    let Ok(t) = ChatTemplate::new(src, "<s>", "</s>") else {
        return;
    };
    let msgs = [
        Message::new(Role::System, "Be brief."),
        Message::new(Role::User, "Hi"),
        Message::new(Role::Assistant, "Hello!"),
    ];
    let _ = t.render(&msgs[..2], true);
    let _ = sft::assistant_spans(&t, &msgs);
}

/// Weak supervision's parsers on the same bytes: SpamAssassin `.cf` text
/// (conditions, definitions, Perl patterns), a mail (headers, MIME parts,
/// encodings, HTML), a rule file and a scored word list; then the imported
/// rules (at most 64) fired on the mail.
pub fn weak_rules(data: &[u8]) {
    use crate::weak::{lexicon, mail::Mail, spamassassin};
    let text = String::from_utf8_lossy(data);
    let imp = spamassassin::import_texts(&[("fuzz.cf".into(), text.to_string())]);
    let m = Mail::parse(&text);
    let _ = (
        m.header("Subject"),
        m.header_raw("From"),
        m.all_headers(false),
        m.model_text(),
    );
    for r in imp.rules.iter().take(64) {
        if let Some(p) = &r.pattern {
            let _ = p.is_match(&m.body);
        }
    }
    let _ = toml::from_str::<toml::Value>(&text);
    if let Ok(lex) = lexicon::Lexicon::parse(&text, Path::new("fuzz.txt")) {
        let _ = lex.score(&text);
    }
    let _ = lexicon::Cond::parse(&text);
}

/// A PyTorch `.pth` state dict through the weights-only reader: zip or
/// legacy container, the pickle machine, storages, views.
pub fn pth(data: &[u8]) {
    let _ = crate::hub::pth::from_bytes(Path::new("fuzz.pth"), data);
}

/// Image inputs: an IDX image file and its label file (the first byte
/// says where the data splits), or PNG / JPEG bytes decoded and resized to
/// a model input.
pub fn images(data: &[u8]) {
    use crate::data::image;
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    if first & 1 == 0 {
        if let Ok(img) = image::decode(rest) {
            let t = image::Transform {
                size: 8,
                mean: image::IMAGENET_MEAN,
                std: image::IMAGENET_STD,
                crop_padding: 1,
                flip: true,
            };
            let _ = t.batch(&[&img], Some(&[first as u64]));
        }
    } else {
        let cut = (first as usize >> 1).min(rest.len());
        let (a, b) = rest.split_at(rest.len() - cut);
        if let Ok(set) = image::idx_from_bytes(
            a,
            b,
            Path::new("fuzz-images"),
            Path::new("fuzz-labels"),
            None,
        ) {
            let t = image::Transform {
                size: 8,
                mean: image::IMAGENET_MEAN,
                std: image::IMAGENET_STD,
                crop_padding: 0,
                flip: false,
            };
            let refs: Vec<&image::RawImage> = set.images.iter().take(4).collect();
            let _ = t.batch(&refs, None);
        }
    }
}
