"""Golden fixtures for afinar's weights-only .pth reader (hub/pth.rs).

Writes tests/fixtures/pth/: the same small state dict saved by torch.save in
the zip format and in the legacy format (`_use_new_zipfile_serialization=False`),
with views (a transpose, a slice at an offset sharing its storage), f16, bf16,
f64, int64 and a Parameter; `tiny.json` holds each tensor's shape and values as
torch.load(weights_only=True) reads them. With the fetched MobileNetV2
(`--mobilenet PATH`) it also records a few of its tensors' sums and first values.

    .venv/bin/python scripts/reference/golden_pth.py [--mobilenet ~/.cache/afinar/models/mobilenet-v2/mobilenet_v2-b0353104.pth]
"""
import argparse, collections, json, os
import torch

ap = argparse.ArgumentParser()
ap.add_argument("--mobilenet")
args = ap.parse_args()
out = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "pth")
os.makedirs(out, exist_ok=True)
g = torch.Generator().manual_seed(0)
base = torch.randn(4, 6, generator=g)
sd = collections.OrderedDict()
sd["conv.weight"] = torch.nn.Parameter(torch.randn(2, 3, 3, 3, generator=g))
sd["dense.weight"] = base
sd["dense.weight_t"] = base.t()                  # a view: strides (1, 6)
sd["dense.row2"] = base[2]                        # a view at offset 12
sd["half"] = torch.randn(5, generator=g).half()
sd["bfloat"] = torch.randn(3, generator=g).bfloat16()
sd["double"] = torch.randn(2, 2, generator=g, dtype=torch.float64)
sd["bn.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
torch.save(sd, os.path.join(out, "tiny-zip.pth"))
torch.save(sd, os.path.join(out, "tiny-legacy.pth"), _use_new_zipfile_serialization=False)
back = torch.load(os.path.join(out, "tiny-legacy.pth"), weights_only=True)
gold = {k: {"shape": list(v.shape), "dtype": str(v.dtype), "values": v.detach().double().flatten().tolist()} for k, v in back.items()}
if args.mobilenet:
    m = torch.load(args.mobilenet, weights_only=True)
    gold["mobilenet"] = {
        k: {"shape": list(m[k].shape), "sum": float(m[k].double().sum()), "first": m[k].double().flatten()[:4].tolist()}
        for k in ["features.0.0.weight", "features.1.conv.0.1.running_var", "features.18.1.bias", "classifier.1.weight"]
    }
    gold["mobilenet_count"] = len(m)
with open(os.path.join(out, "tiny.json"), "w") as f:
    json.dump(gold, f, indent=1)
print("wrote", out, sorted(os.listdir(out)))
