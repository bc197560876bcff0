"""The built-in synthetic benchmark: determinism, layout, cache rules, family structure,
learnability. Tiny configurations (32 px, 3 images per class) keep each test to a few seconds."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from owdfa_bench import cache
from owdfa_bench.data import synth
from owdfa_bench.data import synth_render as sr
from owdfa_bench.errors import DataError

REPO = Path(__file__).resolve().parent.parent
TINY = {"image_size": 32, "real_per_folder": 3, "fakes_per_class": 3, "strength": 1.0, "seed": 0}


def tiny_cfg(root: Path, **generator) -> dict:
    gen = {k: v for k, v in TINY.items() if k != "image_size"} | generator
    return {"root": str(root), "image_size": TINY["image_size"], "generator": gen}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return synth.generate_synth_dataset(tmp_path_factory.mktemp("synth") / "tiny", **TINY)


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def by_code() -> dict[str, synth.SynthClass]:
    return {c.code: c for c in synth.load_registry()}


def test_generating_twice_gives_identical_files_and_manifest_hash(tiny_root, tmp_path):
    again = synth.generate_synth_dataset(tmp_path / "again", **TINY)
    first, second = manifest(tiny_root), manifest(again)
    assert first["manifest_sha256"] == second["manifest_sha256"]
    assert first["files"] == second["files"]
    some = first["files"][::40]
    for entry in some:  # the listed hash is the hash of the bytes on disk
        data = (again / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]


def test_worker_count_does_not_change_the_output(tiny_root, tmp_path):
    two = synth.generate_synth_dataset(tmp_path / "two", workers=2, **TINY)  # child processes
    assert manifest(two)["manifest_sha256"] == manifest(tiny_root)["manifest_sha256"]


def test_layout_matches_the_registry(tiny_root):
    classes = synth.load_registry()
    assert len(classes) == 41
    folders = sorted(p.name for p in tiny_root.iterdir() if p.is_dir())
    assert folders == sorted(f for c in classes for f in c.folders)
    assert "0_Real_CelebDF" in folders and "0_Real_FF++" in folders
    for cls in classes:
        for folder in cls.folders:
            assert folder.split("_")[0] == str(cls.index)
            files = sorted((tiny_root / folder).glob("*.png"))
            expected = TINY["real_per_folder"] if cls.family == "REAL" else TINY["fakes_per_class"]
            assert [f.name for f in files] == [f"{i:05d}.png" for i in range(expected)]
    img = np.asarray(Image.open(tiny_root / "1_Swap_Deepfakes" / "00000.png"))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    m = manifest(tiny_root)
    assert m["synthetic"] is True and m["parameters"] == TINY
    assert m["num_files"] == 2 * 3 + 40 * 3 == len(m["files"])


def test_folder_type_names_match_families():
    words = {"S": "Swap", "R": "Reenact", "E": "Edit", "G": "Generate", "REAL": "Real"}
    for cls in synth.load_registry():
        for folder in cls.folders:
            assert folder.split("_")[1] == words[cls.family], folder


def test_png_encoder_round_trips_exactly():
    rgb = np.random.default_rng(0).integers(0, 256, (40, 700, 3), dtype=np.uint8)  # > 64 kB raw
    data = sr.encode_png(rgb)
    decoded = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB"))
    assert np.array_equal(decoded, rgb)


def test_changed_parameter_changes_hash_and_stale_cache_is_rebuilt(tiny_root, tmp_path, caplog):
    root = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="owdfa_bench.data.synth")
    assert synth.ensure_synth_dataset(tiny_cfg(root)) == root
    first = manifest(root)["manifest_sha256"]
    assert first == manifest(tiny_root)["manifest_sha256"]
    stamp = (root / "manifest.json").stat().st_mtime_ns

    caplog.clear()
    synth.ensure_synth_dataset(tiny_cfg(root))  # same parameters: reused, not rewritten
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    assert "reusing" in caplog.text

    caplog.clear()
    synth.ensure_synth_dataset(tiny_cfg(root, strength=0.5))
    assert "parameters" in caplog.text and "building" in caplog.text
    second = manifest(root)
    assert second["parameters"]["strength"] == 0.5 and second["manifest_sha256"] != first

    victim = root / second["files"][5]["path"]
    victim.unlink()
    caplog.clear()
    synth.ensure_synth_dataset(tiny_cfg(root, strength=0.5))
    assert "missing" in caplog.text and victim.is_file()
    assert manifest(root)["manifest_sha256"] == second["manifest_sha256"]
    assert not list(tmp_path.glob(".cache.*"))  # no temporary or old folders left behind


def test_stale_generator_version_is_rebuilt(tmp_path, monkeypatch):
    root = synth.ensure_synth_dataset(tiny_cfg(tmp_path / "v"))
    data = manifest(root)
    data["generator_version"] = "0"
    (root / "manifest.json").write_text(json.dumps(data))
    assert "version" in synth.cache_problem(root, synth.SynthParams(**TINY))
    synth.ensure_synth_dataset(tiny_cfg(root))
    assert manifest(root)["generator_version"] == synth.GENERATOR_VERSION


def test_a_folder_that_is_not_a_synth_cache_is_never_replaced(tmp_path, tiny_root):
    precious = tmp_path / "my_data"
    precious.mkdir()
    (precious / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="my_data/keep.txt, which the synthetic") as err:
        synth.ensure_synth_dataset(tiny_cfg(precious))
    assert "\n" not in str(err.value)
    assert (precious / "keep.txt").read_text() == "user data"
    # a synth cache with a torn manifest and a file of the user's in it: not replaced either
    mixed = shutil.copytree(tiny_root, tmp_path / "mixed")
    (mixed / "manifest.json").write_text("{")
    (mixed / "1_Swap_Deepfakes" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="notes.txt"):
        synth.ensure_synth_dataset(tiny_cfg(mixed))
    assert (mixed / "1_Swap_Deepfakes" / "notes.txt").is_file()


def png_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every PNG on disk under a synth cache."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.glob("*/*.png"))
    }


def counting_hashes(monkeypatch) -> list[str]:
    hashed, real = [], cache.file_digest

    def counted(path, algorithm="sha256"):
        hashed.append(str(path))
        return real(path, algorithm)

    monkeypatch.setattr(cache, "file_digest", counted)
    return hashed


def never_rebuilt(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("an intact cache was rebuilt")

    monkeypatch.setattr(synth, "generate_synth_dataset", refuse)


def test_a_copied_cache_is_reused_after_one_hash(tiny_root, tmp_path, monkeypatch, caplog):
    copy = shutil.copytree(tiny_root, tmp_path / "copy")  # new inodes and ctimes: no stamp holds
    never_rebuilt(monkeypatch)
    hashed = counting_hashes(monkeypatch)
    caplog.set_level(logging.INFO, logger="owdfa_bench.data.synth")
    assert synth.ensure_synth_dataset(tiny_cfg(copy)) == copy
    assert sorted(hashed) == sorted(str(copy / p) for p in png_digests(tiny_root))  # once each
    assert synth.ensure_synth_dataset(tiny_cfg(copy)) == copy
    assert len(hashed) == manifest(tiny_root)["num_files"]  # re-stamped: read nothing again
    assert caplog.text.count("reusing") == 2 and "building" not in caplog.text


@pytest.mark.parametrize("how", ["rename", "copy keeping mtimes"])
def test_images_swapped_between_classes_are_detected_and_rebuilt(tiny_root, tmp_path, how, caplog):
    root = shutil.copytree(tiny_root, tmp_path / "cache")
    synth.ensure_synth_dataset(tiny_cfg(root))  # checked once: stamped
    original = png_digests(tiny_root)
    a, b = "1_Swap_Deepfakes/00000.png", "2_Swap_FaceSwap/00000.png"
    assert (root / a).stat().st_size == (root / b).stat().st_size and original[a] != original[b]
    spare = tmp_path / "spare.png"
    if how == "rename":
        (root / a).rename(spare)
        (root / b).rename(root / a)
        spare.rename(root / b)
    else:  # the same size, mtimes copied along: only ctime tells
        shutil.copy2(root / a, spare)
        shutil.copy2(root / b, root / a)
        shutil.copy2(spare, root / b)
    assert png_digests(root)[a] == original[b]
    caplog.set_level(logging.INFO, logger="owdfa_bench.data.synth")
    synth.ensure_synth_dataset(tiny_cfg(root))
    assert "2 of 126 PNGs differ from the manifest's SHA-256" in caplog.text
    assert png_digests(root) == original  # rebuilt: the same images as before the swap


def test_a_torn_manifest_rebuilds_the_default_cache_in_one_line(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("OWDFA_BENCH_CACHE", str(tmp_path))
    cfg = tiny_cfg(tmp_path) | {"root": None}  # data.root never set: the default cache
    root = synth.ensure_synth_dataset(cfg)
    assert root.parent == tmp_path
    before = manifest(root)
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text[: len(text) // 2])  # killed mid-write
    caplog.set_level(logging.INFO, logger="owdfa_bench.data.synth")
    assert synth.ensure_synth_dataset(cfg) == root
    assert manifest(root) == before
    lines = [r.getMessage() for r in caplog.records if "manifest" in r.getMessage()]
    assert len(lines) == 1 and "no readable synth manifest.json" in lines[0]
    assert "data.root" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_a_full_check_on_request_hashes_every_png(tiny_root, tmp_path, monkeypatch):
    root = shutil.copytree(tiny_root, tmp_path / "full")
    synth.ensure_synth_dataset(tiny_cfg(root))  # stamped
    never_rebuilt(monkeypatch)
    hashed = counting_hashes(monkeypatch)
    synth.ensure_synth_dataset(tiny_cfg(root))
    assert hashed == []
    monkeypatch.setenv(cache.CHECK_ENV, "full")
    synth.ensure_synth_dataset(tiny_cfg(root))
    assert len(hashed) == manifest(root)["num_files"]


def test_interrupted_generation_leaves_no_cache(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth.render_sample

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "render_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        synth.generate_synth_dataset(tmp_path / "cut", **TINY)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_root_is_keyed_by_parameters(monkeypatch, tmp_path):
    monkeypatch.setenv("OWDFA_BENCH_CACHE", str(tmp_path))
    a = synth.default_cache_root(synth.SynthParams())
    b = synth.default_cache_root(synth.SynthParams(strength=0.5))
    assert a.parent == tmp_path and a.name.startswith("synth-") and a != b


def test_budgets_larger_than_the_generated_set_are_refused(tmp_path):
    cfg = tiny_cfg(tmp_path / "b") | {"budgets": {"known": 40, "novel": 2, "real_per_folder": 2}}
    with pytest.raises(ValueError, match="data.budgets.known=40"):
        synth.ensure_synth_dataset(cfg)


def test_the_generator_values_have_one_source_the_yaml():
    cfg = yaml.safe_load((REPO / "conf" / "data" / "synth.yaml").read_text())
    assert cfg["name"] == "synth" and cfg["synthetic"] is True
    assert synth.synth_params_from_config(cfg) == synth.SynthParams()  # defaults: the YAML's
    assert synth.SynthParams().strength == cfg["generator"]["strength"]
    assert not hasattr(synth, "DEFAULT_STRENGTH")
    with pytest.raises(KeyError, match="generator"):  # no code default behind a missing key
        synth.synth_params_from_config({"image_size": 32})


@pytest.mark.parametrize("code", ["S1", "S8", "R1", "R9", "E1", "E4", "G2", "G9"])
def test_a_fake_differs_from_its_source_where_its_family_manipulates(code):
    cls = by_code()[code]
    params = synth.SynthParams(image_size=64)
    inside = outside = 0.0
    changed = []
    for i in range(6):
        r = synth.render_sample(cls, 0, i, params, with_source=True)
        diff = np.abs(r.image.astype(float) - r.source.astype(float)).mean(2)
        region = sr.gaussian_blur(r.region, 2.0) > 0.01  # JPEG blocks leak a little beyond it
        inside += diff[region].sum()
        outside += diff[~region].sum()
        changed.append((diff > 3).mean())
    if cls.family == "G":  # a whole generated image: changed everywhere
        assert np.mean(changed) > 0.4
    else:
        assert inside / (inside + outside) > 0.85
        assert 0.005 < np.mean(changed) < 0.4


def test_family_regions_differ_in_size():
    params = synth.SynthParams(image_size=64)
    codes = by_code()
    area = {
        fam: np.mean(
            [
                synth.render_sample(codes[c], 0, i, params, with_source=True).region.mean()
                for i in range(4)
            ]
        )
        for fam, c in [("S", "S3"), ("R", "R3"), ("G", "G4")]
    }
    assert area["G"] == 1.0 and 0.05 < area["S"] < 0.3 and 0.03 < area["R"] < 0.3


def test_at_strength_zero_the_methods_of_a_family_share_one_pipeline():
    codes = by_code()
    img = sr.render_face(
        sr.sample_identity(np.random.default_rng(1)), sr.sample_scene(np.random.default_rng(2)), 32
    )[0]
    ref = synth.family_reference("S")
    outs = {
        s: [
            synth.apply_fingerprint(
                img, synth.method_fingerprint(codes[c]), ref, s, np.random.default_rng(3)
            )
            for c in ("S1", "S3")
        ]
        for s in (0.0, 1.0)
    }
    assert np.array_equal(outs[0.0][0], outs[0.0][1])
    assert np.abs(outs[1.0][0] - outs[1.0][1]).mean() > 1 / 255


def test_fingerprints_are_fixed_per_method_and_follow_the_family():
    codes = by_code()
    fps = {c: synth.method_fingerprint(codes[c]) for c in codes if c != "REAL"}
    assert len(set(fps.values())) == 40  # every method has its own
    synth.method_fingerprint.cache_clear()
    assert synth.method_fingerprint(codes["S1"]) == fps["S1"]  # from the class index alone
    for code in synth.DIFFUSION_CODES:  # no periodic upsampling traces, noise residue instead
        assert fps[code].upsampler in sr.RESAMPLE_KERNELS and fps[code].upsampler != "nearest"
        assert fps[code].noise[0] > 3.5 / 255
    for code in synth.LATENT_DIFFUSION_CODES:  # the VAE's 8-pixel grid
        assert all(abs(w[0]) in (0.0, 0.125) and abs(w[1]) in (0.0, 0.125) for w in fps[code].waves)
    with pytest.raises(ValueError, match="REAL"):
        synth.method_fingerprint(codes["REAL"])


def test_bad_parameters_are_refused_with_the_key_name():
    with pytest.raises(ValueError, match="image_size"):
        synth.SynthParams(image_size=30)
    with pytest.raises(ValueError, match="strength"):
        synth.SynthParams(strength=-1)


def test_preview_grid_and_cli(tiny_root, tmp_path, capsys):
    out = synth.write_preview(tiny_root, tmp_path / "grid.png", per_class=2)
    w, h = Image.open(out).size
    assert w > 400 and h > 600
    assert (
        synth.cli_synth_preview(
            ["--root", str(tiny_root), "--out", str(tmp_path / "c.png"), "--per-class", "2"]
        )
        == 0
    )
    assert (tmp_path / "c.png").is_file() and "synthetic" in capsys.readouterr().out
    assert manifest(tiny_root)["parameters"] == TINY  # previewing an existing cache keeps it


def spectral_features(img: np.ndarray) -> np.ndarray:
    """Phase-free traces: log-magnitude spectrum of the high-pass residual, plus colour spread."""
    x = img.astype(np.float64) / 255
    g = x.mean(2)
    lap = g - 0.25 * (np.roll(g, 1, 0) + np.roll(g, -1, 0) + np.roll(g, 1, 1) + np.roll(g, -1, 1))
    spec = np.log1p(10 * np.abs(np.fft.fft2(lap)))
    n = spec.shape[0]
    spec = spec.reshape(n // 2, 2, n // 2, 2).mean((1, 3))
    return np.concatenate([spec.ravel(), x.reshape(-1, 3).std(0)])


def probe_accuracy(names: list[str], strength: float, per_class: int = 36) -> float:
    """Held-out accuracy of a logistic regression on spectral features (32 px images)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    codes, params = by_code(), synth.SynthParams(image_size=32, strength=strength)
    x = [
        spectral_features(synth.render_sample(codes[code], 0, i, params).image)
        for code in names
        for i in range(per_class)
    ]
    y = np.repeat(np.arange(len(names)), per_class)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[: len(y) * 2 // 3], order[len(y) * 2 // 3 :]
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    probe.fit(np.array(x)[train], y[train])
    return float((probe.predict(np.array(x)[test]) == y[test]).mean())


def test_methods_are_separable_by_a_linear_probe_on_spectral_features():
    """Fast learnability check: two swap methods, a GAN and a latent-diffusion generator."""
    assert probe_accuracy(["S1", "S3", "G2", "G7"], strength=synth.SynthParams().strength) > 0.8


def test_at_strength_zero_only_the_family_separates_methods():
    assert probe_accuracy(["S1", "S3"], strength=0.0) < 0.7  # chance is 0.5
    assert probe_accuracy(["S1", "G2"], strength=0.0) > 0.85


@pytest.mark.slow
def test_a_small_cnn_learns_four_classes_in_a_few_epochs():
    """Learnability pin (~12 s on one thread): not trivial after one epoch, learnt after 20."""
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    codes, params = by_code(), synth.SynthParams(image_size=64)
    names, per_class = ["REAL", "S1", "S3", "G7"], 60
    images, labels = [], []
    for label, code in enumerate(names):
        for i in range(per_class):
            folder = i % 2 if code == "REAL" else 0
            images.append(synth.render_sample(codes[code], folder, i, params).image)
            labels.append(label)
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.tensor(labels)

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    net = nn.Sequential(
        *block(3, 32, 1),
        *block(32, 32, 2),
        *block(32, 64, 2),
        *block(64, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, len(names)),
    )
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    train, test = order[: len(y) * 3 // 4], order[len(y) * 3 // 4 :]
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    accuracy = []
    for _ in range(20):
        net.train()
        for batch in train[torch.randperm(len(train), generator=gen)].split(32):
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            accuracy.append((net(x[test]).argmax(1) == y[test]).float().mean().item())
    assert accuracy[0] < 0.7  # not solved instantly
    assert max(accuracy[-3:]) > 0.8  # chance is 0.25
