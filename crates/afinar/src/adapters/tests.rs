//! Adapter tests that need no model: PEFT's module matching and pattern
//! order, and LoRA / IA3 on a quantised base weight against the same layer
//! on its exact f32 dequantisation (forward, input gradient, every adapter
//! gradient, merge), DoRA's refusal of a quantised base.

use super::config::Patterns;
use super::ia3::Ia3Spec;
use super::lora::{pattern_value, LoraSpec};
use super::*;
use crate::hub::gguf::{GgmlType, QTensor};
use crate::params::{Path, Selector};
use crate::testutil::{max_diff, uniform as randn};
use candle_core::{Device, Var};
use serde::Deserialize;

#[test]
fn peft_key_matching_and_layers() {
    assert!(matches_key(
        "bert.encoder.layer.0.attention.self.query",
        "query"
    ));
    assert!(matches_key(
        "bert.encoder.layer.0.attention.output.dense",
        "output.dense"
    ));
    assert!(!matches_key(
        "bert.encoder.layer.0.attention.self.query",
        "uery"
    ));
    assert_eq!(layer_index("bert.encoder.layer.11.output.dense"), Some(11));
    assert_eq!(layer_index("classifier"), None);
    // The first pattern written wins, as in PEFT (not the sorted first).
    #[derive(Deserialize)]
    struct T {
        p: Patterns<usize>,
    }
    let o: T = toml::from_str("[p]\nz = 1\nvalue = 2\n").unwrap();
    assert_eq!(o.p.0[0].0, "z", "TOML document order is kept");
    let v = "bert.encoder.layer.0.attention.self.value";
    let j: Patterns<usize> =
        serde_json::from_str(r#"{"value": 4, "layer.0.attention.self.value": 5}"#).unwrap();
    assert_eq!(pattern_value(&j, v).unwrap(), Some(4));
    let j: Patterns<usize> =
        serde_json::from_str(r#"{"layer.0.attention.self.value": 5, "value": 4}"#).unwrap();
    assert_eq!(pattern_value(&j, v).unwrap(), Some(5));
    let p = Patterns(vec![("value".to_string(), 2usize)]);
    assert_eq!(
        pattern_value(&p, "bert.encoder.layer.0.attention.self.value").unwrap(),
        Some(2)
    );
    assert_eq!(
        pattern_value(&p, "bert.encoder.layer.0.attention.self.query").unwrap(),
        None
    );
}

/// How the test's module is wrapped.
#[derive(Debug, Clone)]
enum Meta {
    Lora(LoraSpec),
    Ia3(Ia3Spec),
}

/// LoRA of rank R on the test's module.
fn lora(scale: f64, dora: bool) -> Meta {
    Meta::Lora(LoraSpec {
        r: R,
        scale,
        dropout: 0.0,
        dora,
    })
}

impl Meta {
    fn spec(&self) -> Arc<dyn AdapterSpec> {
        match self {
            Meta::Lora(s) => Arc::new(s.clone()),
            Meta::Ia3(s) => Arc::new(s.clone()),
        }
    }
}

fn t(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

const OUT: usize = 48;
const IN: usize = 64;
const R: usize = 4;

/// Two stores with the same `m` linear (bias frozen) and adapter: one
/// with the quantised weight, one with its exact f32 dequantisation.
fn stores(ty: GgmlType, meta: Meta) -> (ParamStore, ParamStore) {
    let q = Arc::new(QTensor::from_f32(ty, [OUT, IN], &randn(OUT * IN, 1)).unwrap());
    let wf = crate::params::dequantize(&q).unwrap();
    let mut sq = ParamStore::new(Selector::none(), "quantized");
    let mut sf = ParamStore::new(Selector::none(), "f32");
    sq.insert_quantized("m.weight", q);
    sf.insert("m.weight", wf).unwrap();
    for s in [&mut sq, &mut sf] {
        s.insert("m.bias", t(randn(OUT, 2), &[OUT])).unwrap();
        match &meta {
            Meta::Lora(LoraSpec { r, dora, .. }) => {
                s.insert_trainable("m.lora_A.weight", t(randn(r * IN, 3), &[*r, IN]))
                    .unwrap();
                // B != 0 (not PEFT's init) so the LoRA path changes the output.
                s.insert_trainable("m.lora_B.weight", t(randn(OUT * r, 4), &[OUT, *r]))
                    .unwrap();
                if *dora {
                    s.insert_trainable("m.lora_magnitude_vector", t(randn(OUT, 5), &[OUT]))
                        .unwrap();
                }
            }
            Meta::Ia3(Ia3Spec { feedforward }) => {
                let shape = if *feedforward { [1, IN] } else { [OUT, 1] };
                let n = shape[0] * shape[1];
                s.insert_trainable("m.ia3_l", t(randn(n, 6), &shape))
                    .unwrap();
            }
        }
        s.adapters.insert("m".into(), meta.spec());
    }
    (sq, sf)
}

fn load(s: &ParamStore) -> Result<Linear> {
    Path::root(s, "m").linear(IN, OUT, true)
}

/// Forward, dx and every adapter gradient of the quantised layer equal
/// those of the f32 layer with the dequantised weight; the quantised
/// base has no gradient anywhere.
fn check_equal(ty: GgmlType, meta: Meta) {
    let (sq, sf) = stores(ty, meta.clone());
    let (lq, lf) = (load(&sq).unwrap(), load(&sf).unwrap());
    assert!(lq.weight.is_quantized() && !lf.weight.is_quantized());
    let x = Var::from_vec(randn(2 * 3 * IN, 7), (2, 3, IN), &Device::Cpu).unwrap();
    let r = t(randn(2 * 3 * OUT, 8), &[2, 3, OUT]);
    let yq = lq.forward(x.as_tensor()).unwrap();
    let yf = lf.forward(x.as_tensor()).unwrap();
    let d = max_diff(&yq, &yf);
    assert!(d < 1e-4, "{ty} {meta:?}: forward differs by {d}");
    let gq = (yq * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let d = max_diff(gq.get(&x).unwrap(), gf.get(&x).unwrap());
    assert!(d < 1e-4, "{ty} {meta:?}: dx differs by {d}");
    let trainable: Vec<String> = sq.trainable().into_iter().map(|(n, _)| n).collect();
    assert!(!trainable.is_empty() && !trainable.contains(&"m.weight".to_string()));
    for name in &trainable {
        let a = sq.grad(name).unwrap().expect("adapter gradient");
        let b = sf.grad(name).unwrap().expect("adapter gradient");
        // Relative to the gradient's size (sums over every position).
        let scale = max_diff(&b, &b.zeros_like().unwrap()).max(1.0);
        let d = max_diff(&a, &b);
        assert!(
            d < 1e-4 * scale,
            "{ty} {meta:?}: {name} gradient differs by {d}"
        );
    }
    // The base: no gradient buffer on the quantised side at all.
    assert!(sq.grad("m.weight").unwrap().is_none());
    assert!(sq.unused().is_empty(), "{:?}", sq.unused());
    // merged() dequantises and folds: the same f32 weight as the f32 layer's.
    let ((mq, bq, _), (mf, bf, _)) = (lq.merged().unwrap(), lf.merged().unwrap());
    assert!(max_diff(&mq, &mf) < 1e-5);
    assert!(max_diff(&bq.unwrap(), &bf.unwrap()) < 1e-6);
}

#[test]
fn quantized_base_lora_matches_f32() {
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q4_0] {
        check_equal(ty, lora(2.0, false));
    }
}

#[test]
fn quantized_base_ia3_matches_f32() {
    for feedforward in [false, true] {
        check_equal(GgmlType::Q4_1, Meta::Ia3(Ia3Spec { feedforward }));
    }
}

#[test]
fn quantized_base_refuses_dora_shape_and_in_place_merge() {
    let (sq, _) = stores(GgmlType::Q8_0, lora(1.0, true));
    let e = load(&sq).err().unwrap().to_string();
    assert_eq!(
        e,
        "DoRA on a quantized base weight `m` is not supported: use base_dtype = \"f32\""
    );
    let (sq, _) = stores(GgmlType::Q8_0, lora(1.0, false));
    let e = Path::root(&sq, "m")
        .linear(IN, OUT + 1, true)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("m.weight") && e.contains("[49, 64]") && e.contains("[48, 64]"),
        "{e}"
    );
    let e = crate::adapters::merge(&sq).err().unwrap().to_string();
    assert!(e.contains("quantized base weight `m.weight`"), "{e}");
    // An f32 read of a quantised weight says why it fails.
    let e = sq.get("m.weight", &[OUT, IN]).unwrap_err().to_string();
    assert!(e.contains("quantised") && e.contains("base_dtype"), "{e}");
}

#[test]
fn quantized_weights_count_list_and_save_as_f32() {
    let (sq, _) = stores(GgmlType::Q4_1, lora(1.0, false));
    // weight (quantised) + bias + A + B
    let all = OUT * IN + OUT + R * IN + OUT * R;
    assert_eq!(sq.counts(), (R * IN + OUT * R, all));
    let s = sq.summary();
    assert!(
        s.contains(&format!("all params: {all}"))
            && s.contains("quantized params: 3072 in 1 tensors"),
        "{s}"
    );
    assert_eq!(
        crate::adapters::linear_modules(&sq),
        vec![("m".to_string(), OUT, IN)]
    );
    assert_eq!(
        sq.unused(),
        vec!["m.bias", "m.lora_A.weight", "m.lora_B.weight", "m.weight"]
    );
    let merged = crate::adapters::merged_state(&sq).unwrap();
    assert_eq!(merged["m.weight"].dims(), &[OUT, IN]);
    assert!(!merged.contains_key("m.lora_A.weight"));
    // modules_to_save on a quantised weight trains it as f32.
    let mut sq = sq;
    sq.make_trainable("m.weight").unwrap();
    assert!(!sq.is_quantized("m.weight") && sq.trainable().iter().any(|(n, _)| n == "m.weight"));
}

/// The `[adapter]` of a run folder written before typed adapter configs:
/// every key of every method, the others at their defaults (this is what
/// `configs/smollm2-sarcasm-lora.toml` became in its run's `config.toml`).
const OLD_RUN_ADAPTER: &str = r#"
r = 8
lora_alpha = 8.0
lora_dropout = 0.0
target_modules = []
exclude_modules = []
use_rslora = false
use_dora = false
init_lora_weights = "kaiming"
modules_to_save = []
feedforward_modules = []
allow_unmatched = false
num_virtual_tokens = 0
prompt_tuning_init = "random"

[rank_pattern]

[alpha_pattern]
"#;

#[test]
fn an_older_run_config_loads_and_foreign_values_are_refused() {
    let adapter = |kind: &str, changes: &[(&str, &str)]| {
        let mut text = format!("type = \"{kind}\"\n{OLD_RUN_ADAPTER}");
        for (from, to) in changes {
            assert!(text.contains(from), "{from}");
            text = text.replacen(from, to, 1);
        }
        toml::from_str::<AdapterConfig>(&text).map_err(|e| e.to_string())
    };
    let lora = adapter(
        "lora",
        &[
            ("lora_alpha = 8.0", "lora_alpha = 16.0"),
            (
                "target_modules = []",
                "target_modules = [\"q_proj\", \"v_proj\"]",
            ),
        ],
    );
    assert!(
        matches!(lora, Ok(AdapterConfig::Lora(ref l)) if l.lora_alpha == 16.0 && l.r == 8),
        "{lora:?}"
    );
    assert!(matches!(adapter("ia3", &[]), Ok(AdapterConfig::Ia3(_))));
    assert!(matches!(
        adapter("prompt_tuning", &[]),
        Ok(AdapterConfig::PromptTuning(_))
    ));
    // A value another method would use is still refused, naming the key.
    for (kind, from, to, key) in [
        (
            "lora",
            "num_virtual_tokens = 0",
            "num_virtual_tokens = 4",
            "num_virtual_tokens",
        ),
        (
            "lora",
            "feedforward_modules = []",
            "feedforward_modules = [\"fc\"]",
            "feedforward_modules",
        ),
        ("ia3", "r = 8", "r = 4", "r"),
        ("ia3", "use_dora = false", "use_dora = true", "use_dora"),
        (
            "prompt_tuning",
            "target_modules = []",
            "target_modules = [\"q\"]",
            "target_modules",
        ),
    ] {
        let e = adapter(kind, &[(from, to)]).unwrap_err();
        assert!(
            e.contains(&format!("`{key}` is not an option of")),
            "{kind}: {e}"
        );
    }
}
