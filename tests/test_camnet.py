"""qaclims.camnet: the CAM network, its BN modes and parameter groups, ImageNet weights and the reference checkpoint layout."""
import time

import pytest
import torch
import torchvision
from torch import nn

import qaclims.weights
from qaclims.camnet import (CamNet, ResNetTrunk, from_settings, imagenet_state_dict, load_backbone_weights,
                            load_cam_checkpoint, reference_cam_state_dict)
from qaclims.settings import load_settings, render_settings
from qaclims.weights import OFFLINE_VARIABLES, MissingWeightsError


class ReferenceNet(nn.Module):
    "The reference's resnet50_cam.Net attribute structure (IRN), around a torchvision ResNet without fc."

    def __init__(self, num_classes=20, arch=torchvision.models.resnet50):
        super().__init__()
        self.resnet50 = arch(weights=None)
        del self.resnet50.fc
        r = self.resnet50
        self.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
        self.stage2, self.stage3, self.stage4 = nn.Sequential(r.layer2), nn.Sequential(r.layer3), nn.Sequential(r.layer4)
        self.classifier = nn.Conv2d(r.layer4[-1].conv1.in_channels, num_classes, 1, bias=False)
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4])
        self.newly_added = nn.ModuleList([self.classifier])

    def forward(self, x):  # the reference's stride-16 forward, with IRN's strides (2, 2, 2, 1)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.classifier(x.mean((2, 3), keepdim=True)).flatten(1)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    net = ReferenceNet().eval()
    net.resnet50.layer4[0].conv2.stride = (1, 1)
    net.resnet50.layer4[0].downsample[0].stride = (1, 1)
    with torch.no_grad():  # non-trivial BN statistics, so that a mix-up would show
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def reference18():
    "The same layout around a ResNet-18 (cheaper to write many times)."
    torch.manual_seed(1)
    return ReferenceNet(arch=torchvision.models.resnet18)


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_shapes_and_strides():
    r18 = CamNet(8, arch="resnet18", output_stride=8, bn="train")
    features = r18.features(torch.randn(2, 3, 96, 96))
    assert features.shape == (2, 512, 12, 12)
    assert r18(torch.randn(2, 3, 96, 96)).shape == (2, 8)
    assert r18.cams(features).shape == (2, 8, 12, 12) and r18.cams(features).min() >= 0
    sig = r18.cams(features, "sigmoid")
    assert ((sig > 0) & (sig < 1)).all()
    r50 = CamNet(20).eval()
    with torch.no_grad():
        assert r50.features(torch.randn(1, 3, 64, 80)).shape == (1, 2048, 4, 5)  # output stride 16
    assert r50.output_stride == 16 and r50.resnet.layer4[0].conv2.stride == (1, 1)
    assert r50.resnet.layer3[0].conv2.stride == (2, 2) and r50.classifier.bias is None


def test_logits_are_gap_of_raw_cams():
    net = CamNet(5, "resnet18", 8).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(images), net.cams(net.features(images), None).mean((2, 3)), atol=1e-5)


def test_matches_reference_forward(reference, tmp_path):
    torch.save(reference.state_dict(), tmp_path / "res50_cam.pth")
    net = load_backbone_weights(CamNet(20), tmp_path / "res50_cam.pth").eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(images), reference(images), atol=1e-5)


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_frozen_stem_and_batch_norm(bn):
    net = CamNet(3, "resnet18", 8, bn=bn).train()
    stats = [m.running_mean.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    after = [m.running_mean for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    changed = [not torch.equal(a, b) for a, b in zip(stats, after)]
    assert all(changed) if bn == "train" else not any(changed)
    assert net.resnet.conv1.weight.grad is None and net.resnet.bn1.weight.grad is None
    assert net.resnet.layer1[0].bn1.weight.grad is not None  # BN affine weights train in both modes
    net.eval()
    assert not any(m.training for m in net.modules())


def test_param_groups():
    net = CamNet(4, "resnet18", 8)
    backbone, head = net.param_groups()
    assert head == [net.classifier.weight]
    assert not {id(p) for p in backbone} & {id(p) for p in head}
    assert {id(p) for p in backbone + head} == {id(p) for p in net.parameters() if p.requires_grad}
    assert not any(p is net.resnet.conv1.weight for p in backbone)


def test_reference_layout_round_trip(reference, tmp_path):
    state = reference.state_dict()
    assert {"resnet50.conv1.weight", "stage1.0.weight", "backbone.0.0.weight", "newly_added.0.weight"} <= set(state)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "res50_cam.pth")
    net = load_backbone_weights(CamNet(20), tmp_path / "res50_cam.pth")
    ours = net.state_dict()
    for key, value in state.items():
        if key.startswith("resnet50."):
            assert torch.equal(ours["resnet." + key[len("resnet50."):]], value), key
    assert torch.equal(ours["classifier.weight"], state["classifier.weight"])
    assert len(reference_cam_state_dict(state)) == len(ours)


def _without(state, *keys):
    return {k: v for k, v in state.items() if k not in keys}


@pytest.mark.parametrize("edit, needle", [
    (lambda s: _without(s, "resnet50.layer4.1.bn2.running_var", "stage4.0.1.bn2.running_var", "backbone.3.0.1.bn2.running_var"),
     "missing keys: resnet.layer4.1.bn2.running_var"),
    (lambda s: _without(s, "resnet50.layer4.1.bn2.running_var"), None),  # its aliases still carry it
    (lambda s: _without(s, "classifier.weight"), None),
    (lambda s: _without(s, "classifier.weight", "newly_added.0.weight"), "missing keys: classifier.weight"),
    (lambda s: s | {"resnet50.fc.weight": torch.zeros(1000, 512)}, "unexpected keys: resnet.fc.weight"),
    (lambda s: s | {"aux_head.weight": torch.zeros(1)}, "unexpected keys for the reference layout: aux_head.weight"),
    (lambda s: s | {"stage3.0.1.conv2.weight": s["stage3.0.1.conv2.weight"] * 2}, "inconsistent"),
    (lambda s: s | {"backbone.0.0.weight": torch.zeros(64, 3, 7, 7)}, "inconsistent"),
    (lambda s: s | {"resnet50.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}, "inconsistent"),
])
def test_bad_reference_checkpoints_name_the_file(reference18, tmp_path, edit, needle):
    torch.save(edit(dict(reference18.state_dict())), tmp_path / "edited_cam.pth")
    if needle is None:
        load_backbone_weights(CamNet(20, "resnet18"), tmp_path / "edited_cam.pth")
        return
    with pytest.raises(ValueError) as error:
        load_backbone_weights(CamNet(20, "resnet18"), tmp_path / "edited_cam.pth")
    assert "edited_cam.pth" in str(error.value) and needle in str(error.value)


def test_reference_layout_for_another_arch(reference18, tmp_path):
    torch.save(reference18.state_dict(), tmp_path / "res18_cam.pth")
    with pytest.raises(ValueError, match="res18_cam.pth.*wrong shapes"):
        load_backbone_weights(CamNet(20), tmp_path / "res18_cam.pth")


def test_other_layouts_and_bad_files(tmp_path):
    ours = CamNet(6, "resnet18", 8)
    torch.save(ours.state_dict(), tmp_path / "ours.pth")
    copy = load_backbone_weights(CamNet(6, "resnet18", 8), str(tmp_path / "ours.pth"))
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), ours.state_dict().values()))
    imagenet_like = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(imagenet_like, tmp_path / "resnet18-f37072fd.pth")
    net = CamNet(6, "resnet18", 8)
    head = net.classifier.weight.clone()
    load_backbone_weights(net, tmp_path / "resnet18-f37072fd.pth")
    assert torch.equal(net.resnet.layer4[1].bn2.running_var, imagenet_like["layer4.1.bn2.running_var"])
    assert torch.equal(net.classifier.weight, head)
    with pytest.raises(ValueError, match="ours.pth.*wrong shapes"):
        load_backbone_weights(CamNet(7, "resnet18", 8), tmp_path / "ours.pth")
    with pytest.raises(ValueError, match="ours.pth"):
        load_backbone_weights(CamNet(6, "resnet34", 8), tmp_path / "ours.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "ours.pth").read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.pth"):
        load_backbone_weights(CamNet(6, "resnet18", 8), tmp_path / "truncated.pth")
    with pytest.raises(MissingWeightsError, match="backbone_weights"):
        load_backbone_weights(CamNet(6, "resnet18", 8), "weights/none-here.pth", base_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown layout"):
        load_cam_checkpoint(CamNet(6, "resnet18", 8), {"encoder.w": torch.zeros(1)})


def test_imagenet_offline_fails_fast(offline_home, monkeypatch):
    monkeypatch.setenv("QACLIMS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as error:
        load_backbone_weights(CamNet(20), "imagenet")
    assert time.perf_counter() - start < 1.0
    message = str(error.value)
    folder = offline_home / "torch" / "hub" / "checkpoints"
    assert str(folder / "resnet50-0676ba61.pth") in message and str(folder / "resnet50-19c8e357.pth") in message
    assert "QACLIMS_OFFLINE" in message and "[models] backbone_weights" in message


def test_imagenet_no_network_fails_fast(offline_home, monkeypatch):
    monkeypatch.setattr(qaclims.weights, "reachable", lambda *args, **kwargs: False)
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="no network"):
        imagenet_state_dict("resnet18")
    assert time.perf_counter() - start < 1.0


def test_imagenet_from_cache(offline_home, monkeypatch):
    monkeypatch.setattr(qaclims.weights, "reachable", lambda *args, **kwargs: pytest.fail("network used"))
    folder = offline_home / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, folder / "resnet18-f37072fd.pth")
    net = load_backbone_weights(CamNet(3, "resnet18", 8), "imagenet")
    assert torch.equal(net.resnet.conv1.weight, state["conv1.weight"])


def test_from_settings(tmp_path, offline_home, reference):
    torch.save(reference.state_dict(), tmp_path / "res50_cam.pth")
    settings_file = tmp_path / "settings.ini"
    settings_file.write_text(render_settings())
    net = from_settings(load_settings(settings_file, {"models.backbone_weights": "res50_cam.pth"}), num_classes=20)
    assert torch.equal(net.classifier.weight, reference.classifier.weight)
    r18 = from_settings(load_settings(settings_file, {"models.backbone_weights": "none"}), 8, "resnet18", 8, bn="train")
    assert r18.bn == "train" and r18.output_stride == 8


def test_bad_arguments():
    for call, needle in [(lambda: CamNet(0), "num_classes"), (lambda: CamNet(3, "vgg"), "unknown arch"),
                         (lambda: CamNet(3, output_stride=4), "output_stride"), (lambda: CamNet(3, bn="sync"), "bn must be"),
                         (lambda: ResNetTrunk("resnet18", 12), "output_stride")]:
        with pytest.raises(ValueError, match=needle):
            call()
    net = CamNet(3, "resnet18", 8)
    with pytest.raises(ValueError, match="activation"):
        net.cams(torch.zeros(1, 512, 2, 2), "tanh")
    with pytest.raises(ValueError, match="N, 3, H, W"):
        net(torch.zeros(1, 1, 32, 32))
