"""TensorRT engine builds: every check around the builder runs here; the build itself where tensorrt exists."""

import json

import pytest
import torch
from conftest import tiny_recipe

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.qdq.export import export_onnx
from workbench.runtime.tensorrt import check_engine_matches, layer_precision_summary

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = torch.cuda.is_available()
except ImportError:
    HAVE_TRT = False
needs_tensorrt = pytest.mark.skipif(not HAVE_TRT, reason="needs tensorrt and an NVIDIA GPU")


def _run(images, tmp_path, build_opts="{engine: tensorrt}"):
    stages = (f"  - calibrate: {{method: max}}\n  - export: {{}}\n  - build: {build_opts}\n"
              f"  - evaluate: {{latency: false}}\n")
    (tmp_path / "r.yaml").write_text(tiny_recipe(images, tmp_path / "runs", stages))
    return main(["run", str(tmp_path / "r.yaml")])


@pytest.mark.skipif(HAVE_TRT, reason="checks the behaviour without tensorrt")
def test_without_tensorrt_the_run_still_writes_its_onnx_and_report(images, tmp_path):
    assert _run(images, tmp_path) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    build = json.loads((run_dir / "metrics.json").read_text())["stages"]["build"]
    assert build["built"] is False and "pip install tensorrt" in build["reason"]
    assert (run_dir / "model.onnx").is_file() and "## TensorRT engine" in (run_dir / "report.md").read_text()
    assert not list(run_dir.glob("*.engine"))


@pytest.mark.skipif(HAVE_TRT, reason="checks the behaviour without tensorrt")
def test_required_build_without_tensorrt_fails_the_run(images, tmp_path, capsys):
    assert _run(images, tmp_path, "{engine: tensorrt, required: true}") == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_profile_out_of_order_is_refused_before_anything_runs(images, tmp_path, capsys):
    assert _run(images, tmp_path, "{engine: tensorrt, min_batch: 16, opt_batch: 8, max_batch: 4}") == 2
    assert "min_batch <= opt_batch <= max_batch" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def _exported(images, tmp_path):
    stages = "  - calibrate: {method: max}\n  - export: {}\n"
    (tmp_path / "e.yaml").write_text(tiny_recipe(images, tmp_path / "exp", stages))
    assert main(["run", str(tmp_path / "e.yaml")]) == 0
    (run_dir,) = (tmp_path / "exp").iterdir()
    return run_dir


def test_cli_build_checks_the_request_first(images, tmp_path, capsys):
    run_dir = _exported(images, tmp_path)
    assert main(["build", str(run_dir / "model.onnx"), "--engine", "tensorrt", "--batch", "8", "4", "1"]) == 2
    assert "min <= opt <= max" in capsys.readouterr().err
    assert main(["build", str(run_dir / "model_fp32.onnx"), "--engine", "tensorrt", "--precision", "int8"]) == 2
    assert "no QuantizeLinear/DequantizeLinear nodes" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_text("hello")
    assert main(["build", str(tmp_path / "junk.onnx"), "--engine", "tensorrt"]) == 2
    assert "is not an ONNX model" in capsys.readouterr().err
    # the graph's size is fixed at 32
    assert main(["build", str(run_dir / "model.onnx"), "--engine", "tensorrt", "--size", "64", "64"]) == 2
    assert "fixed at 32" in capsys.readouterr().err
    if not HAVE_TRT:
        assert main(["build", str(run_dir / "model.onnx"), "--engine", "tensorrt"]) == 2
        assert "TensorRT is not installed" in capsys.readouterr().err
    assert not list(run_dir.glob("*.engine"))


def test_engine_for_another_tensorrt_or_gpu_is_refused_by_name():
    sidecar = {"engine": "m.engine", "tensorrt": "10.3.0", "gpu": "NVIDIA A100", "compute_capability": "8.0"}
    check_engine_matches(sidecar, "10.3.0", "8.0", "NVIDIA A100-SXM4-80GB")
    with pytest.raises(WorkbenchError, match="built with TensorRT 10.3.0, this machine has 10.8.0"):
        check_engine_matches(sidecar, "10.8.0", "8.0", "NVIDIA A100")
    with pytest.raises(WorkbenchError,
                       match=r"built for NVIDIA A100 \(compute capability 8.0\), this GPU is NVIDIA H100 \(9.0\)"):
        check_engine_matches(sidecar, "10.3.0", "9.0", "NVIDIA H100")


def test_layer_precision_summary_reads_the_inspector_format():
    # The shape of IEngineInspector's JSON with ProfilingVerbosity.DETAILED (TensorRT 10).
    layers = [
        {"Name": "conv1 + relu", "Outputs": [{"Name": "a", "Format/Datatype": "Int8 NC/32HW32"}]},
        {"Name": "conv2", "Outputs": [{"Name": "b", "Format/Datatype": "Int8 NC/32HW32"}]},
        {"Name": "head", "Outputs": [{"Name": "c", "Format/Datatype": "Half NCHW"}]},
        {"Name": "out", "Outputs": [{"Name": "d", "Format/Datatype": "Row major linear FP32"}]},
    ]
    assert layer_precision_summary(layers) == {"Int8": 2, "Half": 1, "Float": 1}


@needs_tensorrt
def test_build_int8_engine_and_score_it(images, tmp_path):
    assert _run(images, tmp_path, "{engine: tensorrt, required: true, max_batch: 8}") == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    build = json.loads((run_dir / "metrics.json").read_text())["stages"]["build"]
    assert build["built"] and build["layer_precisions"].get("Int8", 0) > 0
    assert (run_dir / "model_int8.engine").is_file() and (run_dir / "model_int8.engine.json").is_file()


@pytest.mark.cuda
def test_bench_times_every_artifact_and_writes_json_plot_and_report(images, tmp_path):
    stages = ("  - calibrate: {method: max}\n  - export: {}\n"
              "  - bench: {batch_sizes: [1, 4], repeats: 5, warmup: 1, threads: 1}\n")
    (tmp_path / "r.yaml").write_text(tiny_recipe(images, tmp_path / "runs", stages))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    bench = json.loads((run_dir / "bench.json").read_text())
    expected = {"pytorch_fp32", "ort_fp32", "ort_int8_default", "ort_int8_native"} | (
        {"pytorch_fp32_cuda", "pytorch_fp16_cuda", "pytorch_fp32_cuda_compute", "pytorch_fp16_cuda_compute"}
        if torch.cuda.is_available() else set()
    )
    assert set(bench["backends"]) == expected
    for name, entry in bench["backends"].items():
        for b in ("b1", "b4"):
            t = entry["latency"][b]
            assert 0 < t["median_ms"] <= t["p90_ms"] and t["images_per_s"] > 0, name
    sizes = {n: e["bytes"] for n, e in bench["backends"].items()}
    assert sizes["ort_int8_native"] == (run_dir / "model_int8_ort.onnx").stat().st_size
    assert (sizes["ort_int8_default"] == (run_dir / "model.onnx").stat().st_size
            and sizes["ort_fp32"] == (run_dir / "model_fp32.onnx").stat().st_size)
    assert ((run_dir / "bench.png").is_file()
            and "## Latency and size on this machine" in (run_dir / "report.md").read_text())


def test_bench_with_no_batch_sizes_is_refused(images, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(tiny_recipe(images, tmp_path / "runs", "  - bench: {batch_sizes: []}\n"))
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    assert "batch_sizes" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_bench_command_times_the_files_of_a_run_directory(images, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(
        tiny_recipe(images, tmp_path / "runs", "  - calibrate: {method: max}\n  - export: {}\n")
    )
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    out = tmp_path / "bench" / "b.json"
    assert main(["bench", str(run_dir), "--batch-sizes", "1", "2", "--repeats", "3", "--warmup", "1", "--threads", "1",
                 "--json", str(out), "--plot", str(tmp_path / "b.png")]) == 0
    result = json.loads(out.read_text())
    assert set(result["backends"]) == {"model.onnx", "model_fp32.onnx", "model_int8_ort.onnx"}
    for name, entry in result["backends"].items():
        assert entry["bytes"] == (run_dir / name).stat().st_size
        assert 0 < entry["latency"]["b2"]["median_ms"] <= entry["latency"]["b2"]["p90_ms"]
    # The printed table is for people (its width follows the terminal and the digits of each latency): the
    # structured result above is what is checked.
    assert (tmp_path / "b.png").stat().st_size > 0


def test_bench_command_bad_input(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx: not an .onnx, .engine or .xml file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["bench", str(tmp_path / "empty")]) == 2
    assert "no .onnx, .engine or .xml files" in capsys.readouterr().err
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "dyn.onnx", dynamic_size=True)
    assert main(["bench", str(path), "--json", str(tmp_path / "x.json")]) == 2
    assert "give it with --input-size" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    assert main(["bench", str(path), "--input-size", "3", "16", "16", "--repeats", "2", "--batch-sizes", "1"]) == 0
    assert main(["bench", str(path), "--batch-sizes", "0"]) == 2


def test_bench_command_names_and_shapes(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    for run in ("runA", "runB"):  # the same file name in two run directories: two rows
        export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / run / "model.onnx")
    out = tmp_path / "b.json"
    assert main(["bench", str(tmp_path / "runA"), str(tmp_path / "runB"), "--repeats", "2", "--batch-sizes", "1",
                 "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["backends"]) == {"runA/model.onnx", "runB/model.onnx"}
    fixed = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "fixed.onnx", dynamic_batch=False)
    assert main(["bench", str(fixed)]) == 2  # default batch sizes 1 and 8
    assert "batch size is fixed at 1" in capsys.readouterr().err
    # a wrong size: ORT's error, named
    assert main(["bench", str(tmp_path / "runA"), "--input-size", "3", "8", "9"]) == 2
    err = capsys.readouterr().err
    assert "model.onnx: cannot run a batch of shape (B, 3, 8, 9)" in err and "Traceback" not in err
    (tmp_path / "lone.engine").write_bytes(b"\0" * 16)
    assert main(["bench", str(tmp_path / "lone.engine")]) == 2
    assert "sidecar lone.engine.json is missing" in capsys.readouterr().err
