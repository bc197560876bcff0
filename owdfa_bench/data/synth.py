"""`data=synth`: the built-in procedural stand-in for OWDFA-40.

It writes the 41 OWDFA-40 classes (same indices, codes and families) as PNG files in the
OWDFA-40 folder layout under a cache folder, so the real scanning, sampling and splitting code
reads it unchanged. Every image is a rendered face (`synth_render.py`) seen through a camera
model; a fake class is a synthetic "method": its family's manipulation plus a fingerprint whose
parameters come from a fixed per-method seed.

- Swap (S): the inner face of another identity, colour-matched (incompletely) and feathered in.
- Reenact (R): eyes, brows and the lower face re-rendered with a new expression and some of the
  driving frame's lighting.
- Edit (E): one attribute changed (hair colour, skin tone, glasses in the eye band).
- Generate (G): the whole image produced by the method's generator pipeline (GAN-like methods
  leave their upsampler's and a periodic pattern's traces; diffusion-like ones a filtered-noise
  residue, plus the 8-pixel grid of a VAE decoder for the latent ones).

The manipulated content always passes through the method's decoder (downsample, then its own
upsampling operator), a periodic pattern, filtered noise and a colour response, then the
method's JPEG quality. One knob, `strength`, interpolates every fingerprint between the family's
shared reference pipeline (strength 0: the methods of a family are indistinguishable) and the
method's own parameters (strength 1), and extrapolates beyond. The family's manipulation
(where, and what it changes) does not depend on `strength`.

The output is synthetic: results on it say nothing about real deepfakes.
docs/synthetic-benchmark.md says why it exists and how it was calibrated.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from owdfa_bench import cache
from owdfa_bench.data import synth_render as sr
from owdfa_bench.protocols import load_registry as load_protocol_file

log = logging.getLogger(__name__)

# Bump whenever a change alters any output pixel: caches of other versions are rebuilt.
GENERATOR_VERSION = "1"
GENERATOR_NAME = "owdfa-bench synth"
MANIFEST_FILE = "manifest.json"
_IMAGE_NAME = re.compile(r"\d{5}\.png")  # what render_jobs names its files
FAMILY_ORDER = ("REAL", "S", "R", "E", "G")
FAMILY_NAMES = {"REAL": "Real", "S": "Swap", "R": "Reenact", "E": "Edit", "G": "Generate"}

IDENTITY_POOL = 400  # identities shared by real and fake images, so identity is no cue
_FINGERPRINT_SALT = 0x0DFA40  # method fingerprints depend on the class index only
_STREAM_IDENTITY, _STREAM_REAL, _STREAM_FAKE = 1, 2, 3

# Entire-face synthesis codes that are diffusion models; the latent ones decode through a
# VAE with an 8x grid (SD2.1, PixArt, DiT-XL, SiT-XL), RDDM works in pixel space.
DIFFUSION_CODES = frozenset({"G7", "G8", "G9", "G10", "G11"})
LATENT_DIFFUSION_CODES = frozenset({"G7", "G9", "G10", "G11"})

# Camera JPEG quality ranges of the two real sources (CelebDF is cleaner than FF++ c23).
_REAL_QUALITY = {0: (85, 97), 1: (80, 95)}
# Family reference pipelines (what strength 0 gives every method of the family).
_REF_QUALITY = {"S": 90, "R": 90, "E": 90, "G": 95}
_REF_FEATHER = {"S": 2.2, "R": 1.4, "E": 1.0, "G": 0.0}  # blend-mask blur in pixels at 64 px
_EDIT_ATTRIBUTES = ("hair", "skin", "glasses")
_UPSAMPLERS = (
    "nearest",
    "bilinear",
    "cubic-0.5",
    "cubic-0.75",
    "cubic-1.0",
    "lanczos2",
    "lanczos3",
    "transposed",
)
_SMOOTH_UPSAMPLERS = ("cubic-0.5", "lanczos2", "lanczos3")


# ---------------------------------------------------------------------------------------------
# classes and parameters


@dataclass(frozen=True)
class SynthClass:
    index: int
    code: str
    family: str  # REAL, S, R, E, G
    name: str
    folders: tuple[str, ...]
    # G only: "gan", "diffusion" or "latent_diffusion"; None derives it from the OWDFA-40 code
    generator: str | None = None

    @property
    def generator_kind(self) -> str:
        if self.generator is not None:
            return self.generator
        if self.code in LATENT_DIFFUSION_CODES:
            return "latent_diffusion"
        return "diffusion" if self.code in DIFFUSION_CODES else "gan"


def load_registry() -> list[SynthClass]:
    """The 41 OWDFA-40 classes (index, code, family, name, folders) from protocols/owdfa40.yaml."""
    classes = [
        SynthClass(
            int(c["index"]), str(c["code"]), str(c["family"]), str(c["name"]), tuple(c["folders"])
        )
        for c in load_protocol_file("owdfa40")["classes"]
    ]
    bad = [c.code for c in classes if c.family not in FAMILY_ORDER or not c.folders]
    if bad:
        raise ValueError(
            f"protocols/owdfa40.yaml: classes {bad} need a family in {FAMILY_ORDER} and folders"
        )
    return classes


@lru_cache(maxsize=1)
def configured_params() -> dict[str, Any]:
    """The generator settings of conf/data/synth.yaml (`image_size` and `generator`): what a
    SynthParams takes for the fields it is not given, so the YAML is their one source."""
    import yaml

    from owdfa_bench.resources import conf_dir

    data = yaml.safe_load((conf_dir() / "data" / "synth.yaml").read_text())
    return {"image_size": data["image_size"], **data["generator"]}


def _configured(name: str) -> Any:
    return field(default_factory=lambda: configured_params()[name])


@dataclass(frozen=True)
class SynthParams:
    """Everything the generated files depend on (with GENERATOR_VERSION); a field not given is
    conf/data/synth.yaml's."""

    image_size: int = _configured("image_size")
    real_per_folder: int = _configured("real_per_folder")
    fakes_per_class: int = _configured("fakes_per_class")
    strength: float = _configured("strength")
    seed: int = _configured("seed")

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 8:
            raise ValueError(
                f"synth image_size={self.image_size}: use a multiple of 8 that is at least 32"
            )
        if self.real_per_folder < 1 or self.fakes_per_class < 1:
            raise ValueError("synth generator.real_per_folder and fakes_per_class must be >= 1")
        if not (0.0 <= self.strength <= 8.0) or not math.isfinite(self.strength):
            raise ValueError(f"synth generator.strength={self.strength}: use a value in [0, 8]")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["strength"] = float(d["strength"])
        return d

    def short_hash(self) -> str:
        """The key in the cache folder's name `synth-<key>` (existing caches are found by it)."""
        return cache.settings_hash({"version": GENERATOR_VERSION, **self.to_dict()}, length=10)


@dataclass(frozen=True)
class Fingerprint:
    """A synthetic method's traces: decoder, periodic pattern, noise, colour, compression."""

    upsampler: str  # a synth_render.RESAMPLE_KERNELS name or "transposed" (phase-gain decoder)
    factor: int  # decoder scale factor
    phase_gain: tuple[float, ...]  # per-phase gain deviation of a transposed-conv decoder
    waves: tuple[tuple[float, ...], ...]  # (fy, fx, phase, amplitude, r, g, b) per wave
    noise: tuple[float, ...]  # (sigma, ring centre, ring width, angle, anisotropy)
    noise_colour: tuple[float, float, float]
    gain: tuple[float, float, float]  # per-channel colour gain
    gamma: float
    quality: int  # JPEG quality
    mask_scale: float  # swap mask size relative to the family's
    feather: float  # blend feathering relative to the family's


def family_reference(family: str) -> Fingerprint:
    """The pipeline every method of a family shares at strength 0."""
    return Fingerprint(
        upsampler="bilinear",
        factor=2,
        phase_gain=(),
        waves=(),
        noise=(0.0, 0.2, 0.1, 0.0, 0.0),
        noise_colour=(1.0, 1.0, 1.0),
        gain=(1.0, 1.0, 1.0),
        gamma=1.0,
        quality=_REF_QUALITY.get(family, 90),
        mask_scale=1.0,
        feather=1.0,
    )


@lru_cache(maxsize=64)
def method_fingerprint(cls: SynthClass) -> Fingerprint:
    """The fixed fingerprint of a fake class, drawn from a seed derived from its index."""
    if cls.family == "REAL":
        raise ValueError("the REAL class has no forgery fingerprint")
    rng = np.random.default_rng([_FINGERPRINT_SALT, cls.index])
    diffusion = cls.generator_kind != "gan"
    if diffusion:
        upsampler, factor = str(rng.choice(_SMOOTH_UPSAMPLERS)), 2
    else:
        upsampler = str(rng.choice(_UPSAMPLERS))
        factor = 4 if rng.uniform() < 0.25 else 2
    phase_gain = ()
    if upsampler == "transposed":
        g = rng.uniform(0.015, 0.04) * rng.choice([-1.0, 1.0])
        phase_gain = tuple(float(v) for v in [g] + [-g / (factor - 1)] * (factor - 1))
    waves = []
    if cls.generator_kind == "latent_diffusion":  # the VAE decoder's 8-pixel grid
        for fy, fx in [(1 / 8, 0.0), (0.0, 1 / 8), (1 / 8, 1 / 8)][: int(rng.integers(1, 4))]:
            waves.append(
                (
                    fy,
                    fx,
                    rng.uniform(0, 2 * np.pi),
                    rng.uniform(6.0, 10.0) / 255,
                    *rng.uniform(0.6, 1.0, 3),
                )
            )
    elif not diffusion:
        for _ in range(int(rng.integers(1, 3))):
            # mid frequencies and mostly luminance: JPEG's chroma subsampling and its coarse
            # high-frequency quantisation would erase anything else
            fy, fx = rng.integers(3, 23, 2) / 64.0 * rng.choice([-1.0, 1.0], 2)
            waves.append(
                (
                    float(fy),
                    float(fx),
                    rng.uniform(0, 2 * np.pi),
                    rng.uniform(8.0, 14.0) / 255,
                    *rng.uniform(0.6, 1.0, 3),
                )
            )
    sigma = rng.uniform(5.0, 10.0) if diffusion else rng.uniform(2.0, 5.0)
    noise = (
        sigma / 255,
        rng.uniform(0.06, 0.3),
        rng.uniform(0.03, 0.12),
        rng.uniform(0, np.pi),
        rng.uniform(0.0, 0.8),
    )
    return Fingerprint(
        upsampler=upsampler,
        factor=factor,
        phase_gain=phase_gain,
        waves=tuple(tuple(float(v) for v in w) for w in waves),
        noise=tuple(float(v) for v in noise),
        noise_colour=tuple(float(v) for v in rng.uniform(0.5, 1.0, 3)),
        gain=tuple(float(v) for v in 1.0 + rng.uniform(-0.08, 0.08, 3)),
        gamma=float(1.0 + rng.uniform(-0.15, 0.15)),
        quality=int(rng.integers(80, 100)),
        mask_scale=float(rng.uniform(0.88, 1.12)),
        feather=float(rng.uniform(0.6, 1.6)),
    )


# ---------------------------------------------------------------------------------------------
# one image


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


@lru_cache(maxsize=4096)
def _identity(seed: int, k: int) -> sr.Identity:
    return sr.sample_identity(_rng(seed, _STREAM_IDENTITY, k))


@lru_cache(maxsize=128)
def _wave_field(waves: tuple[tuple[float, ...], ...], size: int) -> np.ndarray:
    field = np.zeros((size, size, 3))
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    for fy, fx, phase, amp, *colour in waves:
        field += amp * np.cos(2 * np.pi * (fy * y + fx * x) + phase)[:, :, None] * np.array(colour)
    field.setflags(write=False)
    return field


def _decoder(img: np.ndarray, upsampler: str, factor: int, phase_gain: tuple[float, ...]):
    size = img.shape[0]
    small = sr.downsample_box(img, factor)
    up = sr.resize(small, size, "bilinear" if upsampler == "transposed" else upsampler)
    if phase_gain:  # a transposed convolution's uneven kernel: a gain per output phase
        g = 1.0 + np.array(phase_gain)[np.arange(size) % factor]
        up = up * (g[:, None] * g[None, :])[:, :, None]
    return up


def apply_fingerprint(
    img: np.ndarray,
    fp: Fingerprint,
    ref: Fingerprint,
    strength: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Pass generated content through the method's pipeline, `strength` of the way from the
    family reference `ref` (strength 0) to the method's own parameters (strength 1)."""
    s = strength
    base = _decoder(img, ref.upsampler, ref.factor, ref.phase_gain)
    out = base
    if s > 0:
        own = _decoder(img, fp.upsampler, fp.factor, fp.phase_gain)
        out = base + s * (own - base)
    size = img.shape[0]
    noise = sr.filtered_noise(size, rng, *fp.noise[1:])  # drawn always: same stream for any s
    if s > 0:
        if fp.waves:
            out = out + s * _wave_field(fp.waves, size)
        out = out + (s * fp.noise[0]) * noise[:, :, None] * np.array(fp.noise_colour)
        gamma = 1.0 + s * (fp.gamma - 1.0)
        gain = 1.0 + s * (np.array(fp.gain) - 1.0)
        out = np.clip(out, 0.0, 1.0) ** gamma * gain
    return np.clip(out, 0.0, 1.0)


def _quality(fp: Fingerprint, ref: Fingerprint, strength: float, rng) -> int:
    q = ref.quality + strength * (fp.quality - ref.quality) + rng.integers(-3, 4)
    return int(np.clip(round(q), 30, 100))


def _feather(mask: np.ndarray, family: str, fp: Fingerprint, ref: Fingerprint, s: float):
    rel = max(0.2, ref.feather + s * (fp.feather - ref.feather))
    sigma = _REF_FEATHER[family] * rel * mask.shape[0] / 64
    return np.clip(sr.gaussian_blur(mask, sigma), 0.0, 1.0)


@dataclass
class SampleRender:
    image: np.ndarray  # uint8 [H, W, 3], what is written to disk
    source: np.ndarray | None = None  # uint8: the same picture without the manipulation
    region: np.ndarray | None = None  # float [H, W]: where the manipulation blends in


def render_real(folder_no: int, index: int, params: SynthParams, *, with_source=False):
    """A real picture: a render through the camera model and JPEG."""
    rng = _rng(params.seed, _STREAM_REAL, folder_no, index)
    idn = _identity(params.seed, int(rng.integers(IDENTITY_POOL)))
    scene = sr.sample_scene(rng)
    clean, _ = sr.render_face(idn, scene, params.image_size)
    shot = sr.camera_capture(clean, rng)
    q = int(rng.integers(*_REAL_QUALITY[folder_no], endpoint=True))
    image = sr.to_uint8(sr.jpeg_roundtrip(shot, q))
    if not with_source:
        return SampleRender(image)
    return SampleRender(image, image.copy(), np.zeros(image.shape[:2]))


def render_fake(cls: SynthClass, index: int, params: SynthParams, *, with_source=False):
    """One image of a fake class (see the module docstring for what each family does)."""
    fam, size, s = cls.family, params.image_size, params.strength
    fp, ref = method_fingerprint(cls), family_reference(cls.family)
    rng = _rng(params.seed, _STREAM_FAKE, cls.index, index)
    k = int(rng.integers(IDENTITY_POOL))
    target = _identity(params.seed, k)

    if fam == "G":
        scene = sr.sample_scene(rng, generated=True)
        clean, _ = sr.render_face(target, scene, size)
        fake = apply_fingerprint(clean, fp, ref, s, rng)
        q = _quality(fp, ref, s, rng)
        image = sr.to_uint8(sr.jpeg_roundtrip(fake, q))
        if not with_source:
            return SampleRender(image)
        shot = sr.camera_capture(clean, rng)
        return SampleRender(image, sr.to_uint8(sr.jpeg_roundtrip(shot, q)), np.ones((size, size)))

    scene = sr.sample_scene(rng)
    mask_scale = max(0.5, 1.0 + s * (fp.mask_scale - 1.0))
    if fam == "S":
        donor = _identity(
            params.seed, (k + 1 + int(rng.integers(IDENTITY_POOL - 1))) % IDENTITY_POOL
        )
        clean, masks = sr.render_face(target, scene, size, masks=("inner",), inner_scale=mask_scale)
        features = {f: getattr(donor, f) for f in _SWAP_FIELDS}
        content, _ = sr.render_face(replace(target, **features), scene, size)
        region = masks["inner"]
    elif fam == "R":
        clean, masks = sr.render_face(target, scene, size, masks=("expression",))
        new_scene = replace(scene, **sr.sample_expression(rng, scene))
        content, masks2 = sr.render_face(target, new_scene, size, masks=("expression",))
        region = np.maximum(masks["expression"], masks2["expression"])
    elif fam == "E":
        attribute = _edit_attribute(target, rng)
        edited = _edit_identity(target, attribute, rng)
        name = {"hair": "hair", "skin": "face", "glasses": "glasses"}[attribute]
        clean, masks = sr.render_face(target, scene, size, masks=(name,))
        content, masks2 = sr.render_face(edited, scene, size, masks=(name,))
        region = np.maximum(masks[name], masks2[name])
    else:
        raise ValueError(f"class {cls.code}: unknown family {fam!r}")

    shot = sr.camera_capture(clean, rng)
    if fam == "S":  # colour transfer towards the target's skin, deliberately incomplete
        w = region / max(region.sum(), 1e-9)
        delta = (shot * w[:, :, None]).sum((0, 1)) - (content * w[:, :, None]).sum((0, 1))
        content = np.clip(content + 0.75 * delta, 0.0, 1.0)
    content = apply_fingerprint(content, fp, ref, s, rng)
    alpha = _feather(region, fam, fp, ref, s)[:, :, None]
    fake = shot * (1 - alpha) + content * alpha
    q = _quality(fp, ref, s, rng)
    image = sr.to_uint8(sr.jpeg_roundtrip(fake, q))
    if not with_source:
        return SampleRender(image)
    return SampleRender(image, sr.to_uint8(sr.jpeg_roundtrip(shot, q)), alpha[:, :, 0])


# What a swap takes from the donor: the inner-face features and the skin (not head or hair).
_SWAP_FIELDS = (
    "skin",
    "eye_y",
    "eye_dx",
    "eye_w",
    "eye_h",
    "iris",
    "brow_gap",
    "brow_thick",
    "brow_arch",
    "nose_len",
    "nose_w",
    "mouth_y",
    "mouth_w",
    "lip_thick",
    "lips",
    "beard",
)


def _edit_attribute(idn: sr.Identity, rng: np.random.Generator) -> str:
    choices = [a for a in _EDIT_ATTRIBUTES if not (a == "hair" and idn.hair_style == "bald")]
    return str(choices[int(rng.integers(len(choices)))])


def _edit_identity(idn: sr.Identity, attribute: str, rng: np.random.Generator) -> sr.Identity:
    if attribute == "hair":  # recolour to another natural colour (StarGAN-style transfer)
        palette = sr.HAIR_COLOURS / 255.0
        far = [c for c in palette if np.abs(c - np.array(idn.hair)).sum() > 0.35]
        new = far[int(rng.integers(len(far)))] + rng.normal(0, 0.03, 3)
        return replace(idn, hair=tuple(float(v) for v in np.clip(new, 0, 1)))
    if attribute == "skin":  # tone / age shift of the whole face skin
        shift = rng.uniform(0.06, 0.14) * rng.choice([-1.0, 1.0])
        tint = np.array(idn.skin) * (1 + shift) + rng.normal(0, 0.02, 3)
        return replace(idn, skin=tuple(float(v) for v in np.clip(tint, 0, 1)))
    # accessory: add glasses, or remove them
    colour = tuple(float(v) for v in rng.uniform(0.05, 0.5, 3))
    return replace(idn, glasses=not idn.glasses, glasses_colour=colour)


def render_sample(
    cls: SynthClass, folder_no: int, index: int, params: SynthParams, *, with_source: bool = False
) -> SampleRender:
    """Image `index` of folder `folder_no` of class `cls` (pure function of its arguments)."""
    if cls.family == "REAL":
        return render_real(folder_no, index, params, with_source=with_source)
    return render_fake(cls, index, params, with_source=with_source)


# ---------------------------------------------------------------------------------------------
# the dataset on disk


def _folder_jobs(classes: Sequence[SynthClass], params: SynthParams, chunk: int):
    for cls in classes:
        for folder_no, folder in enumerate(cls.folders):
            n = params.real_per_folder if cls.family == "REAL" else params.fakes_per_class
            for start in range(0, n, chunk):
                yield cls, folder_no, folder, start, min(n, start + chunk)


def render_jobs(
    out_root: Path, params: SynthParams, jobs: Iterable[Sequence[int]]
) -> list[tuple[str, str, int]]:
    """Render and write images; a job is (class index, folder number, start, stop).

    Returns one (relative path, sha256, size) row per file.
    """
    by_index = {c.index: c for c in load_registry()}
    rows = []
    for index, folder_no, start, stop in jobs:
        cls = by_index[int(index)]
        folder = cls.folders[int(folder_no)]
        for i in range(int(start), int(stop)):
            data = sr.encode_png(render_sample(cls, int(folder_no), i, params).image)
            rel = f"{folder}/{i:05d}.png"
            (Path(out_root) / rel).write_bytes(data)
            rows.append((rel, cache.content_sha256(data), len(data)))
    return rows


def run_python_workers(module: str, specs: list[dict[str, Any]]) -> list[str]:
    """Run `python -m <module> <json spec>` once per spec, in parallel; their standard outputs.

    Plain subprocesses rather than multiprocessing: no fork of a process that may already run
    torch threads, and no re-import of the caller's __main__ (which spawn needs guarded). One
    thread per child. The first failing child's last error line is raised.
    """
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # the children import this package from wherever the parent did, installed or not
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [package_parent, env.get("PYTHONPATH")] if p)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for spec in specs
    ]
    outputs, errors = [], []
    try:
        for proc in procs:
            out, err = proc.communicate()
            if proc.returncode != 0:
                errors.append(
                    err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
                )
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if errors:
        raise RuntimeError(f"{module} failed in a worker process: {errors[0]}")
    return outputs


def _render_in_subprocesses(
    out_root: Path, params: SynthParams, jobs: list[tuple[int, ...]], workers: int
) -> list[tuple[str, str, int]]:
    """Split the jobs over `workers` child interpreters (`python -m owdfa_bench.data.synth`)."""
    specs = [
        {"out_root": str(out_root), "params": params.to_dict(), "jobs": jobs[w::workers]}
        for w in range(workers)
    ]
    outputs = run_python_workers("owdfa_bench.data.synth", specs)
    return [tuple(r) for out in outputs for r in json.loads(out)]


def _worker_main() -> None:
    import sys

    import cv2

    cv2.setNumThreads(1)
    spec = json.loads(sys.argv[1])
    rows = render_jobs(Path(spec["out_root"]), SynthParams(**spec["params"]), spec["jobs"])
    sys.stdout.write(json.dumps(rows))


def manifest_hash(params: Mapping[str, Any], files: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over the generator version, the parameters and the sorted (path, sha256) list."""
    body = {
        "generator_version": GENERATOR_VERSION,
        "parameters": dict(params),
        "files": sorted([list(f) for f in files]),
    }
    return cache.settings_hash(body, compact=True)


def manifest_digests(root: Path) -> dict[str, str]:
    """image path -> SHA-256 of every PNG the manifest at `root` lists (checked on reuse)."""
    files = (_read_manifest(root) or {}).get("files") or []
    return {str(root / f["path"]): f["sha256"] for f in files}


def _read_manifest(root: Path) -> dict[str, Any] | None:
    data = cache.read_json(root / MANIFEST_FILE)
    return data if data is not None and data.get("generator") == GENERATOR_NAME else None


def _foreign_entry(root: Path) -> Path | None:
    """The first entry under `root` the generator does not write (class folders of numbered
    PNGs, the manifest, the stamps); None when there is none, so the folder is a synth cache
    even if its manifest is torn."""
    folders = {f for c in load_registry() for f in c.folders}
    for entry in sorted(root.iterdir()):
        if entry.name in (MANIFEST_FILE, cache.STAMPS_FILE) and entry.is_file():
            continue
        if entry.name not in folders or not entry.is_dir():
            return entry
        for image in entry.iterdir():
            if not (_IMAGE_NAME.fullmatch(image.name) and image.is_file()):
                return image
    return None


def _check_replaceable(root: Path) -> None:
    """Refuse (one line) to replace a folder that holds anything but a synth cache."""
    if not root.exists() or (root.is_dir() and _read_manifest(root) is not None):
        return
    foreign = _foreign_entry(root) if root.is_dir() else root
    if foreign is not None:
        from owdfa_bench.errors import DataError  # imports Hydra: not in the render workers

        raise DataError(
            f"synth cache folder {root} holds {foreign.relative_to(root.parent)}, which the "
            "synthetic generator does not write, so it is not replaced; delete that folder, or "
            "set data.root to an empty or new folder"
        )


def generate_synth_dataset(
    root: Path,
    *,
    image_size: int,
    real_per_folder: int,
    fakes_per_class: int,
    strength: float,
    seed: int,
    workers: int | None = None,
) -> Path:
    """Write the synthetic OWDFA-40 tree and its manifest at `root`; returns `root`.

    The files are rendered into a temporary folder beside `root` and moved into place at the
    end, so an interrupted run never leaves a partial cache. Output is independent of
    `workers` (default: 2 child processes, or this process alone for small sets).
    """
    params = SynthParams(image_size, real_per_folder, fakes_per_class, float(strength), seed)
    root = Path(root)
    _check_replaceable(root)
    classes = load_registry()
    root.parent.mkdir(parents=True, exist_ok=True)
    cache.remove_stale_temporaries(root)
    tmp = cache.temporary_sibling(root)
    t0 = time.perf_counter()
    try:
        for cls in classes:
            for folder in cls.folders:
                (tmp / folder).mkdir(parents=True)
        jobs = [
            (c.index, f, start, stop) for c, f, _, start, stop in _folder_jobs(classes, params, 40)
        ]
        total = sum(stop - start for *_, start, stop in jobs)
        if workers is None:  # small sets: child start-up would cost more than it saves
            workers = 1 if total < 400 else min(2, cache.cpu_budget())
        if workers <= 1:
            rows = render_jobs(tmp, params, jobs)
        else:
            rows = _render_in_subprocesses(tmp, params, jobs, workers)
        rows.sort()
        # hashed once, from the bytes written; reuse compares stamps, not contents
        cache.stamp_files(tmp, {p: h for p, h, _ in rows}, tmp / cache.STAMPS_FILE)
        manifest = {
            "generator": GENERATOR_NAME,
            "generator_version": GENERATOR_VERSION,
            "synthetic": True,
            "registry": "owdfa40",
            "parameters": params.to_dict(),
            # not part of the hash; recorded because numpy's random streams and libjpeg are
            # only promised stable within a version
            "environment": _environment(),
            "num_files": len(rows),
            "manifest_sha256": manifest_hash(params.to_dict(), [(p, h) for p, h, _ in rows]),
            "files": [{"path": p, "sha256": h, "bytes": n} for p, h, n in rows],
        }
        cache.write_json_atomic(tmp / MANIFEST_FILE, manifest)
        if root.exists():
            _check_replaceable(root)  # again: another process may have put something there
        cache.move_dir_into_place(tmp, root, keep_theirs=_same_synth_data)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "synth: wrote %d images in %.1f s (synthetic data)", len(rows), time.perf_counter() - t0
    )
    return root


def _environment() -> dict[str, str]:
    import cv2

    return {"numpy": np.__version__, "opencv": cv2.__version__}


def _same_synth_data(theirs: Path, ours: Path) -> bool:
    """Whether another process's finished cache holds the same data as ours (then keep it)."""
    a, b = _read_manifest(theirs), _read_manifest(ours)
    return bool(a and b and a["manifest_sha256"] == b["manifest_sha256"])


def synth_params_from_config(data_cfg: Mapping[str, Any]) -> SynthParams:
    """SynthParams from a `data` config (`image_size` plus the `generator` block; the schema,
    owdfa_bench/data/sources.py SynthSource, guarantees both)."""
    gen = data_cfg["generator"]
    return SynthParams(
        image_size=int(data_cfg["image_size"]),
        real_per_folder=int(gen["real_per_folder"]),
        fakes_per_class=int(gen["fakes_per_class"]),
        strength=float(gen["strength"]),
        seed=int(gen["seed"]),
    )


def default_cache_root(params: SynthParams) -> Path:
    """`<cache base>/synth-<hash of the parameters>` (base: `owdfa_bench.cache.cache_base`)."""
    return cache.cache_base() / f"synth-{params.short_hash()}"


def cache_problem(root: Path, params: SynthParams, *, full: bool | None = None) -> str | None:
    """Why the cache at `root` cannot be reused for `params` (None if it can).

    Its manifest must be readable, of this generator version and these parameters, and list
    exactly the PNGs on disk; then every PNG is checked against the manifest's SHA-256
    (`cache.content_mismatches`): by its stamp (no file read), or by hashing all of them when a
    stamp misses (a copied or edited cache) or `full` ($OWDFA_BENCH_CACHE_CHECK=full) asks.
    """
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return "no cache yet"
    manifest = _read_manifest(root)
    if manifest is None:
        return "no readable synth manifest.json"
    expected = {"generator_version": GENERATOR_VERSION, "parameters": params.to_dict()}
    reason = cache.stale_reason(manifest, expected)
    if reason is not None:
        return reason
    files = manifest.get("files") or []
    if manifest_hash(params.to_dict(), [(f["path"], f["sha256"]) for f in files]) != manifest.get(
        "manifest_sha256"
    ):
        return "manifest_sha256 does not match its file list"
    problem = cache.listing_problem(root, (f["path"] for f in files), "*/*.png")
    if problem is not None:
        return problem
    listed = {f["path"]: f["sha256"] for f in files}
    bad = cache.content_mismatches(root, listed, root / cache.STAMPS_FILE, full=full)
    if bad:
        return f"{len(bad)} of {len(listed)} PNGs differ from the manifest's SHA-256, e.g. {bad[0]}"
    return None


def _check_budgets(data_cfg: Mapping[str, Any], params: SynthParams) -> None:
    budgets = data_cfg.get("budgets") or {}
    for key, have, what in [
        ("real_per_folder", params.real_per_folder, "real_per_folder"),
        ("known", params.fakes_per_class, "fakes_per_class"),
        ("novel", params.fakes_per_class, "fakes_per_class"),
    ]:
        want = budgets.get(key)
        if want is not None and int(want) > have:
            raise ValueError(
                f"data.budgets.{key}={want} asks for more images than data.generator.{what}="
                f"{have} generates; raise data.generator.{what} or lower the budget"
            )


def ensure_synth_dataset(data_cfg: Mapping[str, Any]) -> Path:
    """The synth cache folder for `data_cfg`, generated or rebuilt if it is missing, stale,
    torn (an unreadable manifest) or damaged (a PNG whose content is not the manifest's: see
    `cache_problem`); a rebuild is one log line naming the reason."""
    params = synth_params_from_config(data_cfg)
    _check_budgets(data_cfg, params)
    root_cfg = data_cfg.get("root")
    root = Path(str(root_cfg)).expanduser() if root_cfg else default_cache_root(params)
    # checked first without the lock, so a complete cache on a read-only disk is still used
    if cache_problem(root, params) is not None:
        with cache.build_lock(root):
            problem = cache_problem(root, params)  # another run may have built it meanwhile
            if problem is not None:
                log.info("synth: building cache %s: %s", _display(root), problem)
                return generate_synth_dataset(root, **params.to_dict())
    log.info("synth: reusing cache %s (synthetic data)", _display(root))
    return root


def _display(path: Path) -> str:
    """The path with the home folder shortened to ~ (keeps user names out of logs)."""
    try:
        return "~/" + str(path.resolve().relative_to(Path.home().resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# preview


def write_preview(root: Path, out_png: Path, per_class: int = 4) -> Path:
    """One PNG grid with `per_class` images of every class, rows grouped by family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    root, out_png = Path(root), Path(out_png)
    classes = load_registry()
    rows: dict[str, list[tuple[str, np.ndarray]]] = {f: [] for f in FAMILY_ORDER}
    for cls in sorted(classes, key=lambda c: (FAMILY_ORDER.index(c.family), c.index)):
        files: list[Path] = []
        per_folder = math.ceil(per_class / len(cls.folders))
        for folder in cls.folders:
            files += sorted((root / folder).glob("*.png"))[:per_folder]
        if not files:
            raise FileNotFoundError(f"no images for class {cls.code} under {root}/{cls.folders[0]}")
        imgs = [np.asarray(Image.open(f).convert("RGB")) for f in files[:per_class]]
        pad = np.full_like(imgs[0][:, :2], 255)
        strip = np.concatenate([x for img in imgs for x in (img, pad)][:-1], axis=1)
        rows[cls.family].append((f"{cls.code}  {cls.name}", strip))

    columns = [("REAL", "S", "R"), ("E", "G")]
    n_lines = max(sum(len(rows[f]) + 1 for f in col) for col in columns)
    row_h = 0.62
    fig = plt.figure(figsize=(2 * (1.7 + 0.62 * per_class), n_lines * row_h + 0.6), dpi=200)
    manifest = _read_manifest(root) or {}
    p = manifest.get("parameters", {})
    fig.suptitle(
        f"SYNTHETIC benchmark data=synth (not real deepfakes): {p.get('image_size', '?')} px, "
        f"strength={p.get('strength', '?')}, seed={p.get('seed', '?')}",
        fontsize=9,
    )
    top = 1 - 0.5 / (n_lines * row_h + 0.6)
    h = (top - 0.01) / n_lines
    for c, col in enumerate(columns):
        line = 0
        for fam in col:
            fig.text(
                0.01 + 0.5 * c,
                top - (line + 0.6) * h,
                f"{FAMILY_NAMES[fam]} ({fam})",
                fontsize=9,
                weight="bold",
            )
            line += 1
            for label, strip in rows[fam]:
                ax = fig.add_axes((0.5 * c + 0.2, top - (line + 1) * h + 0.05 * h, 0.29, 0.9 * h))
                ax.imshow(strip, interpolation="nearest")
                ax.set_axis_off()
                fig.text(
                    0.5 * c + 0.19,
                    top - (line + 0.5) * h,
                    label,
                    fontsize=7,
                    ha="right",
                    va="center",
                )
                line += 1
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def cli_synth_preview(argv: list[str]) -> int:
    """`owdfa-bench synth-preview`: generate (or reuse) the synth set and draw its preview grid."""
    parser = argparse.ArgumentParser(
        prog="owdfa-bench synth-preview",
        description="Write a PNG grid of the synthetic benchmark (a few images per class).",
    )
    parser.add_argument("--out", type=Path, default=Path("synth_preview.png"), help="PNG to write")
    parser.add_argument("--per-class", type=int, default=4, help="images per class (default 4)")
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="an existing synth folder to show, or where to generate one "
        "(default: the user cache, keyed by the parameters)",
    )
    configured = SynthParams()  # conf/data/synth.yaml: the set `data=synth` trains on
    parser.add_argument("--strength", type=float, default=configured.strength)
    parser.add_argument("--image-size", type=int, default=configured.image_size)
    parser.add_argument("--seed", type=int, default=configured.seed)
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error("--per-class must be at least 1")
    cfg = {
        "root": str(args.root) if args.root else None,
        "image_size": args.image_size,
        "generator": {
            "strength": args.strength,
            "seed": args.seed,
            "real_per_folder": max(configured.real_per_folder, args.per_class),
            "fakes_per_class": max(configured.fakes_per_class, args.per_class),
        },
    }
    if args.root is not None and _read_manifest(args.root) is not None:
        root = args.root  # an existing synth cache: show it as it is
    else:
        root = ensure_synth_dataset(cfg)
    out = write_preview(root, args.out, per_class=args.per_class)
    print(f"wrote {out} (synthetic data)")
    return 0


if __name__ == "__main__":  # worker entry point of generate_synth_dataset
    _worker_main()
