"""Pack the shared assets a GPU run needs into files that fit one device call, and unpack them there.

    python scripts/device_data.py pack cifar10_train cifar10_test resnet20 [--assets DIR] [--out .carry/data]
    python scripts/device_data.py unpack [--from .carry/data] [--into /tmp/assets]     # on the device machine
    python scripts/device_data.py list

A device call carries at most 64 MiB (the working tree, the wheels and the data together). Each bundle is one
.npz file holding the bundle's files under their paths relative to the assets folder; `unpack` writes them back
in the same layout, so recipes run unchanged with WORKBENCH_ASSETS pointing at the unpacked folder.

CIFAR-10's PNGs (25,000 train: 54 MiB as files) are re-encoded as lossless WebP, 64 images to a sheet: about 0.75
of the PNG bytes (WebP effort 2; effort 4 takes five times as long for 3% less). The pack decodes every sheet again
and refuses to write a bundle whose pixels differ from the originals; unpack writes them back as PNG, so the images a
run reads are pixel for pixel the shared ones. Every other bundle keeps its files' bytes unchanged; `--parts N`
splits a bundle into N files, one per call.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEVICE_CALL_BYTES = 64 * 2**20
SHEET = 64  # CIFAR images per WebP sheet: fewer costs more bytes (one header and code table each), more buys little


@dataclass(frozen=True)
class Bundle:
    """Files under the assets folder, by glob patterns, and how they travel."""

    patterns: tuple[str, ...]
    webp_sheets: bool = False  # 32x32 RGB images as lossless WebP sheets (else: the files' bytes unchanged)
    note: str = ""


BUNDLES = {
    "cifar10_train": Bundle(("data/cifar10/train/*/*.png",), True, "25,000 train images (prune, finetune, calibrate)"),
    "cifar10_test": Bundle(("data/cifar10/test/*/*.png",), True, "the 10,000 test images (evaluate)"),
    "imagenet_even": Bundle(("data/imagenet_samples/n*[02468]_*.JPEG",), note="EfficientNet-Lite0 QAT's train split"),
    "imagenet_odd": Bundle(("data/imagenet_samples/n*[13579]_*.JPEG",), note="EfficientNet-Lite0 QAT's held-out split"),
    "coco_tiny": Bundle(("data/coco_tiny/*/*",), note="yolov5n: 80 train and 80 val images, annotations"),
    "resnet20": Bundle(("models/cifar10_resnet20.th",)),
    "yolov5n": Bundle(("models/yolov5n.pt",)),
}


class PackError(Exception):
    """A bundle that cannot be packed or unpacked as asked: the message says which file and what to do."""


def _files(assets: Path, bundle: Bundle, name: str) -> list[Path]:
    files = sorted({f for pattern in bundle.patterns for f in assets.glob(pattern) if f.is_file()})
    if not files:
        raise PackError(f"bundle {name}: no file under {assets} matches {', '.join(bundle.patterns)}; "
                        "point --assets at the shared assets folder")
    return files


def _webp_sheets(files: list[Path]) -> tuple[list[bytes], tuple[int, int, int]]:
    """Lossless WebP sheets of SHEET images each, checked to decode to the originals' pixels."""
    from PIL import Image

    sheets, shape = [], None
    for start in range(0, len(files), SHEET):
        group = files[start:start + SHEET]
        try:
            pixels = [np.asarray(Image.open(f).convert("RGB")) for f in group]
        except OSError as e:
            raise PackError(f"{group[0].parent}: an image cannot be read ({e}); fix or remove it") from None
        shape = shape or Counter(p.shape for p in pixels).most_common(1)[0][0]  # the first sheet's usual size
        if odd := next((f for f, p in zip(group, pixels) if p.shape != shape), None):
            raise PackError(f"{odd}: {np.asarray(Image.open(odd)).shape} pixels where the bundle's images are {shape}; "
                            "WebP sheets need images of one size")
        strip = np.concatenate(pixels)  # the images stacked vertically
        buffer = io.BytesIO()
        Image.fromarray(strip).save(buffer, "WEBP", lossless=True, quality=100, method=2, exact=True)
        if not np.array_equal(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")), strip):
            raise PackError(f"{group[0]}: lossless WebP did not give back the same pixels; pack this bundle as files")
        sheets.append(buffer.getvalue())
    return sheets, shape


def pack(name: str, assets: Path, out: Path, part: int = 1, parts: int = 1) -> Path:
    """Part `part` of `parts` (contiguous slices of the sorted files) of bundle `name`, as one .npz in `out`."""
    bundle = BUNDLES[name]
    files = _files(assets, bundle, name)
    files = files[(part - 1) * len(files) // parts:part * len(files) // parts]
    names = [str(f.relative_to(assets)) for f in files]
    if bundle.webp_sheets:
        pieces, shape = _webp_sheets(files)
    else:
        pieces, shape = [f.read_bytes() for f in files], (0, 0, 0)
    offsets = np.cumsum([0] + [len(p) for p in pieces], dtype=np.int64)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{name}.npz" if parts == 1 else f"{name}-{part}of{parts}.npz")
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, names=np.array([n.encode() for n in names]), blob=np.frombuffer(b"".join(pieces), np.uint8),
             offsets=offsets, webp_sheet=np.int64(SHEET if bundle.webp_sheets else 0), shape=np.array(shape))
    tmp.replace(path)  # never a half-written bundle under the final name
    return path


def unpack(path: Path, into: Path) -> int:
    """Write a bundle's files under `into`; the number of files written."""
    from PIL import Image

    try:
        with np.load(path, allow_pickle=False) as z:
            names = [n.decode() for n in z["names"]]
            blob, offsets, sheet, shape = z["blob"], z["offsets"], int(z["webp_sheet"]), tuple(z["shape"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise PackError(f"{path}: not a bundle written by `device_data.py pack` ({e}); pack it again") from None
    if any(Path(n).is_absolute() or ".." in Path(n).parts for n in names):
        raise PackError(f"{path}: a file name leaves the target folder; pack it again from the shared assets")
    pieces = [blob[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:])]
    expected = -(-len(names) // sheet) if sheet else len(names)
    if len(pieces) != expected:
        raise PackError(f"{path}: {len(pieces)} pieces for {len(names)} files; the file is damaged, pack it again")
    for i, piece in enumerate(pieces):
        if sheet:
            strip = np.asarray(Image.open(io.BytesIO(piece)).convert("RGB"))
            group = names[i * sheet:(i + 1) * sheet]
            if strip.shape[0] != shape[0] * len(group):
                raise PackError(f"{path}: sheet {i} holds {strip.shape[0] // shape[0]} images, not {len(group)}")
            for j, name in enumerate(group):
                target = into / name
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(strip[j * shape[0]:(j + 1) * shape[0]]).save(target, "PNG", compress_level=1)
        else:
            target = into / names[i]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(piece)
    return len(names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="pack bundles into one .npz each")
    a.add_argument("bundles", nargs="+", choices=list(BUNDLES))
    a.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets")
    a.add_argument("--out", type=Path, default=ROOT / ".carry" / "data")
    a.add_argument("--parts", type=int, default=1, help="split each bundle into this many files (one per call)")
    b = sub.add_parser("unpack", help="write every bundle in a folder back as files")
    b.add_argument("--from", dest="source", type=Path, default=ROOT / ".carry" / "data")
    b.add_argument("--into", type=Path, default=Path("/tmp/assets"))
    sub.add_parser("list", help="the bundles")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            for name, bundle in BUNDLES.items():
                print(f"{name:15s} {', '.join(bundle.patterns)}  {bundle.note}")
        elif args.command == "pack":
            total = 0
            for name in args.bundles:
                for part in range(1, args.parts + 1):
                    path = pack(name, args.assets, args.out, part, args.parts)
                    total += path.stat().st_size
                    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")
            print(f"{total / 2**20:.1f} MiB packed; a device call carries {DEVICE_CALL_BYTES // 2**20} MiB in all, "
                  "the working tree and the wheels included")
        else:
            bundles = sorted(args.source.glob("*.npz"))
            if not bundles:
                raise PackError(f"{args.source}: no bundle (*.npz) to unpack; carry the folder `pack` wrote")
            for path in bundles:
                print(f"{path.name}: {unpack(path, args.into)} files -> {args.into}")
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
