"""Unstructured magnitude pruning and 2:4 sparsity, directly and through the prune stage."""

import copy
import json

import pytest
import torch
from conftest import tiny_recipe
from helpers import make_image_folder, pad_shortcut_net, trained_cnn

from workbench.cli import main
from workbench.models.cifar_resnet import cifar_resnet, option_a_as_convolutions_
from workbench.prune import magnitude_prune_, make_permanent, prunable_layers, sparsity_2to4_, weight_sparsity
from workbench.prune.structured import ChannelPruning, PruningError, load_pruned, prune_channels_, save_pruned
from workbench.prune.unstructured import two_four_mask


def test_two_four_mask_keeps_the_two_largest_of_every_four_input_channels():
    w = torch.randn(8, 16, 3, 3)
    mask = two_four_mask(w)
    groups = mask.movedim(1, -1).reshape(-1, 4)
    assert (groups.sum(1) == 2).all()
    kept = (w.abs() * mask).movedim(1, -1).reshape(-1, 4)
    dropped = (w.abs() * (1 - mask)).movedim(1, -1).reshape(-1, 4)
    # every dropped weight is smaller than both kept
    assert (dropped.max(1).values <= kept.topk(2, 1).values[:, 1]).all()


def test_global_magnitude_reaches_the_sparsity_and_masks_become_permanent():
    model = trained_cnn()
    layers = prunable_layers(model, ignore=["fc"])
    magnitude_prune_(model, layers, 0.5, "global")
    make_permanent(layers)
    sparsity = weight_sparsity(layers)
    assert sparsity["all"] == pytest.approx(0.5, abs=0.01)
    assert len({round(v, 2) for k, v in sparsity.items() if k != "all"}) > 1  # global: layers differ
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    assert list(model.state_dict()) == list(trained_cnn().state_dict())  # plain weights again


def test_2to4_skips_layers_whose_channels_do_not_divide_by_4():
    model = trained_cnn()
    layers = prunable_layers(model)
    skipped = sparsity_2to4_(layers)
    make_permanent(layers)
    assert skipped == ["conv1"]  # 3 input channels
    sparsity = weight_sparsity({n: m for n, m in layers.items() if n != "conv1"})
    assert all(v == pytest.approx(0.5) for v in sparsity.values())


def test_prune_stage_in_steps_with_finetuning_keeps_accuracy(tmp_path):
    images = make_image_folder(tmp_path / "blobs", per_class=20, seed=4)
    runs = tmp_path / "runs"
    stages = ("  - prune: {method: magnitude, sparsity: 0.6, steps: 2, ignore: [fc], "
              "finetune_between: {epochs: 2, lr: 0.01, eval_samples: 30}}\n  - evaluate: {latency: false}\n")
    text = tiny_recipe(images, runs, stages).replace("helpers:tiny_cnn", "helpers:trained_cnn")
    text = text.replace("  batch_size: 4", f'  finetune: {{source: imagefolder, path: "{images}"}}\n  batch_size: 8')
    (tmp_path / "r.yaml").write_text(text)
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    (run_dir,) = runs.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())["stages"]
    assert metrics["prune"]["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert len(metrics["prune"]["finetune_history"]) == 2
    assert metrics["evaluate"]["backends"]["pytorch_fp32"]["metrics"]["top1"] > 90


def test_prune_ignore_pattern_matching_nothing(images, tmp_path, capsys):
    stages = "  - prune: {method: magnitude, ignore: ['head.*']}\n"
    (tmp_path / "r.yaml").write_text(tiny_recipe(images, tmp_path / "runs", stages))
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    assert "stages.prune.ignore" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["{method: magnitude, sparsity: 1.5}", "{method: structured, ratio: 0}",
                                   "{method: structured, ratio: 1.2}"])
def test_prune_ratio_outside_0_1(images, tmp_path, capsys, stage):
    (tmp_path / "r.yaml").write_text(tiny_recipe(images, tmp_path / "runs", f"  - prune: {stage}\n"))
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    field = "sparsity" if "sparsity" in stage else "ratio"
    assert field in capsys.readouterr().err and not (tmp_path / "runs").exists()


def _structured_recipe(images, runs, stages, model="trained_cnn"):
    text = tiny_recipe(images, runs, stages).replace("helpers:tiny_cnn", f"helpers:{model}")
    return text.replace("  batch_size: 4", f'  finetune: {{source: imagefolder, path: "{images}"}}\n  batch_size: 8')


def test_structured_prune_finetune_calibrate_export_and_reload(tmp_path):
    images = make_image_folder(tmp_path / "blobs", per_class=20, seed=4)
    runs = tmp_path / "runs"
    stages = ("  - prune: {method: structured, ratio: 0.5}\n  - finetune: {epochs: 2, lr: 0.01, eval_samples: 30}\n"
              "  - calibrate: {method: mse}\n  - export: {}\n  - evaluate: {latency: false}\n")
    (tmp_path / "r.yaml").write_text(_structured_recipe(images, runs, stages))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    (run_dir,) = runs.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())["stages"]
    prune = metrics["prune"]
    assert prune["onnx_bytes_after"] < prune["onnx_bytes_before"] and prune["ort_latency_b1_ms_after"] > 0
    assert "## Pruning" in (run_dir / "report.md").read_text()
    assert prune["out_channels"] == {"conv1": 8, "conv2": 8, "conv3": 8, "fc": 3}  # 16 -> 8; 8 stays (round_to 8)
    assert prune["macs_after"] < 0.6 * prune["macs_before"]
    backends = metrics["evaluate"]["backends"]
    assert backends["ort_int8_faithful"]["metrics"]["top1"] > 85  # pruned, fine-tuned, INT8, in ONNX Runtime
    pruned = backends["pytorch_fp32_pruned"]["metrics"]["top1"]
    assert backends["ort_fp32_pruned"]["metrics"]["top1"] == pytest.approx(pruned, abs=1)
    assert backends["ort_fp32_pruned"]["size_bytes"] < backends["ort_fp32"]["size_bytes"]
    # A later recipe reloads the pruned model on the same architecture, no pickled classes.
    again = tmp_path / "again"
    text = _structured_recipe(images, again, "  - evaluate: {latency: false}\n").replace(
        "  input_size: [3, 32, 32]", f'  input_size: [3, 32, 32]\n  pruned: "{run_dir / "pruned_model.pt"}"')
    (tmp_path / "again.yaml").write_text(text)
    assert main(["run", str(tmp_path / "again.yaml")]) == 0
    (again_dir,) = again.iterdir()
    reloaded = json.loads(
        (again_dir / "metrics.json").read_text()
    )["stages"]["evaluate"]["backends"]["pytorch_fp32"]["metrics"]
    # The run's own FP32 reference is the unpruned model; the reloaded one is the pruned model with its
    # fine-tuned weights.
    assert reloaded["top1"] == pruned


def test_structured_prune_that_breaks_the_model_is_refused_naming_the_op(images, tmp_path, capsys):
    """A shortcut that zero-pads channels with F.pad couples channels the dependency graph cannot see."""
    stages = "  - prune: {method: structured, ratio: 0.5, scope: layer, latency: false}\n"
    text = tiny_recipe(images, tmp_path / "runs", stages).replace("helpers:tiny_cnn", "helpers:pad_shortcut_net")
    (tmp_path / "r.yaml").write_text(text)
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "structured pruning broke the model" in err and "ConstantPadNdBackward0" in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("pruned_model.pt"))


def test_failed_pruning_leaves_the_model_as_it_was():
    model = pad_shortcut_net()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    with pytest.raises(PruningError, match="ConstantPadNdBackward0"):
        prune_channels_(model, x[:1], [model.fc], ChannelPruning(ratio=0.5))
    assert torch.equal(model(x), before)


def test_a_ratio_that_would_empty_a_layer_is_refused():
    model = trained_cnn()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(PruningError, match="would lose every channel"):
        prune_channels_(model, x, [model.fc], ChannelPruning(ratio=0.99, global_pruning=True, round_to=1))


def test_a_ratio_that_would_empty_a_layer_fails_the_run(tmp_path, capsys):
    images = make_image_folder(tmp_path / "blobs", per_class=4, seed=4)
    stages = "  - prune: {method: structured, ratio: 0.99, scope: global, round_to: 1, latency: false}\n"
    (tmp_path / "r.yaml").write_text(_structured_recipe(images, tmp_path / "runs", stages))
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    assert "would lose every channel" in capsys.readouterr().err
    assert not list((tmp_path / "runs").rglob("pruned_model.pt"))


def test_option_a_resnet_shortcuts_become_exact_convolutions_and_prune_per_layer(tmp_path):
    model = cifar_resnet("resnet20").eval()
    x = torch.randn(4, 3, 32, 32)
    before = model(x)
    converted = copy.deepcopy(model)
    assert len(option_a_as_convolutions_(converted)) == 2
    assert torch.equal(converted(x), before)  # 0/1 weights: the same function, bit for bit
    counts = prune_channels_(model, x[:1], [model.linear], ChannelPruning(ratio=0.5))
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert widths["layer1.0.conv2"] == 8 and widths["layer2.0.shortcut"] == 16 and widths["layer3.2.conv1"] == 32
    assert counts["macs_after"] < 0.3 * counts["macs_before"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if "shortcut" in n)  # stays a fixed map
    # The pruned shortcut still embeds each kept input channel once and pads the rest with zeros.
    w = model.layer2[0].shortcut.weight[:, :, 0, 0]
    assert ((w == 0) | (w == 1)).all() and (w.sum(0) <= 1).all()
    save_pruned(model, tmp_path / "p.pt")
    reloaded = load_pruned(cifar_resnet("resnet20"), tmp_path / "p.pt")
    assert torch.equal(reloaded(x), model(x))
    assert not any(p.requires_grad for n, p in reloaded.named_parameters() if "shortcut" in n)


def test_structured_needs_one_of_ratio_or_macs_target(images, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(tiny_recipe(images, tmp_path / "runs", "  - prune: {method: structured}\n"))
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    assert "exactly one of ratio" in capsys.readouterr().err
