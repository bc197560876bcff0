"""The synthetic benchmark's pretrained start: disjoint corpus, cached weights, the runner's use."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from owdfa_bench import cache, pretrain
from owdfa_bench.data import synth
from owdfa_bench.data.corpus import CORPUS_INDEX_BASE, corpus_classes, render_corpus
from owdfa_bench.data.sources import SynthPretrain
from owdfa_bench.models import build_backbone
from owdfa_bench.pretrain import PretrainSettings, ensure_pretrained
from owdfa_bench.runner import run

TINY = PretrainSettings(
    image_size=32,
    methods_per_family=1,
    images_per_method=4,
    real_images=4,
    epochs=1,
    batch_size=8,
)
TINY_START = {
    "methods_per_family": 1,
    "images_per_method": 4,
    "real_images": 4,
    "epochs": 1,
    "batch_size": 8,
    "lr": 0.001,
    "seed": 0,
    "threads": 1,
    "device": "cpu",
}


def test_corpus_shares_no_class_fingerprint_or_identity_with_the_benchmark():
    benchmark = synth.load_registry()
    corpus = corpus_classes(3)
    fakes = [c for c in corpus if c.family != "REAL"]
    assert len(fakes) == 12 and {c.family for c in fakes} == {"S", "R", "E", "G"}
    assert min(c.index for c in fakes) >= CORPUS_INDEX_BASE > max(c.index for c in benchmark)
    assert not {c.code for c in fakes} & {c.code for c in benchmark}
    fingerprints = {synth.method_fingerprint(c) for c in benchmark if c.family != "REAL"}
    assert not fingerprints & {synth.method_fingerprint(c) for c in fakes}
    # corpus images use another identity seed: no picture equals a benchmark picture
    images, labels = render_corpus(TINY.corpus(), workers=1)
    in_children, child_labels = render_corpus(TINY.corpus(), workers=2)
    assert np.array_equal(images, in_children) and np.array_equal(labels, child_labels)
    params = synth.SynthParams(image_size=32, seed=TINY.generator_seed)
    bench_real = np.stack([synth.render_real(f, i, params).image for f in (0, 1) for i in range(4)])
    assert images.shape == (4 + 4 * 4, 32, 32, 3) and labels.tolist()[:4] == [0] * 4
    assert not any(np.array_equal(a, b) for a in images[:4] for b in bench_real)


def test_weights_are_built_once_cached_and_loaded_by_the_backbone(tmp_path):
    first = ensure_pretrained(TINY, tmp_path / "start")
    mtime = (tmp_path / "start" / "backbone.safetensors").stat().st_mtime_ns
    again = ensure_pretrained(TINY, tmp_path / "start")
    assert again["weights_sha256"] == first["weights_sha256"]
    assert (tmp_path / "start" / "backbone.safetensors").stat().st_mtime_ns == mtime  # reused
    assert 0.0 <= first["scores"]["held_out_acc"] <= 1.0
    state = load_file(first["weights"])
    assert not any(k.startswith("fc.") for k in state)  # the corpus classifier is dropped
    model = build_backbone("resnet18", weights=first["weights"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # a manifest that does not match (other settings) is rebuilt, never reused
    manifest = json.loads((tmp_path / "start" / "manifest.json").read_text())
    manifest["settings"]["epochs"] = 99
    (tmp_path / "start" / "manifest.json").write_text(json.dumps(manifest))
    rebuilt = ensure_pretrained(TINY, tmp_path / "start")
    assert rebuilt["settings"]["epochs"] == 1


def test_runner_starts_from_the_cached_weights_and_records_them(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("OWDFA_BENCH_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg("method=lower_bound")
    OmegaConf.update(cfg, "data.pretrain", SynthPretrain(**TINY_START), merge=False)
    record = run(cfg)
    start = record["pretrained_start"]
    assert record["status"] == "complete" and start["settings"]["methods_per_family"] == 1
    assert start["settings"]["image_size"] == 32  # follows data.image_size
    weights = next((tmp_path / "cache").glob("pretrain-*/backbone.safetensors"))
    assert start["weights_sha256"] and weights.is_file()
    # its time (built here) is reported apart from training: not in wall_s
    setup = record["setup_s"]
    assert set(setup) == {"data", "pretrained_start"} and setup["pretrained_start"] > 0
    built_s = json.loads((weights.parent / "manifest.json").read_text())["total_s"]
    assert setup["pretrained_start"] >= built_s - 0.1
    from_scratch = run(make_cfg("method=lower_bound", f"output_root={tmp_path / 'scratch'}"))
    assert "pretrained_start" not in from_scratch and set(from_scratch["setup_s"]) == {"data"}


def test_a_flipped_byte_in_the_cached_weights_is_caught_and_rebuilt(tmp_path, monkeypatch, caplog):
    root = tmp_path / "start"
    first = ensure_pretrained(TINY, root)
    weights = root / pretrain.WEIGHTS_FILE
    hashed, real = [], cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda *a: hashed.append(a) or real(*a))
    ensure_pretrained(TINY, root)
    assert hashed == []  # reused on its stamp: the weights are not read
    st = weights.stat()
    with open(weights, "r+b") as f:  # one byte flipped in place: same size, same inode
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.file_digest(weights) != first["weights_sha256"]
    caplog.set_level(logging.INFO, logger="owdfa_bench.pretrain")
    rebuilt = ensure_pretrained(TINY, root)
    assert "backbone.safetensors does not match the SHA-256 in the manifest" in caplog.text
    assert cache.file_digest(weights) == rebuilt["weights_sha256"]


def test_the_start_trains_on_the_runs_threads_and_each_thread_count_has_its_own_start(
    monkeypatch,
):
    """`data.pretrain.threads` is the run's `trainer.threads` (all cores when null); the weights
    depend on the thread count, so it is part of the start's key."""
    from owdfa_bench.config import compose_config

    def start_of(*overrides: str) -> PretrainSettings:
        cfg = compose_config(["data=synth", *overrides])
        return pretrain.settings_from_config(cfg.data.pretrain, cfg.data)

    one, two = start_of("trainer.threads=1"), start_of("trainer.threads=2")
    assert (one.threads, two.threads) == (1, 2) and one.key() != two.key()
    assert start_of("trainer.threads=null").threads == torch.get_num_threads()
    assert start_of("trainer.threads=1", "data.pretrain.threads=2") == two  # pinned
    seen = []
    monkeypatch.setattr(pretrain, "_train", lambda *a: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    pretrain.pretrain_backbone(PretrainSettings(threads=2), np.zeros((1, 32, 32, 3)), np.zeros(1))
    assert seen == [2] and torch.get_num_threads() == before  # restored afterwards


def test_the_sweeps_behind_the_committed_tables_keep_their_start():
    """results/synth_* were computed from the start built at 2 threads (key 0058abd2c8): the
    sweeps that extend them pin it, whatever their one-thread jobs would build."""
    from owdfa_bench.config import compose_config

    for sweep in ("synth_benchmark", "synth_unknown_k", "synth_protocols", "synth_cpl_baselines"):
        cfg = compose_config([f"+sweep={sweep}", "method=cal", "seed=2025"])
        assert cfg.trainer.threads == 1
        settings = pretrain.settings_from_config(cfg.data.pretrain, cfg.data)
        assert settings.threads == 2 and settings.key() == "0058abd2c8", sweep
