"""A finished run reopened for exploration: what the sensitivity notebook drives.

    explorer = workbench.open_run("runs/yolov5n-...")
    explorer.table                      # the run's sensitivity rows, most sensitive first
    explorer.set_float(["model.24.m.0"])
    explorer.evaluate(samples=32)       # task metric and agreement with FP32 on a subset
    print(explorer.plan_snippet())      # the recipe lines that reproduce this precision plan

The calibrated model is rebuilt from the run's recipe.yaml and calibration.json
(`quant.ptq.restore_`): no calibration data is read and nothing is recalibrated.
"""

from __future__ import annotations

import copy
import glob
import json
from pathlib import Path

import torch
import yaml

from .data import build_dataset, subset_loader
from .errors import CalibrationError, WorkbenchError
from .models import resolve_model
from .quant.ptq import quant_units, restore_, set_float_units
from .quant.sensitivity import layer_costs, make_probe, score_probe
from .recipe import parse_recipe
from .stages.calibrate import CalibrateOptions
from .tasks import get_task


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise WorkbenchError(f"{path} is not the JSON the workbench wrote ({e}): open another run, or run it again") \
            from None


def _float_layers(saved, path: Path) -> list[str]:
    layers = saved.get("float_layers") if isinstance(saved, dict) else None
    if not isinstance(layers, list) or not all(isinstance(name, str) for name in layers):
        raise WorkbenchError(f"{path}: float_layers must be a list of layer names (got {str(layers)[:80]})")
    return layers


class RunExplorer:
    def __init__(self, run_dir: Path, device: str = "cpu", trust_code: bool = False, trust_pickle: bool = False):
        from .run_record import RecordError, run_file
        from .stages.calibrate import check_calibration
        from .stages.sensitivity import check_sensitivity

        self.dir = Path(run_dir)
        try:  # a planted link or FIFO in place of a run file is refused, as on --resume
            recipe_file, calibration = run_file(self.dir, "recipe.yaml"), run_file(self.dir, "calibration.json")
            sens, plan = run_file(self.dir, "sensitivity.json"), run_file(self.dir, "mixed_precision.json")
        except RecordError as e:
            raise WorkbenchError(str(e)) from None
        if recipe_file is None:
            raise WorkbenchError(f"{self.dir} is not a run directory (no recipe.yaml): give a directory under runs/")
        if calibration is None:
            raise CalibrationError(
                f"{self.dir} has no calibration.json: that run was not calibrated. Run a recipe with a calibrate stage "
                "(workbench sensitivity RECIPE does) and open that run"
            )
        # A run directory is untrusted input: the trust keys its recipe.yaml writes count only when the caller
        # gives them again (else a tampered recipe.yaml would run code in the notebook that opens it).
        overrides = [f"model.trust_code={str(trust_code).lower()}", f"model.trust_pickle={str(trust_pickle).lower()}"]
        self.recipe = parse_recipe(recipe_file.read_text(), str(recipe_file), overrides)
        self.task = get_task(self.recipe.task)
        saved = _read_json(calibration)
        check_calibration(saved, calibration)
        # a run from before `decode_float` quantized its decode: a missing key means it did not keep it float
        self.config = CalibrateOptions(**{"decode_float": False, **saved["config"]})
        self.device = torch.device(device)
        self.reference = resolve_model(self.recipe.model).to(self.device).eval()
        pruned = self.dir / "pruned_model.pt"
        if pruned.is_file():  # the run pruned the model before calibrating it: rebuild that shape
            self.model = resolve_model(
                self.recipe.model.model_copy(update={"pruned": str(pruned)})
            ).to(self.device).eval()
        else:
            self.model = copy.deepcopy(self.reference)
        from .quant.algorithms.base import StateError, read_run_state
        from .targets import TENSORRT, Arithmetic

        try:  # the arithmetic the run calibrated with (openvino's cpu: auto read that run's CPU, not this one)
            self.arithmetic = Arithmetic.from_dict(saved["target"]) if "target" in saved else TENSORRT
        except (ValueError, TypeError) as e:
            raise CalibrationError(f"{calibration}: target is not {e}; calibrate again") from None
        try:  # what the run's PTQ algorithms changed (ptq_state.pt)
            state = read_run_state(self.dir, self.config)
        except StateError as e:
            raise WorkbenchError(f"{self.dir / 'ptq_state.pt'}: {e}") from None
        self.result = restore_(self.model, self.config, saved["activation_amax"], self._example(), self.arithmetic,
                               saved.get("activation_min"), ptq_state=state)
        self.units = list(quant_units(self.model, self.result))
        self.table: list[dict] = []
        if sens is not None:
            saved_table = _read_json(sens)
            check_sensitivity(saved_table, sens)
            self.table = saved_table["layers"]
        self.run_plan: list[str] = _float_layers(_read_json(plan), plan) if plan is not None else []
        self.set_float(self.run_plan)
        self._dataset = None
        self._probes: dict[int | None, object] = {}

    def _example(self) -> torch.Tensor:
        c, h, w = self.recipe.model.input_size
        return torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0)).to(self.device)

    @property
    def float_layers(self) -> list[str]:
        return list(self.result.kept_float)

    def set_float(self, layers: list[str]) -> None:
        """Keep exactly these layers (names from the table) in float; every other quantized layer INT8."""
        set_float_units(self.model, self.result, layers)

    def evaluate(self, samples: int | None = 64) -> dict:
        """The current plan scored on `samples` evaluation samples drawn with a seed (None: all),
        with FP32 alongside."""
        if self._dataset is None:
            classes = lambda: self.task.classes(self.reference, self.recipe.model.input_size)  # noqa: E731
            self._dataset = self.task.for_model(build_dataset(self.recipe.data, "evaluation"), classes,
                                                "data.evaluation")
        if samples not in self._probes:
            loader = subset_loader(self._dataset, self.recipe.data, samples)
            self._probes[samples] = make_probe(self.reference, loader, None, self.device)
        probe = self._probes[samples]
        scorer = self.task.scorer(self.recipe, self._dataset)
        metrics = score_probe(self.model, probe, scorer)
        name, value = self.task.headline_points(metrics)
        # FP32 on the same images: the difference, with its paired interval, is what the subset can resolve.
        fp32 = self.task.scorer(self.recipe, self._dataset)
        for targets, ref in zip(probe.targets, probe.references):
            fp32.update(ref.float(), targets, ref.float())
        interval = self.task.delta(scorer, fp32)
        return {"samples": probe.samples, "metric": name, "value": value,
                "agreement": self.task.agreement_points(metrics),
                "delta": interval.as_dict() if interval is not None else None,
                "float_layers": len(self.float_layers), "int8_mac_share": self.int8_mac_share()}

    def int8_mac_share(self) -> float:
        if not hasattr(self, "_costs"):
            self._costs = layer_costs(self.model, self.units, self._example())
        total = sum(c["macs"] for c in self._costs.values())
        kept = set(self.float_layers)
        return sum(c["macs"] for u, c in self._costs.items() if u not in kept) / total if total else 1.0

    def plan_snippet(self) -> str:
        """The calibrate stage that reproduces the current plan, as recipe YAML."""
        options = self.config.model_dump(mode="json")
        # excludes are glob patterns: each float layer escaped, so it matches its own name only
        options["exclude"] = list(dict.fromkeys(self.config.exclude + [glob.escape(u) for u in self.float_layers]))
        return yaml.safe_dump({"stages": [{"calibrate": options}]}, sort_keys=False)

    def plot_sensitivity(self, top: int = 20, ax=None):
        """Bar chart of the most sensitive layers (task-metric sensitivity if the run measured it, else SQNR)."""
        import matplotlib.pyplot as plt

        from .quant.sensitivity import task_sensitivity

        if not self.table:
            raise WorkbenchError(f"{self.dir} has no sensitivity.json: run `workbench sensitivity` on its recipe first")
        rows = self.table[:top]
        task = task_sensitivity(rows[0]) is not None
        only = "only_sqnr_db" in rows[0]
        values = [task_sensitivity(r) if task else (r["only_sqnr_db"] if only else r["loo_sqnr_db"]) for r in rows]
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1))
        ax.barh([r["layer"] for r in rows], values, color="#C44E52" if task else "#4C72B0")
        ax.invert_yaxis()
        ax.set_xlabel("sensitivity, task-metric points" if task else "SQNR with only this layer INT8, dB (lower hurts "
                                                                     "more)"
                      if only else "output SQNR with this layer float and the rest INT8, dB")
        return ax
