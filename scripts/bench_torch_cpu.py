#!/usr/bin/env python3
"""Times torchvision's efficientnet_b0 on the CPU: forward in eval mode and a full training step (forward,
cross-entropy, backward, AdamW), at batch 8 and 224x224 by default, channels_last, fp32.

  bench_torch_cpu.py [--batch 8] [--size 224] [--steps 5] [--threads N] [--json]

Run it on the machine where `derma bench cpu` runs, in the same session, and compare the ratios.
"""
import argparse
import json
import platform
import statistics
import time

import torch
import torchvision


def timed(fn, steps):
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0().to(memory_format=torch.channels_last)
    x = torch.randn(a.batch, 3, a.size, a.size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (a.batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=1e-5)

    def forward():
        model.eval()
        with torch.no_grad():
            model(x)

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    fwd = timed(forward, a.steps)
    trn = timed(train_step, a.steps)
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "batch": a.batch,
        "size": a.size,
        "forward_img_s": a.batch / fwd,
        "train_img_s": a.batch / trn,
    }
    if a.json:
        print(json.dumps(result))
    else:
        print(f"torch {result['torch']} on {result['threads']} threads, batch {a.batch}, {a.size}x{a.size}, fp32:")
        print(f"  forward (eval)  {result['forward_img_s']:.2f} images/s")
        print(f"  training step   {result['train_img_s']:.2f} images/s")


if __name__ == "__main__":
    main()
