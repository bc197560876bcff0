"""The synthetic benchmark's pretrained start: supervised pretraining on a disjoint corpus.

In the papers every method starts from an ImageNet-pretrained ResNet-50, whose features already
separate forgery types somewhat before any open-world training; from scratch and at CPU budgets
the open-world methods cannot leave the known classes. ImageNet is disjoint from the forgeries,
so the synthetic analogue is a corpus disjoint from the benchmark: synthetic forgery "methods"
whose fingerprints are drawn for class indices the benchmark never uses (1000 on), applied to
faces of other identities (another identity seed), plus real renders of those identities. A
backbone is trained to tell the corpus's methods apart, and its weights (classifier removed)
are the start of every method on `data=synth`. No image, identity, fingerprint or label of the
benchmark is used.

The corpus lives in memory only; the weights are written once as safetensors under the synth
cache folder, keyed by the settings (and the generator version), with a manifest holding the
settings, the SHA-256 of the weights and the corpus's held-out accuracy. On reuse the weights
are checked against that SHA-256 (`cache_problem`); a mismatch rebuilds them. Concurrent runs (a
joblib sweep) wait on a file lock and reuse the first one's result.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from owdfa_bench import cache
from owdfa_bench.data import synth
from owdfa_bench.data.corpus import CorpusSpec, render_corpus
from owdfa_bench.data.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

PRETRAIN_VERSION = "1"  # bump when a change alters the corpus or the training
WEIGHTS_FILE = "backbone.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class PretrainSettings:
    """Everything the pretrained weights depend on (with the generator and pretrain versions)."""

    backbone: str = "resnet18"
    image_size: int = 32
    methods_per_family: int = 12  # corpus forgery methods per family (S, R, E, G)
    images_per_method: int = 60
    real_images: int = 600
    strength: float = field(default_factory=lambda: synth.SynthParams().strength)
    generator_seed: int = 0  # the benchmark's generator seed (the corpus offsets it)
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1.0e-3
    seed: int = 0  # initialisation, order and flips of the pretraining
    # CPU threads of the pretraining: the run's `trainer.threads` by default (conf/data/synth.yaml).
    # Part of the key, because the thread count changes the weights (measured: 1 and 2 threads
    # give different weights after one epoch): each thread count has its own start, and a sweep
    # that must give the committed synthetic tables pins the one they were built with (2).
    threads: int = 2
    device: str = "cpu"  # "cuda" for the paper-scale variant (data=synth_paper)

    def __post_init__(self) -> None:
        checks = {
            "methods_per_family": self.methods_per_family >= 1,
            "images_per_method": self.images_per_method >= 2,
            "real_images": self.real_images >= 2,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 2,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "threads": self.threads >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"data.pretrain.{key}={getattr(self, key)!r} is out of range "
                    "(counts >= 1, images >= 2, batch_size >= 2, lr > 0)"
                )

    def key(self) -> str:
        """The key in the cache folder's name `pretrain-<key>`."""
        versions = {
            "pretrain_version": PRETRAIN_VERSION,
            "generator_version": synth.GENERATOR_VERSION,
        }
        return cache.settings_hash({**versions, **asdict(self)}, length=10)

    def corpus(self) -> CorpusSpec:
        """What the corpus's pixels depend on (owdfa_bench/data/corpus.py)."""
        return CorpusSpec(
            image_size=self.image_size,
            methods_per_family=self.methods_per_family,
            images_per_method=self.images_per_method,
            real_images=self.real_images,
            strength=self.strength,
            generator_seed=self.generator_seed,
        )


def settings_from_config(pretrain_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]):
    """PretrainSettings from `data.pretrain`; backbone, size and generator follow `data`."""
    gen, backbone = data_cfg["generator"], data_cfg["backbone"]  # the schema guarantees them
    own = {
        k: v for k, v in dict(pretrain_cfg).items() if k in PretrainSettings.__dataclass_fields__
    }
    if not own.get("threads"):  # trainer.threads null or 0: all the cores torch uses
        own["threads"] = torch.get_num_threads()
    return PretrainSettings(
        **{
            "backbone": str(backbone["name"]),
            "image_size": int(data_cfg["image_size"]),
            "strength": float(gen["strength"]),
            "generator_seed": int(gen["seed"]),
            **own,
        }
    )


# ---------------------------------------------------------------------------------------------
# training data


def held_out_mask(labels: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Every 10th image of each class (deterministic) is held out to score the pretraining."""
    mask = np.zeros(len(labels), dtype=bool)
    step = max(2, round(1 / fraction))
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        mask[rows[::step]] = True
    return mask


# ---------------------------------------------------------------------------------------------
# training


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def pretrain_backbone(
    settings: PretrainSettings, images: np.ndarray, labels: np.ndarray
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Supervised training on the corpus; the backbone's state dict (no classifier) and scores.

    Adam with a cosine schedule over all steps, random horizontal flips, `settings.threads`
    CPU threads; deterministic for the settings on one machine and library build.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _train(settings, images, labels)
    finally:
        torch.set_num_threads(threads)


def _train(
    settings: PretrainSettings, images: np.ndarray, labels: np.ndarray
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    import timm

    device = torch.device(settings.device)
    held = held_out_mask(labels)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y_all = torch.from_numpy(labels)
    x_train, y_train = x_all[~torch.from_numpy(held)], y_all[~torch.from_numpy(held)]
    x_val, y_val = x_all[torch.from_numpy(held)], y_all[torch.from_numpy(held)]
    num_classes = int(labels.max()) + 1

    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        model = timm.create_model(settings.backbone, pretrained=False, num_classes=num_classes)
    model = model.to(device)
    steps_per_epoch = math.ceil(len(x_train) / settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    model.train()
    started, loss = time.perf_counter(), torch.tensor(float("nan"))
    for epoch in range(settings.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            x = _normalise(x_train[idx])
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x).to(device)
            loss = F.cross_entropy(model(x), y_train[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        log.info(
            "pretrained start: epoch %d/%d, loss %.3f, %.0f s (%d threads)",
            epoch + 1,
            settings.epochs,
            float(loss),
            time.perf_counter() - started,
            torch.get_num_threads(),
        )
    model.eval()
    with torch.no_grad():
        preds = torch.cat(
            [
                model(_normalise(x_val[i : i + 256]).to(device)).argmax(1).cpu()
                for i in range(0, len(x_val), 256)
            ]
        )
    scores = {
        "held_out_acc": round(float((preds == y_val).float().mean()), 4),
        "train_images": int(len(x_train)),
        "held_out_images": int(len(x_val)),
        "classes": num_classes,
        "steps": total_steps,
    }
    model.reset_classifier(0)
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}, scores


# ---------------------------------------------------------------------------------------------
# the cache


def default_pretrain_root(settings: PretrainSettings) -> Path:
    """`<cache base>/pretrain-<key>`, beside the synthetic data (`owdfa_bench.cache.cache_base`)."""
    return cache.cache_base() / f"pretrain-{settings.key()}"


def cache_problem(root: Path, settings: PretrainSettings) -> str | None:
    """Why the cache entry at `root` cannot serve `settings` (None: it can).

    The weights are checked against the manifest's SHA-256 by their stamp (no read), or hashed
    when the stamp misses (a copied or rewritten file) or $OWDFA_BENCH_CACHE_CHECK=full asks.
    """
    manifest = cache.read_json(root / MANIFEST_FILE)
    reason = cache.stale_reason(manifest, {"settings": asdict(settings), "key": settings.key()})
    if reason is not None:
        return reason
    if not (root / WEIGHTS_FILE).is_file():
        return f"no {WEIGHTS_FILE}"
    listed = {WEIGHTS_FILE: str(manifest.get("weights_sha256"))}
    if cache.content_mismatches(root, listed, root / cache.STAMPS_FILE):
        return f"{WEIGHTS_FILE} does not match the SHA-256 in the manifest"
    return None


def ensure_pretrained(settings: PretrainSettings, root: Path | None = None) -> dict[str, Any]:
    """The cached pretrained start for `settings`, built first if missing or stale.

    Returns the manifest, with `weights` set to the safetensors file. Concurrent callers wait on
    one lock: the first builds, the others reuse its result.
    """
    root = Path(root) if root else default_pretrain_root(settings)
    with cache.build_lock(root):
        problem = cache_problem(root, settings)
        if problem is None:
            manifest = cache.read_json(root / MANIFEST_FILE)
        else:
            manifest = _build(settings, root, problem)
    return {**manifest, "weights": str(root / WEIGHTS_FILE)}


def _build(settings: PretrainSettings, root: Path, problem: str) -> dict[str, Any]:
    """Render the corpus, pretrain, write weights then manifest (each atomically)."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    log.info(
        "pretrained start: building %s (%s; synthetic corpus, no benchmark data)", root, problem
    )
    images, labels = render_corpus(settings.corpus())
    t_render = time.perf_counter() - t0
    log.info("pretrained start: corpus of %d images rendered in %.0f s", len(labels), t_render)
    state, scores = pretrain_backbone(settings, images, labels)
    root.mkdir(parents=True, exist_ok=True)
    with cache.atomic_path(root / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    weights_sha256 = cache.file_digest(root / WEIGHTS_FILE)
    cache.stamp_files(root, {WEIGHTS_FILE: weights_sha256}, root / cache.STAMPS_FILE)
    manifest = {
        "what": "owdfa-bench synthetic pretrained start (disjoint corpus, synthetic)",
        "key": settings.key(),
        "settings": asdict(settings),
        "pretrain_version": PRETRAIN_VERSION,
        "generator_version": synth.GENERATOR_VERSION,
        "weights_sha256": weights_sha256,
        "scores": scores,
        "render_s": round(t_render, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    cache.write_json_atomic(root / MANIFEST_FILE, manifest)
    log.info(
        "pretrained start: held-out corpus accuracy %.3f, %.0f s",
        scores["held_out_acc"],
        manifest["total_s"],
    )
    return manifest


def resolve_pretrained_start(data_cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pretrained start a `data` config asks for (`data.pretrain`), built if needed.

    None when `data.pretrain` is null (from scratch) or the user gave `data.backbone.weights`.
    """
    pretrain_cfg = data_cfg.get("pretrain")
    if not pretrain_cfg or (data_cfg.get("backbone") or {}).get("weights"):
        return None
    return ensure_pretrained(settings_from_config(pretrain_cfg, data_cfg))
