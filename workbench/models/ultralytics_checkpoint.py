"""What an Ultralytics checkpoint needs from the installed Ultralytics, read before it is unpickled.

Ultralytics unpickles a whole model from a `.pt`: every layer's class is looked up by its module path at load time.
A checkpoint saved by another Ultralytics version, or by a fork that adds its own layers (LeYOLO, YOLOv7/9 ports...),
names classes the installed package may not have, and the unpickler then stops with a bare `AttributeError:
module 'ultralytics.nn.modules' has no attribute 'X'` (or `No module named ...`). And a fork installed in place of
Ultralytics may lack what the workbench itself needs of the package (`ultralytics.utils.patches._image_open`).

So, before Ultralytics loads anything:
- `version_problem`: the installed Ultralytics is in the range the workbench is written against (SUPPORTED), read
  from the package's metadata without importing it;
- `checkpoint_facts`: from the pickle's opcodes, never executed, the globals the file names (`module.attribute`)
  and the version, docs address and model file it was saved with (the keys Ultralytics writes: `version`, `docs`,
  `train_args.model`);
- `missing_globals`: the globals under `ultralytics.` that the installed package does not have (importing the
  installed package's own modules, never the file's code);
- `check_ultralytics_checkpoint` turns those into one ModelLoadError: what is missing, which version or fork the
  file was likely saved with, and what to do.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelLoadError

# The Ultralytics releases the workbench is written against (pyproject's `ultralytics` extra): their DetectionModel
# and Detect layout (ultralytics_head.py), their decode modules and their patches (registry.import_ultralytics).
SUPPORTED = ((8, 3), (8, 5))  # >= 8.3, < 8.5
SUPPORTED_TEXT = "ultralytics>=8.3,<8.5"
_MAX_PICKLE_BYTES = 64 * 2**20  # a detector's data.pkl is a few hundred kilobytes: its tensors live in other records
_STRINGS = ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING")
_MEMO_OPS = ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT")


def installed_version() -> str | None:
    """The installed Ultralytics distribution's version (its metadata; nothing imported), None if not installed."""
    try:
        return importlib.metadata.version("ultralytics")
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def version_problem(version: str | None = None) -> str | None:
    """Why the installed Ultralytics (or `version`) is not one the workbench can drive, or None."""
    version = installed_version() if version is None else version
    if version is None:
        return None  # not installed: the source's own check says so (registry._ULTRALYTICS_EXTRA)
    low, high = SUPPORTED
    release = _release(version)
    if release and low <= release[:2] < high:
        return None
    return (f"the installed Ultralytics is {version}, but the workbench drives {SUPPORTED_TEXT} (their detection "
            f"model and head layout, and what it restores of the package's patches). Install a supported one "
            f"(pip install '{SUPPORTED_TEXT}'), in a separate environment if another project needs {version}")


@dataclass
class CheckpointFacts:
    """What a checkpoint's pickle names, read from its opcodes: the globals (module, attribute) and the strings
    Ultralytics writes beside the model (None when the file does not record them)."""

    globals: list[tuple[str, str]] = field(default_factory=list)
    version: str | None = None
    docs: str | None = None
    model_file: str | None = None  # train_args['model']: the .yaml or .pt it was trained from

    def saved_with(self) -> str:
        parts = [f"Ultralytics {self.version}" if self.version else "an Ultralytics version it does not record"]
        if self.docs and "docs.ultralytics.com" not in self.docs:
            parts.append(f"whose docs are {self.docs} (a fork)")
        if self.model_file:
            parts.append(f"trained from {self.model_file}")
        return ", ".join(parts)


def checkpoint_facts(path: str | Path) -> CheckpointFacts | None:
    """The globals and saved-with strings of a torch.save zip's pickle, read without unpickling; None when the file
    is not such an archive (a legacy pickle, TorchScript is refused elsewhere) or its pickle cannot be read."""
    import pickletools

    try:
        with zipfile.ZipFile(path) as archive:
            info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
            if info.file_size > _MAX_PICKLE_BYTES:
                return None
            data = archive.read(info)
    except (OSError, zipfile.BadZipFile, StopIteration, ValueError):
        return None
    facts = CheckpointFacts()
    strings: list[str] = []
    after: dict[str, list[str]] = {}  # a key string -> the strings that follow it (its value, in a dict of strings)
    memo: dict[int, str | None] = {}  # a string pickled once and fetched again by its memo index (a repeated key)
    last: str | None = None  # the string the previous opcode pushed
    try:
        for op, arg, _ in pickletools.genops(data):
            value = None
            if op.name in _STRINGS:
                value = arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                value = memo.get(int(arg))
            if op.name in _MEMO_OPS:
                memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = last
                continue
            last = value
            if value is not None:
                if strings and strings[-1] in ("version", "docs", "model"):
                    after.setdefault(strings[-1], []).append(value)
                strings.append(value)
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                facts.globals.append((strings[-2], strings[-1]))
                strings.clear()  # the two strings were the global's name, not a key and its value
            elif op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                facts.globals.append((module, name))
            else:
                strings.append("")  # only adjacent strings are a key and its value
    except Exception:  # noqa: BLE001 - a malformed pickle: torch.load / Ultralytics say what is wrong with it
        return None

    def first(key: str, fits) -> str | None:  # the first value after `key` that is what Ultralytics writes there
        return next((v for v in after.get(key, []) if fits(v)), None)

    facts.version = first("version", lambda v: re.fullmatch(r"\d+\.\d+[\w.+-]*", v) is not None)
    facts.docs = first("docs", lambda v: v.startswith("http"))
    facts.model_file = first("model", lambda v: v.endswith((".yaml", ".yml", ".pt")))
    facts.globals = list(dict.fromkeys(facts.globals))
    return facts


def missing_globals(names: list[tuple[str, str]], package: str = "ultralytics") -> list[str]:
    """`module.attribute` of each global under `package` the installed package lacks (its module does not exist,
    or has no such attribute). Only the installed package's own modules are imported, never the file's code."""
    import PIL.Image
    import torch

    # Importing Ultralytics patches PIL.Image.open and torch.save for the whole process (registry.import_ultralytics
    # says why that matters): whatever this imports, they are put back as they were.
    image_open, save = PIL.Image.open, torch.save
    try:
        return _missing_globals(names, package)
    finally:
        PIL.Image.open, torch.save = image_open, save


def _missing_globals(names: list[tuple[str, str]], package: str) -> list[str]:
    missing = []
    for module, name in names:
        if module != package and not module.startswith(package + "."):
            continue
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing
            found = False
        if not found:
            missing.append(f"{module}.{name} (no module {module})")
            continue
        try:
            obj = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - the installed module itself fails to import: say so
            missing.append(f"{module}.{name} (importing {module} fails: {type(e).__name__}: {e})")
            continue
        for part in name.split("."):  # a nested class is pickled by its qualified name
            if not hasattr(obj, part):
                missing.append(f"{module}.{name} ({module} has no attribute {name!r})")
                break
            obj = getattr(obj, part)
    return missing


def check_ultralytics_checkpoint(path: str | Path, field_name: str = "model.spec") -> None:
    """Raise ModelLoadError when the installed Ultralytics is not a supported one, or lacks a class the checkpoint
    at `path` pickles: naming what is missing, what the file was saved with, and what to do."""
    if problem := version_problem():
        raise ModelLoadError(f"{field_name}: cannot load {path}: {problem}")
    facts = checkpoint_facts(path)
    if facts is None:
        return  # not a torch.save archive we can read: Ultralytics' own loader says what it is
    missing = missing_globals(facts.globals)
    if not missing:
        return
    installed = installed_version()
    saved = facts.saved_with()
    newer = facts.version and installed and _release(facts.version) > _release(installed)
    likely = (f"a newer Ultralytics ({facts.version}) than the installed {installed}" if newer else
              "a fork of Ultralytics that adds its own layers (or a version with layers since renamed)")
    shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise ModelLoadError(
        f"{field_name}: {path} cannot be loaded with the installed Ultralytics {installed}: it pickles classes that "
        f"package does not have: {shown}. It was saved with {saved}, so it likely needs {likely}. What to do: "
        f"install the package it was saved with, if that is within {SUPPORTED_TEXT} (a fork installs as "
        "`ultralytics` too); otherwise, where that package is installed, save the weights alone "
        "(torch.save(YOLO(path).model.state_dict(), 'weights.pt')) and give the model's class here as "
        "model.spec 'import:package.module:factory' (model.trust_code: true) with model.weights: weights.pt")
