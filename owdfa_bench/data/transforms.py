"""Weak, strong and test views of CAL's loader (`dataset/transforms.py`), for any image size.

At the paper's 256 px the enlarged size is 292 = int(256 / 224 * 256), as in the reference.
"""

from __future__ import annotations

import random

import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _finish(size: int) -> list:
    return [
        T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


class CropOrResize:
    """With probability p a RandomResizedCrop to `size`, else the shorter side resized to `size`.

    The reference uses Python's `random.random()` here (seeded by Lightning's seed_everything),
    and squashes the result to a square afterwards: without the crop, the shorter side goes to
    `size` and the final square resize then distorts the aspect ratio. Kept.
    """

    def __init__(self, size: int, p: float = 0.2, scale: tuple[float, float] = (0.5, 1.0)):
        self.size, self.p = size, p
        self.crop = T.RandomResizedCrop(
            size, scale=scale, interpolation=T.InterpolationMode.BILINEAR
        )

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return self.crop(img)
        return TF.resize(img, self.size, interpolation=T.InterpolationMode.BILINEAR)


def weak_view(size: int) -> T.Compose:
    return T.Compose([T.RandomHorizontalFlip(0.5), *_finish(size)])


def strong_view(size: int) -> T.Compose:
    enlarged = int(size / 224 * 256)
    return T.Compose(
        [
            T.RandomHorizontalFlip(0.5),
            CropOrResize(enlarged, p=0.2),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4)], p=0.2),
            *_finish(size),
        ]
    )


def test_view(size: int) -> T.Compose:
    return T.Compose(_finish(size))


VIEWS = {"weak": weak_view, "strong": strong_view, "test": test_view}


def build_view(name: str, size: int) -> T.Compose:
    if name not in VIEWS:
        raise KeyError(f"unknown view {name!r}; known views: {sorted(VIEWS)}")
    return VIEWS[name](size)
