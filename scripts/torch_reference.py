#!/usr/bin/env python3
"""PyTorch reference for derma's model: builds torchvision EfficientNets (optionally with the seed's head),
writes weights, inputs and expected outputs, and compares derma's outputs against them.

Needs torch, torchvision and safetensors (CPU is enough).

  torch_reference.py make OUT [--width W --depth D --head seed|torchvision --classes C --batch N --size S
                              --seed K --fp16-weights --format pth|seed|safetensors]
      OUT/weights.<ext>            model weights (state_dict, or the seed's checkpoint dict)
      OUT/input.safetensors        images f32 [N,3,S,S], targets i64 [N], alpha f32 [C]
      OUT/expected_eval.safetensors   logits
      OUT/expected_train.safetensors  logits, loss, grad.<name>, running.<name>
  torch_reference.py compare EXPECTED ACTUAL    relative errors per tensor, worst first
  torch_reference.py parity --derma BIN OUT     full-size B0 with the seed head: make, run derma, compare
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
from torchvision.ops import StochasticDepth


class SeedModel(nn.Module):
    """The seed notebook's EfficientNetB0PyTorch: torchvision's model as `base_model`, deeper head."""

    def __init__(self, base, num_classes):
        super().__init__()
        self.base_model = base
        in_features = base.classifier[1].in_features
        base.classifier = nn.Sequential(
            nn.Dropout(p=0.5, inplace=True),
            nn.Linear(in_features, 256),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(256),
            nn.Dropout(p=0.5, inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x):
        return self.base_model(x)


def focal_loss(logits, targets, alpha, gamma):
    ce = nn.functional.cross_entropy(logits, targets, weight=alpha, reduction="none")
    pt = torch.exp(-ce)
    return ((1 - pt) ** gamma * ce).mean()


def build(args):
    settings, last_channel = _efficientnet_conf("efficientnet_b0", width_mult=args.width, depth_mult=args.depth)
    base = EfficientNet(settings, 0.2, last_channel=last_channel, num_classes=args.classes if args.head == "torchvision" else 1000)
    if args.head == "seed":
        model = SeedModel(base, args.classes)
        inner = base
    else:
        model = base
        inner = base
    # Non-trivial running statistics and BN affine parameters, so eval mode tests them.
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.num_batches_tracked.fill_(3)
        if args.fp16_weights:
            for p in model.state_dict().values():
                if p.is_floating_point():
                    p.copy_(p.half().float())
    return model, inner


def make(args):
    torch.manual_seed(args.seed)
    model, inner = build(args)
    os.makedirs(args.out, exist_ok=True)
    sd = inner.state_dict()
    if args.format == "seed":
        torch.save(
            {
                "epoch": 3,
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 5e-5, "betas": (0.9, 0.999)}]},
                "val_acc": 0.5,
                "frozen_layers": 7,
                "config": {"batch_size": 32, "lr": 5e-5},
            },
            os.path.join(args.out, "weights.pth"),
        )
    elif args.format == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(args.out, "weights.safetensors"))
    else:
        torch.save(sd, os.path.join(args.out, "weights.pth"))

    g = torch.Generator().manual_seed(args.seed + 2)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    if args.fp16_weights:
        images = images.half().float()
    targets = torch.randint(0, args.classes, (args.batch,), generator=g)
    alpha = torch.rand(args.classes, generator=g) + 0.5
    save_file({"images": images, "targets": targets, "alpha": alpha}, os.path.join(args.out, "input.safetensors"))

    model.eval()
    with torch.no_grad():
        logits = model(images)
    save_file({"logits": logits.contiguous()}, os.path.join(args.out, "expected_eval.safetensors"))

    # Train mode: batch statistics, no dropout, no stochastic depth.
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, StochasticDepth):
            m.p = 0.0
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    logits = model(images)
    loss = focal_loss(logits, targets, alpha, args.gamma)
    loss.backward()
    out = {"logits": logits.detach().contiguous(), "loss": loss.detach().reshape(())}
    for name, p in inner.named_parameters():
        out["grad." + name] = p.grad.detach().contiguous()
    for name, b in inner.named_buffers():
        if name.endswith("running_mean") or name.endswith("running_var"):
            out["running." + name] = b.detach().contiguous()
    save_file(out, os.path.join(args.out, "expected_train.safetensors"))
    print(f"wrote {args.out}: {sum(p.numel() for p in inner.parameters())} parameters, batch {args.batch}, {args.size}x{args.size}")


def compare(expected, actual):
    """Relative error ||derma - torch|| / ||torch|| per tensor. A gradient whose reference norm is below 1e-5 of
    the largest gradient norm is analytically zero (e.g. the bias of a BN whose output only reaches later BNs in
    train mode: shift invariance), so both sides hold rounding noise; it is measured against the largest gradient
    norm instead and marked `~0`."""
    e = load_file(expected)
    a = load_file(actual)
    grad_scale = max([v.double().norm().item() for k, v in e.items() if k.startswith("grad.")] or [0.0])
    rows = []
    missing = sorted(set(e) - set(a))
    for k in sorted(set(e) & set(a)):
        x, y = e[k].double(), a[k].double()
        if x.shape != y.shape:
            rows.append((float("inf"), k, f"shape {tuple(y.shape)} vs {tuple(x.shape)}"))
            continue
        denom = x.norm().item()
        note = f"max |d| {(x - y).abs().max().item():.3e}"
        if k.startswith("grad.") and denom < 1e-5 * grad_scale:
            denom = grad_scale
            note += ", ~0: relative to the largest gradient norm"
        err = (x - y).norm().item() / denom if denom > 0 else (x - y).norm().item()
        rows.append((err, k, note))
    rows.sort(reverse=True)
    return rows, missing


def report(rows, missing, limit=12):
    for err, k, note in rows[:limit]:
        print(f"  {err:10.3e}  {k}  ({note})")
    if missing:
        print(f"  missing in derma's output: {missing[:10]}{'...' if len(missing) > 10 else ''}")


def parity(args):
    make_args = argparse.Namespace(
        out=args.out, width=1.0, depth=1.0, head="seed", classes=8, batch=args.batch, size=args.size, seed=args.seed,
        fp16_weights=False, format="seed", gamma=2.0,
    )
    make(make_args)
    results = {}
    for mode in ("eval", "train"):
        out = os.path.join(args.out, f"derma_{mode}.safetensors")
        cmd = [args.derma, "forward", "--weights", os.path.join(args.out, "weights.pth"), "--input",
               os.path.join(args.out, "input.safetensors"), "--output", out, "--mode", mode, "--device", "cpu"]
        subprocess.run(cmd, check=True)
        rows, missing = compare(os.path.join(args.out, f"expected_{mode}.safetensors"), out)
        print(f"{mode}: worst relative errors (||derma - torch|| / ||torch||)")
        report(rows, missing)
        logits = next(err for err, k, _ in rows if k == "logits")
        grads = [err for err, k, _ in rows if k.startswith("grad.")]
        results[mode] = {"logits_rel": logits, "worst_grad_rel": max(grads) if grads else None, "missing": missing}
    print(json.dumps(results, indent=2))
    ok = results["eval"]["logits_rel"] <= 1e-4 and results["train"]["logits_rel"] <= 1e-4 and results["train"]["worst_grad_rel"] <= 1e-3
    print("PARITY", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out")
    m.add_argument("--width", type=float, default=1.0)
    m.add_argument("--depth", type=float, default=1.0)
    m.add_argument("--head", choices=["seed", "torchvision"], default="seed")
    m.add_argument("--classes", type=int, default=8)
    m.add_argument("--batch", type=int, default=2)
    m.add_argument("--size", type=int, default=64)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--gamma", type=float, default=2.0)
    m.add_argument("--fp16-weights", action="store_true")
    m.add_argument("--format", choices=["pth", "seed", "safetensors"], default="pth")
    c = sub.add_parser("compare")
    c.add_argument("expected")
    c.add_argument("actual")
    q = sub.add_parser("parity")
    q.add_argument("out")
    q.add_argument("--derma", required=True)
    q.add_argument("--batch", type=int, default=4)
    q.add_argument("--size", type=int, default=224)
    q.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    args = p.parse_args()
    if args.cmd == "make":
        make(args)
    elif args.cmd == "compare":
        rows, missing = compare(args.expected, args.actual)
        report(rows, missing, limit=len(rows))
    else:
        sys.exit(parity(args))


if __name__ == "__main__":
    main()
