"""Hostile input, third round (issue 28): recipe injection, memory from tiny files, the remaining tracebacks,
COCO paths, signals, and the smaller leaks. Each case asserts the message, the exit code (2 for refused input)
and what is left on disk; the memory cases also the peak RSS of a process that is handed them."""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from helpers import make_tiny_yolov5_checkpoint, tiny_cnn, trained_cnn
from test_hostile_models import _call, _checkpoint, _global, _recipe, _refused, _run, _torch_zip
from torch import nn

from workbench.api import quantize_recipe
from workbench.cli import main
from workbench.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]


def _int(n: int) -> bytes:
    return b"K" + bytes([n]) if n < 256 else b"M" + struct.pack("<H", n)  # BININT1 / BININT2


def _conv2d_call(kernel: int) -> bytes:
    """A pickle calling Conv2d(1, 1, kernel): its __init__ allocates kernel^2 floats while unpickling."""
    return _call(_global("torch.nn.modules.conv", "Conv2d"), _int(1), _int(1), _int(kernel))


def _stride0_state(path: Path, shape=(20000, 20000)) -> Path:
    """A state dict whose one tensor declares `shape` over a single stored float (stride 0): 4 bytes on disk,
    1.6 GB once anything copies it."""
    torch.save({"conv1.weight": torch.zeros(1).expand(*shape)}, path)
    return path


def _no_run_dirs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())


# --- 1. generated recipes are data -------------------------------------------------------------------------------

INJECTED = "d.yaml\ndetection: {conf: 0.99}"


def test_quantize_data_text_cannot_add_a_recipe_key():
    text = quantize_recipe("m.pt", INJECTED)
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert len(comments) == 1 and "\\n" in comments[0]  # the newline written as an escape, in the one comment
    assert not any(line.startswith("detection") for line in text.splitlines())
    recipe = parse_recipe(text)
    assert recipe.detection.conf != 0.99  # the default, not the injected value
    assert recipe.data.calibration.yaml == INJECTED  # the whole text is the data.yaml's path, as typed


def test_quantize_with_injected_data_is_refused_naming_the_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "m.pt")
    (tmp_path / "d.yaml").write_text("path: .\ntrain: images\nval: images\nnames: [a, b, c]\n")
    assert main(["quantize", str(ckpt), "--data", INJECTED, "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "'d.yaml\\ndetection: {conf: 0.99}' does not exist" in err and "Traceback" not in err
    assert "\ndetection:" not in err  # the path cannot forge a line either
    _no_run_dirs(tmp_path)


# --- 2. memory from tiny files ------------------------------------------------------------------------------------


def test_conv2d_call_payload_is_real():
    """Under an unrestricted unpickler the pickle really constructs the layer (and would allocate kernel^2 floats)."""
    import pickle

    layer = pickle.loads(_checkpoint(_conv2d_call(300)))["model"]
    assert isinstance(layer, nn.Conv2d) and layer.weight.shape == (1, 1, 300, 300)


def test_yolov5_loader_calls_no_layer_class(images, tmp_path, capsys):
    ckpt = _torch_zip(tmp_path / "conv.pt", _checkpoint(_conv2d_call(20000)))
    assert ckpt.stat().st_size < 1000
    assert _run(tmp_path, _recipe(images, tmp_path, f"yolov5:{ckpt}")) == 2
    _refused(capsys, tmp_path, "calls torch.nn.modules.conv.Conv2d(...) while unpickling", "conv.pt")


@pytest.mark.parametrize("opcode", ["OBJ", "INST"])
def test_yolov5_loader_constructs_no_layer_class_by_obj_or_inst(images, tmp_path, capsys, opcode):
    """OBJ and INST call a class as REDUCE does: the same refusal (a crafted Conv2d(1, 1, 20000) allocates 1.6 GB)."""
    import pickle

    args = _int(1) + _int(1) + _int(20000)
    payload = (b"(" + _global("torch.nn.modules.conv", "Conv2d") + args + b"o" if opcode == "OBJ"
               else b"(" + args + b"itorch.nn.modules.conv\nConv2d\n")
    small = payload.replace(_int(20000), _int(3))
    assert isinstance(pickle.loads(_checkpoint(small))["model"], nn.Conv2d)  # the payload is real
    ckpt = _torch_zip(tmp_path / "conv.pt", _checkpoint(payload))
    assert _run(tmp_path, _recipe(images, tmp_path, f"yolov5:{ckpt}")) == 2
    _refused(capsys, tmp_path, "constructs torch.nn.modules.conv.Conv2d(...) while unpickling", "conv.pt")


def _stride0_yolov5(path: Path) -> Path:
    def tamper(model):
        model.model[0].conv.weight = nn.Parameter(torch.zeros(1, dtype=torch.half).expand(20000, 20000, 1, 1),
                                                  requires_grad=False)

    return make_tiny_yolov5_checkpoint(path, tamper=tamper)


def _stride0_pruned(folder: Path) -> Path:
    """A prune stage's pruned_model.pt of tiny_cnn, with one weight replaced by a stride-0 tensor of 144 M values."""
    from workbench.prune.structured import ChannelPruning, prune_channels_, save_pruned

    model = tiny_cnn()
    prune_channels_(model, torch.randn(1, 3, 32, 32), [model.fc], ChannelPruning(ratio=0.5))
    folder.mkdir(exist_ok=True)
    path = save_pruned(model, folder / "pruned_model.pt")
    saved = torch.load(path, weights_only=True)
    saved["state_dict"]["conv2.weight"] = torch.zeros(1).expand(20000, 8, 30, 30)
    torch.save(saved, path)
    return path


def test_yolov5_stride0_weight_is_refused_before_it_is_copied(images, tmp_path, capsys):
    ckpt = _stride0_yolov5(tmp_path / "s0.pt")
    assert _run(tmp_path, _recipe(images, tmp_path, f"yolov5:{ckpt}")) == 2
    _refused(capsys, tmp_path, "s0.pt: tensor model.model.0.conv.weight is refused", "(stride 0)")


def test_pruned_model_with_stride0_tensor_is_refused(images, tmp_path, capsys):
    path = _stride0_pruned(tmp_path / "pruned")
    extra = f'  pruned: "{path}"\n'
    assert _run(tmp_path, _recipe(images, tmp_path, extra=extra)) == 2
    _refused(capsys, tmp_path, "model.pruned:", "tensor state_dict.conv2.weight is refused", "(stride 0)")


@pytest.mark.parametrize("tensor, said", [
    (torch.zeros(1).expand(20000, 20000), "(stride 0)"),
    (torch.zeros(200).as_strided((100, 100), (1, 1)), "declare 40000 bytes over a storage of 800 bytes"),
])
def test_weights_whose_tensors_outgrow_their_storage_are_refused(images, tmp_path, capsys, tensor, said):
    torch.save({"conv1.weight": tensor}, tmp_path / "w.pt")
    extra = f'  weights: "{tmp_path / "w.pt"}"\n'
    assert _run(tmp_path, _recipe(images, tmp_path, extra=extra)) == 2
    _refused(capsys, tmp_path, "model.weights:", "tensor conv1.weight is refused", said)


def _zip_bomb(path: Path, inflated_mb: int) -> Path:
    """A torch.save archive re-zipped with deflate: a storage of `inflated_mb` MB of zeros in a file of kilobytes."""
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with zipfile.ZipFile(path) as src:
        records = {n: src.read(n) for n in src.namelist()}
    storage = next(n for n in records if n.endswith("/data/0"))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in records.items():
            if name != storage:
                out.writestr(name, data)
        with out.open(storage, "w", force_zip64=True) as f:
            chunk = bytes(2**20)
            for _ in range(inflated_mb):
                f.write(chunk)
    return path


def test_zip_bomb_weights_are_refused_before_inflating(images, tmp_path, capsys):
    bomb = _zip_bomb(tmp_path / "w.pt", 20)
    assert bomb.stat().st_size < 100_000
    extra = f'  weights: "{bomb}"\n'
    assert _run(tmp_path, _recipe(images, tmp_path, extra=extra)) == 2
    _refused(capsys, tmp_path, "model.weights:", "records inflate to 20971", "torch.save writes them uncompressed")


@pytest.mark.parametrize("field", ["weights", "pruned", "spec"])
def test_dev_zero_as_a_checkpoint_is_refused_by_validate_and_run(images, tmp_path, capsys, field):
    text = tiny_recipe(images, tmp_path / "runs")
    if field == "spec":
        text = text.replace('"import:helpers:tiny_cnn"', '"yolov5:/dev/zero"')
    else:
        text = text.replace("  trust_code: true\n", f"  trust_code: true\n  {field}: /dev/zero\n")
    (tmp_path / "r.yaml").write_text(text)
    said = "/dev/zero is not a regular file (a device, a pipe or a socket"
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    assert f"model.{field}: {said}" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    _refused(capsys, tmp_path, f"model.{field}: {said}")


@pytest.mark.slow
def test_rejected_checkpoints_stay_under_1_gb_of_memory(tmp_path, images):
    """Every memory bomb above, handed to the loaders in one fresh process: its peak RSS (importing torch
    takes about 700 MB of it) stays under 1 GB. Without the limits, the Conv2d call takes 1.6 GB, the stride-0
    tensors 1.6 to 3.6 GB once copied, the zip bomb 400 MB more, /dev/zero until the process is killed."""
    conv = _checkpoint(_conv2d_call(20000))
    files = {
        "yolov5 Conv2d(1, 1, 20000)": ("spec", f"yolov5:{_torch_zip(tmp_path / 'c.pt', conv)}"),
        "yolov5 stride 0": ("spec", f"yolov5:{_stride0_yolov5(tmp_path / 's0.pt')}"),
        "weights stride 0": ("weights", str(_stride0_state(tmp_path / "w0.pt"))),
        "weights zip bomb": ("weights", str(_zip_bomb(tmp_path / "bomb.pt", 400))),
        "weights /dev/zero": ("weights", "/dev/zero"),
        "pruned stride 0": ("pruned", str(_stride0_pruned(tmp_path / "p"))),
    }
    script = textwrap.dedent("""
        import json, sys
        from workbench.errors import WorkbenchError
        from workbench.models import resolve_model
        from workbench.schema import ModelConfig
        refused = []
        for name, (field, value) in json.loads(sys.argv[1]).items():
            config = {"spec": "import:helpers:tiny_cnn", "trust_code": True, field: value}
            try:
                resolve_model(ModelConfig(**config))
            except WorkbenchError:
                refused.append(name)
        # VmHWM: this process's own peak RSS (ru_maxrss would keep the forking pytest's across exec)
        peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(json.dumps({"refused": refused, "peak_mb": int(peak.split()[1]) // 1024}))
    """)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(files)], capture_output=True, text=True,
                          env=env, cwd=ROOT / "tests", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["refused"] == list(files)
    assert result["peak_mb"] < 1024, result


# --- 3. tracebacks that are now messages ----------------------------------------------------------------------------


def test_yolov5_layer_whose_forward_is_a_string_is_refused(images, tmp_path, capsys):
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "boom.pt", tamper=lambda m: setattr(m.model[1], "forward", "boom"))
    assert _run(tmp_path, _recipe(images, tmp_path, f"yolov5:{ckpt}")) == 2
    _refused(capsys, tmp_path, "boom.pt: layer 'model.1' (Conv) has an attribute 'forward' that replaces its class's "
                               "method")


def test_yolov5_layer_wired_to_a_missing_output_is_refused(images, tmp_path, capsys):
    """Attributes of the wrong value (here a Concat reading a layer that saved nothing): the dry run names it."""
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "wired.pt", tamper=lambda m: setattr(m.model[5], "f", [2, 40]))
    assert _run(tmp_path, _recipe(images, tmp_path, f"yolov5:{ckpt}")) == 2
    _refused(capsys, tmp_path, "wired.pt holds a YOLOv5 model whose layers do not run on a 64x64 image (IndexError")


@pytest.mark.parametrize("where", ["recipe", "override"])
def test_control_bytes_in_yaml_are_refused(images, tmp_path, capsys, where):
    text = tiny_recipe(images, tmp_path / "runs")
    args = []
    if where == "recipe":
        text = text.replace("name: tiny", "name: ti\x07ny")
    else:
        args = ["name=a\x01b"]
    (tmp_path / "r.yaml").write_text(text)
    for command in ("validate", "run"):
        assert main([command, str(tmp_path / "r.yaml"), *args]) == 2
        err = capsys.readouterr().err
        assert "not valid YAML: unacceptable character" in err and "Traceback" not in err
        assert "\x07" not in err and "\x01" not in err
    _no_run_dirs(tmp_path)


def test_a_3000_deep_override_key_is_refused(images, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(tiny_recipe(images, tmp_path / "runs"))
    assert main(["run", str(tmp_path / "r.yaml"), "a" + ".a" * 3000 + "=1"]) == 2
    _refused(capsys, tmp_path, "its key has 3001 parts; the limit is 64")


def _onnx(path: Path, initializer_dims=None, input_dims=(1, 3, 8, 8)) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits, nodes = [], [helper.make_node("Relu", ["x"], ["y"])]
    if initializer_dims:
        w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=list(initializer_dims))  # declared, no data
        inits, nodes = [w], [helper.make_node("Add", ["x", "W"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("command", [["check-onnx"], ["build", "--engine", "openvino", "--precision", "fp32"]])
def test_onnx_initializer_declaring_2_40_floats_without_data_is_refused(tmp_path, capsys, command):
    path = _onnx(tmp_path / "big.onnx", initializer_dims=[2**20, 2**20])
    assert path.stat().st_size < 500
    assert main([command[0], str(path), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert "initializer 'W' declares 1099511627776 values (dims [1048576, 1048576]) but holds 0" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx"]  # no engine, IR or sidecar


def test_onnx_input_of_2_31_by_2_31_is_refused_by_build(tmp_path, capsys):
    path = _onnx(tmp_path / "wide.onnx", input_dims=(1, 3, 2**31, 2**31))
    assert main(["build", str(path), "--engine", "openvino", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "input 'x' declares the shape 1 x 3 x 2147483648 x 2147483648: a dimension outside 0..1048576" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.onnx"]


def test_onnx_constants_that_hold_their_values_pass():
    """The check refuses only what is missing: real initializers of every storage kind pass."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from workbench.qdq.limits import _tensor_problem

    assert _tensor_problem(numpy_helper.from_array(np.zeros((4, 3), np.float32), "raw")) is None
    assert _tensor_problem(helper.make_tensor("typed", TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0])) is None
    assert _tensor_problem(helper.make_tensor("i8", TensorProto.INT8, [3], [1, -2, 3])) is None
    short = TensorProto(name="short", data_type=TensorProto.FLOAT, dims=[2, 2], float_data=[1.0, 2.0, 3.0])
    assert "declares 4 values (dims [2, 2]) but holds 3 values" in _tensor_problem(short)


@pytest.mark.parametrize("kwargs", ["{weights: DEFAULT}", "{pretrained: true}"])
def test_torchvision_kwargs_that_download_are_refused(images, tmp_path, capsys, kwargs):
    text = tiny_recipe(images, tmp_path / "runs").replace('"import:helpers:tiny_cnn"', '"torchvision:resnet18"')
    (tmp_path / "r.yaml").write_text(text.replace("  trust_code: true\n", f"  kwargs: {kwargs}\n"))
    key = kwargs[1:].split(":")[0]
    for command in ("validate", "run"):
        assert main([command, str(tmp_path / "r.yaml")]) == 2
        err = capsys.readouterr().err
        assert f"model.kwargs.{key}: torchvision would download weights" in err and "Traceback" not in err
    _no_run_dirs(tmp_path)


def test_kwargs_a_builder_does_not_take_are_named(images, tmp_path, capsys):
    text = tiny_recipe(images, tmp_path / "runs").replace('"import:helpers:tiny_cnn"', '"cifar_resnet:resnet20"')
    (tmp_path / "r.yaml").write_text(text.replace("  trust_code: true\n", "  kwargs: {depth: 3}\n"))
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    _refused(capsys, tmp_path, "model.kwargs {'depth': 3}: cifar_resnet:resnet20 cannot be built with them")


# --- 4. COCO: each image its own file, inside the folder --------------------------------------------------------------


def _coco_run(tmp_path, capsys, edit) -> tuple[int, str, Path]:
    from test_detection_data import write_detection_set
    from test_hostile_data import detection_recipe

    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, ann, _ = write_detection_set(tmp_path / "set")
    coco = json.loads(ann.read_text())
    edit(coco, images)
    ann.write_text(json.dumps(coco))
    split = f'{{source: coco, path: "{images}", annotations: "{ann}"}}'
    code = main(["run", str(detection_recipe(tmp_path, ckpt, split))])
    return code, capsys.readouterr().err, ann


def test_coco_file_name_shared_by_two_images_is_refused(tmp_path, capsys):
    def edit(coco, images):
        coco["images"][1]["file_name"] = coco["images"][0]["file_name"]

    code, err, ann = _coco_run(tmp_path, capsys, edit)
    assert code == 2 and "Traceback" not in err
    assert f"{ann}: images 11 and 12 both have 'file_name' 'a.png'" in err
    _no_run_dirs(tmp_path)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_coco_file_name_outside_the_image_folder_is_refused(tmp_path, capsys, how):
    def edit(coco, images):
        outside = images.parent / "outside.png"
        (images / coco["images"][0]["file_name"]).rename(outside)  # a real image there: it would be read
        name = {"dotdot": "../outside.png", "absolute": str(outside), "symlink": "link.png"}[how]
        if how == "symlink":
            (images / "link.png").symlink_to(outside)
        coco["images"][0]["file_name"] = name

    code, err, ann = _coco_run(tmp_path, capsys, edit)
    assert code == 2 and "Traceback" not in err
    said = "resolves to a file outside" if how == "symlink" else "leaves the image folder"
    assert f"{ann}: image 11: 'file_name'" in err and said in err
    _no_run_dirs(tmp_path)


# --- 5. signals ----------------------------------------------------------------------------------------------------


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "WORKBENCH_NO_PROGRESS": "1"}


@pytest.mark.slow
def test_sigterm_marks_the_run_interrupted_in_its_stage_and_it_resumes(tmp_path, images):
    stages = ("  - calibrate: {method: max}\n  - export: {}\n"
              "  - evaluate: {latency_repeats: 1000000, latency_batch_sizes: [1]}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs", stages=stages))
    process = subprocess.Popen([sys.executable, "-m", "workbench", "run", str(recipe)], cwd=ROOT / "tests",
                               env={**_env(), "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    # The heading "stage 3/3: evaluate" is printed after the runner enters the stage, so a signal sent once it is
    # read lands inside evaluate (its million latency repeats). Waiting for export's timing in metrics.json instead
    # raced the few instructions between one stage's end and the next one's start on a loaded CI machine.
    entered = threading.Event()

    def watch_stdout():
        for line in process.stdout:
            if "stage 3/3: evaluate" in line:
                entered.set()

    errors: list[str] = []  # read as it comes, so a chatty stderr never fills the pipe and stalls the run
    readers = [threading.Thread(target=watch_stdout, daemon=True),
               threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        assert entered.wait(timeout=240) and process.poll() is None, "evaluate never started"
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        readers[1].join(timeout=30)
        err = "".join(errors)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143 and "Traceback" not in err and "interrupted (SIGTERM)" in err
    (failed,) = (tmp_path / "runs").iterdir()
    assert failed.name.endswith(".failed")
    metrics = json.loads((failed / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["failed_stage"] == "evaluate"
    assert metrics["error"] == "interrupted (SIGTERM) during stage evaluate"
    assert main(["run", "--resume", str(failed), "model.trust_code=true", "stages.evaluate.latency_repeats=2"]) == 0
    (done,) = (tmp_path / "runs").iterdir()
    resumed = json.loads((done / "metrics.json").read_text())
    assert resumed["status"] == "complete" and resumed["resumed"]["reused"] == ["calibrate", "export"]


@pytest.mark.parametrize("after_s", [0.15, 0.5, 1.5])
def test_ctrl_c_in_the_first_seconds_prints_no_traceback(tmp_path, images, after_s):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs"))
    process = subprocess.Popen([sys.executable, "-m", "workbench", "run", str(recipe)], cwd=ROOT / "tests",
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after_s)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    if process.returncode == -signal.SIGINT:
        # Two ways to die by SIGINT, both without a traceback: under load the signal can land before Python starts
        # (silent), or inside code a C extension runs through PyRun_* during an import, which sets CPython's
        # "unhandled KeyboardInterrupt" flag even though main() caught it and said so; the interpreter then exits
        # by re-raising SIGINT (the shell convention for an interrupted command).
        assert err.strip() in ("", "interrupted"), err[-2000:]
    else:
        assert process.returncode == 130 and err.strip().endswith("interrupted")


# --- 6. the smaller ones ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runs_dir, said", [
    ("/etc/passwd", "runs_dir: /etc/passwd is a file, not a folder"),
    ("/etc/passwd/runs", "runs_dir: /etc/passwd/runs lies under /etc/passwd, which is a file, not a folder"),
    ("/proc/self/x", "runs_dir: /proc/self/x is on the kernel's pseudo-filesystem /proc"),
])
def test_validate_refuses_runs_dirs_where_no_run_can_be_kept(images, tmp_path, capsys, runs_dir, said):
    (tmp_path / "r.yaml").write_text(tiny_recipe(images, tmp_path / "runs"))
    assert main(["validate", str(tmp_path / "r.yaml"), f"runs_dir={runs_dir}"]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_escape_bytes_of_a_path_are_escaped_on_stderr(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "no\x1b[31mred.yaml")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "no\\x1b[31mred.yaml does not exist" in err


def test_class_names_with_newlines_or_escapes_stay_in_their_table_cell():
    from workbench.report import _per_class_section

    names = ["car\n| forged | row |", "red\x1b[31m", "plain"]
    per_class = {n: {"map50_95": 0.5 - 0.1 * i, "map50": 0.7, "instances": 3} for i, n in enumerate(names)}
    metrics = {"stages": {"evaluate": {"backends": {
        "pytorch_fp32": {"metrics": {"per_class": per_class}},
        "ort_int8_faithful": {"metrics": {"per_class": {n: {**v, "map50_95": 0.2} for n, v in per_class.items()}}},
    }}}}
    lines = _per_class_section(Path("."), metrics)
    rows = [line for line in lines if line.startswith("| ") and "Instances" not in line]
    assert len(rows) == 3 and all(line.endswith(" |") for line in rows)
    text = "\n".join(lines)
    assert "\x1b" not in text and "red\\\\x1b\\[31m" in text
    assert "car\\\\n\\| forged \\| row \\|" in text


def test_random_bytes_as_weights_get_no_advice_to_trust_them(images, tmp_path, capsys):
    (tmp_path / "w.pt").write_bytes(os.urandom(4096))
    extra = f'  weights: "{tmp_path / "w.pt"}"\n'
    assert _run(tmp_path, _recipe(images, tmp_path, extra=extra)) == 2
    err = _refused(capsys, tmp_path, "model.weights:", "it is not a PyTorch checkpoint, or a damaged one")
    assert "trust_pickle" not in err and "file:" not in err


def test_a_pickled_object_as_weights_still_gets_the_advice(images, tmp_path, capsys):
    torch.save(trained_cnn(), tmp_path / "w.pt")  # a whole model: the advice fits
    extra = f'  weights: "{tmp_path / "w.pt"}"\n'
    assert _run(tmp_path, _recipe(images, tmp_path, extra=extra)) == 2
    _refused(capsys, tmp_path, "holds more than tensors", "model.trust_pickle: true")


def test_a_bare_stage_word_gets_a_message(images, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(tiny_recipe(images, tmp_path / "runs").replace("  - export: {}", "  - export"))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "'stages[1]' is the bare word 'export'" in err and "write '- export: {}'" in err
    assert "got None" not in err


def test_a_node_breaking_its_schema_is_refused_before_openvino_reads_it(tmp_path, capsys):
    """A Conv with one input (found by the fuzzer) crashed OpenVINO's reader with a segfault, no message at all."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Conv", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "conv.onnx"))
    for command in (["check-onnx"], ["build", "--engine", "openvino", "--precision", "fp32"]):
        assert main([command[0], str(tmp_path / "conv.onnx"), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert "conv.onnx is not a valid ONNX graph" in err and "has input size 1" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx"]


def test_usage_errors_escape_control_characters(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "r.yaml", "-1.\x1b[2J="])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "\x1b" not in err and "unrecognized arguments: -1.\\x1b[2J=" in err
