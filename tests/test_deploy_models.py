"""slab.deploy and slab.tune on real architectures: ultralytics YOLOv8n (not traceable by torch.fx;
its Conv holds conv/bn/act as attributes), timm CNNs (BatchNormAct2d: BN and activation in one
module) and resnet18. Models are built from yaml / pretrained=False: nothing is downloaded."""

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import slab
from slab.deploy import Left, conv_bn_pairs, register_bn_act, register_conv_bn_block

timm = pytest.importorskip("timm")
_env = dict(os.environ)
tasks = pytest.importorskip("ultralytics.nn.tasks")
# Importing ultralytics sets OMP_NUM_THREADS=1 (and more) in os.environ; later tests' subprocesses
# (slab info, distributed workers) must not inherit that.
os.environ.clear()
os.environ.update(_env)

BN = nn.modules.batchnorm._BatchNorm
TIMM = ["efficientnet_b0", "mobilenetv3_small_100", "regnetx_002", "resnet18"]


def count_bn(model):
    return sum(isinstance(m, BN) for m in model.modules())


def settled(model, shape, seed=0):
    """The model with BN statistics and affine parameters moved away from their initial values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(2):
            model(torch.randn(*shape))
    return model.eval()


def tensors(out):
    """Every tensor of a (nested) model output: YOLO returns tuples, lists and dicts."""
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for item in items for t in tensors(item)]


def first(out):
    return tensors(out)[0]


def yolov8n():
    return tasks.DetectionModel("yolov8n.yaml", verbose=False)


def build(name):
    return yolov8n() if name == "yolov8n" else timm.create_model(name, pretrained=False)


def deploy_quietly(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # YOLOv8n does not trace: deploy says so
        return slab.deploy(model, return_report=True, **kwargs)


@pytest.mark.parametrize("name", TIMM + ["yolov8n"])
def test_deploy_folds_every_batchnorm(name):
    shape = (1, 3, 64, 64)
    model = settled(build(name), shape)
    n_bn = count_bn(model)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = first(model(x))
    dep, report = deploy_quietly(model)
    assert count_bn(dep) == 0, report
    assert len(report.folded) == n_bn and not report.left and not report.converted, report
    assert count_bn(model) == n_bn  # the input model is untouched
    with torch.no_grad():
        out = first(dep(x))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_deploy_yolov8n_keeps_its_classes_and_float64_exact():
    model = settled(yolov8n(), (1, 3, 64, 64)).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = first(model(x))
    dep, report = deploy_quietly(model)
    assert type(dep) is type(model) and type(dep.model[0]) is type(model.model[0])
    assert all(isinstance(m.bn, nn.Identity) for m in dep.modules() if type(m).__name__ == "Conv")
    assert sum(f.into.endswith(".conv") for f in report.folded) == 57
    with torch.no_grad():
        out = first(dep(x))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())


def test_deploy_timm_bn_act_keeps_the_activation():
    model = settled(timm.create_model("efficientnet_b0", pretrained=False), (2, 3, 32, 32)).double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    dep, _ = deploy_quietly(model)
    acts = [type(m).__name__ for m in dep.modules()]
    assert "SiLU" in acts  # BatchNormAct2d's activation survives the fold
    with torch.no_grad():
        torch.testing.assert_close(dep(x), ref, rtol=1e-10, atol=1e-12)


class Holder(nn.Module):
    """A user block that holds its pair as attributes and does something untraceable."""

    def __init__(self, c):
        super().__init__()
        self.c = nn.Conv2d(c, c, 3, padding=1)
        self.n = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.n(self.c(x))
        return y * 2 if x.sum() > 0 else y  # data-dependent: torch.fx cannot trace this


def test_registry_extends_deploy_to_user_blocks():
    model = settled(nn.Sequential(Holder(4), nn.ReLU()), (2, 4, 5, 5)).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).abs()
    with torch.no_grad():
        ref = model(x)
    _, report = deploy_quietly(model)
    assert report.folded == [] and [k.norm for k in report.left] == ["0.n"]
    register_conv_bn_block(Holder, conv="c", bn="n")
    dep, report = deploy_quietly(model)
    assert report.folded == [("0.n", "0.c")] and report.left == []
    with torch.no_grad():
        torch.testing.assert_close(dep(x), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="conv"):
        register_conv_bn_block(Holder, conv="not an attribute")
    with pytest.raises(ValueError, match="tail"):
        register_bn_act(nn.BatchNorm2d, tail=None)


def test_deploy_report_says_why_a_bn_is_left():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output has a second use: not foldable

    model = settled(Shared(), (2, 3, 4, 4))
    _, report = deploy_quietly(model)
    assert report.left == [Left("bn", "the output of conv is also used elsewhere")]
    assert "1 left" in report.summary()


# ------------------------------------------------------------------------------------------------
# Tune mode
# ------------------------------------------------------------------------------------------------
def frozen_bn(model):
    """Training mode with every BatchNorm in eval mode (frozen statistics): fine-tuning."""
    model.train()
    for m in model.modules():
        if isinstance(m, BN):
            m.eval()
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = sum(o.square().mean() for o in tensors(out) if o.is_floating_point())
    loss.backward()
    return first(out).detach(), grads(model)


@pytest.mark.parametrize("name", ["resnet18", "yolov8n"])
def test_tune_equals_eval_mode_outputs_and_gradients(name):
    shape = (2, 3, 32, 32)
    model = frozen_bn(settled(build(name), shape).double())
    x = torch.randn(*shape, dtype=torch.float64)
    ref_out, ref_grads = step(model, x)
    state = copy.deepcopy(model.state_dict())
    tuned_model, report = slab.tune(model, return_report=True)
    assert tuned_model is model and len(report.folded) == count_bn(model) and not report.left, report
    assert all(k in state for k in model.state_dict()) and len(model.state_dict()) == len(state)
    out, g = step(model, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert set(g) == set(ref_grads)
    for k in g:
        torch.testing.assert_close(g[k], ref_grads[k], rtol=1e-8, atol=1e-10, msg=k)
    slab.untune(model)
    assert not any(type(m).__name__.startswith("Tuned") for m in model.modules())
    out, _ = step(model, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)


def test_tune_follows_the_bn_mode_and_the_context_manager_restores():
    model = settled(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), (2, 3, 6, 6)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    classes = [type(m) for m in model]
    with slab.tuned(model):
        assert type(model[0]).__name__ == "TunedConv2d"
        model.train()  # the BN computes batch statistics again: the tuned pair must too
        ref = nn.functional.batch_norm(
            nn.functional.conv2d(x, model[0].weight, model[0].bias), None, None, model[1].weight, model[1].bias, True
        )
        torch.testing.assert_close(model[:2](x), ref)
        model.eval()
        copy.deepcopy(model)  # a tuned model still deep-copies
    assert [type(m) for m in model] == classes


def test_tune_leaves_training_bns_and_rejects_bad_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    _, report = slab.tune(model, return_report=True)
    assert report.folded == [] and "training mode" in report.left[0].reason
    with pytest.raises(TypeError):
        slab.tune("model")
    with pytest.raises(ValueError):
        slab.tune(model, return_report="yes")


def test_conv_bn_pairs_changes_nothing():
    model = settled(yolov8n(), (1, 3, 64, 64))
    snap = copy.deepcopy(model.state_dict())
    pairs, left = conv_bn_pairs(model)
    assert len(pairs) == 57 and not left
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())
