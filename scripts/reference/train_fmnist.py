"""Reference run (PyTorch + torchvision) of an afinar image config
(configs/mobilenet-fmnist-*.toml): the same recipe with torchvision's
MobileNetV2 and a plain PyTorch loop; writes a results JSON to compare
afinar's run with (best validation accuracy, test accuracy of the
best-on-validation weights, wall time).

    .venv/bin/python scripts/reference/train_fmnist.py configs/mobilenet-fmnist-head.toml --threads 2 --out results.json

What it honours from the TOML: model.asset / model.path (the .pth), data.train
/ train_labels / test / test_labels (IDX; `asset:NAME/file` from afinar's
cache), data.split + split_seed (afinar_split.split_indices: the same rows),
image.size / crop_padding / flip (resize bilinear align_corners=False,
grey to 3 channels, ImageNet normalisation; RandomCrop(size, padding) and
horizontal flip in training), freeze.preset "head_only" and freeze.frozen /
first_layers over features.N (frozen stages' batch norm in eval mode),
train.epochs, batch_size, lr, weight_decay (none on biases, as afinar),
linear schedule with warmup = ceil(warmup_ratio * steps), max_grad_norm,
eval_every, seeds.init (the new head) and seeds.data (a torch.Generator for
the batch order and the augmentation: not afinar's draws).
"""
import argparse, json, math, os, re, sys, time, tomllib
from pathlib import Path
import numpy as np
import torch, torchvision
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from afinar_split import split_indices  # noqa: E402


def cache():
    return Path(os.environ.get("AFINAR_CACHE", Path.home() / ".cache" / "afinar"))


def resolve(spec):
    if spec.startswith("asset:"):
        name, _, sub = spec[6:].partition("/")
        base = {"fashion-mnist": "data/fashion-mnist", "mobilenet-v2": "models/mobilenet-v2/mobilenet_v2-b0353104.pth"}[name]
        return cache() / base / sub if sub else cache() / base
    return Path(spec)


def idx(path, nd):
    b = open(path, "rb").read()
    dims = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(b[4 + 4 * nd:], dtype=np.uint8).reshape(dims)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    c = tomllib.load(open(a.config, "rb"))
    torch.set_num_threads(a.threads)
    t0 = time.time()
    d, im, tr, fr = c["data"], c.get("image", {}), c["train"], c.get("freeze", {})
    X = idx(resolve(d["train"]), 3); Y = idx(resolve(d["train_labels"]), 1)
    ratios = d.get("split", [0.9, 0.1, 0.0])
    tri, vai, _ = split_indices(len(X), d.get("split_seed", 42), ratios)
    Xt = idx(resolve(d["test"]), 3); Yt = idx(resolve(d["test_labels"]), 1)
    size = im.get("size", 224); pad = im.get("crop_padding", size // 8); flip = im.get("flip", True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1); std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def prep(x, gen=None):
        t = torch.tensor(x, dtype=torch.float32).unsqueeze(1)
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1) / 255.0
        if gen is not None:
            out = torch.zeros_like(t)
            for i in range(len(t)):
                p = F.pad(t[i], (pad, pad, pad, pad)) if pad else t[i]
                oy, ox = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
                crop = p[:, oy:oy + size, ox:ox + size]
                if flip and torch.rand(1, generator=gen).item() < 0.5:
                    crop = crop.flip(-1)
                out[i] = crop
            t = out
        return (t - mean) / std

    seeds = c.get("seeds", {})
    torch.manual_seed(seeds.get("init", 42))
    m = torchvision.models.mobilenet_v2()
    m.load_state_dict(torch.load(resolve(c["model"].get("asset") and "asset:" + c["model"]["asset"] or c["model"]["path"]), weights_only=True))
    m.classifier[1] = torch.nn.Linear(m.last_channel, 10)
    torch.nn.init.normal_(m.classifier[1].weight, 0, 0.01); torch.nn.init.zeros_(m.classifier[1].bias)
    frozen_stages = set()
    if fr.get("preset") == "head_only":
        frozen_stages = set(range(19))
    frozen_stages |= set(range(fr.get("first_layers", 0)))
    for p in fr.get("frozen", []):
        r = re.fullmatch(r"features\.(\d+)-(\d+)", p) or re.fullmatch(r"features\.(\d+)()", p)
        lo = int(r.group(1)); hi = int(r.group(2) or lo)
        frozen_stages |= set(range(lo, hi + 1))
    for i in frozen_stages:
        for p in m.features[i].parameters():
            p.requires_grad_(False)
    params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    wd = tr.get("weight_decay", 0.0)
    groups = [{"params": [p for n, p in params if "bias" not in n], "weight_decay": wd},
              {"params": [p for n, p in params if "bias" in n], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=tr["lr"], betas=(0.9, 0.999), eps=1e-8)
    bs, epochs = tr.get("batch_size", 32), tr.get("epochs", 1)
    steps_per_epoch = math.ceil(len(tri) / bs); total = steps_per_epoch * epochs
    warm = math.ceil(tr.get("warmup_ratio", 0.0) * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    gen = torch.Generator().manual_seed(seeds.get("data", 42))
    clip = tr.get("max_grad_norm", 1.0); every = tr.get("eval_every", steps_per_epoch)

    def set_train():
        m.train()
        for i in frozen_stages:
            m.features[i].eval()

    def evaluate(X_, Y_):
        m.eval(); correct = 0
        with torch.no_grad():
            for s in range(0, len(X_), 256):
                correct += int((m(prep(X_[s:s + 256])).argmax(-1) == torch.tensor(Y_[s:s + 256], dtype=torch.long)).sum())
        set_train()
        return correct / len(X_)

    Xtr, Ytr = X[tri], Y[tri]; Xva, Yva = X[vai], Y[vai]
    best, best_state, best_step, step, evals = -1.0, None, 0, 0, []
    set_train()
    for ep in range(epochs):
        order = torch.randperm(len(tri), generator=gen).tolist()
        for b in range(0, len(order), bs):
            ix = order[b:b + bs]
            x = prep(Xtr[ix], gen); y = torch.tensor(Ytr[ix], dtype=torch.long)
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True); loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], clip)
            opt.step(); sched.step(); step += 1
            if step % 50 == 0:
                print(f"step {step}/{total} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
            if step % every == 0 or step == total:
                acc = evaluate(Xva, Yva); evals.append((step, acc)); print(f"validation @ {step}: {acc:.4f}", flush=True)
                if acc > best:
                    best, best_step = acc, step
                    best_state = {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict(best_state)
    test = evaluate(Xt, Yt)
    res = {"config": a.config, "torch": torch.__version__, "torchvision": torchvision.__version__, "threads": a.threads,
           "train_rows": len(tri), "steps": step, "best_step": best_step, "best_validation_accuracy": best,
           "test_accuracy": test, "validation": evals, "wall_s": time.time() - t0}
    json.dump(res, open(a.out, "w"), indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
