"""Load an afinar MobileNetV2 model folder (<run>/model: model.safetensors +
config.json) into torchvision and check that it predicts what afinar predicts.

    afinar predict RUN --image a.png --image b.png > preds.jsonl
    .venv/bin/python scripts/reference/mobilenet_load_saved.py --model RUN/model --predictions preds.jsonl

`load_state_dict(strict=True)`: every key of torchvision's
`mobilenet_v2(num_classes=N)` is there with its shape and nothing else (running
statistics and num_batches_tracked included). Each image is preprocessed as the
config says (grey to 3 channels, bilinear resize with align_corners=False,
ImageNet normalisation) and torchvision's class probabilities are compared with
afinar's. `--write-images DIR N` writes N Fashion-MNIST test images as PNG
(with --idx) to predict on.
"""
import argparse, json, os, sys
import numpy as np
import torch, torchvision
import torch.nn.functional as F
from safetensors.torch import load_file

ap = argparse.ArgumentParser()
ap.add_argument("--model")
ap.add_argument("--predictions")
ap.add_argument("--write-images", nargs=2, metavar=("DIR", "N"))
ap.add_argument("--idx")
a = ap.parse_args()

if a.write_images:
    from PIL import Image
    d, n = a.write_images[0], int(a.write_images[1])
    raw = open(a.idx, "rb").read()
    imgs = np.frombuffer(raw[16:], dtype=np.uint8).reshape(-1, 28, 28)
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        Image.fromarray(imgs[i], mode="L").save(os.path.join(d, f"{i}.png"))
    sys.exit(0)

cfg = json.load(open(os.path.join(a.model, "config.json")))
assert cfg["model_type"] == "mobilenet_v2", cfg["model_type"]
m = torchvision.models.mobilenet_v2(num_classes=cfg["num_classes"])
sd = load_file(os.path.join(a.model, "model.safetensors"))
missing, unexpected = m.load_state_dict(sd, strict=True)
m.eval()
s = cfg["image_size"]
mean = torch.tensor(cfg["image_mean"]).view(1, 3, 1, 1)
std = torch.tensor(cfg["image_std"]).view(1, 3, 1, 1)
classes = [cfg["id2label"][str(i)] for i in range(cfg["num_classes"])]
worst = 0.0
from PIL import Image
rows = [json.loads(l) for l in open(a.predictions) if l.strip()]
for r in rows:
    im = np.asarray(Image.open(r["image"]))
    t = torch.tensor(im, dtype=torch.float32)
    t = t.unsqueeze(0) if t.ndim == 2 else t[..., :3].permute(2, 0, 1)
    t = F.interpolate(t.unsqueeze(0), size=(s, s), mode="bilinear", align_corners=False)
    if t.shape[1] == 1:
        t = t.repeat(1, 3, 1, 1)
    t = (t / 255.0 - mean) / std
    with torch.no_grad():
        p = torch.softmax(m(t), -1)[0]
    ours = torch.tensor([r["scores"][c] for c in classes])
    worst = max(worst, float((p - ours).abs().max()))
    assert classes[int(p.argmax())] == r["label"], (r["image"], r["label"], classes[int(p.argmax())])
print(json.dumps({"images": len(rows), "strict_load": True, "max_abs_prob_diff": worst}))
assert worst < 1e-4, worst
