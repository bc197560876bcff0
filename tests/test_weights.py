"""Pretrained weights without internet: the fetch-weights cache, a local file, one clear line."""

from __future__ import annotations

import hashlib
import logging
import os

import pytest
import timm
import torch

from owdfa_bench.models import build_backbone
from owdfa_bench.weights import (
    MissingWeightsError,
    cached_weights_path,
    digest_file,
    fetch_weights,
)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty caches: the Hub must not be reachable from the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when first imported: set what it read, so that no
    # download is tried (it would wait for a network timeout)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("OWDFA_BENCH_CACHE", str(tmp_path / "cache"))


def fake_download(monkeypatch) -> None:
    """Stand in for timm's download: a seeded random resnet18 (what a Hub file would hold)."""
    create = timm.create_model

    def create_offline(name, pretrained=False, **kwargs):
        torch.manual_seed(0)
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_offline)


def test_missing_weights_fail_in_one_line_naming_them_and_the_three_ways(offline):
    with pytest.raises(MissingWeightsError) as err:
        build_backbone("resnet18", pretrained=True)
    message = str(err.value)
    assert "\n" not in message and "resnet18" in message
    assert "owdfa-bench fetch-weights --name resnet18" in message
    assert "data.backbone.weights=" in message and "HF_HUB_OFFLINE=1" in message
    assert str(cached_weights_path("resnet18")) in message


def test_fetched_weights_are_used_offline_from_the_cache(offline, monkeypatch):
    with monkeypatch.context() as patch:
        fake_download(patch)
        path = fetch_weights("resnet18")
    assert path == cached_weights_path("resnet18") and path.is_file()
    torch.manual_seed(0)
    expected = timm.create_model("resnet18", pretrained=False)
    model = build_backbone("resnet18", pretrained=True)  # no network: the cached file
    state = model.state_dict()
    assert "fc.weight" not in state
    assert all(torch.equal(state[k], v) for k, v in expected.state_dict().items() if k in state)


def test_a_local_weights_file_is_loaded_and_a_missing_one_is_named(offline, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="data.backbone.weights="):
        build_backbone("resnet18", weights=str(tmp_path / "nope.safetensors"))
    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False)
    save_file(source.state_dict(), str(tmp_path / "mine.safetensors"))
    model = build_backbone("resnet18", weights=str(tmp_path / "mine.safetensors"))
    assert torch.equal(model.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])


def test_cli_lists_fetch_weights():
    from owdfa_bench.cli import COMMANDS

    assert COMMANDS["fetch-weights"][0] == "owdfa_bench.weights"


def test_cached_weights_are_checked_against_their_digest_file(offline, monkeypatch, caplog):
    with monkeypatch.context() as patch:
        fake_download(patch)
        path = fetch_weights("resnet18")
    recorded = digest_file(path)
    digest = recorded.read_text().split()[0]
    assert recorded.read_text() == f"{digest}  resnet18.safetensors\n"
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    build_backbone("resnet18", pretrained=True)  # intact: used

    st = path.stat()
    with open(path, "r+b") as f:  # one byte flipped in place: same size, mtime set back
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(MissingWeightsError, match="do not match the SHA-256") as err:
        build_backbone("resnet18", pretrained=True)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "owdfa-bench fetch-weights --name resnet18" in message

    recorded.unlink()  # a file fetched before digests were written: recorded at first use
    caplog.set_level(logging.INFO, logger="owdfa_bench.weights")
    build_backbone("resnet18", pretrained=True)
    assert recorded.is_file() and "recording it" in caplog.text
    assert recorded.read_text().split()[0] == hashlib.sha256(path.read_bytes()).hexdigest()
