"""ImageNet weights of the paper recipe, on machines without internet.

The references start from timm's ImageNet ResNet-50 (`resnet50.ram_in1k`, what timm 0.4.12
loaded as `resnet50`), which timm downloads from the Hugging Face Hub on first use. Cluster
compute nodes typically have no internet, so there are three ways to give a run its weights:

1. `owdfa-bench fetch-weights` on a machine with internet writes them to
   `<cache>/weights/<name>.safetensors` (`$OWDFA_BENCH_CACHE`, else `~/.cache/owdfa-bench`);
   copy that file to the same place on the node (or share the cache folder), and every run with
   `data.backbone.pretrained=true` finds it there without network;
2. `data.backbone.weights=FILE`: any local timm state dict (.safetensors or .pth);
3. a Hugging Face cache that already holds them (`HF_HOME`), with `HF_HUB_OFFLINE=1`.

Without any of them, the run stops with one line saying which weights are missing and these
three ways (`MissingWeightsError`), not huggingface_hub's traceback.

`fetch-weights` writes the SHA-256 beside the weights (`<name>.safetensors.sha256`, the format
of `sha256sum`; copy it along). Every run that uses the cached file checks it against that
digest: by its stamp (`owdfa_bench.cache`, no read), or by hashing it when the stamp misses (a
copied file) or `OWDFA_BENCH_CACHE_CHECK=full` asks; a mismatch stops the run in one line naming
the file. A cached file without a digest (fetched by an older version, or copied alone) gets one
at its first use.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

from owdfa_bench.cache import (
    STAMPS_FILE,
    atomic_path,
    cache_base,
    content_mismatches,
    file_digest,
    stamp_files,
    write_bytes_atomic,
)
from owdfa_bench.errors import MissingWeightsError as MissingWeightsError  # its home is errors

log = logging.getLogger(__name__)

PAPER_BACKBONE = "resnet50.ram_in1k"


def cached_weights_path(name: str) -> Path:
    """Where `fetch-weights` puts the weights of timm model `name`."""
    return cache_base() / "weights" / f"{name}.safetensors"


def digest_file(weights: Path) -> Path:
    """`<weights>.sha256`, beside the weights."""
    return weights.with_name(weights.name + ".sha256")


def record_digest(weights: Path) -> str:
    """Hash `weights` once, write its digest file and stamp it; returns the SHA-256. A folder
    that cannot be written (a shared read-only cache) is left as it is."""
    digest = file_digest(weights)
    try:
        write_bytes_atomic(digest_file(weights), f"{digest}  {weights.name}\n".encode())
        stamp_files(weights.parent, {weights.name: digest}, weights.parent / STAMPS_FILE)
    except OSError as err:
        log.debug("cannot record the SHA-256 of %s: %s", weights, err)
    return digest


def check_cached_weights(weights: Path, name: str) -> None:
    """Raise MissingWeightsError (one line, naming the file) when the fetched `weights` are not
    the bytes their digest file records; record a digest for a file without one."""
    recorded = digest_file(weights)
    if not recorded.exists():
        log.info("%s: no %s yet (an older fetch, or copied alone); recording it", weights, recorded)
        record_digest(weights)
        return
    words = recorded.read_text(errors="replace").split()
    digest = words[0].lower() if words and re.fullmatch(r"[0-9a-fA-F]{64}", words[0]) else None
    if digest is None or content_mismatches(
        weights.parent, {weights.name: digest}, weights.parent / STAMPS_FILE
    ):
        raise MissingWeightsError(
            f"data.backbone: the cached weights {weights} do not match the SHA-256 in "
            f"{recorded.name} (damaged or replaced); run `owdfa-bench fetch-weights --name "
            f"{name}` again, or copy both files again"
        )


def missing_weights_message(name: str, cause: BaseException) -> str:
    return (
        f"data.backbone: the pretrained weights of {name} are not on this machine and could not "
        f"be downloaded ({type(cause).__name__}). Either run `owdfa-bench fetch-weights --name "
        f"{name}` on a machine with internet and copy {cached_weights_path(name)} here, or set "
        f"data.backbone.weights=/path/to/{name}.safetensors, or use a Hugging Face cache that "
        "holds them with HF_HUB_OFFLINE=1."
    )


def resolve_backbone(backbone: dict[str, Any]) -> dict[str, Any]:
    """The backbone config with `weights` filled from the fetch-weights cache when it exists.

    Only for `pretrained: true` without explicit `weights`; otherwise unchanged. The cached
    file is checked against its digest file first (`check_cached_weights`).
    """
    if not backbone.get("pretrained") or backbone.get("weights"):
        return dict(backbone)
    cached = cached_weights_path(str(backbone["name"]))
    if not cached.is_file():
        return dict(backbone)
    check_cached_weights(cached, str(backbone["name"]))
    return {**backbone, "weights": str(cached)}


def fetch_weights(name: str = PAPER_BACKBONE, dest: Path | None = None) -> Path:
    """Download timm's pretrained `name` (needs internet) and save its state dict locally."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(name, pretrained=True)
    dest = Path(dest) if dest else cached_weights_path(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(dest) as tmp:
        save_file(state, str(tmp))
    record_digest(dest)
    return dest


def cli_fetch_weights(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="owdfa-bench fetch-weights",
        description="Download timm ImageNet weights once (on a machine with internet) and keep "
        "them in the owdfa-bench cache, where offline runs find them.",
    )
    parser.add_argument("--name", default=PAPER_BACKBONE, help="timm model name")
    parser.add_argument("--out", type=Path, default=None, help="file (default: the cache)")
    args = parser.parse_args(argv)
    path = fetch_weights(args.name, args.out)
    print(f"{args.name}: weights written to {path} (SHA-256 in {digest_file(path).name})")
    if args.out:
        print(f"runs use them with data.backbone.weights={path}")
    return 0
