//! Replays every committed fuzz input through the fuzz targets' bodies
//! (`afinar::fuzz_targets`), on stable Rust, in CI: the corpora in
//! `fuzz/corpus/<target>/` and the inputs that once crashed a target in
//! `fuzz/regressions/<target>/`. No input may panic. See docs/fuzzing.md.
//!
//! `write_gguf_seeds` (ignored) regenerates the GGUF seed files with afinar's
//! own writer: `cargo test --release -p afinar --test fuzz_corpus -- --ignored`.

use afinar::hub::gguf::quant::GgmlType;
use afinar::hub::gguf::writer::str_array;
use afinar::hub::gguf::{GgufValue, GgufValueType, GgufWriter};
use std::path::{Path, PathBuf};

/// A single allocation over 256 MiB aborts the test, as it crashes a fuzzer.
#[global_allocator]
static ALLOC: afinar::fuzz_targets::CappedAlloc = afinar::fuzz_targets::CappedAlloc;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[test]
fn every_corpus_and_regression_input_runs_without_panic() {
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for (name, target) in afinar::fuzz_targets::TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        let regressions = files(&fuzz_dir().join("regressions").join(name));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{name}/ is empty or missing"
        );
        let start = std::time::Instant::now();
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).unwrap();
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                failures.push(path.display().to_string());
            }
        }
        summary.push(format!(
            "{name}: {} corpus + {} regression inputs in {:.2} s",
            corpus.len(),
            regressions.len(),
            start.elapsed().as_secs_f64()
        ));
    }
    eprintln!("{}", summary.join("\n"));
    assert!(failures.is_empty(), "inputs that panic: {failures:#?}");
}

/// A tiny llama (1 layer, hidden 32) with every supported tensor type among
/// its weights, a byte-level BPE tokenizer and a ChatML template.
fn tiny_llama(ty: GgmlType) -> GgufWriter {
    let (h, nh, nkv, ff, layers) = (32usize, 2usize, 1usize, 32usize, 1usize);
    let tokens = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "h",
        "e",
        "l",
        "o",
        "Ġ",
        "w",
        "r",
        "d",
        "he",
        "ll",
        "llo",
        "hello",
        "Ġw",
    ];
    let merges = ["h e", "l l", "ll o", "he llo", "Ġ w"];
    let vocab = tokens.len();
    let mut w = GgufWriter::new();
    let s = |v: &str| GgufValue::String(v.into());
    w.add_metadata("general.architecture", s("llama")).unwrap();
    for (k, v) in [
        ("block_count", layers),
        ("context_length", 64),
        ("embedding_length", h),
        ("feed_forward_length", ff),
        ("attention.head_count", nh),
        ("attention.head_count_kv", nkv),
        ("vocab_size", vocab),
    ] {
        w.add_metadata(format!("llama.{k}"), GgufValue::U32(v as u32))
            .unwrap();
    }
    w.add_metadata(
        "llama.attention.layer_norm_rms_epsilon",
        GgufValue::F32(1e-5),
    )
    .unwrap();
    w.add_metadata("llama.rope.freq_base", GgufValue::F32(10000.0))
        .unwrap();
    w.add_metadata("tokenizer.ggml.model", s("gpt2")).unwrap();
    w.add_metadata("tokenizer.ggml.pre", s("smollm")).unwrap();
    w.add_metadata("tokenizer.ggml.tokens", str_array(&tokens))
        .unwrap();
    w.add_metadata("tokenizer.ggml.merges", str_array(&merges))
        .unwrap();
    let mut types = vec![GgufValue::I32(1); vocab];
    for t in types.iter_mut().take(3) {
        *t = GgufValue::I32(3);
    }
    w.add_metadata(
        "tokenizer.ggml.token_type",
        GgufValue::Array(GgufValueType::I32, types),
    )
    .unwrap();
    w.add_metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
        .unwrap();
    w.add_metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(2))
        .unwrap();
    w.add_metadata("tokenizer.ggml.add_bos_token", GgufValue::Bool(false))
        .unwrap();
    w.add_metadata(
        "tokenizer.chat_template",
        s("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    )
    .unwrap();
    let vals =
        |n: usize| -> Vec<f32> { (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect() };
    let kv = h / nh * nkv;
    let mut add = |name: &str, ty: GgmlType, shape: &[usize]| {
        let n = shape.iter().product();
        w.add_f32(name, ty, shape, &vals(n)).unwrap();
    };
    add("token_embd.weight", GgmlType::F32, &[vocab, h]);
    add("output_norm.weight", GgmlType::F32, &[h]);
    for l in 0..layers {
        add(&format!("blk.{l}.attn_norm.weight"), GgmlType::F32, &[h]);
        add(&format!("blk.{l}.ffn_norm.weight"), GgmlType::F32, &[h]);
        add(&format!("blk.{l}.attn_q.weight"), ty, &[h, h]);
        add(&format!("blk.{l}.attn_k.weight"), ty, &[kv, h]);
        add(&format!("blk.{l}.attn_v.weight"), ty, &[kv, h]);
        add(&format!("blk.{l}.attn_output.weight"), ty, &[h, h]);
        add(&format!("blk.{l}.ffn_gate.weight"), ty, &[ff, h]);
        add(&format!("blk.{l}.ffn_up.weight"), ty, &[ff, h]);
        add(&format!("blk.{l}.ffn_down.weight"), ty, &[h, ff]);
    }
    w
}

/// Every metadata value type, nested arrays, a non-default alignment and one
/// small tensor of each supported type.
fn all_types() -> GgufWriter {
    use GgufValue as V;
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", V::String("llama".into()))
        .unwrap();
    w.add_metadata("general.alignment", V::U32(64)).unwrap();
    for (k, v) in [
        ("t.u8", V::U8(200)),
        ("t.i8", V::I8(-5)),
        ("t.u16", V::U16(60000)),
        ("t.i16", V::I16(-30000)),
        ("t.u32", V::U32(4_000_000_000)),
        ("t.i32", V::I32(-2_000_000_000)),
        ("t.f32", V::F32(1.5e-5)),
        ("t.bool", V::Bool(true)),
        ("t.str", V::String("héllo ✓".into())),
        ("t.u64", V::U64(u64::MAX)),
        ("t.i64", V::I64(i64::MIN)),
        ("t.f64", V::F64(-2.25)),
        ("t.strs", str_array(&["a", "", "Ġthe"])),
        (
            "t.nested",
            V::Array(
                GgufValueType::Array,
                vec![V::Array(GgufValueType::U8, vec![V::U8(1), V::U8(2)])],
            ),
        ),
    ] {
        w.add_metadata(k, v).unwrap();
    }
    for (name, ty, shape) in [
        ("a.f32", GgmlType::F32, vec![3, 5]),
        ("b.f16", GgmlType::F16, vec![2, 3]),
        ("c.bf16", GgmlType::BF16, vec![2, 2, 2]),
        ("d.q8_0", GgmlType::Q8_0, vec![2, 32]),
        ("e.q4_0", GgmlType::Q4_0, vec![1, 32]),
        ("f.q4_1", GgmlType::Q4_1, vec![1, 64]),
    ] {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| i as f32 / 4.0 - 1.0).collect();
        w.add_f32(name, ty, &shape, &v).unwrap();
    }
    w
}

#[test]
#[ignore = "writes the GGUF seed files of fuzz/corpus/gguf/"]
fn write_gguf_seeds() {
    let dir = fuzz_dir().join("corpus/gguf");
    std::fs::create_dir_all(&dir).unwrap();
    all_types().write(dir.join("seed-all-types.gguf")).unwrap();
    for (ty, name) in [
        (GgmlType::F32, "f32"),
        (GgmlType::F16, "f16"),
        (GgmlType::Q8_0, "q8_0"),
        (GgmlType::Q4_0, "q4_0"),
        (GgmlType::Q4_1, "q4_1"),
    ] {
        tiny_llama(ty)
            .write(dir.join(format!("seed-llama-{name}.gguf")))
            .unwrap();
    }
}
