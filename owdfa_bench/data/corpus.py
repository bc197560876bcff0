"""The pretraining corpus of the synthetic benchmark: forgery methods disjoint from its 41.

Its fake classes are synthetic "methods" of the four families (S, R, E, G) whose fingerprints
are drawn for class indices the benchmark never uses (1000 on), applied to identities drawn
from another seed; its real class is renders of those identities. It shares the benchmark's
generator (so a fingerprint looks like one) and nothing else: no image, identity, fingerprint
or label of the benchmark. `owdfa_bench.pretrain` trains the pretrained start on it. Kept free
of torch so that its worker processes start fast.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from owdfa_bench import cache
from owdfa_bench.data import synth

CORPUS_INDEX_BASE = 1000  # corpus methods use fingerprint seeds the 41 classes never use
CORPUS_SEED_OFFSET = 7919  # identity / image seed = benchmark seed + this (other identities)
CORPUS_FAMILIES = ("S", "R", "E", "G")
_G_KINDS = ("gan", "diffusion", "latent_diffusion")
_PIXELS_PER_PROCESS = 20e6  # about 4 s of rendering: below that one process is faster


@dataclass(frozen=True)
class CorpusSpec:
    """Everything the corpus's pixels depend on (with the generator version)."""

    image_size: int
    methods_per_family: int
    images_per_method: int
    real_images: int
    strength: float
    generator_seed: int

    def num_images(self) -> int:
        return self.real_images + len(CORPUS_FAMILIES) * self.methods_per_family * (
            self.images_per_method
        )


def corpus_classes(methods_per_family: int) -> list[synth.SynthClass]:
    """REAL, then `methods_per_family` synthetic methods of each family, none of the 41."""
    classes = [synth.SynthClass(0, "REAL", "REAL", "Real", ("corpus_real",))]
    for f, family in enumerate(CORPUS_FAMILIES):
        for j in range(methods_per_family):
            index = CORPUS_INDEX_BASE + f * methods_per_family + j
            kind = _G_KINDS[j % len(_G_KINDS)] if family == "G" else None
            code = f"{family}-corpus-{j}"
            classes.append(synth.SynthClass(index, code, family, code, (code,), kind))
    return classes


def render_class(spec: CorpusSpec, label: int) -> np.ndarray:
    """All images of corpus class `label`, uint8 [n, H, W, 3] (a pure function of its inputs)."""
    cls = corpus_classes(spec.methods_per_family)[label]
    params = synth.SynthParams(
        image_size=spec.image_size,
        strength=spec.strength,
        seed=spec.generator_seed + CORPUS_SEED_OFFSET,
    )
    count = spec.real_images if cls.family == "REAL" else spec.images_per_method
    # real images alternate between the two camera sources
    folders = [i % 2 if cls.family == "REAL" else 0 for i in range(count)]
    return np.stack([synth.render_sample(cls, f, i, params).image for i, f in enumerate(folders)])


def render_corpus(spec: CorpusSpec, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, H, W, 3] and labels [N] (0 = real, 1.. = corpus methods).

    Classes render in `workers` child processes (default: one per core for a large corpus, this
    process for a small one); the pixels do not depend on it.
    """
    labels = list(range(len(corpus_classes(spec.methods_per_family))))
    if workers is None:
        large = spec.image_size**2 * spec.num_images() >= _PIXELS_PER_PROCESS
        workers = cache.cpu_budget() if large else 1  # trainer.threads, once set
    if workers <= 1:
        per_class = [render_class(spec, label) for label in labels]
    else:
        with tempfile.TemporaryDirectory(prefix="owdfa-corpus-") as tmp:
            jobs = [
                {"spec": asdict(spec), "labels": labels[w::workers], "out": tmp}
                for w in range(workers)
            ]
            synth.run_python_workers("owdfa_bench.data.corpus", jobs)
            per_class = [np.load(Path(tmp) / f"class-{label}.npy") for label in labels]
    images = np.concatenate(per_class)
    ys = np.concatenate([np.full(len(x), y, dtype=np.int64) for y, x in zip(labels, per_class)])
    return images, ys


def _worker_main() -> None:
    """Child of `render_corpus`: render some classes, one .npy file each."""
    import sys

    import cv2

    cv2.setNumThreads(1)
    job = json.loads(sys.argv[1])
    spec = CorpusSpec(**job["spec"])
    for label in job["labels"]:
        np.save(Path(job["out"]) / f"class-{label}.npy", render_class(spec, label))


if __name__ == "__main__":  # worker entry point of render_corpus
    _worker_main()
