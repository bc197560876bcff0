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
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from owdfa_bench.cache import cache_base
from owdfa_bench.errors import MissingWeightsError as MissingWeightsError  # its home is errors

PAPER_BACKBONE = "resnet50.ram_in1k"


def cached_weights_path(name: str) -> Path:
    """Where `fetch-weights` puts the weights of timm model `name`."""
    return cache_base() / "weights" / f"{name}.safetensors"


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

    Only for `pretrained: true` without explicit `weights`; otherwise unchanged.
    """
    if not backbone.get("pretrained") or backbone.get("weights"):
        return dict(backbone)
    cached = cached_weights_path(str(backbone["name"]))
    return {**backbone, "weights": str(cached)} if cached.is_file() else dict(backbone)


def fetch_weights(name: str = PAPER_BACKBONE, dest: Path | None = None) -> Path:
    """Download timm's pretrained `name` (needs internet) and save its state dict locally."""
    import timm
    from safetensors.torch import save_file

    from owdfa_bench.cache import atomic_path

    model = timm.create_model(name, pretrained=True)
    dest = Path(dest) if dest else cached_weights_path(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(dest) as tmp:
        save_file(state, str(tmp))
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
    print(f"{args.name}: weights written to {path}")
    if args.out:
        print(f"runs use them with data.backbone.weights={path}")
    return 0
