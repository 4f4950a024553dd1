"""The PyTorch side of bench/mobilenet.py: one training step of torchvision's
MobileNetV2 (the ImageNet weights from the .pth, a new 10-class head), batch B
of S x S images, on the CPU; step = forward + cross-entropy + backward + global
grad norm + AdamW (fused=True). `--mode head`: only classifier.1 trains, the
features frozen and in eval mode (running statistics). One JSON line out.

    .venv/bin/python bench/pytorch_mobilenet.py --model PTH --batch 32 --size 96 --steps 5 --threads 2 --mode full
"""
import argparse, json, resource, time


def rss_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["full", "head"], default="full")
    a = ap.parse_args()
    import torch, torchvision

    base = rss_mb("VmRSS")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v2()
    m.load_state_dict(torch.load(a.model, weights_only=True))
    m.classifier[1] = torch.nn.Linear(m.last_channel, 10)
    m.train()
    if a.mode == "head":
        for p in m.features.parameters():
            p.requires_grad_(False)
        m.features.eval()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    # The LCG of examples/mobilenet_step.rs, NCHW.
    n = a.batch * 3 * a.size * a.size
    st, vals = 12345, []
    for _ in range(n):
        st = (st * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
        vals.append((st >> 40) / float(1 << 24) * 4.0 - 2.0)
    x = torch.tensor(vals, dtype=torch.float32).reshape(a.batch, 3, a.size, a.size)
    y = torch.tensor([i % 10 for i in range(a.batch)])
    times = []
    for step in range(a.steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        opt.step()
        if step > 0:
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    print(json.dumps({"impl": "pytorch", "mode": a.mode, "median_s": med, "steps": times,
                      "images_per_s": a.batch / med, "peak_rss_mb": rss_mb("VmHWM"), "base_rss_mb": base,
                      "threads": a.threads, "batch": a.batch, "size": a.size,
                      "torch": torch.__version__, "torchvision": torchvision.__version__}))


if __name__ == "__main__":
    main()
