"""Golden fixtures for afinar's MobileNetV2 (models/mobilenet_v2.rs, nn/conv.rs,
nn/batch_norm.rs, nn/conv_stack.rs) from torchvision.

Writes tests/fixtures/mobilenet/:
- tiny.pth: a random torchvision MobileNetV2 (width_mult 0.25, 4 classes,
  seed 0) saved by torch.save (zip format): what afinar reads through its
  weights-only .pth reader;
- tiny-golden.safetensors: for input `input` [2, 3, 32, 32] (NCHW) and targets
  [1, 3], in train mode with dropout off: `logits_train`, `loss`, the gradient
  of every parameter (`grad.<name>`), every running statistic after that
  forward (`after.<name>`); then in eval mode `logits_eval`;
- real.json (with --pth and --idx, the fetched assets): the ImageNet weights
  with a new seeded 10-class head (its weights in real-head.safetensors), on
  Fashion-MNIST test images 0..3 resized to 64x64 (bilinear, align_corners
  False), grey to 3 channels, ImageNet normalisation: the input's sum and
  first values, logits in eval and train mode, the loss, and per gradient
  its sum, norm and first values.

    .venv/bin/python scripts/reference/golden_mobilenet.py --pth ~/.cache/afinar/models/mobilenet-v2/mobilenet_v2-b0353104.pth --idx ~/.cache/afinar/data/fashion-mnist/t10k-images-idx3-ubyte
"""
import argparse, json, os
import numpy as np
import torch, torchvision
import torch.nn.functional as F
from safetensors.torch import save_file

ap = argparse.ArgumentParser()
ap.add_argument("--pth")
ap.add_argument("--idx")
args = ap.parse_args()
out = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "mobilenet")
os.makedirs(out, exist_ok=True)
torch.set_num_threads(2)

# ---- tiny random model
torch.manual_seed(0)
m = torchvision.models.mobilenet_v2(num_classes=4, width_mult=0.25)
# Non-trivial running statistics and affine parameters (fresh ones are 0/1).
with torch.no_grad():
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.uniform_(0.5, 1.5)
            mod.bias.uniform_(-0.2, 0.2)
            mod.num_batches_tracked.fill_(3)
torch.save(m.state_dict(), os.path.join(out, "tiny.pth"))
m.classifier[0].p = 0.0
m.train()
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
y = torch.tensor([1, 3])
logits = m(x)
loss = F.cross_entropy(logits, y)
loss.backward()
gold = {"input": x, "targets": y.to(torch.float32), "logits_train": logits.detach(), "loss": loss.detach().reshape(1)}
for n, p in m.named_parameters():
    gold["grad." + n] = p.grad.detach().clone()
for n, b in m.named_buffers():
    gold["after." + n] = b.detach().clone().to(torch.float32)
m.eval()
with torch.no_grad():
    gold["logits_eval"] = m(x)
save_file({k: v.contiguous() for k, v in gold.items()}, os.path.join(out, "tiny-golden.safetensors"))
print("tiny: loss", float(loss), "params", sum(p.numel() for p in m.parameters()))

# ---- the real weights on Fashion-MNIST
if args.pth and args.idx:
    raw = open(args.idx, "rb").read()
    n, h, w = np.frombuffer(raw[4:16], dtype=">u4")
    imgs = np.frombuffer(raw[16:], dtype=np.uint8).reshape(n, h, w)[:4]
    t = torch.tensor(imgs, dtype=torch.float32).unsqueeze(1)  # [4, 1, 28, 28], 0..255
    t = F.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False, antialias=False)
    t = (t / 255.0).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    t = (t - mean) / std
    r = torchvision.models.mobilenet_v2()
    r.load_state_dict(torch.load(args.pth, weights_only=True))
    torch.manual_seed(0)
    r.classifier[1] = torch.nn.Linear(1280, 10)
    save_file({"classifier.1.weight": r.classifier[1].weight.detach().contiguous(),
               "classifier.1.bias": r.classifier[1].bias.detach().contiguous()},
              os.path.join(out, "real-head.safetensors"))
    r.eval()
    with torch.no_grad():
        le = r(t)
    r.train()
    r.classifier[0].p = 0.0
    lt = r(t)
    yy = torch.tensor([0, 1, 2, 3])
    lo = F.cross_entropy(lt, yy)
    lo.backward()
    res = {
        "images": [0, 1, 2, 3], "size": 64, "targets": [0, 1, 2, 3],
        "input_sum": float(t.double().sum()), "input_first": t.permute(0, 2, 3, 1).flatten()[:8].tolist(),
        "input_samples": t.permute(0, 2, 3, 1).flatten()[::997].tolist(),
        "logits_eval": le.tolist(), "logits_train": lt.detach().tolist(), "loss": float(lo),
        "grads": {k: {"sum": float(p.grad.double().sum()), "norm": float(p.grad.double().norm()),
                      "first": p.grad.flatten()[:4].tolist()} for k, p in r.named_parameters()},
        "running_mean_after": {k: b.flatten()[:4].tolist() for k, b in r.named_buffers() if k.endswith("running_mean")},
    }
    json.dump(res, open(os.path.join(out, "real.json"), "w"), indent=1)
    print("real: loss", float(lo))
