#!/usr/bin/env python
"""BatchNorm re-parameterization on real models: deployed inference and Tune-mode fine-tuning.

Inference (eval mode, one batch), providers:
  eval       the model as built (Conv -> BatchNorm -> act)
  fuse       ultralytics' own model.fuse() (YOLOv8n only): what a YOLO user would pick instead
  deploy     slab.deploy(model): every BatchNorm folded into its conv
Fine-tuning step (forward + backward of a sum-of-squares loss; the model in training mode with every
BatchNorm in eval mode, i.e. frozen statistics, as transfer learning runs it), providers:
  eval-BN    plain eager PyTorch: conv, then BatchNorm in eval mode
  tune       slab.tune(model): each Conv -> BN pair as one convolution with the BN folded into the
             weights on the fly (slab.ops.fold_conv_bn), same outputs and gradients
  compile    torch.compile of the eval-BN model with inductor's efficient_conv_bn_eval pass on
             (torch._inductor.config.efficient_conv_bn_eval_fx_passes), the anchor of Tune mode
"saved MiB" is the memory autograd keeps for backward beyond the parameters (unique storages
saved by the step's graph, measured with torch.autograd.graph.saved_tensors_hooks; eager
providers only): eval-BN keeps every conv output for BatchNorm's backward, Tune mode keeps a
folded weight per conv instead. Times are medians of interleaved calls (slab._bench.time_fns) with the p20-p80
spread.

Usage:
  python bench/bench_deploy.py                  # YOLOv8n 320x320 and resnet18 224x224, batch 1 / 8
  python bench/bench_deploy.py --quick          # smaller images, short budget
  python bench/bench_deploy.py --no-compile --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import slab  # noqa: E402
from slab import _bench as B  # noqa: E402

BN = nn.modules.batchnorm._BatchNorm


def build(name: str) -> nn.Module:
    if name == "yolov8n":
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel("yolov8n.yaml", verbose=False)
    import timm

    return timm.create_model(name, pretrained=False)


def settled(model: nn.Module, shape) -> nn.Module:
    """BN statistics moved off their initial values by two training forwards."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(*shape))
    return model.eval()


def frozen_bn(model: nn.Module) -> nn.Module:
    model.train()
    for m in model.modules():
        if isinstance(m, BN):
            m.eval()
    return model


def tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for item in items for t in tensors(item)]


def train_step(model, x):
    def run():
        model.zero_grad(set_to_none=True)
        loss = sum(o.float().square().mean() for o in tensors(model(x)) if o.is_floating_point())
        loss.backward()

    return run


def saved_bytes(model, x) -> int:
    """Bytes of the unique storages autograd saves for backward in one step, beyond the model's
    own parameters and buffers (which exist anyway)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.data_ptr() not in own:
                seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sum(o.float().square().mean() for o in tensors(model(x)) if o.is_floating_point())
    del loss
    return sum(seen.values())


@contextlib.contextmanager
def efficient_conv_bn_eval():
    import torch._inductor.config as cfg

    old = cfg.efficient_conv_bn_eval_fx_passes
    cfg.efficient_conv_bn_eval_fx_passes = True
    try:
        yield
    finally:
        cfg.efficient_conv_bn_eval_fx_passes = old


def inference_rows(name, size, batch, args):
    shape = (batch, 3, size, size)
    model = settled(build(name), shape)
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep, report = slab.deploy(model, return_report=True)
    fns = {"eval": model, "deploy": dep}
    if name == "yolov8n":
        fns["fuse"] = copy.deepcopy(model).fuse(verbose=False)
    with torch.no_grad():
        ref = tensors(model(x))[0]
        err = max((tensors(f(x))[0] - ref).abs().max().item() / ref.abs().max().item() for f in fns.values())
        t = B.time_fns(
            {k: (lambda f=f: f(x)) for k, f in fns.items()}, "cpu", budget_s=args.budget, min_reps=args.min_reps
        )
    left = sum(isinstance(m, BN) for m in dep.modules())
    row = {"model": name, "input": f"{batch}x3x{size}x{size}", "BNs left": left, "max rel err": err}
    for k in ("eval", "fuse", "deploy"):
        row[f"{k} ms"] = t[k].median_ms if k in t else None
        row[f"{k} spread"] = t[k].spread if k in t else None
    row["eval/deploy"] = t["eval"].median_ms / t["deploy"].median_ms
    row["fuse/deploy"] = t["fuse"].median_ms / t["deploy"].median_ms if "fuse" in t else None
    return row


def tune_rows(name, size, batch, args):
    shape = (batch, 3, size, size)
    base = frozen_bn(settled(build(name), shape))
    x = torch.randn(*shape)
    tuned = slab.tune(copy.deepcopy(base))
    steps = {"eval-BN": train_step(base, x), "tune": train_step(tuned, x)}
    if not args.no_compile:
        with efficient_conv_bn_eval():
            compiled = torch.compile(copy.deepcopy(base))
            steps["compile"] = train_step(compiled, x)
            steps["compile"]()  # compile outside the timed region
    t = B.time_fns(steps, "cpu", budget_s=args.budget, min_reps=args.min_reps)
    row = {
        "model": name,
        "input": f"{batch}x3x{size}x{size}",
        "saved MiB eval-BN": saved_bytes(base, x) / 2**20,
        "saved MiB tune": saved_bytes(tuned, x) / 2**20,
    }
    for k in ("eval-BN", "tune", "compile"):
        row[f"{k} ms"] = t[k].median_ms if k in t else None
        row[f"{k} spread"] = t[k].spread if k in t else None
    row["eval-BN/tune"] = t["eval-BN"].median_ms / t["tune"].median_ms
    row["compile/tune"] = t["compile"].median_ms / t["tune"].median_ms if "compile" in t else None
    return row


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small images and a short time budget")
    p.add_argument("--only", choices=["inference", "tune"], help="run one section only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--budget", type=float, help="seconds of timed calls per provider (default 2.0, quick 0.3)")
    p.add_argument("--min-reps", type=int, help="at least this many timed calls (default 10, quick 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", metavar="PATH", help="write all rows (+ machine info) as JSON")
    args = p.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    args.budget = args.budget or (0.3 if args.quick else 2.0)
    args.min_reps = args.min_reps or (3 if args.quick else 10)
    yolo, resnet = (160, 96) if args.quick else (320, 224)
    rows = []
    print(
        f"slab {slab.__version__}, torch {torch.__version__}, {B.device_description(torch.device('cpu'))}, "
        f"{torch.get_num_threads()} threads"
    )
    if args.only in (None, "inference"):
        table = B.Table(
            [
                "model",
                "input",
                B.Column("BNs left", fmt="d"),
                B.Column("max rel err", fmt=".1e"),
                B.Column("eval ms", fmt=".2f"),
                B.Column("fuse ms", fmt=".2f"),
                B.Column("deploy ms", fmt=".2f"),
                B.Column("deploy spread", fmt=".0%"),
                B.Column("eval/deploy", fmt=".2f"),
                B.Column("fuse/deploy", fmt=".2f"),
            ],
            title="\nInference, median ms (x/deploy > 1: deploy is faster)",
        )
        for name, size, batch in (("yolov8n", yolo, 1), ("resnet18", resnet, 1)):
            r = inference_rows(name, size, batch, args)
            table.add(r)
            rows.append({"section": "inference", **r})
        print(table.render())
    if args.only in (None, "tune"):
        table = B.Table(
            [
                "model",
                "input",
                B.Column("saved MiB eval-BN", fmt=".1f"),
                B.Column("saved MiB tune", fmt=".1f"),
                B.Column("eval-BN ms", fmt=".1f"),
                B.Column("tune ms", fmt=".1f"),
                B.Column("compile ms", fmt=".1f"),
                B.Column("tune spread", fmt=".0%"),
                B.Column("eval-BN/tune", fmt=".2f"),
                B.Column("compile/tune", fmt=".2f"),
            ],
            title="\nFine-tuning step (forward + backward, frozen BN), median ms (x/tune > 1: tune is faster)",
        )
        for name, size, batch in (("yolov8n", yolo, 8), ("resnet18", resnet, 8)):
            r = tune_rows(name, size, batch, args)
            table.add(r)
            rows.append({"section": "tune", **r})
        print(table.render())
    if args.json:
        B.write_results(args.json, rows, {"argv": sys.argv[1:]})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
