"""CAL's views (`dataset/transforms.py`) and its labelled/unlabelled sampler."""

import numpy as np
import torch
from PIL import Image

from owdfa_bench.data.datasets import weighted_sampler
from owdfa_bench.data.transforms import CropOrResize, build_view


def _image(w=40, h=30):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_views_are_square_normalised_tensors_of_the_configured_size():
    for name in ("weak", "strong", "test"):
        x = build_view(name, 32)(_image())
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # the test view is deterministic and ImageNet-normalised
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    x = build_view("test", 8)(white)
    assert torch.allclose(x[0], torch.full((8, 8), (1 - 0.485) / 0.229))
    assert torch.equal(build_view("test", 8)(white), x)


def test_strong_view_enlarges_to_the_reference_size_first():
    # 292 = int(256 / 224 * 256); without the crop branch the shorter side goes to 292
    strong = build_view("strong", 256)
    crop = next(t for t in strong.transforms if isinstance(t, CropOrResize))
    assert crop.size == 292 and crop.p == 0.2
    crop.p = 0.0
    assert min(crop(_image(400, 300)).size) == 292
    crop.p = 1.0
    assert crop(_image(400, 300)).size == (292, 292)


def test_weighted_sampler_draws_labelled_rows_half_the_time():
    sampler = weighted_sampler(num_labelled=100, num_unlabelled=900, seed=0)
    draws = np.array(list(sampler))
    assert len(draws) == 1000
    assert 0.44 < (draws < 100).mean() < 0.56  # 1/2 in expectation (not per batch)
    assert np.array_equal(draws, np.array(list(weighted_sampler(100, 900, seed=0))))


def test_a_last_batch_of_one_row_is_dropped_counted_in_this_ranks_draws():
    """BatchNorm cannot train on one row; under DDP a rank's draws are its share of the rows."""
    from owdfa_bench.data.datamodule import DataSplits, OWDFADataModule

    rows = [(f"{i}.png", 0) for i in range(10)]
    splits = DataSplits(rows[:6], rows[6:], [], num_known=1, classes=[{"label": 0}])
    dm = OWDFADataModule(splits, 16, ("weak",), batch_size=4)
    assert dm.train_dataloader().drop_last is False  # 10 draws: batches of 4, 4, 2
    dm._world = lambda: (2, 0)  # rank 0 of 2 draws 5 of the 10 rows: 4, 1
    assert dm.train_dataloader().drop_last is True
    dm.batch_size = 5
    assert dm.train_dataloader().drop_last is False
