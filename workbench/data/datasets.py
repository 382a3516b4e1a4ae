"""From a recipe's DataSplit to a deterministic Dataset and DataLoader.

Sampling is seeded: the same split definition always yields the same images,
in the same order, with the same random crops (each sample's crop is seeded by
its position, so results do not depend on worker count or batch size).
"""

from __future__ import annotations

import math
import random

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from ..schema import DataConfig, DataSplit, TransformConfig
from .calibsets import load_calib_set
from .sources import Sample, list_samples, verify_image


class ImageDataset(Dataset):
    """Samples with a spatial transform (PIL in, PIL out) and a normalisation (tensor out)."""

    def __init__(self, samples: list[Sample], transform: TransformConfig, seed: int = 0, field: str = "data",
                 batch_size: int = 1):
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.field = field  # the recipe's data.<split>, for messages
        # Images of different sizes can only be batched one at a time (a fully convolutional model at native sizes).
        self.same_size = batch_size > 1
        self._first_size: tuple[str, tuple[int, int]] | None = None  # the first image's key and size, per process

    def __len__(self) -> int:
        return len(self.samples)

    def spatial(self, index: int) -> Image.Image:
        """The sample's image after resize/crop, before normalisation (what calib-data build saves)."""
        return apply_spatial(self.samples[index].opener(), self.transform, self.seed * 1_000_003 + index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.spatial(index)
        # Images that leave the transform at different sizes cannot be batched (torch's collate would
        # fail with a bare "stack expects each tensor to be equal size"): name the two here.
        key = self.samples[index].key
        if self.same_size and self._first_size is None:
            self._first_size = (key, img.size)
        elif self.same_size and img.size != self._first_size[1]:
            raise DataError(_size_mismatch(self.field, *self._first_size, key, img.size))
        tensor = TF.to_tensor(img)
        t = self.transform
        if t.pad_crop:  # augmentation draws from the global RNG: a new crop every epoch
            h, w = tensor.shape[1:]
            tensor = TF.pad(tensor, [t.pad_crop])
            top, left = (int(v) for v in torch.randint(0, 2 * t.pad_crop + 1, (2,)))
            tensor = tensor[:, top : top + h, left : left + w]
        if t.hflip and torch.rand(()) < 0.5:
            tensor = tensor.flip(-1)
        tensor = TF.normalize(tensor, t.mean, t.std)
        return tensor, self.samples[index].label

    @property
    def labeled(self) -> bool:
        return all(s.label >= 0 for s in self.samples)


def apply_spatial(img: Image.Image, t: TransformConfig, seed: int) -> Image.Image:
    if t.resize:
        img = TF.resize(img, t.resize, interpolation=TF.InterpolationMode.BILINEAR)
    if t.random_resized_crop:
        top, left, h, w = _random_crop_box(img.height, img.width, t.scale, torch.Generator().manual_seed(seed))
        img = TF.resized_crop(img, top, left, h, w, [t.random_resized_crop] * 2,
                              interpolation=TF.InterpolationMode.BILINEAR)
    if t.crop:
        img = TF.center_crop(img, [t.crop, t.crop])
    return img


def _random_crop_box(height: int, width: int, scale: tuple[float, float],
                     gen: torch.Generator) -> tuple[int, int, int, int]:
    # As torchvision's RandomResizedCrop, but drawing from our own generator so crops are reproducible.
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        ratio = math.exp(torch.empty(1).uniform_(*log_ratio, generator=gen).item())
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


# What the model fixes about its input, whichever images a named calibration set picks.
MODEL_INPUT_FIELDS = ("mean", "std", "channels", "pixel_max")


def build_dataset(data: DataConfig, split_name: str) -> ImageDataset:
    """The Dataset for data.<split_name> (calibration, evaluation or finetune)."""
    split: DataSplit | None = getattr(data, split_name)
    field = f"data.{split_name}"
    if split is None:
        raise DataError(f"{field} is not set: the recipe needs it for this stage")
    if split.calib_set:
        # count and seed given next to calib_set override the set's own.
        given = split.model_fields_set
        split, transform = load_calib_set(
            split.calib_set, field, count=split.count, seed=split.seed if "seed" in given else None
        )
        # The set fixes which pixels; the model fixes how they are normalised.
        transform = transform.model_copy(update={k: getattr(data.transform, k) for k in MODEL_INPUT_FIELDS
                                                 if hasattr(data.transform, k)})
    else:
        transform = split.transform or data.transform
    from .registry import data_source, load

    source = data_source(split.source)
    detector = transform.detector_input()
    if source.boxes is not None:  # box labels: letterboxed (or resized) as the detection task reads them
        if detector is None:
            raise DataError(f"{field}: detection sources need data.transform.letterbox: [height, width], e.g. "
                            "[640, 640] (or resize: [height, width] for a model trained on plain resizes)")
        dataset = load(source.boxes)(split, detector[0], transform.stride, field)
        dataset.prep = detector_prep(transform)
        return dataset
    samples = list_samples(split, field)
    samples = sample_subset(samples, split, transform, field)
    if detector is not None:  # a detector's unlabeled images (calibration, distillation)
        from .detection import LetterboxedImages

        return LetterboxedImages(samples, detector[0], transform.stride, detector_prep(transform))
    return ImageDataset(samples, transform, seed=split.seed, field=field, batch_size=data.batch_size)


def detector_prep(transform: TransformConfig):
    """How the recipe's transform turns an image into a detector's input (data/detection.py's ImageInput)."""
    from .detection import ImageInput

    return ImageInput(fit=transform.detector_input()[1], channels=transform.channels, pixel_max=transform.pixel_max)


def sample_subset(samples: list[Sample], split: DataSplit, transform: TransformConfig, field: str) -> list[Sample]:
    """`count` samples in a seeded order; cycling is allowed only when random crops make each one distinct."""
    if split.count is None:
        return samples
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(split.seed)).tolist()
    if split.count > len(samples) and not transform.random_resized_crop:
        raise DataError(
            f"{field}.count is {split.count} but the source holds only {len(samples)} images; lower count or add "
            "transform.random_resized_crop so repeated images become distinct crops"
        )
    return [samples[order[i % len(order)]] for i in range(split.count)]


def make_loader(dataset, data: DataConfig, shuffle: bool = False) -> DataLoader:
    from .detection import DetectionDataset, LetterboxedImages, detection_collate

    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return DataLoader(
        dataset,
        batch_size=data.batch_size,
        shuffle=shuffle,
        num_workers=data.workers,
        persistent_workers=False,
        # Detection targets differ in length per image: keep them as a list.
        collate_fn=detection_collate if isinstance(base, (DetectionDataset, LetterboxedImages)) else None,
    )


def subset_loader(dataset, data: DataConfig, samples: int | None, seed: int = 0) -> DataLoader:
    """A loader over `samples` items drawn with a seed (all when None or more than there are).

    Drawn, not the first N: image folders list their classes in order, so the first N
    would be a few classes only.
    """
    if samples is None or samples >= len(dataset):
        return make_loader(dataset, data)
    indices = sorted(random.Random(seed).sample(range(len(dataset)), samples))
    return make_loader(torch.utils.data.Subset(dataset, indices), data)


def check_readable(dataset: ImageDataset, field: str, limit: int | None = None) -> None:
    """Check every image (or the first `limit`) up front, so a bad file fails before any output is written."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if not hasattr(dataset, "samples"):  # a DetectionDataset: records with paths
        for record in dataset.records[:n]:
            verify_image(Sample(str(record.path), lambda: None), field)
        return
    seen: set[str] = set()
    first = None  # (key, size after the transform) of the first file
    for sample in dataset.samples[:n]:
        if sample.key in seen:
            continue
        seen.add(sample.key)
        size = verify_image(sample, field)
        if size is None or not isinstance(dataset, ImageDataset) or not dataset.same_size:
            continue  # in-memory rows: __getitem__ checks them; letterboxed images come out at the letterbox size
        out = spatial_size(size, dataset.transform)
        if first is None:
            first = (sample.key, out)
        elif out != first[1]:
            raise DataError(_size_mismatch(field, *first, sample.key, out))


def spatial_size(size: tuple[int, int], t: TransformConfig) -> tuple[int, int]:
    """(width, height) of an image of `size` after apply_spatial, from its header alone."""
    if t.crop:
        return t.crop, t.crop
    if t.random_resized_crop:
        return t.random_resized_crop, t.random_resized_crop
    if not t.resize:
        return size
    if isinstance(t.resize, tuple):  # a detector's plain resize: (height, width)
        return t.resize[1], t.resize[0]
    w, h = size  # torchvision's resize: the shorter side to `resize`, the longer one scaled and truncated
    if w <= h:
        return t.resize, int(t.resize * h / w)
    return int(t.resize * w / h), t.resize


def _size_mismatch(field: str, key_a: str, size_a: tuple[int, int], key_b: str, size_b: tuple[int, int]) -> str:
    return (
        f"{field}: {key_a} is {size_a[0]}x{size_a[1]} and {key_b} is {size_b[0]}x{size_b[1]} after the transform, so "
        "they cannot be batched together: add a fixed size to data.transform (for a classifier resize and crop, e.g. "
        "resize: 256 and crop: 224; for a detector letterbox: [640, 640])"
    )
