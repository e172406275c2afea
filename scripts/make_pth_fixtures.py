#!/usr/bin/env python3
"""Writes the small weight-file fixtures that tests/io_*.rs read.

Usage: make_pth_fixtures.py OUT_DIR   (needs PyTorch; numpy and safetensors are optional)

Files written:
  state_dict.pth         an OrderedDict state_dict from a tiny Conv+BN module plus extra tensors covering f32, f16,
                         bf16, f64, int64, a scalar num_batches_tracked, a transposed view and a strided slice that
                         share storage with other entries, and an nn.Parameter.
  checkpoint.pth         the seed's checkpoint layout: {epoch, model_state_dict (keys prefixed `base_model.`),
                         optimizer_state_dict (real AdamW state after two steps), val_acc, frozen_layers, config}.
  numpy_scalar.pth       a checkpoint whose val_acc is a numpy.float64 and epoch a numpy.int64 (what metrics
                         libraries return), when numpy is importable.
  legacy.pth             the pre-1.6 (non-zip) torch.save format, to check that it is refused clearly.
  hostile.pth            a torch.save-shaped zip whose pickle calls os.system: a reader must refuse it.
  reference.safetensors  the plain state dict written by safetensors.torch.save_file, when safetensors is importable.
  expected.json          every tensor of the files above: dtype, shape and elements (row-major; float elements also
                         as the hex bit patterns of their f64 values, exact), plus the checkpoint's metadata.
"""

import collections
import json
import math
import os
import pickle
import struct
import sys
import zipfile

import torch


def elements(t):
    """Row-major elements as exact Python numbers (floats are exact doubles for every float dtype)."""
    flat = t.detach().contiguous().reshape(-1)
    if t.dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        return [int(v) for v in flat.tolist()]
    out = []
    for v in flat.to(torch.float64).tolist():
        if math.isinf(v):
            out.append("inf" if v > 0 else "-inf")
        elif math.isnan(v):
            out.append("nan")
        else:
            out.append(v)
    return out


def f64_bits(t):
    """IEEE-754 bit patterns of the elements widened to f64, as hex: JSON readers need not round-trip floats."""
    flat = t.detach().contiguous().reshape(-1).to(torch.float64).tolist()
    return ["%016x" % struct.unpack("<Q", struct.pack("<d", v))[0] for v in flat]


def describe(sd):
    out = []
    for k, v in sd.items():
        d = {"name": k, "dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape), "values": elements(v)}
        if v.is_floating_point():
            d["f64_bits"] = f64_bits(v)
        out.append(d)
    return out


def plain_state_dict():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 2), torch.nn.BatchNorm2d(2))
    model.train()
    model(torch.randn(2, 3, 4, 4))  # one step so running stats and num_batches_tracked are not defaults
    sd = model.state_dict()  # OrderedDict with a `_metadata` attribute, like every module state_dict

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 8.0 - 1.0
    sd["lin.weight"] = base
    sd["lin.weight_t"] = base.t()  # non-contiguous view sharing storage with lin.weight
    sd["lin.slice"] = base[1:, ::2]  # storage offset 6, strides (6, 2)
    sd["half.weight"] = torch.tensor([0.1, -2.5, 65504.0, 6e-8, -0.0, float("inf"), 1.0 / 3.0], dtype=torch.float16)
    sd["bf16.weight"] = torch.tensor([[0.1, -3.0e38], [1.0 / 3.0, 7.0]], dtype=torch.bfloat16)
    sd["f64.buf"] = torch.tensor([math.pi, -1e-300], dtype=torch.float64)
    sd["long.buf"] = torch.tensor([2**40, -3, 2**62 + 1], dtype=torch.int64)
    sd["param.weight"] = torch.nn.Parameter(torch.tensor([1.5, -0.25, 3.0]))  # pickled via _rebuild_parameter
    sd["expanded"] = torch.tensor([4.0, 5.0]).reshape(2, 1).expand(2, 3)  # stride 0
    sd["empty"] = torch.zeros(0, 3)
    return sd


def checkpoint():
    torch.manual_seed(1)
    model = torch.nn.Module()
    model.base_model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=1e-5)
    for _ in range(2):
        opt.zero_grad()
        model.base_model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
    config = {
        "batch_size": 32,
        "lr": 5e-05,
        "weight_decay": 1e-05,
        "num_epochs": 100,
        "img_size": 224,
        "betas": (0.9, 0.999),
        "model": "efficientnet_b0",
        "mixed_precision": True,
        "resume": None,
        "class_names": ["MEL", "NV", "BCC"],
    }
    ckpt = {
        "epoch": 12,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "val_acc": 83.25,
        "frozen_layers": 5,
        "config": config,
    }
    return ckpt, config


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo hostile-pickle-executed > hostile_marker.txt",))


def write_hostile(path):
    payload = pickle.dumps({"weight": _Hostile()}, protocol=2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("hostile/data.pkl", payload)
        z.writestr("hostile/byteorder", "little")
        z.writestr("hostile/version", "3\n")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_pth_fixtures.py OUT_DIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)

    sd = plain_state_dict()
    torch.save(sd, os.path.join(out, "state_dict.pth"))

    ckpt, config = checkpoint()
    torch.save(ckpt, os.path.join(out, "checkpoint.pth"))

    expected = {
        "torch_version": torch.__version__,
        "state_dict": describe(sd),
        "checkpoint": {
            "epoch": ckpt["epoch"],
            "val_acc": ckpt["val_acc"],
            "frozen_layers": ckpt["frozen_layers"],
            "config": config,
            "model_state_dict": describe(ckpt["model_state_dict"]),
            "optimizer_state": {
                str(k): describe(v) for k, v in ckpt["optimizer_state_dict"]["state"].items()
            },
            "param_groups": [
                {k: v for k, v in g.items() if isinstance(v, (int, float, bool, list, tuple)) or v is None}
                for g in ckpt["optimizer_state_dict"]["param_groups"]
            ],
        },
    }

    try:
        import numpy as np

        torch.save(
            {"epoch": np.int64(7), "val_acc": np.float64(81.5), "model_state_dict": ckpt["model_state_dict"]},
            os.path.join(out, "numpy_scalar.pth"),
        )
        expected["numpy_scalar"] = {"epoch": 7, "val_acc": 81.5}
    except ImportError:
        pass

    torch.save(
        collections.OrderedDict(w=torch.ones(2)),
        os.path.join(out, "legacy.pth"),
        _use_new_zipfile_serialization=False,
    )
    write_hostile(os.path.join(out, "hostile.pth"))

    try:
        from safetensors.torch import save_file

        contiguous = {k: v.detach().contiguous().clone() for k, v in sd.items()}
        save_file(contiguous, os.path.join(out, "reference.safetensors"), metadata={"source": "safetensors.torch"})
    except ImportError:
        pass

    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
