//! What the library's integration tests share: the rule for tests that need
//! a real asset (`hub::assets::testing`, shared with the unit tests and the
//! CLI's tests), the golden fixtures and tensor comparisons.

#![allow(dead_code)]

use afinar::hub::checkpoint::Checkpoint;
use afinar::models::gpt2::is_conv1d;
use afinar::models::Inputs;
use afinar::params::ParamStore;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// The fetched asset `name`, or a skip (a failure under CI): the rule in
/// `afinar::hub::assets::testing`.
#[allow(unused_imports)]
pub use afinar::hub::assets::testing::real_asset;

/// The committed golden fixtures (`tests/fixtures` at the repository root).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The integer tensor `name` of a golden file, flattened.
pub fn i64s(g: &Checkpoint, name: &str) -> Vec<i64> {
    g.load(name)
        .and_then(|t| Ok(t.flatten_all()?.to_vec1::<i64>()?))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The golden batch as afinar's inputs: `input_ids`, `attention_mask`, and
/// `token_type_ids` when the file has them (BERT).
pub fn golden_inputs(g: &Checkpoint) -> Inputs {
    let (b, t) = g.load("input_ids").unwrap().dims2().unwrap();
    let u32s = |n: &str| i64s(g, n).into_iter().map(|v| v as u32).collect();
    let mask = i64s(g, "attention_mask")
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let inputs = Inputs::new(u32s("input_ids"), mask, b, t).unwrap();
    if g.contains("token_type_ids") {
        return inputs.with_type_ids(u32s("token_type_ids")).unwrap();
    }
    inputs
}

/// The largest element of a tensor (any device, any float dtype).
fn max_of(x: &Tensor) -> f32 {
    x.to_device(&Device::Cpu)
        .and_then(|x| {
            x.to_dtype(DType::F32)?
                .flatten_all()?
                .max(0)?
                .to_vec0::<f32>()
        })
        .unwrap()
}

/// max |a - b| (same number of elements; any device, any float dtype).
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    let f = |x: &Tensor| {
        x.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (a, b) = (f(a).flatten_all().unwrap(), f(b).flatten_all().unwrap());
    assert_eq!(a.dims(), b.dims(), "compared tensors differ in size");
    max_of(&(a - b).unwrap().abs().unwrap())
}

/// max |a - b| / max(max |b|, floor).
pub fn rel_err_floor(a: &Tensor, b: &Tensor, floor: f32) -> f32 {
    max_abs(a, b) / max_of(&b.abs().unwrap()).max(floor)
}

/// max |a - b| / max(max |b|, 1e-3).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    rel_err_floor(a, b, 1e-3)
}

/// Every gradient `grad.NAME` of a golden file with afinar's gradient of
/// `NAME`: `(NAME, afinar's, golden's)`, the golden one in afinar's layout
/// (GPT-2's Conv1D weights are `[in, out]` in the checkpoint, `[out, in]` in
/// afinar). Panics naming `case` and the parameter when afinar has none.
pub fn golden_grads(
    g: &Checkpoint,
    store: &ParamStore,
    case: &str,
) -> Vec<(String, Tensor, Tensor)> {
    let mut out = Vec::new();
    for name in g.names() {
        let Some(p) = name.strip_prefix("grad.") else {
            continue;
        };
        let want = g.load_f32(&name).unwrap();
        let want = match is_conv1d(p) {
            true => want.t().unwrap().contiguous().unwrap(),
            false => want,
        };
        let got = store
            .grad(p)
            .unwrap()
            .unwrap_or_else(|| panic!("{case}: no gradient for {p}"));
        out.push((p.to_string(), got, want));
    }
    out
}

/// Every golden gradient within `tol` relative ([`rel_err`]), and one for
/// every trainable tensor of `store`.
pub fn assert_golden_grads(g: &Checkpoint, store: &ParamStore, case: &str, tol: f32) {
    let grads = golden_grads(g, store, case);
    for (p, got, want) in &grads {
        let e = rel_err(got, want);
        assert!(e < tol, "{case}: gradient of {p}: rel err {e}");
    }
    assert_eq!(
        grads.len(),
        store.trainable().len(),
        "{case}: every trainable tensor has a golden gradient"
    );
}
