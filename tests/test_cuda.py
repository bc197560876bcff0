"""The GPU path on a real device: `trainer=gpu` (bf16-mixed, channels_last, loader workers,
pinned memory), `trainer=ddp` on one device, and the DDP evaluation gather on CUDA tensors.

Marked `cuda` and skipped without a CUDA device; `benchmarks/gpu_check.sh` runs them on a lent
GPU machine (`pytest -m cuda tests/test_cuda.py`).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_SYNTH, compose_config
from torch import nn
from torch.utils.data import DistributedSampler

# The runner and the method base class (Lightning: seconds to import) are imported in the tests,
# so collecting this module where they are skipped stays cheap (the --cpu rehearsal does).

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# A few steps on the device; two loader workers so pinned memory and worker hand-off run too.
GPU_SMOKE = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.num_workers=2",
    "trainer.progress_bar=false",
]


def gpu_cfg(tmp_path, synth_root, *overrides: str):
    base = [
        "logger=none",
        "data=synth",
        f"data.root={synth_root}",
        f"output_root={tmp_path / 'outputs'}",
        *TINY_SYNTH,
        *GPU_SMOKE,
    ]
    return compose_config(base + list(overrides))


def watch_first_conv(monkeypatch) -> dict[str, tuple]:
    """Record, per mode, what the backbone's first convolution receives and returns."""
    from owdfa_bench import runner

    seen: dict[str, tuple] = {}
    build = runner.build_method

    def build_and_watch(*args, **kwargs):
        method = build(*args, **kwargs)
        conv = next(m for m in method.encoder.backbone.modules() if isinstance(m, nn.Conv2d))

        def hook(module, inputs, output) -> None:
            x = inputs[0]
            seen.setdefault(
                "train" if module.training else "eval",
                (
                    x.device.type,
                    x.is_contiguous(memory_format=torch.channels_last),
                    output.dtype,
                ),
            )

        conv.register_forward_hook(hook)
        return method

    monkeypatch.setattr(runner, "build_method", build_and_watch)
    return seen


def test_cal_trains_on_cuda_with_bf16_and_channels_last(tmp_path, synth_root, monkeypatch):
    from owdfa_bench import runner

    seen = watch_first_conv(monkeypatch)
    record = runner.run(gpu_cfg(tmp_path, synth_root, "method=cal", "trainer=gpu"))
    assert record["status"] == "complete", record.get("error")
    assert record["device"] == torch.cuda.get_device_name(0)
    assert record["config"]["trainer"]["precision"] == "bf16-mixed"
    # inputs reach the backbone on the GPU in channels_last and autocast runs its conv in bf16
    assert seen["train"] == ("cuda", True, torch.bfloat16)
    assert seen["eval"] == ("cuda", True, torch.bfloat16)
    assert all(0.0 <= record["metrics"][k] <= 1.0 for k in ("all_acc", "known_acc", "novel_acc"))
    assert record["train_images_per_s"] > 0


@pytest.fixture
def process_group_cleanup():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # later tests start without one


def test_ddp_strategy_runs_on_one_device(tmp_path, synth_root, process_group_cleanup):
    from owdfa_bench import runner

    record = runner.run(
        gpu_cfg(
            tmp_path,
            synth_root,
            "method=cal",
            "trainer=ddp",
            "trainer.devices=1",
            "trainer.limit_val_batches=null",
        )
    )
    assert record["status"] == "complete", record.get("error")
    assert record["config"]["trainer"]["strategy"].startswith("ddp")
    assert record["counts"]["test"] == sum(map(sum, record["confusion"]))


def test_gather_eval_drops_the_distributed_samplers_padding_on_cuda():
    """Two ranks' padded test shards, as DistributedSampler deals them, gathered on the GPU:
    every test row once, in index order (the all_gather is simulated: NCCL cannot put two ranks
    on one device)."""
    from owdfa_bench.method import OWDFAMethod, Problem

    class Outputs(OWDFAMethod):  # class scores given as the batch's "image": no model needed
        def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
            return x

    n, classes, world = 11, 4, 2  # 11 rows over 2 ranks: rank 1 repeats row 0 as padding
    device = torch.device("cuda")
    logits = torch.randn(n, classes, device=device)
    labels = torch.randint(0, classes, (n,), device=device)
    method = Outputs(Problem(num_known=2, num_classes=classes)).to(device)
    method.trainer = SimpleNamespace(world_size=world)
    shards: dict[torch.dtype, list[torch.Tensor]] = {}  # what each rank holds, by dtype
    for rank in range(world):
        idx = torch.tensor(list(DistributedSampler(range(n), world, rank, shuffle=False)))
        idx = idx.to(device)
        shards.setdefault(torch.float32, []).append(logits[idx])
        shards.setdefault(torch.int64, []).append(torch.stack([labels[idx], idx], 1))
        if rank == 0:  # this process: its batches go through the validation hooks
            method.on_validation_epoch_start()
            for step, rows in enumerate(idx.split(4)):
                batch = {"image": logits[rows], "y": labels[rows], "index": rows}
                method.validation_step(batch, step)

    def all_gather(t: torch.Tensor) -> torch.Tensor:
        assert t.is_cuda and torch.equal(t, shards[t.dtype][0])  # rank 0's rows, on the GPU
        return torch.stack(shards[t.dtype])

    method.all_gather = all_gather
    outputs, targets = method.gather_eval()
    assert outputs.device.type == targets.device.type == "cpu"
    assert torch.equal(outputs, logits.cpu()) and torch.equal(targets, labels.cpu())
