"""`timm:NAME` (models/timm_models.py): timm's models by name, their released weights from the hub cache only, and
quantized with every residual rewrite verified."""

import pytest
import torch

from workbench.errors import ModelLoadError
from workbench.models import resolve_model
from workbench.models.registry import spec_problems
from workbench.quant.ptq import Int8Config, quantize_
from workbench.schema import ModelConfig

timm = pytest.importorskip("timm", reason="timm (the `test` extra) builds the timm models")


def _cache_with(tmp_path, repo: str, state: dict):
    """A Hugging Face hub cache holding `repo`'s model.safetensors, laid out as huggingface_hub writes it."""
    from safetensors.torch import save_file

    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return tmp_path / "hub"


def test_a_timm_model_builds_by_name_and_an_unknown_name_is_refused_with_close_ones():
    model = resolve_model(ModelConfig(spec="timm:resnet18", kwargs={"num_classes": 10}, input_size=(3, 32, 32)))
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 10
    problems = spec_problems(ModelConfig(spec="timm:resnet19"))
    assert len(problems) == 1 and "timm has no model 'resnet19'" in problems[0] and "resnet18" in problems[0]


def test_released_weights_come_from_the_hub_cache_and_are_never_downloaded_unasked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    config = ModelConfig(spec="timm:resnet18", weights="DEFAULT", input_size=(3, 32, 32))
    problems = spec_problems(config)
    assert len(problems) == 1 and "timm/resnet18.a1_in1k" in problems[0] and "allow_download" in problems[0]
    with pytest.raises(ModelLoadError, match="allow_download"):
        resolve_model(config)
    # in the cache: loaded from it (the cached tensors, not timm's random initialisation)
    reference = timm.create_model("resnet18", pretrained=False)
    torch.nn.init.normal_(reference.fc.weight)
    monkeypatch.setenv("HF_HUB_CACHE", str(_cache_with(tmp_path, "timm/resnet18.a1_in1k", reference.state_dict())))
    assert spec_problems(config) == []
    model = resolve_model(config)
    torch.testing.assert_close(model.fc.weight, reference.fc.weight)


# MobileNetV3's and EfficientNet's inverted-residual blocks have no residual rule yet: their Adds stay in float (None),
# and nothing is left half-rewritten.
@pytest.mark.parametrize("name, adds", [("resnet18", 8), ("seresnet18", 8), ("ecaresnet26t", 8),
                                         ("mobilenetv3_small_050", None), ("efficientnet_b0", None)])
def test_timm_families_quantize_and_export_with_every_residual_rewrite_verified(name, adds, tmp_path):
    from workbench.qdq.export import export_onnx

    model = resolve_model(ModelConfig(spec=f"timm:{name}", kwargs={"num_classes": 10}, input_size=(3, 64, 64)))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = quantize_(model, Int8Config(method="max"), lambda m: m(x), x)
    assert result.residual_left_alone == {}  # every residual block it found was rewritten and proved equivalent
    if adds is not None:
        assert result.census()["Add (residual)"] == {"int8": adds, "float": 0}
    export_onnx(model, x[:1], tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").stat().st_size > 0
