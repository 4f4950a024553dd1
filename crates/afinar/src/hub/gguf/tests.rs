//! GGUF reader, writer, llama mapping and tokenizer tests. Files are made by
//! the writer here; the real SmolLM2 file is compared with the golden fixture
//! from `scripts/reference/golden_smollm2_gguf.py` when it has been fetched.

use super::quant::{GgmlType, QData, QTensor};
use super::writer::str_array;
use super::*;
use crate::testutil::{max_diff, uniform as randn};
use rand::SeedableRng;

fn all_value_types() -> Vec<(&'static str, GgufValue)> {
    use GgufValue as V;
    vec![
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
        ("t.strs", str_array(&["a", "", "Ġthe", "<|im_end|>"])),
        (
            "t.i32s",
            V::Array(GgufValueType::I32, vec![V::I32(1), V::I32(3), V::I32(-7)]),
        ),
        ("t.empty", V::Array(GgufValueType::F32, vec![])),
        (
            "t.nested",
            V::Array(
                GgufValueType::Array,
                vec![
                    V::Array(GgufValueType::U8, vec![V::U8(1), V::U8(2)]),
                    str_array(&["x"]),
                ],
            ),
        ),
    ]
}

/// (name, type, HF shape, values) of each tensor written.
type SampleTensors = Vec<(&'static str, GgmlType, Vec<usize>, Vec<f32>)>;

/// A small file: every metadata type, every writable tensor type.
fn sample_writer(alignment: Option<u32>) -> (GgufWriter, SampleTensors) {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("llama".into()))
        .unwrap();
    if let Some(a) = alignment {
        w.add_metadata("general.alignment", GgufValue::U32(a))
            .unwrap();
    }
    for (k, v) in all_value_types() {
        w.add_metadata(k, v).unwrap();
    }
    let tensors = vec![
        ("norm.weight", GgmlType::F32, vec![7], randn(7, 1)),
        ("a.f32", GgmlType::F32, vec![3, 5], randn(15, 2)),
        ("b.f16", GgmlType::F16, vec![2, 33], randn(66, 3)),
        ("c.bf16", GgmlType::BF16, vec![2, 3, 4], randn(24, 4)),
        ("d.q8_0", GgmlType::Q8_0, vec![4, 64], randn(256, 5)),
        ("e.q4_0", GgmlType::Q4_0, vec![3, 32], randn(96, 6)),
        ("f.q4_1", GgmlType::Q4_1, vec![5, 96], randn(480, 7)),
    ];
    for (name, ty, shape, vals) in &tensors {
        w.add_f32(*name, *ty, shape, vals).unwrap();
    }
    (w, tensors)
}

#[test]
fn gguf_write_read_roundtrip() {
    for alignment in [None, Some(64u32)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let (w, tensors) = sample_writer(alignment);
        w.write(&path).unwrap();
        // Atomic: only the file itself is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let g = Gguf::open(&path).unwrap();
        let align = alignment.unwrap_or(32) as usize;
        assert_eq!((g.version(), g.alignment()), (3, align));
        assert_eq!(g.data_offset() % align, 0);
        for (k, v) in all_value_types() {
            assert_eq!(g.get(k), Some(&v), "{k}");
        }
        assert_eq!(g.get_u32("t.u16").unwrap(), 60000);
        assert_eq!(g.get_u64("t.u64").unwrap(), u64::MAX);
        assert_eq!(g.get_f32("t.f64").unwrap(), -2.25);
        assert_eq!(g.get_str("t.str").unwrap(), "héllo ✓");
        assert!(g.get_bool("t.bool").unwrap());
        assert_eq!(
            g.get_str_array("t.strs").unwrap(),
            vec!["a", "", "Ġthe", "<|im_end|>"]
        );
        assert_eq!(g.get_int_array("t.i32s").unwrap(), vec![1, 3, -7]);
        assert_eq!(g.opt_u32("absent").unwrap(), None);

        assert_eq!(g.tensor_infos().len(), tensors.len());
        for (name, ty, shape, vals) in &tensors {
            let info = g.tensor_info(name).unwrap();
            assert_eq!((info.ty, &info.shape()), (*ty, shape), "{name}");
            assert_eq!(info.ne[0] as usize, *shape.last().unwrap());
            assert_eq!(info.offset % align as u64, 0, "{name}");
            let want = quant::quantize(*ty, vals).unwrap();
            assert_eq!(g.tensor_bytes(name).unwrap(), &want[..], "{name}");
            let q = g.qtensor(name).unwrap();
            assert_eq!(q.bytes(), &want[..]);
            let t = g.tensor_f32(name).unwrap();
            assert_eq!(t.dims(), &shape[..]);
            let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if *ty == GgmlType::F32 {
                assert_eq!(&got, vals);
            }
            assert_eq!(got, q.to_f32_vec());
        }
        // Writing what was read gives the same bytes.
        let mut again = GgufWriter::new();
        for (k, v) in g.metadata() {
            again.add_metadata(k.clone(), v.clone()).unwrap();
        }
        let mut first = GgufWriter::new();
        for (k, v) in g.metadata() {
            first.add_metadata(k.clone(), v.clone()).unwrap();
        }
        for t in g.tensor_infos() {
            let q = g.qtensor(&t.name).unwrap();
            again
                .add_qtensor(t.name.clone(), &q, Some(&t.shape()))
                .unwrap();
            first
                .add_raw(
                    t.name.clone(),
                    t.ty,
                    &t.shape(),
                    g.tensor_bytes(&t.name).unwrap().to_vec(),
                )
                .unwrap();
        }
        assert_eq!(again.to_bytes(), first.to_bytes());
        let reread = dir.path().join("again.gguf");
        again.write(&reread).unwrap();
        let g2 = Gguf::open(&reread).unwrap();
        assert_eq!(g2.metadata(), g.metadata());
        assert_eq!(g2.tensor_infos(), g.tensor_infos());
    }
}

#[test]
fn gguf_truncated_copies_are_errors_never_panics() {
    let (w, tensors) = sample_writer(None);
    let bytes = w.to_bytes();
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.gguf");
    std::fs::write(&full, &bytes).unwrap();
    let g = Gguf::open(&full).unwrap();
    let last = g.tensor_infos().last().unwrap();
    let data_end = g.data_offset() + (last.offset + last.nbytes.unwrap()) as usize;
    assert!(data_end <= bytes.len() && bytes.len() - data_end < 32);
    let header_end = g.data_offset();
    drop(g);
    let p = dir.path().join("cut.gguf");
    let mut in_data = 0;
    for cut in 0..bytes.len() {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        match Gguf::open(&p) {
            Ok(_) => assert!(
                cut >= data_end,
                "a copy cut at {cut} of {} opened",
                bytes.len()
            ),
            Err(GgufError::Truncated {
                path,
                what,
                start,
                end,
                len,
            }) => {
                assert_eq!(path, p);
                assert_eq!(len, cut as u64);
                assert!(end > len && start <= end, "{what}: {start}..{end} of {len}");
                if cut >= header_end {
                    in_data += 1;
                    // Which tensor, its bytes, the file's length.
                    let msg = Gguf::open(&p).unwrap_err().to_string();
                    assert!(
                        msg.contains("tensor `") && msg.contains("data needs bytes"),
                        "{msg}"
                    );
                    assert!(tensors.iter().any(|t| what.contains(t.0)), "{what}");
                }
            }
            Err(e) => panic!("cut at {cut}: expected a truncation error, got {e}"),
        }
    }
    assert!(in_data > 0);
    // The message names the file and what was cut.
    std::fs::write(&p, &bytes[..30]).unwrap();
    let msg = Gguf::open(&p).unwrap_err().to_string();
    assert!(
        msg.contains("cut.gguf") && msg.contains("truncated: metadata entry 0"),
        "{msg}"
    );
}

fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b
}

fn open_bytes(bytes: &[u8]) -> GgufResult<Gguf> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.gguf");
    std::fs::write(&p, bytes).unwrap();
    Gguf::open(&p)
}

#[test]
fn gguf_bad_files_give_typed_errors() {
    let err = open_bytes(b"GGML\x03\x00\x00\x00").unwrap_err();
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
    assert!(err.to_string().contains("not a GGUF file"), "{err}");
    for v in [1u32, 4] {
        let err = open_bytes(&header(v, 0, 0)).unwrap_err();
        assert!(
            matches!(err, GgufError::UnsupportedVersion { version, .. } if version == v),
            "{err}"
        );
    }
    let mut be = b"GGUF".to_vec();
    be.extend_from_slice(&3u32.to_be_bytes());
    let err = open_bytes(&be).unwrap_err().to_string();
    assert!(err.contains("big-endian"), "{err}");
    assert!(open_bytes(&header(2, 0, 0)).is_ok());

    // An unknown value type, a bad bool, a non-UTF-8 key, a duplicate key.
    let kv = |key: &[u8], ty: u32, val: &[u8]| {
        let mut b = header(3, 0, 1);
        b.extend_from_slice(&(key.len() as u64).to_le_bytes());
        b.extend_from_slice(key);
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(val);
        b
    };
    let err = open_bytes(&kv(b"k", 13, &[0])).unwrap_err().to_string();
    assert!(
        err.contains("`k`") && err.contains("unknown value type 13"),
        "{err}"
    );
    let err = open_bytes(&kv(b"k", 7, &[2])).unwrap_err().to_string();
    assert!(err.contains("bool byte is 2"), "{err}");
    let err = open_bytes(&kv(b"\xff", 0, &[0])).unwrap_err().to_string();
    assert!(err.contains("not UTF-8"), "{err}");
    // A huge array length in a short file: an error, not a huge allocation.
    let mut arr = 8u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&u64::MAX.to_le_bytes());
    let err = open_bytes(&kv(b"k", 9, &arr)).unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");

    // A type afinar cannot decode: listed and bounds-checked, refused by name on use.
    let mut w = GgufWriter::new();
    w.add_raw(
        "blk.0.ffn_down.weight",
        GgmlType::Q5_K,
        &[2, 256],
        vec![0; 2 * 176],
    )
    .unwrap();
    w.add_f32("ok", GgmlType::F32, &[2], &[1.0, 2.0]).unwrap();
    let g = open_bytes(&w.to_bytes()).unwrap();
    assert_eq!(
        g.tensor_info("blk.0.ffn_down.weight").unwrap().ty,
        GgmlType::Q5_K
    );
    let err = g.qtensor("blk.0.ffn_down.weight").unwrap_err();
    assert!(matches!(err, GgufError::UnsupportedType { .. }));
    assert!(
        err.to_string().ends_with(
            "tensor blk.0.ffn_down.weight has type Q5_K, supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"
        ),
        "{err}"
    );
    assert!(g.tensor_f32("blk.0.ffn_down.weight").is_err());
    let err = g.tensor_f32("nope").unwrap_err().to_string();
    assert!(
        err.contains("`nope`") && err.contains("not in the file"),
        "{err}"
    );
    // Typed getters name the key and what they found.
    let err = g.get_u32("general.architecture").unwrap_err().to_string();
    assert!(
        err.contains("general.architecture") && err.contains("missing"),
        "{err}"
    );

    // A misaligned tensor offset (patched by hand).
    let mut w = GgufWriter::new();
    w.add_f32("a", GgmlType::F32, &[8], &[0.0; 8]).unwrap();
    w.add_f32("b", GgmlType::F32, &[8], &[0.0; 8]).unwrap();
    let mut bytes = w.to_bytes();
    // b's offset (32) is the last u64 of the tensor infos, just before the padding.
    let pos = bytes
        .windows(8)
        .rposition(|s| s == 32u64.to_le_bytes())
        .unwrap();
    bytes[pos] = 4;
    let err = open_bytes(&bytes).unwrap_err().to_string();
    assert!(
        err.contains("`b`") && err.contains("not a multiple of the alignment 32"),
        "{err}"
    );
}

// ---------------------------------------------------------------- llama

const LLAMA_DIMS: (usize, usize, usize, usize, usize, usize) = (64, 4, 2, 96, 40, 2); // hidden, heads, kv heads, ff, vocab, layers

/// A tiny llama GGUF whose Q/K weights were permuted as llama.cpp's converter
/// does; returns the file and the HF-order f32 weights.
fn tiny_llama(dir: &Path, arch: &str, tied: bool) -> (PathBuf, Vec<(String, Tensor)>) {
    let (h, nh, nkv, ff, vocab, layers) = LLAMA_DIMS;
    let kv = h / nh * nkv;
    let mut w = GgufWriter::new();
    let s = |v: &str| GgufValue::String(v.into());
    w.add_metadata("general.architecture", s(arch)).unwrap();
    for (k, v) in [
        ("block_count", layers),
        ("context_length", 256),
        ("embedding_length", h),
        ("feed_forward_length", ff),
        ("attention.head_count", nh),
        ("attention.head_count_kv", nkv),
        ("vocab_size", vocab),
    ] {
        w.add_metadata(format!("{arch}.{k}"), GgufValue::U32(v as u32))
            .unwrap();
    }
    w.add_metadata(format!("{arch}.rope.freq_base"), GgufValue::F32(100000.0))
        .unwrap();
    w.add_metadata(
        format!("{arch}.attention.layer_norm_rms_epsilon"),
        GgufValue::F32(1e-5),
    )
    .unwrap();
    w.add_metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
        .unwrap();
    w.add_metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(2))
        .unwrap();
    let mut hf = Vec::new();
    let mut seed = 0;
    let mut add = |w: &mut GgufWriter, name: String, shape: Vec<usize>, ty: GgmlType| {
        seed += 1;
        let t = Tensor::from_vec(
            randn(shape.iter().product(), seed),
            shape.clone(),
            &Device::Cpu,
        )
        .unwrap();
        let stored = match () {
            _ if name.ends_with("q_proj.weight") => permute_qk(&t, nh).unwrap(),
            _ if name.ends_with("k_proj.weight") => permute_qk(&t, nkv).unwrap(),
            _ => t.clone(),
        };
        let vals = stored.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        w.add_f32(gguf_name(&name).unwrap(), ty, &shape, &vals)
            .unwrap();
        hf.push((name, t));
    };
    add(
        &mut w,
        "model.embed_tokens.weight".into(),
        vec![vocab, h],
        GgmlType::Q8_0,
    );
    use GgmlType::{F32, Q4_0, Q4_1, Q8_0};
    let layer: [(&str, Vec<usize>, GgmlType); 9] = [
        ("self_attn.q_proj.weight", vec![h, h], F32),
        ("self_attn.k_proj.weight", vec![kv, h], F32),
        ("self_attn.v_proj.weight", vec![kv, h], Q4_1),
        ("self_attn.o_proj.weight", vec![h, h], Q4_0),
        ("mlp.gate_proj.weight", vec![ff, h], Q4_1),
        ("mlp.up_proj.weight", vec![ff, h], Q4_1),
        ("mlp.down_proj.weight", vec![h, ff], Q8_0),
        ("input_layernorm.weight", vec![h], F32),
        ("post_attention_layernorm.weight", vec![h], F32),
    ];
    for l in 0..layers {
        for (name, shape, ty) in &layer {
            add(
                &mut w,
                format!("model.layers.{l}.{name}"),
                shape.clone(),
                *ty,
            );
        }
    }
    add(&mut w, "model.norm.weight".into(), vec![h], GgmlType::F32);
    if !tied {
        add(
            &mut w,
            "lm_head.weight".into(),
            vec![vocab, h],
            GgmlType::F16,
        );
    }
    let path = dir.join(format!("{arch}.gguf"));
    w.write(&path).unwrap();
    (path, hf)
}

#[test]
fn gguf_qk_permutation_roundtrip_and_mapping() {
    // Two heads of four rows: GGUF row h*d + 2j + i holds HF row h*d + i*d/2 + j.
    let rows = Tensor::arange(0f32, 8.0, &Device::Cpu)
        .unwrap()
        .reshape((8, 1))
        .unwrap();
    let p = permute_qk(&rows, 2).unwrap();
    assert_eq!(
        p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    );
    assert_eq!(
        llama::qk_permutation(8, 2).unwrap(),
        vec![0, 2, 1, 3, 4, 6, 5, 7]
    );
    // 9 heads of 64 (SmolLM2's q), 3 of 64 (its k): both directions are inverses.
    for (rows, heads) in [(576, 9), (192, 3), (8, 1)] {
        let t = Tensor::from_vec(randn(rows * 32, rows as u64), (rows, 32), &Device::Cpu).unwrap();
        let back = unpermute_qk(&permute_qk(&t, heads).unwrap(), heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        let q = QTensor::from_f32(
            GgmlType::Q4_1,
            [rows, 32],
            &t.flatten_all().unwrap().to_vec1().unwrap(),
        )
        .unwrap();
        let pq = permute_qk_q(&q, heads).unwrap();
        assert_eq!(unpermute_qk_q(&pq, heads).unwrap().bytes(), q.bytes());
        // Moving quantised rows = moving the dequantised rows.
        let pf = permute_qk(
            &Tensor::from_vec(q.to_f32_vec(), (rows, 32), &Device::Cpu).unwrap(),
            heads,
        )
        .unwrap();
        assert_eq!(
            pq.to_f32_vec(),
            pf.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    assert!(unpermute_qk_q(
        &QTensor::new(GgmlType::F32, [6, 1], QData::Owned(vec![0; 24])).unwrap(),
        4
    )
    .is_err());
}

#[test]
fn gguf_llama_names_config_and_weights() {
    for (g, hf) in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        (
            "blk.12.attn_q.weight",
            "model.layers.12.self_attn.q_proj.weight",
        ),
        (
            "blk.0.attn_k.weight",
            "model.layers.0.self_attn.k_proj.weight",
        ),
        (
            "blk.0.attn_v.weight",
            "model.layers.0.self_attn.v_proj.weight",
        ),
        (
            "blk.0.attn_output.weight",
            "model.layers.0.self_attn.o_proj.weight",
        ),
        (
            "blk.3.ffn_gate.weight",
            "model.layers.3.mlp.gate_proj.weight",
        ),
        ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight"),
        (
            "blk.3.ffn_down.weight",
            "model.layers.3.mlp.down_proj.weight",
        ),
        (
            "blk.29.attn_norm.weight",
            "model.layers.29.input_layernorm.weight",
        ),
        (
            "blk.29.ffn_norm.weight",
            "model.layers.29.post_attention_layernorm.weight",
        ),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ] {
        assert_eq!(hf_name(g).as_deref(), Some(hf));
        assert_eq!(gguf_name(hf).as_deref(), Some(g));
    }
    assert_eq!(hf_name("rope_freqs.weight"), None);
    assert_eq!(hf_name("blk.x.attn_q.weight"), None);

    let dir = tempfile::tempdir().unwrap();
    let (path, hf) = tiny_llama(dir.path(), "llama", true);
    let g = Gguf::open(&path).unwrap();
    let cfg = llama_config_from_gguf(&g).unwrap();
    let (h, nh, nkv, ff, vocab, layers) = LLAMA_DIMS;
    for (k, v) in [
        ("hidden_size", h),
        ("num_attention_heads", nh),
        ("num_key_value_heads", nkv),
        ("intermediate_size", ff),
        ("vocab_size", vocab),
        ("num_hidden_layers", layers),
        ("max_position_embeddings", 256),
        ("head_dim", h / nh),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
    ] {
        assert_eq!(cfg[k], serde_json::json!(v), "{k}");
    }
    assert_eq!(cfg["rms_norm_eps"], serde_json::json!(1e-5));
    assert_eq!(cfg["rope_theta"], serde_json::json!(100000.0));
    assert_eq!(cfg["tie_word_embeddings"], serde_json::json!(true));
    assert_eq!(cfg["model_type"], "llama");
    // It deserialises as afinar's typed config would read a config.json.
    let _: serde_json::Map<String, serde_json::Value> = serde_json::from_value(cfg).unwrap();

    assert_eq!(llama::llama_tensor_names(&g).len(), hf.len());
    for (name, want) in &hf {
        let got = llama_tensor_f32(&g, name).unwrap();
        assert_eq!(got.dims(), want.dims(), "{name}");
        let q = llama_qtensor(&g, name).unwrap();
        let from_q = Tensor::from_vec(q.to_f32_vec(), got.shape(), &Device::Cpu).unwrap();
        let d = max_diff(&got, &from_q);
        assert_eq!(d, 0.0, "{name}");
        // F32 weights (q, k, norms) come back exactly, in HF row order.
        let ty = g.tensor_info(&gguf_name(name).unwrap()).unwrap().ty;
        if ty == GgmlType::F32 {
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{name}"
            );
        }
    }
    let (path, _) = tiny_llama(dir.path(), "llama", false);
    let g = Gguf::open(&path).unwrap();
    assert_eq!(
        llama_config_from_gguf(&g).unwrap()["tie_word_embeddings"],
        false
    );

    let (path, _) = tiny_llama(dir.path(), "gemma", true);
    let g = Gguf::open(&path).unwrap();
    let err = llama_config_from_gguf(&g).unwrap_err();
    assert!(matches!(err, GgufError::UnsupportedArchitecture { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("general.architecture is `gemma`, supported: llama"),
        "{msg}"
    );
    assert!(llama_qtensor(&g, "model.norm.weight").is_err());
}

// ---------------------------------------------------------------- tokenizer

fn tiny_tokenizer_gguf(dir: &Path, model: &str, pre: Option<&str>) -> PathBuf {
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
        "1",
        "2",
        "!",
        "he",
        "ll",
        "llo",
        "hello",
        "Ġw",
        "or",
        "Ġwor",
        "Ġworld",
        "ld",
        "12",
    ];
    let merges = [
        "h e", "l l", "ll o", "he llo", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
    ];
    let mut types = vec![GgufValue::I32(1); tokens.len()];
    for t in types.iter_mut().take(3) {
        *t = GgufValue::I32(3);
    }
    let mut w = GgufWriter::new();
    let s = |v: &str| GgufValue::String(v.into());
    w.add_metadata("general.architecture", s("llama")).unwrap();
    w.add_metadata("tokenizer.ggml.model", s(model)).unwrap();
    if let Some(p) = pre {
        w.add_metadata("tokenizer.ggml.pre", s(p)).unwrap();
    }
    w.add_metadata("tokenizer.ggml.tokens", str_array(&tokens))
        .unwrap();
    w.add_metadata("tokenizer.ggml.merges", str_array(&merges))
        .unwrap();
    w.add_metadata(
        "tokenizer.ggml.token_type",
        GgufValue::Array(GgufValueType::I32, types),
    )
    .unwrap();
    w.add_metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
        .unwrap();
    w.add_metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(2))
        .unwrap();
    w.add_metadata("tokenizer.chat_template", s("{{ messages }}"))
        .unwrap();
    let p = dir.join(format!("tok-{model}-{}.gguf", pre.unwrap_or("none")));
    w.write(&p).unwrap();
    p
}

#[test]
fn gguf_tokenizer_from_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let g = Gguf::open(tiny_tokenizer_gguf(dir.path(), "gpt2", Some("smollm"))).unwrap();
    let t = tokenizer_from_gguf(&g).unwrap();
    assert_eq!((t.bos_id, t.eos_id, t.pad_id), (Some(1), Some(2), None));
    assert_eq!(t.chat_template.as_deref(), Some("{{ messages }}"));
    let enc = |text: &str| t.tokenizer.encode(text, true).unwrap().get_ids().to_vec();
    assert_eq!(enc("hello world"), vec![17, 21]);
    assert_eq!(enc("<|im_start|>hello<|im_end|>"), vec![1, 17, 2]);
    // smollm splits digits one by one: "12" is never merged.
    assert_eq!(enc("12"), vec![11, 12]);
    assert_eq!(
        t.tokenizer.decode(&[1, 17, 21, 2], true).unwrap(),
        "hello world"
    );
    assert_eq!(
        t.tokenizer.decode(&[1, 17, 2], false).unwrap(),
        "<|im_start|>hello<|im_end|>"
    );
    // gpt2 keeps runs of digits together.
    let g = Gguf::open(tiny_tokenizer_gguf(dir.path(), "gpt2", Some("gpt2"))).unwrap();
    let t2 = tokenizer_from_gguf(&g).unwrap();
    assert_eq!(t2.tokenizer.encode("12", true).unwrap().get_ids(), &[23]);
    let g = Gguf::open(tiny_tokenizer_gguf(dir.path(), "gpt2", None)).unwrap();
    assert_eq!(tokenizer_from_gguf(&g).unwrap().pre, "default");
    // As afinar's TextTokenizer: pad falls back to eos.
    let tt = t.text_tokenizer(g.path(), 16).unwrap();
    assert_eq!(tt.pad_id(), 2);
    assert_eq!(tt.encode("hello world", None).unwrap().0, vec![17, 21]);

    let g = Gguf::open(tiny_tokenizer_gguf(dir.path(), "llama", None)).unwrap();
    let err = tokenizer_from_gguf(&g).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.ggml.model") && err.contains("`llama`"),
        "{err}"
    );
    let g = Gguf::open(tiny_tokenizer_gguf(dir.path(), "gpt2", Some("qwen2"))).unwrap();
    let err = tokenizer_from_gguf(&g).unwrap_err().to_string();
    assert!(
        err.contains("`qwen2` is not supported") && err.contains("smollm"),
        "{err}"
    );
}

// ---------------------------------------------------------------- the real SmolLM2

fn smollm2() -> Option<Gguf> {
    crate::hub::assets::testing::real_asset("smollm2-135m-instruct").map(|p| Gguf::open(p).unwrap())
}

fn fixture() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/smollm2/gguf_reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

#[test]
fn gguf_real_smollm2_metadata_config_and_weights() {
    let Some(g) = smollm2() else { return };
    assert_eq!((g.version(), g.alignment()), (3, 32));
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.tensor_infos().len(), 272);
    let count = |ty| g.tensor_infos().iter().filter(|t| t.ty == ty).count();
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::Q8_0),
            count(GgmlType::F32)
        ),
        (210, 1, 61)
    );
    assert_eq!(
        g.tensor_info("token_embd.weight").unwrap().shape(),
        vec![49152, 576]
    );
    assert!(!g.has_tensor("output.weight"));
    assert_eq!(llama::llama_tensor_names(&g).len(), 272);

    let fx = fixture();
    let cfg = llama_config_from_gguf(&g).unwrap();
    for (k, v) in fx["config"].as_object().unwrap() {
        if v.is_f64() {
            // transformers widens the stored f32 (9.999999747378752e-06); we write
            // the shortest decimal of that f32 (1e-5), as SmolLM2's config.json has it.
            assert_eq!(
                cfg[k].as_f64().map(|x| x as f32),
                v.as_f64().map(|x| x as f32),
                "{k}"
            );
        } else {
            assert_eq!(&cfg[k], v, "config {k}");
        }
    }
    // Dequantised, un-permuted weights against transformers' own GGUF loader.
    for (name, want) in fx["tensors"].as_object().unwrap() {
        let t = llama_tensor_f32(&g, name).unwrap();
        let shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
        assert_eq!(t.dims(), &shape[..], "{name}");
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let sum: f64 = v.iter().map(|x| *x as f64).sum();
        let abs: f64 = v.iter().map(|x| x.abs() as f64).sum();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0) + 1e-3;
        assert!(
            close(sum, want["sum"].as_f64().unwrap()),
            "{name}: sum {sum} vs {}",
            want["sum"]
        );
        assert!(
            close(abs, want["abs_sum"].as_f64().unwrap()),
            "{name}: abs sum {abs}"
        );
        let cols = *shape.last().unwrap();
        if let Some(rows) = want["rows"].as_object() {
            for (r, vals) in rows {
                let r: usize = r.parse().unwrap();
                let vals: Vec<f32> = serde_json::from_value(vals.clone()).unwrap();
                assert_eq!(&v[r * cols..r * cols + 8], &vals[..], "{name} row {r}");
            }
        } else {
            let vals: Vec<f32> = serde_json::from_value(want["first"].clone()).unwrap();
            assert_eq!(&v[..8], &vals[..], "{name}");
        }
    }
}

#[test]
fn gguf_real_smollm2_tokenizer() {
    let Some(g) = smollm2() else { return };
    let t = tokenizer_from_gguf(&g).unwrap();
    assert_eq!(t.pre, "smollm");
    assert_eq!((t.bos_id, t.eos_id, t.pad_id), (Some(1), Some(2), Some(2)));
    let tpl = t.chat_template.as_deref().unwrap();
    assert!(
        tpl.contains("<|im_start|>") && tpl.contains("<|im_end|>"),
        "{tpl}"
    );
    let tok = &t.tokenizer;
    for s in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] {
        let ids = tok.encode(s, false).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), 1, "{s}: {ids:?}");
        assert_eq!(tok.token_to_id(s), Some(ids[0]));
    }
    let text = "The capital of France is";
    let ids = tok.encode(text, true).unwrap().get_ids().to_vec();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);

    let fx = fixture();
    for case in fx["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tok.decode(&got, false).unwrap(), text);
    }
    let chat = &fx["chat"];
    let want: Vec<u32> = serde_json::from_value(chat["ids"].clone()).unwrap();
    assert_eq!(
        tok.encode(chat["text"].as_str().unwrap(), true)
            .unwrap()
            .get_ids(),
        &want[..]
    );
    let tt = t.text_tokenizer(g.path(), 512).unwrap();
    assert_eq!(tt.pad_id(), 2);
    assert_eq!(tt.vocab_size(), 49152);
}

/// The real Q4_1 / Q8_0 tensors through qlinear: same as the dequantised matmul.
#[test]
fn gguf_real_smollm2_qlinear() {
    let Some(g) = smollm2() else { return };
    use std::sync::Arc;
    for name in [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ] {
        let q = Arc::new(llama_qtensor(&g, name).unwrap());
        let wf = llama_tensor_f32(&g, name).unwrap();
        let x = Tensor::from_vec(randn(3 * q.cols(), 1), (3, q.cols()), &Device::Cpu).unwrap();
        let y = crate::nn::qlinear::qlinear(&x, &q, None).unwrap();
        let y_ref = x.matmul(&wf.t().unwrap()).unwrap();
        let d = max_diff(&y, &y_ref);
        assert!(d < 1e-4, "{name}");
    }
}

// ---------------------------------------------------------------- quantised loading

/// LoRA on q/v/gate of a decoder loaded from `g`, f32 or quantised; the same
/// init seed, so both get the same adapter weights.
fn lora_decoder(g: &Gguf, quantized: bool) -> (crate::heads::CausalLm, crate::params::ParamStore) {
    use crate::models::load::gguf_params;
    let opts = crate::models::LoadOpts {
        quantized,
        max_length: None,
    };
    let (cfg, _, mut store) = gguf_params(g, crate::params::Selector::none(), opts).unwrap();
    let ad: crate::adapters::AdapterConfig = toml::from_str(
        "type = \"lora\"\nr = 4\nlora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\", \"gate_proj\"]\ninit_lora_weights = \"gaussian\"",
    )
    .unwrap();
    let linears = crate::adapters::linear_modules(&store);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    ad.apply(&mut store, &linears, &["lm_head"], &mut rng)
        .unwrap();
    // B = 0 at init: give it values so the LoRA path counts in the output.
    for (n, w) in store.trainable() {
        if n.contains("lora_B") {
            let v = Tensor::from_vec(randn(w.t.elem_count(), 9), w.t.shape(), &Device::Cpu)
                .unwrap()
                .affine(0.1, 0.0)
                .unwrap();
            store.copy_values_from(&[(n, v)].into()).unwrap();
        }
    }
    let model = crate::heads::CausalLm::build(&store, &cfg).unwrap();
    assert!(store.unused().is_empty(), "{:?}", store.unused());
    (model, store)
}

/// A tiny llama GGUF (F32 Q/K, Q4_1 V/gate/up, Q4_0 O, Q8_0 down) loaded with
/// the projections kept quantised: the same hidden states, loss and LoRA
/// gradients as the f32 load; full fine-tuning is refused.
#[test]
fn gguf_quantized_load_matches_f32_with_lora() {
    use crate::models::load::gguf_params;
    use crate::models::{Inputs, LoadOpts};
    let dir = tempfile::tempdir().unwrap();
    let (h, _, _, _, vocab, layers) = LLAMA_DIMS;
    for tied in [true, false] {
        let (path, _) = tiny_llama(dir.path(), "llama", tied);
        let g = Gguf::open(&path).unwrap();
        let (mq, sq) = lora_decoder(&g, true);
        let (mf, sf) = lora_decoder(&g, false);
        assert_eq!(sq.quantized().count(), 7 * layers);
        assert!(sq.is_quantized("model.layers.1.self_attn.k_proj.weight"));
        assert!(!sq.is_quantized("model.embed_tokens.weight"));
        assert_eq!(sq.counts(), sf.counts());
        assert_eq!(
            crate::adapters::linear_modules(&sq),
            crate::adapters::linear_modules(&sf)
        );
        let (b, t) = (2, 7);
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % vocab) as u32).collect();
        let inp = Inputs::new(ids.clone(), vec![1.0; b * t], b, t).unwrap();
        let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let (hq, hf) = (
            mq.forward(&inp, None).unwrap(),
            mf.forward(&inp, None).unwrap(),
        );
        assert_eq!(hq.dims(), &[b, t, h]);
        let d = max_diff(&hq, &hf);
        assert!(d < 1e-4, "hidden states differ by {d}");
        let (lq, _) = mq.lm_loss(&hq, &labels).unwrap();
        let (lf, _) = mf.lm_loss(&hf, &labels).unwrap();
        let (lqv, lfv) = (
            lq.to_scalar::<f32>().unwrap(),
            lf.to_scalar::<f32>().unwrap(),
        );
        assert!((lqv - lfv).abs() < 1e-4, "loss {lqv} vs {lfv}");
        lq.backward().unwrap();
        lf.backward().unwrap();
        let names: Vec<String> = sq.trainable().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 2 * 3 * layers);
        for n in &names {
            let (gq, gf) = (sq.grad(n).unwrap().unwrap(), sf.grad(n).unwrap().unwrap());
            let d = max_diff(&gq, &gf);
            assert!(d < 1e-4, "{n}: gradient differs by {d}");
        }
        let e = gguf_params(
            &g,
            crate::params::Selector::all(),
            LoadOpts {
                quantized: true,
                max_length: None,
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("would train") && e.contains("base_dtype"), "{e}");
    }
}

/// The real SmolLM2 (Q4_1 projections): the quantised load generates the same
/// greedy tokens as the f32 load (both decode the same bytes).
#[test]
fn gguf_real_smollm2_quantized_generates_as_f32() {
    use crate::generate::{generate, GenerateConfig};
    use crate::models::{load_model, LoadOpts};
    let Some(path) = crate::hub::assets::testing::real_asset("smollm2-135m-instruct") else {
        return;
    };
    let mut out = Vec::new();
    for quantized in [false, true] {
        let src = load_model(
            &path,
            crate::params::Selector::none(),
            LoadOpts {
                quantized,
                max_length: None,
            },
        )
        .unwrap();
        assert_eq!(
            src.store.quantized().count(),
            if quantized { 30 * 7 } else { 0 }
        );
        let model = crate::heads::CausalLm::build(&src.store, &src.cfg).unwrap();
        let ids = src
            .tokenizer
            .encode_raw("The capital of France is", false)
            .unwrap();
        let cfg = GenerateConfig {
            max_new_tokens: 8,
            ..Default::default()
        };
        let decode = |ids: &[u32]| src.tokenizer.decode(ids, true);
        let g = generate(&model, None, &ids, 2048, &cfg, &decode, &mut |_| {}).unwrap();
        eprintln!("quantized = {quantized}: {:?} {:?}", g.ids, g.text);
        out.push((g.ids, g.text));
    }
    assert_eq!(out[0].0.len(), 8);
    assert_eq!(out[0], out[1]);
    assert!(out[0].1.contains("Paris"), "{:?}", out[0].1);
}

/// A file of tensor infos (name, `ne` in ggml order, type id, offset) and
/// `data` bytes of data.
fn tensors_file(tensors: &[(&str, &[u64], u32, u64)], data: usize) -> Vec<u8> {
    let mut b = header(3, tensors.len() as u64, 0);
    for (name, ne, ty, offset) in tensors {
        b.extend_from_slice(&(name.len() as u64).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&(ne.len() as u32).to_le_bytes());
        for d in *ne {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
    }
    b.resize(b.len().div_ceil(32) * 32 + data, 0);
    b
}

fn one_tensor_file(ne: &[u64], ty: u32, offset: u64, data: usize) -> Vec<u8> {
    tensors_file(&[("t", ne, ty, offset)], data)
}

/// Inputs found by `cargo fuzz run gguf` (fuzz/regressions/gguf/): each
/// panicked before its fix and is now a typed error or a clean read.
#[test]
fn gguf_fuzz_regressions() {
    // An empty F32 tensor (a zero dimension) with a row of 2^60 values:
    // dequantising it overflowed `256 * cols` in `to_f32_vec`.
    let g = Gguf::from_bytes("x.gguf", one_tensor_file(&[1 << 60, 0], 0, 0, 0)).unwrap();
    assert_eq!(g.qtensor("t").unwrap().to_f32_vec(), Vec::<f32>::new());
    // Dimensions whose product overflows once the zero one is counted as 1:
    // `[rows, cols]` could not be formed. Refused when the file is read.
    for ne in [vec![0, 1 << 40, 1 << 40], vec![1 << 63, 0]] {
        let err = Gguf::from_bytes("x.gguf", one_tensor_file(&ne, 0, 0, 0))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.gguf") && err.contains("tensor `t`") && err.contains("overflow"),
            "{err}"
        );
    }
    // 0-D tensors (n_dims = 0): a Q4_0 one indexed `ne[0]` formatting its
    // error; a 0-D `token_embd.weight` would have been read as `shape()[0]`
    // for the vocabulary size. ggml (and afinar's writer) never write one.
    for ty in [0u32, 2] {
        let err = Gguf::from_bytes("x.gguf", one_tensor_file(&[], ty, 0, 32))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.gguf: tensor `t` has 0 dimensions, GGUF tensors have 1 to 4"),
            "{err}"
        );
    }
    // Types without a known layout are listed unchecked against the file's
    // length: the `inspect` table's total of 4 x 2^62 parameters overflowed usize.
    let big: &[u64] = &[1 << 62];
    let g = Gguf::from_bytes(
        "x.gguf",
        tensors_file(
            &[
                ("a", big, 99, 0),
                ("b", big, 99, 0),
                ("c", big, 99, 0),
                ("d", big, 99, 0),
            ],
            0,
        ),
    )
    .unwrap();
    let table = crate::hub::inspect::gguf_table(&g);
    assert!(
        table.contains("4 tensors, 18,446,744,073,709,551,616 parameters"),
        "{table}"
    );
}
