"""Patch candle-core 0.11.1's autograd accumulation (src/backprop.rs) in the copy
that scripts/build-cuda.sh builds the GPU binary with.

Stock candle stores every gradient as `zeros_like(t) + g`: a full-size memset
and an add per gradient, each a kernel launch and two or three passes over
memory. Patched, the first gradient of a tensor is stored as it comes (a
0-strided zero placeholder stands in until then) and only a second one is
added. Same values (0 + g == g exactly), no extra passes. Idempotent.

    python3 scripts/patch_candle_backprop.py CANDLE_CORE_DIR
"""

import re
import sys
from pathlib import Path

MARK = "// afinar: first gradient stored as is"

HELPERS = MARK + """
thread_local! {
    static FRESH: std::cell::RefCell<std::collections::HashSet<TensorId>> =
        std::cell::RefCell::new(std::collections::HashSet::new());
}
fn take_fresh(t: &Tensor) -> bool {
    FRESH.with(|f| f.borrow_mut().remove(&t.id()))
}
fn fresh_add(s: &Tensor, g: &Tensor) -> Result<Tensor> {
    if take_fresh(s) && s.shape() == g.shape() { Ok(g.clone()) } else { s.add(g) }
}
fn fresh_sub(s: &Tensor, g: &Tensor) -> Result<Tensor> {
    if take_fresh(s) && s.shape() == g.shape() { g.neg() } else { s.sub(g) }
}
fn materialize(s: &Tensor) -> Result<Tensor> {
    if take_fresh(s) { Tensor::zeros(s.shape(), s.dtype(), s.device()) } else { Ok(s.clone()) }
}
"""


def main():
    p = Path(sys.argv[1]) / "src/backprop.rs"
    s = p.read_text()
    if MARK in s:
        return
    old = """            Entry::Vacant(entry) => {
                let grad = tensor.zeros_like()?;
                entry.insert(grad)
            }"""
    new = """            Entry::Vacant(entry) => {
                let grad = Tensor::zeros((), tensor.dtype(), tensor.device())?
                    .broadcast_as(tensor.shape())?;
                FRESH.with(|f| f.borrow_mut().insert(grad.id()));
                entry.insert(grad)
            }"""
    assert old in s, "or_insert not found: candle-core changed"
    s = s.replace(old, new)
    n0 = len(re.findall(r"\b(\w*sum_grad)\.(add|sub)\(", s))
    s = re.sub(r"\b(\w*sum_grad)\.add\(", r"fresh_add(\1, ", s)
    s = re.sub(r"\b(\w*sum_grad)\.sub\(", r"fresh_sub(\1, ", s)
    s = re.sub(r"\b(\w*sum_grad)\.(index_add|scatter_add|slice_scatter)\(", r"materialize(\1)?.\2(", s)
    # any other method call on a placeholder must see real zeros
    left = re.findall(r"\b\w*sum_grad\.(?!dims\(|shape\(|dtype\(|device\()\w+\(", s)
    assert not left, f"unhandled uses: {left}"
    s = s.replace("use std::collections::{hash_map::Entry, HashMap};",
                  "use std::collections::{hash_map::Entry, HashMap};\n\n" + HELPERS, 1)
    p.write_text(s)
    print(f"patched {p}: {n0} accumulations")


if __name__ == "__main__":
    main()
