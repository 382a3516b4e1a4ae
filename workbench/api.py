"""The Python API that the CLI and the notebook both call: one function per `workbench` command.

    run(recipe, overrides)            workbench run            sensitivity(recipe)     workbench sensitivity
    quantize(model, data)             workbench quantize
    validate(recipe, overrides)       workbench validate       check_onnx(path)        workbench check-onnx
    build(onnx, ...)                  workbench build          bench(paths, ...)       workbench bench
    open_run(run_dir)                 the notebook's explorer  load_run(run_dir)       a run's metrics

Everything heavy (torch, modelopt, ONNX) is imported by the function that needs it, so `import workbench`
and the CLI's quick commands stay light.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import RecipeError, shown_path

if TYPE_CHECKING:
    from .recipe import Recipe
    from .run import Run


def run(recipe: str | os.PathLike | Recipe | None, overrides: list[str] | tuple[str, ...] = (), console=None,
        resume: str | os.PathLike | None = None) -> Run:
    """Run a recipe (a path or a validated Recipe) and return the finished Run.

    `resume`: a failed or interrupted run directory to continue in place (see resume.py); with `recipe`
    None, the run's own recipe.yaml (with `overrides`) is used.
    """
    from .recipe import Recipe, load_recipe
    from .run import run_recipe

    if recipe is None and resume is None:
        raise RecipeError("give a recipe to run, or a run directory to resume")
    if resume is not None:  # opened once: its recipe may be the one to run
        from .resume import open_previous

        resume = open_previous(resume)
    if recipe is None:
        recipe = resume.recipe(overrides)
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return run_recipe(recipe, console=console, resume=resume)


def quantize_recipe(model: str | os.PathLike, data: str | os.PathLike, imgsz: int = 640, method: str = "mse",
                    engine: str = "auto", trust_pickle: bool = False, runs_dir: str | os.PathLike = "runs",
                    name: str | None = None) -> str:
    """The recipe `workbench quantize` runs, as YAML: a YOLO checkpoint (YOLOv5 or Ultralytics .pt, or an
    Ultralytics .yaml) and its dataset's data.yaml, calibrated, exported, compiled by `engine` and scored."""
    from .models.yolov5_legacy import is_yolov5_checkpoint
    from .yaml_io import dump_yaml

    path = Path(model)
    if path.suffix == ".pt" and path.is_file() and is_yolov5_checkpoint(path):
        spec = f"yolov5:{path}"  # read by the restricted unpickler: no trust needed
    else:
        spec = f"ultralytics:{path}"
    stem = "".join(c if c.isalnum() or c in "_.-" else "_" for c in path.stem) or "model"
    # Ultralytics' models as `yolo export dynamic=True` writes them (batch, height and width dynamic): its ONNX
    # loader takes a graph with a dynamic batch for one of dynamic size, so `yolo val` feeds it rectangular batches.
    # YOLOv5's layout is one Ultralytics 8 refuses (tasks/detection.py): its graph keeps its fixed size.
    export = {"dynamic_size": True} if spec.startswith("ultralytics:") else {}
    recipe = {
        "name": name or f"{stem}_int8",
        "task": "detection",
        "model": {"spec": spec, "input_size": [3, int(imgsz), int(imgsz)],
                  **({"trust_pickle": True} if trust_pickle else {})},
        "data": str(data),
        "runs_dir": str(runs_dir),
        "stages": [{"calibrate": {"method": method}}, {"export": export}, {"build": {"engine": engine}},
                   {"evaluate": {}}],
    }
    return dump_yaml(recipe, comment=f"workbench quantize {path} --data {data}")


def quantize(model: str | os.PathLike, data: str | os.PathLike, imgsz: int = 640, method: str = "mse",
             engine: str = "auto", trust_pickle: bool = False, runs_dir: str | os.PathLike = "runs",
             name: str | None = None, console=None) -> Run:
    """`workbench quantize MODEL --data data.yaml`: a YOLO model to INT8 in one call (quantize_recipe); the run
    directory's recipe.yaml is the recipe it ran (`workbench run` it again, or edit it)."""
    # The paths the command names, checked before anything is opened or imported (torch and a checkpoint can take a
    # minute to read on a loaded machine).
    for flag, path, what in (("MODEL", model, "the trained .pt (or an Ultralytics .yaml)"),
                             ("--data", data, "the dataset's data.yaml")):
        if not Path(path).exists():
            raise RecipeError(f"{flag}: {shown_path(path)} does not exist: give {what} on this machine (relative "
                              "paths are relative to the working directory)")
    from .recipe import parse_recipe
    from .run import run_recipe

    text = quantize_recipe(model, data, imgsz, method, engine, trust_pickle, runs_dir, name)
    recipe = parse_recipe(text, f"workbench quantize {model}")
    if recipe.model.spec.startswith("ultralytics:") and Path(model).suffix == ".pt" and not trust_pickle:
        raise RecipeError(f"{model} is an Ultralytics checkpoint: Ultralytics unpickles the whole model, which runs "
                          "code from the file (model.trust_pickle in a recipe). If you trust it, add --trust-pickle")
    return run_recipe(recipe, console=console)


def validate(recipe: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """`workbench validate`: the recipe, read and checked (schema, stage order, model, files, data splits, required
    extras) without loading a model or an image; RecipeError naming every problem otherwise."""
    from .recipe import load_recipe
    from .validate import check_recipe_inputs

    loaded = load_recipe(recipe, overrides)
    check_recipe_inputs(loaded, f"recipe {recipe}")
    return loaded


def sensitivity_recipe(recipe: Recipe, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe's stages up to its calibrate stage, then `sensitivity` (with the recipe's own options if it
    has them); `overrides` (`stages.sensitivity.x=...`) apply to the derived recipe."""
    import yaml

    from .recipe import parse_recipe

    data = recipe.model_dump(mode="json")
    names = [next(iter(s)) for s in data["stages"]]
    if "calibrate" not in names:
        raise RecipeError(f"{recipe.name}: the recipe has no calibrate stage, and sensitivity needs a calibrated "
                          "model; "
                          "add one")
    own = next((s["sensitivity"] for s in data["stages"] if "sensitivity" in s), {})
    data["stages"] = data["stages"][: names.index("calibrate") + 1] + [{"sensitivity": own}]
    data["name"] = f"{recipe.name}-sensitivity"
    return parse_recipe(yaml.safe_dump(data, sort_keys=False), f"{recipe.name} (sensitivity)", overrides)


def sensitivity(recipe: str | os.PathLike | Recipe, overrides: list[str] | tuple[str, ...] = (), console=None) -> Run:
    """`workbench sensitivity RECIPE`: calibrate as the recipe says, then the per-layer sensitivity sweep."""
    from .recipe import Recipe, load_recipe
    from .run import run_recipe

    # Options of the sweep may be given even when the recipe has no sensitivity stage of its own.
    own = [o for o in overrides if o.startswith("stages.sensitivity.")]
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, [o for o in overrides if o not in own])
    return run_recipe(sensitivity_recipe(recipe, own), console=console)


@dataclass
class OnnxCheck:
    """What `check_onnx` found: TensorRT Q/DQ rule violations, and whether the graph computes anything in INT8."""

    violations: list  # qdq.trt_rules.Violation
    not_quantized: object | None  # a Violation saying no Conv/Gemm/MatMul reads INT8, or None

    @property
    def findings(self) -> list:
        return self.violations + ([self.not_quantized] if self.not_quantized else [])


def check_onnx(path: str | os.PathLike) -> OnnxCheck:
    """`workbench check-onnx`: a Q/DQ graph against TensorRT's explicit-quantization rules, node by node."""
    from .qdq.export import load_onnx
    from .qdq.numeric import numeric_violations
    from .qdq.trt_rules import check_qdq, check_quantized

    model = load_onnx(path)  # a clear error (exit 2) for a missing file or one that is not a model
    _check_graph_schema(model, path)
    found = check_qdq(model)
    seen = {(v.rule, v.node) for v in found}
    found += [v for v in numeric_violations(model) if (v.rule, v.node) not in seen]  # what every engine needs
    return OnnxCheck(found, check_quantized(model))


def _check_graph_schema(model, path: str | os.PathLike) -> None:
    """Refuse a graph whose nodes break ONNX's own schemas (a QuantizeLinear with one input, an op that does not
    exist): the rules below read each node's inputs as its op defines them."""
    import onnx

    from .errors import WorkbenchError

    if model.ByteSize() >= 2**31:  # the checker takes no proto over protobuf's 2 GB: such a graph goes unchecked
        return
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WorkbenchError(f"{path} is not a valid ONNX graph ({reason[:300]}): export it again") from None


def build(onnx: str | os.PathLike, engine: str = "auto", batch: tuple[int, int, int] = (1, 8, 32),
          size: tuple[int, int] | None = None, out: str | os.PathLike | None = None, precision: str = "int8",
          strongly_typed: bool = True, workspace_mib: int = 4096, timing_cache: str | os.PathLike | None = None,
          sparse: bool = False, data: str | os.PathLike | None = None, guard: bool = True,
          guard_min_agreement: float = 90.0, guard_max_samples: int = 1024, openvino_graph: str = "u8",
          openvino_weights: str = "auto") -> dict:
    """`workbench build`: an engine from an ONNX file, written beside it unless `out`; returns its sidecar.

    engine "tensorrt": a TensorRT engine (min/opt/max `batch`, `size` (H, W) for a graph with a dynamic image
    size); "openvino": OpenVINO IR compiled for this CPU (.xml/.bin, .blob, .xml.json) from the layout
    `openvino_graph` of the graph with `openvino_weights` (as the build stage's options; beside it as <out>.onnx);
    "auto": the first engine of runtime/engines.py's table whose package is installed (TensorRT, else OpenVINO).

    The graph's numbers are checked first (qdq/numeric.py). An INT8 engine is then guarded (runtime/guard.py) on
    the images of `data` (a folder of images, or a detector's data.yaml), else on those of the run whose
    model.onnx it is (its recipe.yaml's calibration and evaluation splits): refused, its files are removed and
    WorkbenchError raised with the guard's numbers. `guard` False keeps it, marked unverified in its sidecar.
    """
    from .errors import WorkbenchError
    from .qdq.export import load_onnx, onnx_input_dims
    from .qdq.numeric import require_numeric
    from .runtime import engines
    from .runtime.guard import GuardPolicy

    onnx_path = Path(onnx)
    # A node that breaks its op's schema can crash a compiler outright (OpenVINO segfaults on a one-input Conv).
    _check_graph_schema(load_onnx(onnx_path), onnx_path)
    row = engines.resolve(engine)
    fixed = onnx_input_dims(onnx_path)  # a missing or broken file is named before anything reads it
    require_numeric(onnx_path)
    if not 0 <= guard_min_agreement < 100 or guard_max_samples < 1:
        raise WorkbenchError(f"--guard-min-agreement {guard_min_agreement:g} --guard-max-samples {guard_max_samples}: "
                             "give a percent from 0 to below 100 (no number of images resolves 100) and 1 image or "
                             "more")
    policy = GuardPolicy(guard_min_agreement, max_samples=guard_max_samples)
    images = _guard_images(onnx_path, fixed, data, policy) if guard and precision == "int8" else None
    if problem := engines.precision_problem(row, precision, "--precision"):
        raise WorkbenchError(problem)
    req = engines.FileBuild(
        onnx=onnx_path, out=Path(out) if out else None, precision=precision, dims=fixed, batch=tuple(batch),
        size=tuple(size) if size else None, strongly_typed=strongly_typed, workspace_mib=workspace_mib,
        timing_cache=Path(timing_cache) if timing_cache else None, sparse=sparse, openvino_graph=openvino_graph,
        openvino_weights=openvino_weights)

    def guarded(runner, graph, files, tap, engine_name) -> dict:
        _guard_built(runner, graph, images, policy, files, engine_name, tap)
        return {}

    return row.build_file(req, guarded)


def _guard_built(runner, graph: Path, images, policy, files: list[Path], engine_name: str, tap) -> None:
    """The CLI build's guard: `images` None means the guard is off (the sidecar says unverified); a refusal removes
    the engine's files and raises WorkbenchError (exit 2) with the guard's numbers."""
    from .errors import WorkbenchError
    from .runtime.guard import EngineRefused, mark_sidecar, verify_engine

    if images is None:
        mark_sidecar(files[0], None)
        return
    task, num_classes, batches = images
    try:
        verify_engine(runner(), graph, batches, task.agreement_meter(num_classes), policy, files, engine_name, tap)
    except EngineRefused as e:
        raise WorkbenchError(f"{e}. Deploy the faithful ONNX graph, or build with --no-guard to keep an engine "
                             "marked unverified") from None
    except WorkbenchError:
        for path in files:
            path.unlink(missing_ok=True)
        raise
    except Exception as e:  # the engine or the graph failed on the images: no verdict, so no engine kept
        for path in files:
            path.unlink(missing_ok=True)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise WorkbenchError(f"the guard could not run the {engine_name} engine and its graph on the images "
                             f"({type(e).__name__}: {reason}); its files were removed. Give --data images of the "
                             "model's input, or --no-guard to keep an engine marked unverified") from None
    except BaseException:
        for path in files:
            path.unlink(missing_ok=True)
        raise


def _guard_images(onnx_path: Path, dims: list, data, policy):
    """(task, class count or None, (split, images) batches) for the CLI build's guard: the images of `data` (a
    folder of images, or an Ultralytics data.yaml for a detector), else the calibration and evaluation splits of the
    run directory the graph is in (its recipe.yaml); WorkbenchError saying what to pass when there are none."""
    from .data import build_dataset, make_loader
    from .errors import WorkbenchError
    from .schema import DataConfig
    from .tasks import get_task

    recipe_file = onnx_path.parent / "recipe.yaml"
    metadata = _onnx_metadata(onnx_path)
    if data is None and recipe_file.is_file():
        from .recipe import load_recipe

        recipe = load_recipe(recipe_file)
        config, task_name = recipe.data, recipe.task
        splits = [s for s in ("calibration", "evaluation") if getattr(config, s) is not None]
        where = f"the calibration and evaluation images of {recipe_file}"
    elif data is not None:
        path = Path(data)
        # Ultralytics' "detect" or the workbench's "detect-yolov5: ..." (YOLOv5's layout, which Ultralytics refuses)
        task_name = "detection" if str(metadata.get("task", "")).startswith("detect") else "classification"
        h, w = (dims[2], dims[3]) if len(dims) == 4 and dims[2] and dims[3] else (None, None)
        if h is None:
            raise WorkbenchError(f"{onnx_path} has a dynamic image size: the guard cannot tell what size to give "
                                 "--data's images; build the model.onnx of a run directory, or --no-guard")
        # a detector's own input, as its export recorded it (plain resize, BGR): the images it was made for
        fit = "resize" if metadata.get("workbench.resize") == "resize" else "letterbox"
        detector = {fit: [h, w], "channels": "bgr" if metadata.get("workbench.channels") == "bgr" else "rgb",
                    "pixel_max": _pixel_max(metadata.get("workbench.pixel_max"))}
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            splits = ["calibration", "evaluation"]
            config = DataConfig(transform=detector,
                                calibration={"source": "yolo", "yaml": str(path), "split": "train"},
                                evaluation={"source": "yolo", "yaml": str(path), "split": "val"})
        elif path.is_dir():
            if task_name != "detection" and h != w:
                raise WorkbenchError(f"{onnx_path} takes {h}x{w} images and --data's are center-cropped square: "
                                     "build the model.onnx of a run directory (its recipe says how images are "
                                     "prepared), or --no-guard")
            transform = detector if task_name == "detection" else {"resize": min(h, w), "crop": h}
            config = DataConfig(transform=transform, calibration={"source": "files", "path": str(path)})
            splits = ["calibration"]
        else:
            raise WorkbenchError(f"--data {path}: give a folder of images (or a detector's Ultralytics data.yaml)")
        where = str(path)
    else:
        raise WorkbenchError(f"{onnx_path}: the guard compares the engine with the faithful graph on images, and "
                             "there are none: pass --data DIR (a folder of images like the model's inputs; a "
                             "detector's data.yaml), or build the model.onnx of a run directory (its recipe's "
                             "calibration images are used), or --no-guard to keep an engine marked unverified")
    datasets = [(split, build_dataset(config, split)) for split in splits]

    def batches():
        for split, dataset in datasets:
            for images, _ in make_loader(dataset, config):
                yield split, images.numpy()

    task = get_task(task_name)
    if not any(len(d) for _, d in datasets):
        raise WorkbenchError(f"the guard found no images in {where}: give --data a folder of images, or --no-guard")
    return task, None, batches()


def _pixel_max(value: str | None) -> float:
    """A graph's recorded white-pixel value (workbench.pixel_max), 1.0 where absent or not a valid one."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 1.0
    return v if 0 < v <= 255 else 1.0


def _onnx_metadata(path: Path) -> dict[str, str]:
    from .qdq.export import load_onnx

    return {p.key: p.value for p in load_onnx(path).metadata_props}


def bench(paths: list[str | os.PathLike], batch_sizes: list[int] = (1, 8), warmup: int = 5, repeats: int = 50,
          threads: int | None = None, input_size: tuple[int, int, int] | None = None) -> dict:
    """`workbench bench`: latency and throughput of model files (each opened by the backend that serves its suffix:
    .onnx in ONNX Runtime, .engine in TensorRT), or of every such file in a directory; the same measurement as the
    bench stage."""
    from .qdq.numeric import require_numeric
    from .runtime import backends
    from .runtime.guard import engine_verified
    from .runtime.latency import bench_artifacts, check_bench_options, cpu_threads, model_files, model_input_shape

    check_bench_options(batch_sizes, warmup, repeats, threads)
    threads = cpu_threads(threads)  # one count for every file, whichever runtime opens it
    files = model_files([Path(p) for p in paths], backends.file_suffixes())
    names = [f.name for f in files]
    results = {}
    for path in files:
        shape, fixed_batch = model_input_shape(path)
        if input_size:
            shape = tuple(input_size)
        if shape is None:
            raise RecipeError(f"{path}: the input size is dynamic; give it with --input-size C H W")
        if fixed_batch and any(b != fixed_batch for b in batch_sizes):
            raise RecipeError(f"{path}: the graph's batch size is fixed at {fixed_batch}; time it with --batch-sizes "
                              f"{fixed_batch} (or export with a dynamic batch)")
        name = path.name if names.count(path.name) == 1 else f"{path.parent.name}/{path.name}"  # two run dirs
        if path.suffix == ".onnx":
            require_numeric(path)
        results.update(bench_artifacts({name: backends.file_artifact(path, threads)}, shape, list(batch_sizes), warmup,
                                       repeats, threads))
        if path.suffix != ".onnx":  # an engine: verified only where its build's guard passed it
            results[name]["verified"] = engine_verified(path)
    return {"batch_sizes": list(batch_sizes), "repeats": repeats, "threads": threads, "backends": results}


def load_run(run_dir: str | os.PathLike) -> dict:
    """A finished run's metrics, read from its directory."""
    from .report import load_metrics

    return load_metrics(Path(run_dir))


def open_run(run_dir: str | os.PathLike, device: str = "cpu", trust_code: bool = False, trust_pickle: bool = False):
    """A run directory reopened for exploration: its calibrated model rebuilt from the saved ranges (see explore.py).
    The run's recipe.yaml is not trusted to run code: give trust_code/trust_pickle here if its model needs them."""
    from .explore import RunExplorer

    return RunExplorer(Path(run_dir), device, trust_code, trust_pickle)
