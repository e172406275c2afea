#!/usr/bin/env python3
"""The PyTorch side of derma's training benchmark: the seed's model and pipeline in PyTorch against derma on the
same device, written as one JSON record with its conditions.

  bench_pytorch.py OUT [--device cuda|cpu] [--batch 256] [--size 224] [--steps 40] [--warmup 10] [--windows 5]
                   [--derma BIN] [--data DIR] [--budget-s S] [--skip PART,...] [--strict] [--quick]

OUT is a folder (the record goes to OUT/pytorch-bench.json, one log per part beside it) or a file ending in .json
(the logs go beside it); the synthetic images, derma's decode cache and run folder go to --work (by default a
temporary folder, removed at the end). Parts, in this order, each in its own process under a time limit taken
from --budget-s and capped per part:

  synth        `derma synth` makes an ISIC-2019-layout folder when --data is not given
  derma-bench  `derma bench train --device D --batch B --size S --precision f16 --steps N --json`:
               derma_img_s and floor_img_s from its JSON
  eager        training steps of the seed's model on synthetic data already on the device: torchvision
               efficientnet_b0 (weights=None) with the seed's head, the seed's focal loss and AdamW, autocast fp16
               and GradScaler, channels_last; warm-up excluded, the median of --windows timed windows (CUDA events
               on cuda, perf_counter on cpu): pytorch_eager_img_s
  prepare      `derma prepare` (the one-time decode cache and the lesion-grouped split; timed on its own)
  derma-epoch  `derma train --epochs 1` over the folder, wall clock: derma_epoch_s
  seed-epoch   the seed's pipeline as written (its Dataset with PIL, its transforms, DataLoader with min(6, cores)
               workers, pin_memory, prefetch_factor 3, persistent workers, AMP) for one epoch (training split,
               then the validation split) over the same images: seed_epoch_s
  compile      the eager part under torch.compile: pytorch_compile_img_s (a failure is recorded, never fatal)

A part that crashes, hangs or fails is recorded with its exit status and the tail of its stderr, and the others
go on; the record is rewritten after every part, so a run stopped from outside still leaves what finished. Exit
status: 0 when every PyTorch part (eager, seed-epoch) succeeded, and with --strict every derma part too; 3 when
not (the record says which and why); 2 on bad arguments.

--quick is the small CPU check of the whole script: --device cpu, batch 4, 64x64, 3 steps, a 64-image folder.
On the CPU the PyTorch parts autocast to --cpu-amp (bf16 by default, torch's CPU autocast dtype; f16 runs too,
with GradScaler('cpu'), but far slower than f32 where the CPU has no fp16 arithmetic), and derma trains in f32.
"""
import argparse
import csv
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

SCHEMA = "derma-bench-pytorch/1"
# ISIC 2019 training images per class, in the ground truth's column order (UNK has none).
ISIC_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
ISIC_COUNTS = [4522, 12875, 3323, 867, 2624, 239, 253, 628]
GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
IMAGES = "ISIC_2019_Training_Input"
# The seed's optimizer and loss settings.
LR, WEIGHT_DECAY, GAMMA = 5e-5, 1e-5, 2.0
# The seed's first unfreezing stage (epoch 0: 7 of the 9 children of `features` frozen): what one epoch trains.
EPOCH_FROZEN_BLOCKS = 7
PARTS = ["synth", "derma-bench", "eager", "prepare", "derma-epoch", "seed-epoch", "compile"]
DERMA_PARTS = {"synth", "derma-bench", "prepare", "derma-epoch"}
# Longest each part may take (s), before the overall budget cuts it shorter.
CAPS = {
    "cuda": {"synth": 60, "derma-bench": 60, "eager": 75, "prepare": 45, "derma-epoch": 75, "seed-epoch": 75,
             "compile": 240},
    "cpu": {"synth": 60, "derma-bench": 120, "eager": 240, "prepare": 60, "derma-epoch": 240, "seed-epoch": 240,
            "compile": 600},
}
# A part is not started with less than this left of the budget.
MIN_PART_S = 10


# ---------------------------------------------------------------------------------------------------------------
# The seed's components (the notebook's code; where it shows none, the plainest code that does what it says)


def balanced_weights(counts):
    """Balanced class weights n/(C*n_c) (0 for an empty class), as derma computes its focal loss alpha."""
    n, c = sum(counts), len(counts)
    return [n / (c * k) if k else 0.0 for k in counts]


def seed_classes():
    """The seed's model, loss and dataset classes (torch imported only here, so the parent runs without it)."""
    import torch
    import torch.nn as nn
    from torch.utils.data import Dataset
    from torchvision import models

    class EfficientNetB0PyTorch(nn.Module):
        def __init__(self, num_classes, pretrained=True):
            super().__init__()
            # The seed calls models.efficientnet_b0(pretrained=pretrained); weights=None is its random-init form
            # in current torchvision (nothing to download, and derma's side starts from random weights too).
            self.base_model = models.efficientnet_b0(weights=None)

            # Initially freeze ALL layers
            for param in self.base_model.parameters():
                param.requires_grad = False

            in_features = self.base_model.classifier[1].in_features
            self.base_model.classifier = nn.Sequential(
                nn.Dropout(p=0.5, inplace=True),
                nn.Linear(in_features, 256),
                nn.ReLU(inplace=True),
                nn.BatchNorm1d(256),
                nn.Dropout(p=0.5, inplace=True),
                nn.Linear(256, num_classes),
            )

            # Always keep classifier trainable
            for param in self.base_model.classifier.parameters():
                param.requires_grad = True

        def forward(self, x):
            return self.base_model(x)

    class FocalLoss(nn.Module):
        def __init__(self, alpha, gamma=2.0):
            super().__init__()
            self.alpha = alpha
            self.gamma = gamma

        def forward(self, logits, targets):
            ce = nn.functional.cross_entropy(logits, targets, weight=self.alpha, reduction="none")
            pt = torch.exp(-ce)
            return ((1 - pt) ** self.gamma * ce).mean()

    class AddGaussianNoise:
        def __init__(self, mean=0.0, std=0.02):
            self.mean = mean
            self.std = std

        def __call__(self, tensor):
            return tensor + torch.randn_like(tensor) * self.std

    class SkinConditionDataset(Dataset):
        # The seed takes a pandas DataFrame with a `filepath` column; a list of rows does the same here (pandas
        # need not be installed).
        def __init__(self, df, transform=None, size=224):
            self.df = list(df)
            self.transform = transform
            self.size = size

            # Pre-filter valid files during initialization
            self.valid_indices = []
            for idx in range(len(self.df)):
                image_path = self.df[idx]["filepath"]
                if os.path.exists(image_path):
                    self.valid_indices.append(idx)
                else:
                    print(f"Warning: File not found - {image_path}")

        def __len__(self):
            return len(self.valid_indices)

        def __getitem__(self, idx):
            from PIL import Image

            row = self.df[self.valid_indices[idx]]
            label = row["label"]
            try:
                # "Pre-resizing: images resized to 224x224 during loading".
                image = Image.open(row["filepath"]).convert("RGB").resize((self.size, self.size))
            except Exception as e:  # the seed returns a dummy tensor for an unreadable image
                print(f"Warning: cannot read {row['filepath']}: {e}")
                return torch.zeros(3, self.size, self.size), label
            if self.transform:
                image = self.transform(image)
            return image, label

    return EfficientNetB0PyTorch, FocalLoss, AddGaussianNoise, SkinConditionDataset


def set_frozen_blocks(model, k):
    """The seed's gradual unfreezing: children 0..k-1 of `features` frozen, the rest and the head trainable."""
    for i, child in enumerate(model.base_model.features):
        for p in child.parameters():
            p.requires_grad = i >= k


def seed_gpu_settings(torch):
    """The seed's GPU settings (section 5.2)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.enabled = True
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        torch.set_float32_matmul_precision("high")


def amp_setup(torch, device, cpu_amp="bf16"):
    """(autocast dtype or None, GradScaler or None, description). On cuda the seed's fp16 autocast + GradScaler.
    On cpu `cpu_amp`: bf16 (torch's cpu autocast default, no scaler needed), f16 (with GradScaler('cpu'); runs,
    but far slower than f32 on CPUs without native fp16 arithmetic) or f32; a dtype this torch cannot autocast
    on cpu falls back to f32, and the description says so."""
    if device == "cuda":
        return torch.float16, torch.amp.GradScaler("cuda"), "f16: autocast float16 + GradScaler"
    if cpu_amp == "f32":
        return None, None, "f32 on cpu (no autocast)"
    dt = torch.float16 if cpu_amp == "f16" else torch.bfloat16
    try:
        conv = torch.nn.Conv2d(3, 4, 3)
        with torch.autocast("cpu", dtype=dt):
            out = conv(torch.randn(2, 3, 8, 8))
        if out.dtype != dt:
            raise RuntimeError(f"autocast gave {out.dtype}")
    except Exception as e:
        return None, None, f"f32 on cpu: autocast {cpu_amp} is not supported here ({e})"
    if dt == torch.bfloat16:
        return dt, None, "bf16: autocast bfloat16 on cpu, no GradScaler (bf16 has f32's range)"
    try:
        return dt, torch.amp.GradScaler("cpu"), "f16: autocast float16 on cpu + GradScaler('cpu')"
    except Exception as e:
        return dt, None, f"f16: autocast float16 on cpu, no GradScaler ({e})"


def train_step_fn(torch, model, criterion, optimizer, scaler, device, amp_dtype):
    """One optimizer step as the seed's training loop does it (section 5.1)."""

    def step(inputs, targets):
        optimizer.zero_grad()
        with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(inputs)
            loss = criterion(outputs, targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return outputs, loss

    return step


def device_info(torch, device):
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_bytes=p.total_memory,
                    sms=p.multi_processor_count, cudnn=torch.backends.cudnn.version())
    return info


# ---------------------------------------------------------------------------------------------------------------
# Child parts: each runs in its own process and writes one JSON object to --part-out


def part_steps(a, compiled):
    """Training-step throughput of the seed's model on synthetic data already on the device."""
    import torch

    res = {"compiled": compiled}
    torch.manual_seed(0)
    if a.device == "cuda":
        seed_gpu_settings(torch)
    res.update(device_info(torch, a.device))
    EfficientNetB0PyTorch, FocalLoss, _, _ = seed_classes()
    dev = torch.device(a.device)
    model = EfficientNetB0PyTorch(len(ISIC_CLASSES), pretrained=False)
    set_frozen_blocks(model, a.stage)
    model = model.to(dev, memory_format=torch.channels_last).train()
    res["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    criterion = FocalLoss(alpha=torch.tensor(balanced_weights(ISIC_COUNTS), device=dev), gamma=GAMMA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    amp_dtype, scaler, res["amp"] = amp_setup(torch, a.device, a.cpu_amp)
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(ISIC_CLASSES), (a.batch,), device=dev)
    net = model
    if compiled:
        net = torch.compile(model)
        res["compile_mode"] = "default"
    step = train_step_fn(torch, net, criterion, optimizer, scaler, a.device, amp_dtype)

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    # Warm-up, excluded from the timing: the first step (the compile, cuDNN's algorithm search) timed on its own.
    t = time.perf_counter()
    step(x, y)
    sync()
    res["first_step_s"] = time.perf_counter() - t
    # A compiled step can compile again on its second call (seen on CPU: the first timed window 40x slower).
    warmup = max(a.warmup, 3) if compiled else a.warmup
    for _ in range(warmup - 1):
        step(x, y)
    sync()
    if compiled:
        try:
            from torch._dynamo.utils import counters

            res["graph_breaks"] = sum(counters["graph_break"].values())
        except Exception:
            pass
    per_window = max(a.steps // a.windows, 1)
    windows, skipped = [], 0
    for _ in range(a.windows):
        scale0 = scaler.get_scale() if scaler is not None else None
        if a.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_window):
                step(x, y)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        else:
            t = time.perf_counter()
            for _ in range(per_window):
                step(x, y)
            seconds = time.perf_counter() - t
        windows.append(a.batch * per_window / seconds)
        if scaler is not None:
            # Within a few windows the scale only halves, once per step that overflowed (and was skipped).
            skipped += round(math.log2(scale0 / scaler.get_scale()))
    img_s = statistics.median(windows)
    res.update(
        status="ok",
        img_s=img_s,
        ms_per_step=1000.0 * a.batch / img_s,
        window_img_s=windows,
        steps_per_window=per_window,
        windows=a.windows,
        warmup=warmup,
        timer="CUDA events" if a.device == "cuda" else "time.perf_counter",
        skipped_steps=skipped,
        grad_scale=scaler.get_scale() if scaler is not None else None,
    )
    if a.device == "cuda":
        res["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    return res


def read_rows(data, split_csv):
    """(train rows, val rows, class names, where the split came from). Rows: {filepath, label}. The split is
    derma's (its split.csv) when there is one, so both sides train and validate on the same images."""
    with open(os.path.join(data, GROUND_TRUTH), newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        records = [r for r in reader if r]
    columns = header[1:]
    onehot = [[float(v) for v in r[1:]] for r in records]
    # UNK is a class only when some row has it, as derma reads the ground truth.
    keep = [j for j, c in enumerate(columns) if c != "UNK" or any(row[j] > 0 for row in onehot)]
    classes = [columns[j] for j in keep]
    label_of = {r[0]: max(range(len(keep)), key=lambda i: oh[keep[i]]) for r, oh in zip(records, onehot)}
    path = lambda image: os.path.join(data, IMAGES, image + ".jpg")
    if split_csv and os.path.exists(split_csv):
        train, val = [], []
        with open(split_csv, newline="") as f:
            for r in csv.DictReader(f):
                if r["image"] in label_of:
                    (train if r["split"] == "train" else val).append(
                        {"filepath": path(r["image"]), "label": label_of[r["image"]]})
        return train, val, classes, f"derma's split ({split_csv})"
    ids = sorted(label_of)
    random.Random(42).shuffle(ids)
    n_val = len(ids) // 5
    rows = [{"filepath": path(i), "label": label_of[i]} for i in ids]
    return rows[n_val:], rows[:n_val], classes, "a random 80/20 split by image (derma's split.csv was not there)"


def part_seed_epoch(a):
    """One epoch of the seed's pipeline as written, timed end to end."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms

    t_process = time.perf_counter()
    res = {}
    if a.device == "cuda":
        seed_gpu_settings(torch)
    res.update(device_info(torch, a.device))
    dev = torch.device(a.device)
    torch.zeros(1, device=dev)  # the device context exists before the clock starts (reported apart)
    res["context_s"] = time.perf_counter() - t_process
    train_rows, val_rows, classes, res["split"] = read_rows(a.data, a.split_csv)
    EfficientNetB0PyTorch, FocalLoss, AddGaussianNoise, SkinConditionDataset = seed_classes()
    s = a.size

    t0 = time.perf_counter()
    train_transform = transforms.Compose([
        transforms.RandomHorizontalFlip(p=0.3),
        transforms.RandomRotation(degrees=3),
        transforms.RandomResizedCrop(s, scale=(0.92, 1.0)),
        transforms.ColorJitter(brightness=0.05, contrast=0.05, saturation=0.05, hue=0.05),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        AddGaussianNoise(std=0.02),
    ])
    # The notebook shows no validation transform: the pre-resized image, normalized.
    val_transform = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    train_dataset = SkinConditionDataset(train_rows, train_transform, size=s)
    val_dataset = SkinConditionDataset(val_rows, val_transform, size=s)
    counts = [0] * len(classes)
    for r in train_rows:
        counts[r["label"]] += 1
    model = EfficientNetB0PyTorch(len(classes), pretrained=False)
    set_frozen_blocks(model, EPOCH_FROZEN_BLOCKS)
    model = model.to(dev)
    criterion = FocalLoss(alpha=torch.tensor(balanced_weights(counts), device=dev), gamma=GAMMA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    amp_dtype, scaler, res["amp"] = amp_setup(torch, a.device, a.cpu_amp)

    num_workers = min(6, os.cpu_count())
    loader_args = dict(
        batch_size=a.epoch_batch,
        num_workers=num_workers,
        pin_memory=True,
        persistent_workers=True,
        prefetch_factor=3,
        pin_memory_device=str(dev) if dev.type == "cuda" else "",
    )
    train_loader = DataLoader(train_dataset, shuffle=True, drop_last=True, **loader_args)
    val_loader = DataLoader(val_dataset, shuffle=False, drop_last=False, **loader_args) if len(val_dataset) else []
    step = train_step_fn(torch, model, criterion, optimizer, scaler, a.device, amp_dtype)

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    t_setup = time.perf_counter()
    model.train()
    running_loss, correct, seen, steps, first_batch_s = 0.0, 0, 0, 0, None
    for inputs, targets in train_loader:
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - t_setup
        inputs, targets = inputs.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
        outputs, loss = step(inputs, targets)
        running_loss += loss.item() * inputs.size(0)
        correct += (outputs.argmax(1) == targets).sum().item()
        seen += inputs.size(0)
        steps += 1
    sync()
    t_train = time.perf_counter()
    model.eval()
    val_seen, val_correct = 0, 0
    with torch.no_grad():
        for inputs, targets in val_loader:
            inputs, targets = inputs.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
            with torch.autocast(a.device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = model(inputs)
                criterion(outputs, targets)
            val_correct += (outputs.argmax(1) == targets).sum().item()
            val_seen += inputs.size(0)
    sync()
    t_end = time.perf_counter()
    res.update(
        status="ok",
        epoch_s=t_end - t0,
        setup_s=t_setup - t0,
        first_batch_s=first_batch_s,
        train_s=t_train - t_setup,
        val_s=t_end - t_train,
        train_images=seen,
        train_steps=steps,
        train_img_s=seen / (t_train - t_setup) if t_train > t_setup else None,
        val_images=val_seen,
        train_loss=running_loss / seen if seen else None,
        train_acc=correct / seen if seen else None,
        val_acc=val_correct / val_seen if val_seen else None,
        batch=a.epoch_batch,
        workers=num_workers,
        frozen_blocks=EPOCH_FROZEN_BLOCKS,
        classes=len(classes),
        grad_scale=scaler.get_scale() if scaler is not None else None,
    )
    if a.device == "cuda":
        res["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    del train_loader, val_loader  # persistent workers end here, outside the timing
    return res


def run_part(a):
    t = time.perf_counter()
    try:
        if a.part == "eager":
            res = part_steps(a, compiled=False)
        elif a.part == "compile":
            res = part_steps(a, compiled=True)
        elif a.part == "seed-epoch":
            res = part_seed_epoch(a)
        else:
            raise ValueError(f"unknown --part {a.part}")
        rc = 0
    except Exception as e:
        res = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        rc = 1
    res["part_s"] = time.perf_counter() - t
    with open(a.part_out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "traceback"}))
    if rc:
        print(res["traceback"], file=sys.stderr)
    sys.stdout.flush()
    # os._exit: a failed torch.compile can leave worker threads that keep a normal exit waiting.
    os._exit(rc)


# ---------------------------------------------------------------------------------------------------------------
# The parent: runs the parts under the budget and writes the record


class Interrupted(Exception):
    pass


def on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def tail(path, n=1500):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - n, 0))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_cmd(argv, timeout, stdout_path, stderr_path, env=None):
    """Runs argv in its own process group under timeout seconds; the whole group is killed at the limit or when
    this script is interrupted. Returns {rc, seconds, timed_out}."""
    t = time.perf_counter()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        try:
            p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
                                 env=env)
        except OSError as e:
            return {"rc": None, "seconds": 0.0, "timed_out": False, "error": f"cannot start {argv[0]}: {e}"}
        try:
            rc = p.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        except BaseException:
            kill_group(p)
            raise
        if timed_out:
            kill_group(p)
            rc = p.returncode
    return {"rc": rc, "seconds": time.perf_counter() - t, "timed_out": timed_out}


def kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class Bench:
    def __init__(self, a):
        self.a = a
        self.t_start = time.perf_counter()
        self.deadline = self.t_start + a.budget_s
        self.caps = CAPS[a.device]
        self.record = {
            "schema": SCHEMA,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": f"{platform.node()} {platform.system()} {platform.release()} {platform.machine()}",
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "device": a.device,
            "derma_device": a.derma_device,
            "quick": a.quick,
            "gpu": None, "driver": None, "cuda": None, "cudnn": None, "torch": None, "torchvision": None,
            "batch": a.batch, "size": a.size, "stage": a.stage, "precision": None,
            "derma_precision": {"bench": a.derma_precision, "train": a.derma_train_precision},
            "steps": a.steps, "warmup": a.warmup, "windows": a.windows,
            "derma_img_s": None, "pytorch_eager_img_s": None, "pytorch_compile_img_s": None,
            "ratio_vs_eager": None, "ratio_vs_compile": None,
            "seed_epoch_s": None, "derma_epoch_s": None, "floor_img_s": None,
            "epoch": {"batch": a.epoch_batch, "frozen_blocks": EPOCH_FROZEN_BLOCKS, "data": a.data},
            "parts": {},
            "notes": [
                "Both sides start from random weights (torchvision weights=None; derma without --pretrained).",
                "derma_epoch_s is `derma train --epochs 1` wall clock (process start, training split, validation, "
                "checkpoints, plots) with derma's decode cache already built by the prepare part (prepare_s, a "
                "one-time cost); seed_epoch_s is the seed's pipeline from Dataset construction to the end of "
                "validation, decoding every JPEG with PIL as the seed does every epoch; seed_process_s adds the "
                "interpreter, import torch and the device context.",
                "The epoch is the seed's first unfreezing stage (7 of 9 feature blocks frozen) on both sides; "
                "the step benchmark trains feature blocks from --stage on (0: all).",
                "The seed's Dataset body is not in the notebook: PIL open, convert('RGB'), resize to size x size, "
                "its transforms; its validation transform is not shown either: ToTensor + Normalize.",
            ],
        }
        self.failed = []
        # The part running now (recorded as interrupted when a signal stops the run).
        self.current = None

    def left(self):
        return self.deadline - time.perf_counter()

    def path(self, name):
        return os.path.join(self.a.logs, name)

    def write(self):
        r = self.record
        r["total_s"] = round(time.perf_counter() - self.t_start, 2)
        tmp = self.a.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(r, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.a.json_path)

    def begin(self, name):
        """The time limit for part `name`, or None (recorded as skipped) when it should not start."""
        if name in self.a.skip:
            self.part(name, status="skipped", reason="--skip")
            return None
        limit = min(self.caps[name], self.left() - 3)
        if limit < MIN_PART_S:
            self.part(name, status="skipped", reason=f"not started: {max(self.left(), 0):.0f} s of the "
                      f"{self.a.budget_s:.0f} s budget left")
            return None
        print(f"== {name} (limit {limit:.0f} s)", flush=True)
        self.current = name
        return limit

    def part(self, name, **fields):
        self.current = None
        self.record["parts"][name] = fields
        status = fields.get("status")
        if status == "skipped":
            print(f"SKIPPED: {name}: {fields.get('reason')}", flush=True)
        elif status != "ok":
            msg = fields.get("error") or f"exit status {fields.get('rc')}"
            print(f"part {name} {status}: {msg}", flush=True)
            if name in ("eager", "seed-epoch") or (self.a.strict and name in DERMA_PARTS):
                self.failed.append(name)
        self.write()

    def derma_cmd(self, name, args, json_stdout=False):
        """Runs derma ARGS as part `name`; returns (fields, parsed stdout JSON or None)."""
        if not self.a.derma:
            self.part(name, status="skipped", reason="no derma binary (--derma)")
            return None, None
        limit = self.begin(name)
        if limit is None:
            return None, None
        argv = [self.a.derma] + args
        out, err = self.path(f"{name}.stdout.txt"), self.path(f"{name}.stderr.log")
        r = run_cmd(argv, limit, out, err)
        fields = {"command": " ".join(argv), "rc": r["rc"], "seconds": round(r["seconds"], 3),
                  "stdout": os.path.basename(out), "stderr": os.path.basename(err)}
        parsed = None
        if json_stdout and r["rc"] == 0:
            text = open(out, encoding="utf-8", errors="replace").read().strip()
            try:
                parsed = json.loads(text)
            except ValueError:
                # One JSON object on the last line that holds one.
                for line in reversed(text.splitlines()):
                    try:
                        parsed = json.loads(line)
                        break
                    except ValueError:
                        continue
        if r.get("error"):
            fields.update(status="failed", error=r["error"])
        elif r["timed_out"]:
            fields.update(status="timeout", error=f"killed at its {limit:.0f} s limit",
                          stderr_tail=tail(err))
        elif r["rc"] != 0:
            fields.update(status="failed", error=f"exit status {r['rc']}", stderr_tail=tail(err))
        elif json_stdout and not isinstance(parsed, dict):
            fields.update(status="failed", error="no JSON object on stdout", stdout_tail=tail(out),
                          stderr_tail=tail(err))
        else:
            fields["status"] = "ok"
        return fields, parsed

    def torch_part(self, name):
        """Runs this script with --part NAME in a child process; returns its result (or the failure)."""
        limit = self.begin(name)
        if limit is None:
            return None
        a = self.a
        result = self.path(f"{name}.json")
        if os.path.exists(result):
            os.remove(result)
        argv = [sys.executable, os.path.abspath(__file__), a.out, "--part", name, "--part-out", result,
                "--device", a.device, "--batch", str(a.batch), "--size", str(a.size), "--steps", str(a.steps),
                "--warmup", str(a.warmup), "--windows", str(a.windows), "--stage", str(a.stage),
                "--epoch-batch", str(a.epoch_batch), "--cpu-amp", a.cpu_amp]
        if a.data:
            argv += ["--data", a.data]
        if a.split_csv:
            argv += ["--split-csv", a.split_csv]
        env = None
        if name == "compile" and not a.warm_compile_cache:
            # Empty compile caches, so first_step_s is the whole compile wherever the script runs.
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(a.work, "inductor-cache"),
                       TRITON_CACHE_DIR=os.path.join(a.work, "triton-cache"))
        log = self.path(f"{name}.log")
        r = run_cmd(argv, limit, log, log + ".stderr", env=env)
        # One log per part: stdout, then stderr.
        with open(log, "ab") as f, open(log + ".stderr", "rb") as e:
            f.write(b"\n--- stderr\n" + e.read())
        os.remove(log + ".stderr")
        res = {}
        if os.path.exists(result):
            try:
                res = json.load(open(result))
            except ValueError:
                res = {}
        res.update(rc=r["rc"], process_s=round(r["seconds"], 3), log=os.path.basename(log))
        if name == "compile":
            res["compile_caches"] = "torch's defaults (may be warm)" if a.warm_compile_cache else "empty"
        if r.get("error"):
            res.update(status="failed", error=r["error"])
        elif r["timed_out"]:
            res.update(status="timeout", error=f"killed at its {limit:.0f} s limit", log_tail=tail(log))
        elif res.get("status") != "ok":
            res["status"] = "failed"
            res.setdefault("error", f"exit status {r['rc']} and no result")
            res["log_tail"] = tail(log)
        res.pop("traceback", None)
        self.part(name, **res)
        return res

    def versions(self):
        r = self.record
        try:
            import torch
            import torchvision

            r.update(torch=torch.__version__, torchvision=torchvision.__version__, cuda=torch.version.cuda)
        except Exception as e:
            r["parts"]["versions"] = {"status": "failed", "error": f"import torch, torchvision: {e}"}
        if self.a.device == "cuda" and shutil.which("nvidia-smi"):
            try:
                q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
                first = q.stdout.strip().splitlines()[0].split(", ")
                r.update(gpu=first[0], driver=first[1], gpu_memory=first[2])
            except Exception as e:
                r["driver"] = None
                r["notes"].append(f"nvidia-smi gave no GPU: {e}")
        if self.a.device == "cpu":
            r["gpu"] = None
            r["cpu"] = cpu_name()

    def run(self):
        a = self.a
        self.versions()
        self.write()
        # Data for the epoch parts.
        if a.data is None:
            folder = os.path.join(a.work, "synth")
            if os.path.exists(folder):
                shutil.rmtree(folder)
            f, parsed = self.derma_cmd("synth", ["synth", "--out", folder, "--n", str(a.synth_n), "--size",
                                                 a.synth_size, "--seed", "0", "--json"], json_stdout=True)
            if f is not None:
                f["summary"] = parsed
                self.part("synth", **f)
                if f["status"] == "ok":
                    a.data = folder
                    self.record["epoch"]["data"] = f"derma synth --n {a.synth_n} --size {a.synth_size}"
        else:
            self.part("synth", status="ok", reason=f"--data {a.data} given")

        # derma's step benchmark.
        bench_args = ["bench", "train", "--device", a.derma_device, "--batch", str(a.batch), "--size", str(a.size),
                      "--precision", a.derma_precision, "--steps", str(a.steps), "--json"]
        if a.stage:
            bench_args += ["--stage", str(a.stage)]
        f, parsed = self.derma_cmd("derma-bench", bench_args, json_stdout=True)
        if f is not None:
            if f["status"] == "ok":
                f["result"] = parsed
                self.record["derma_img_s"] = num(parsed.get("images_per_s"))
                self.record["floor_img_s"] = num(parsed.get("floor_images_per_s"))
                f["ms_per_step"] = num(parsed.get("ms_per_step"))
                f["peak_device_bytes"] = parsed.get("peak_device_bytes")
                if self.record["derma_img_s"] is None:
                    f.update(status="failed", error="its JSON has no numeric images_per_s")
            self.part("derma-bench", **f)

        res = self.torch_part("eager")
        if res is not None:
            if res.get("status") == "ok":
                self.record["pytorch_eager_img_s"] = res["img_s"]
            self.take_info(res)

        # The epoch on both sides.
        if a.data is None:
            for name in ("prepare", "derma-epoch", "seed-epoch"):
                self.part(name, status="skipped", reason="no data: pass --data DIR, or --derma to make one")
        else:
            cache = os.path.join(a.work, f"derma-cache-{a.size}")
            f, parsed = self.derma_cmd("prepare", ["prepare", "--data", a.data, "--cache", cache, "--size",
                                                   str(a.size), "--json", "--quiet"], json_stdout=True)
            if f is not None:
                if f["status"] == "ok":
                    f["summary"] = parsed
                    self.record["epoch"]["prepare_s"] = f["seconds"]
                    if os.path.exists(os.path.join(cache, "split.csv")):
                        a.split_csv = os.path.join(cache, "split.csv")
                self.part("prepare", **f)
            run_dir = os.path.join(a.work, "derma-run")
            f, _ = self.derma_cmd("derma-epoch", [
                "train", "--device", a.derma_device, "--data", a.data, "--cache", cache, "--out", run_dir,
                "--overwrite", "--epochs", "1", "--batch-size", str(a.epoch_batch), "--image-size", str(a.size),
                "--precision", a.derma_train_precision, "--quiet"])
            if f is not None:
                if f["status"] == "ok":
                    self.record["derma_epoch_s"] = f["seconds"]
                    f["history"] = derma_history(run_dir)
                    try:
                        e = f["history"]["epochs"][0]
                        self.record["epoch"].update(derma_train_val_s=e.get("seconds"),
                                                    derma_train_img_s=e.get("images_per_s"))
                    except (TypeError, KeyError, IndexError):
                        pass
                self.part("derma-epoch", **f)
            res = self.torch_part("seed-epoch")
            if res is not None:
                self.take_info(res)
            if res is not None and res.get("status") == "ok":
                self.record["seed_epoch_s"] = res["epoch_s"]
                self.record["epoch"].update(
                    seed_process_s=res["process_s"], train_images=res["train_images"], val_images=res["val_images"],
                    workers=res["workers"], split=res["split"])

        res = self.torch_part("compile")
        if res is not None:
            if res.get("status") == "ok":
                self.record["pytorch_compile_img_s"] = res["img_s"]
            self.take_info(res)

        r = self.record
        r["ratio_vs_eager"] = ratio(r["derma_img_s"], r["pytorch_eager_img_s"])
        r["ratio_vs_compile"] = ratio(r["derma_img_s"], r["pytorch_compile_img_s"])
        r["failed_parts"] = self.failed
        r["result"] = "ok" if not self.failed else "FAILED"
        self.write()

    def take_info(self, res):
        r = self.record
        for k in ("cudnn", "capability", "sms", "gpu_memory_bytes", "threads"):
            if res.get(k) is not None:
                r[k] = res[k]
        if r.get("gpu") is None and res.get("gpu"):
            r["gpu"] = res["gpu"]
        if res.get("amp") and r.get("precision") is None:
            r["precision"] = res["amp"].split(":")[0].split(" ")[0]
            r["precision_detail"] = res["amp"]


def num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def ratio(x, y):
    return x / y if x is not None and y else None


def derma_history(run_dir):
    """derma's own record of the epoch (history.json), when the run left one."""
    try:
        with open(os.path.join(run_dir, "history.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(v, unit="", digits=1):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}{unit}"


def print_table(r):
    parts = r["parts"]

    def st(name):
        p = parts.get(name)
        if p is None:
            return "not run"
        if p.get("status") == "ok":
            return "ok"
        return f"{p.get('status')}: {(p.get('error') or p.get('reason') or '')[:70]}"

    where = r.get("gpu") or r.get("cpu") or r["device"]
    print()
    print(f"PyTorch {r['torch']} / torchvision {r['torchvision']} against derma on {where} "
          f"(driver {r.get('driver') or '-'}, CUDA {r.get('cuda') or '-'}); batch {r['batch']}, "
          f"{r['size']}x{r['size']}, {r.get('precision_detail') or '-'}")
    rows = [
        ("derma bench train", fmt(r["derma_img_s"], " img/s"), st("derma-bench")),
        ("derma floor (its bound)", fmt(r["floor_img_s"], " img/s"), st("derma-bench")),
        ("PyTorch eager", fmt(r["pytorch_eager_img_s"], " img/s"), st("eager")),
        ("PyTorch torch.compile", fmt(r["pytorch_compile_img_s"], " img/s"), st("compile")),
        ("derma / eager", fmt(r["ratio_vs_eager"], "x", 2), ""),
        ("derma / compile", fmt(r["ratio_vs_compile"], "x", 2), ""),
        (f"seed pipeline, 1 epoch (batch {r['epoch']['batch']})", fmt(r["seed_epoch_s"], " s", 2), st("seed-epoch")),
        ("derma train, 1 epoch", fmt(r["derma_epoch_s"], " s", 2), st("derma-epoch")),
    ]
    w0 = max(len(x[0]) for x in rows)
    w1 = max(len(x[1]) for x in rows)
    for name, value, status in rows:
        print(f"  {name:<{w0}}  {value:>{w1}}  {status}")
    e = r["epoch"]
    if e.get("train_images") is not None:
        print(f"  epoch: {e.get('train_images')} training + {e.get('val_images')} validation images, "
              f"{e.get('workers')} workers; derma prepare (one-time decode) {fmt(e.get('prepare_s'), ' s', 2)}")
    print(f"result: {r.get('result')} ({r.get('total_s')} s)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder, or a .json file (logs beside it)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="[default: cuda; --quick: cpu]")
    p.add_argument("--batch", type=int, default=None, help="images per step of the step benchmark [256; quick 4]")
    p.add_argument("--size", type=int, default=None, help="square image side [224; quick 64]")
    p.add_argument("--steps", type=int, default=None, help="timed steps, split over --windows [40; quick 3]")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first [10; quick 1]")
    p.add_argument("--windows", type=int, default=None, help="timed windows; the median counts [5; quick 3]")
    p.add_argument("--stage", type=int, default=0, help="step benchmark: feature blocks 0..K-1 frozen [0: none]")
    p.add_argument("--epoch-batch", type=int, default=None, help="batch of the epoch parts [32, the seed's; quick 4]")
    p.add_argument("--cpu-amp", choices=["bf16", "f16", "f32"], default="bf16",
                   help="mixed precision of the PyTorch parts on --device cpu [bf16, torch's cpu autocast default]")
    p.add_argument("--derma", help="the derma binary (needed for the derma parts and to make --data)")
    p.add_argument("--derma-device", help="--device for derma's commands [default: --device]")
    p.add_argument("--data", help="ISIC-2019-layout folder for the epoch parts [default: one made by derma synth]")
    p.add_argument("--synth-n", type=int, default=None, help="images derma synth makes [2048; quick 64]")
    p.add_argument("--synth-size", default=None, help="their WxH [600x450, ISIC's smallest; quick 160x120]")
    p.add_argument("--work", help="scratch folder for the synthetic data, derma's cache and run folder "
                   "[default: a new temporary folder, removed at the end]")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="compile part: keep torch's inductor/triton caches [default: empty ones in --work]")
    p.add_argument("--budget-s", type=float, default=None, help="time for all parts [300; quick 1500]")
    p.add_argument("--skip", default="", help=f"comma-separated parts not to run: {','.join(PARTS)}")
    p.add_argument("--strict", action="store_true", help="a failed derma part fails the exit status too")
    p.add_argument("--quick", action="store_true", help="the tiny CPU check (see above)")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    p.add_argument("--split-csv", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    defaults = dict(device="cpu" if q else "cuda", batch=4 if q else 256, size=64 if q else 224, steps=3 if q else 40,
                    warmup=1 if q else 10, windows=3 if q else 5, epoch_batch=4 if q else 32,
                    synth_n=64 if q else 2048, synth_size="160x120" if q else "600x450",
                    budget_s=1500.0 if q else 300.0)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.derma_device = a.derma_device or a.device
    # derma's step benchmark in the seed's mixed precision; its CPU trainer is f32 only.
    a.derma_precision = "f16"
    a.derma_train_precision = "f32" if a.derma_device == "cpu" else "f16"
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    errors = []
    if a.batch < 2 or a.epoch_batch < 2:
        errors.append("--batch and --epoch-batch must be at least 2 (batch norm in training)")
    if a.size < 32:
        errors.append("--size must be at least 32")
    if a.steps < 1 or a.windows < 1 or a.warmup < 1:
        errors.append("--steps, --windows and --warmup must be at least 1")
    if not 0 <= a.stage <= 9:
        errors.append("--stage must be 0..9")
    if a.skip - set(PARTS):
        errors.append(f"--skip: unknown part(s) {sorted(a.skip - set(PARTS))}; parts: {','.join(PARTS)}")
    if a.derma and not (os.path.isfile(a.derma) and os.access(a.derma, os.X_OK)):
        errors.append(f"--derma {a.derma} is not an executable file (build it: cargo build --release --bin derma)")
    if a.data and not os.path.isfile(os.path.join(a.data, GROUND_TRUTH)):
        errors.append(f"--data {a.data} has no {GROUND_TRUTH} (an ISIC 2019 layout folder is needed)")
    if errors:
        p.error("; ".join(errors))
    if a.derma:
        a.derma = os.path.abspath(a.derma)
    if a.data:
        a.data = os.path.abspath(a.data)
    if a.out.endswith(".json"):
        a.json_path = os.path.abspath(a.out)
        a.logs = os.path.dirname(a.json_path)
    else:
        a.logs = os.path.abspath(a.out)
        a.json_path = os.path.join(a.logs, "pytorch-bench.json")
    return a


def main():
    a = parse_args()
    if a.part:
        run_part(a)
    os.makedirs(a.logs, exist_ok=True)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The scratch data stays out of OUT, which may be copied somewhere (a 2048-image folder and its decode cache
    # are a few hundred MB).
    made_work = a.work is None
    a.work = os.path.abspath(a.work) if a.work else tempfile.mkdtemp(prefix="bench-pytorch-")
    os.makedirs(a.work, exist_ok=True)
    b = Bench(a)
    b.record["work"] = a.work
    try:
        b.run()
    except Interrupted as e:
        if b.current:
            b.record["parts"][b.current] = {"status": "interrupted", "error": f"{e} while it ran"}
            b.failed.append(b.current)
        b.record["result"] = f"interrupted by {e}"
        b.record["failed_parts"] = b.failed
        b.write()
        print(f"interrupted by {e}: the record holds the parts that finished: {a.json_path}")
        sys.exit(143)
    finally:
        if made_work and not a.keep_work:
            shutil.rmtree(a.work, ignore_errors=True)
    print_table(b.record)
    print(f"record: {a.json_path}")
    sys.exit(3 if b.failed else 0)


if __name__ == "__main__":
    main()
