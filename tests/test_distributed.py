"""The helpers that keep DDP replicas equal (owdfa_bench/distributed.py), run for real on two
gloo processes (torch.multiprocessing), and the methods' state updates built on them: two ranks
that each see half of a batch end with the state one process computes from the whole batch
(rank 0's rows first). No model is trained (`tests/test_ddp.py` trains every method); the
multi-process tests are marked `cluster` (`make test-cluster`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, TINY_SYNTH

from owdfa_bench import distributed as ddp
from owdfa_bench.distributed import ReplicaCheck, ReplicaDivergence, value_digest

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fn, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        torch.save(fn(rank), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def on_two_ranks(fn) -> list:
    """`fn(rank)` in each of two gloo processes; their return values, rank 0's first."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(free_port(), fn, out), nprocs=WORLD, join=True)
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def halves(t: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank `rank`'s half of a batch: rank 0 the first rows."""
    return t.chunk(WORLD)[rank]


# ----------------------------------------------------------------------------- helpers
def _gather_checks(rank: int) -> dict:
    rows = torch.arange(3 + 2 * rank, dtype=torch.float32).unsqueeze(1) + 10 * rank  # 3 and 5
    gathered, start = ddp.gather_rows_and_start(rows)
    # a sharded split of 5 rows: rank 0 rows 0, 2, 4; rank 1 rows 1, 3, 0 (0 repeated)
    index = torch.tensor([[0, 2, 4], [1, 3, 0]][rank])
    ordered_index, values = ddp.rows_in_order(index, index.float() * 2)
    return {
        "gathered": gathered,
        "start": start,
        "sum": ddp.sum_over_ranks(torch.tensor([1.0, rank])),
        "broadcast": ddp.from_rank_zero({"k": 7} if rank == 0 else None),
        "every": ddp.all_ranks(rank * 3),
        "index": ordered_index,
        "values": values,
        "rank": ddp.global_rank(),
    }


@pytest.mark.cluster
def test_the_helpers_on_two_processes():
    r0, r1 = on_two_ranks(_gather_checks)
    expected = torch.cat([torch.arange(3.0), torch.arange(5.0) + 10]).unsqueeze(1)
    for r in (r0, r1):
        assert torch.equal(r["gathered"], expected)
        assert torch.equal(r["sum"], torch.tensor([2.0, 1.0]))
        assert r["broadcast"] == {"k": 7} and r["every"] == [0, 3]
        assert torch.equal(r["index"], torch.arange(5)) and torch.equal(
            r["values"], torch.arange(5.0) * 2
        )
    assert (r0["start"], r1["start"]) == (0, 3) and (r0["rank"], r1["rank"]) == (0, 1)


def test_the_helpers_are_identities_in_one_process():
    t = torch.randn(4, 3)
    assert ddp.gather_rows(t) is t and ddp.sum_over_ranks(t) is t
    assert ddp.gather_rows_and_start(t) == (t, 0) and ddp.from_rank_zero(t) is t
    index = torch.tensor([2, 0, 1])
    assert ddp.rows_in_order(index, t[:3])[1] is not None
    assert ddp.all_ranks("x") == ["x"] and ddp.world_size() == 1


def test_value_digest_tells_contents_apart():
    a = torch.arange(6.0).reshape(2, 3)
    assert value_digest(a) == value_digest(a.clone())
    assert value_digest(a) != value_digest(a + 1e-7)
    assert value_digest(a) != value_digest(a.reshape(3, 2))  # same bytes, other shape
    assert value_digest(torch.tensor(1.0)) != value_digest(torch.tensor(1.0, dtype=torch.float64))
    assert value_digest({"a": [1, 2.5], "b": None}) == value_digest({"b": None, "a": [1, 2.5]})
    assert value_digest({"a": [1, 2.5]}) != value_digest({"a": [1, 2.6]})
    n = np.arange(4, dtype=np.int64)  # numpy arrays: by dtype, shape and bytes
    assert value_digest(n) == value_digest(n.copy()) != value_digest(n.astype(np.int32))


class _Trainer:
    world_size = 2


def test_replica_check_names_what_differs(monkeypatch):
    check = ReplicaCheck()
    theirs = {"parameter head.weight": "1", "method state conf_stats": "x", "same": "s"}
    ours = {"parameter head.weight": "1", "method state conf_stats": "y", "same": "s"}
    monkeypatch.setattr(ddp, "all_ranks", lambda value: [ours, theirs])
    with pytest.raises(ReplicaDivergence, match=r"epoch 3 .*rank 1: method state conf_stats"):
        check.compare(_Trainer(), ours, "epoch 3")
    monkeypatch.setattr(ddp, "all_ranks", lambda value: [ours, dict(ours)])
    assert check.compare(_Trainer(), ours, "epoch 3") == [ours, ours]


# ----------------------------------------------------------------------------- methods' state
def method_inputs() -> tuple[torch.Tensor, ...]:
    """A global batch of 8 rows (each rank takes half): weak and strong logits, their softmax,
    a selection, a proxy memory, features and their proxies."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g)
    strong = torch.randn(8, 5, generator=g)
    selected = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    memory = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    feats = torch.randn(8, 4, generator=g)
    rows = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2])
    return logits, strong, logits.softmax(1), selected, memory, feats, rows


def _method_states(rank: int) -> dict:
    from methods.cal import confidence_statistics
    from methods.legogcd import update_class_prior
    from methods.lps import class_distribution
    from methods.palgcd import update_proxy_memory
    from methods.protogcd import dapl_targets

    logits, strong, probs, selected, memory, feats, rows = method_inputs()
    mine = lambda t: halves(t, rank)  # noqa: E731
    _, hard = dapl_targets(mine(probs), 0.5)
    return {
        "cal": confidence_statistics(mine(logits), mine(strong), 2).summed_over_ranks(),
        "prior": update_class_prior(torch.full((5,), 0.2), ddp.gather_rows(mine(logits)), 0.9),
        "lps": class_distribution(mine(probs), mine(selected)),
        "memory": update_proxy_memory(
            memory, ddp.gather_rows(mine(feats)), ddp.gather_rows(mine(rows)), 0.2
        ),
        "dapl_hard": ddp.gather_rows(hard),
    }


@pytest.mark.cluster
def test_method_state_from_two_half_batches_equals_one_process():
    from methods.cal import confidence_statistics
    from methods.legogcd import update_class_prior
    from methods.palgcd import update_proxy_memory
    from methods.protogcd import dapl_targets

    logits, strong, probs, selected, memory, feats, rows = method_inputs()
    one = {
        "cal": confidence_statistics(logits, strong, 2),
        "prior": update_class_prior(torch.full((5,), 0.2), logits, 0.9),
        "lps": probs[selected].sum(0) / probs[selected].sum(),
        "memory": update_proxy_memory(memory, feats, rows, 0.2),
        "dapl_hard": dapl_targets(probs, 0.5)[1],
    }
    for state in on_two_ranks(_method_states):
        assert state["cal"].count_known == one["cal"].count_known
        assert state["cal"].count_novel == one["cal"].count_novel
        assert state["cal"].sum_known == pytest.approx(one["cal"].sum_known, rel=1e-6)
        assert state["cal"].sum_novel == pytest.approx(one["cal"].sum_novel, rel=1e-6)
        for key in ("prior", "lps", "memory"):
            torch.testing.assert_close(state[key], one[key], rtol=1e-6, atol=1e-7)
        assert torch.equal(state["dapl_hard"], one["dapl_hard"])  # global quota and ranking


def _owmatch_codes(rank: int) -> dict:
    from methods.owmatch import push_queue, sinkhorn_codes

    g = torch.Generator().manual_seed(1)
    pinned = torch.randn(8, 4, generator=g)
    queue = torch.randn(6, 4, generator=g)
    pushed, start = ddp.gather_rows_and_start(halves(pinned, rank))
    grown = push_queue(queue, pushed, 16)
    codes = sinkhorn_codes(grown)[-len(pushed) :][start : start + 4]
    return {"queue": grown, "codes": codes}


@pytest.mark.cluster
def test_owmatch_queue_and_codes_from_two_half_batches_equal_one_process():
    from methods.owmatch import push_queue, sinkhorn_codes

    g = torch.Generator().manual_seed(1)
    pinned = torch.randn(8, 4, generator=g)
    queue = torch.randn(6, 4, generator=g)
    grown = push_queue(queue, pinned, 16)
    codes = sinkhorn_codes(grown)[-8:]
    r0, r1 = on_two_ranks(_owmatch_codes)
    assert torch.equal(r0["queue"], grown) and torch.equal(r1["queue"], grown)
    torch.testing.assert_close(torch.cat([r0["codes"], r1["codes"]]), codes)


# ----------------------------------------------------------------------------- the runner
@pytest.mark.cluster
def test_a_ddp_cell_in_a_local_multirun_is_refused_in_one_line(synth_root, tmp_path):
    """Lightning would start rank 1 by running the whole sweep again."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    out = subprocess.run(
        [
            sys.executable,
            "run.py",
            "-m",
            "method=lower_bound",
            "trainer=ddp_cpu",
            "logger=none",
            f"data.root={synth_root}",
            f"output_root={tmp_path}",
            *TINY_SYNTH,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode != 0
    assert "in a multirun on one machine" in out.stderr and "hydra/launcher=slurm" in out.stderr
    assert "Initializing distributed" not in out.stdout + out.stderr  # no rank was started
