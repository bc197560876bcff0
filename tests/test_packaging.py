"""The wheel ships what an installed owdfa-bench reads: the config tree (sweeps included), the
protocol registries and the published numbers; code finds them through importlib.resources.

The wheel is built offline (`pip wheel --no-deps --no-build-isolation --no-index`, the
setuptools of this venv) from a copy of the source tree, so the build writes nothing into the
checkout. The slow test installs it into a fresh venv and trains a smoke cell outside the
checkout (docs/installing.md, "Installed as a package").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from owdfa_bench import resources

REPO = Path(__file__).resolve().parent.parent
# What a build reads from the checkout (the links in owdfa_bench/resources point into it).
SOURCE_TREE = ("pyproject.toml", "README.md", "LICENSE", "owdfa_bench", "methods", "conf")
SOURCE_TREE += ("protocols", "results/paper", "sweeps")
SHIPPED = "owdfa_bench/resources"


def copy_source_tree(work: Path) -> Path:
    """What a build reads, copied under `work/src` (links kept as links)."""
    src = work / "src"
    for name in SOURCE_TREE:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(
                path,
                src / name,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
            )
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    return src


def build_wheel(out: Path, work: Path) -> Path:
    src = copy_source_tree(work)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        text=True,
        cwd=work,
    )
    (wheel,) = out.glob("owdfa_bench-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("build"))


def files_under(folder: Path) -> dict[str, Path]:
    """Relative POSIX path -> file, following symbolic links (conf/sweep -> sweeps/)."""
    found = {}
    for dirpath, _, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(dirpath) / name
            found[path.relative_to(folder).as_posix()] = path
    return found


def test_in_a_checkout_the_resources_are_the_top_level_folders():
    assert resources.conf_dir() == (REPO / "conf").resolve()
    assert resources.protocols_dir() == (REPO / "protocols").resolve()
    assert resources.paper_dir() == (REPO / "results" / "paper").resolve()
    assert (resources.conf_dir() / "sweep").resolve() == (REPO / "sweeps").resolve()


def test_wheel_holds_configs_sweeps_protocols_and_paper_numbers(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        expected = {
            f"{SHIPPED}/conf/{rel}": path
            for rel, path in files_under(REPO / "conf").items()
            if rel.endswith(".yaml")
        }
        expected |= {f"{SHIPPED}/conf/sweep/{p.name}": p for p in (REPO / "sweeps").glob("*.yaml")}
        expected |= {f"{SHIPPED}/protocols/{p.name}": p for p in (REPO / "protocols").glob("*")}
        paper = REPO / "results" / "paper"
        expected |= {f"{SHIPPED}/paper/{p.name}": p for p in paper.glob("*.csv")}
        expected[f"{SHIPPED}/paper/README.md"] = paper / "README.md"
        assert f"{SHIPPED}/conf/config.yaml" in expected
        assert len([n for n in expected if "/conf/sweep/" in n]) >= 1
        assert len([n for n in expected if n.endswith(".csv")]) >= 4
        missing = sorted(set(expected) - names)
        assert not missing, f"not in the wheel: {missing}"
        for name, path in expected.items():
            assert archive.read(name) == path.read_bytes(), name
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "owdfa-bench = owdfa_bench.cli:main" in archive.read(entry_points).decode()
    for module in ("cli", "train", "cache", "resources/__init__", "report/main"):
        assert f"owdfa_bench/{module}.py" in names
    assert {n.split("/")[0] for n in names if "/" in n} == {
        "owdfa_bench",
        "methods",
        wheel.name.split("-py3")[0] + ".dist-info",
    }


def metadata_fields(text: str) -> list[str]:
    """The header lines of a METADATA / PKG-INFO file (before the long description)."""
    return text.split("\n\n", 1)[0].splitlines()


def test_the_wheel_and_the_sdist_carry_the_mit_license(wheel, tmp_path):
    license_text = (REPO / "LICENSE").read_bytes()
    assert license_text.startswith(b"MIT License\n\nCopyright (c) 2026 the owdfa-bench authors\n")
    with zipfile.ZipFile(wheel) as archive:
        info = wheel.name.split("-py3")[0] + ".dist-info"
        assert archive.read(f"{info}/licenses/LICENSE") == license_text
        fields = metadata_fields(archive.read(f"{info}/METADATA").decode())
    assert "License-Expression: MIT" in fields and "License-File: LICENSE" in fields
    src = copy_source_tree(tmp_path)
    build = "from setuptools import build_meta; build_meta.build_sdist('dist')"
    subprocess.run([sys.executable, "-c", build], cwd=src, check=True, capture_output=True)
    (sdist,) = (src / "dist").glob("owdfa_bench-*.tar.gz")
    root = sdist.name.removesuffix(".tar.gz")
    with tarfile.open(sdist) as archive:
        assert archive.extractfile(f"{root}/LICENSE").read() == license_text
        fields = metadata_fields(archive.extractfile(f"{root}/PKG-INFO").read().decode())
    assert "License-Expression: MIT" in fields and "License-File: LICENSE" in fields


def test_the_unpacked_wheel_composes_the_config_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OWDFA_BENCH_CACHE": str(tmp_path / "cache")}

    def python(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    # every module that reads shipped data, and the package itself, come from the wheel
    where = python(
        "-c",
        "import owdfa_bench, owdfa_bench.protocols as a, owdfa_bench.report.paper as b,"
        " owdfa_bench.report.naming as c, owdfa_bench.data.faces as d;"
        "print(owdfa_bench.__file__, a.PROTOCOLS_DIR, b.PAPER_DIR, c.METHOD_CONF_DIR, d.CONF_DIR)",
    ).split()
    assert len(where) == 5 and all(Path(w).is_relative_to(site) for w in where), where
    config = python("-m", "owdfa_bench", "train", "--cfg", "job", "method=cpl", "+sweep=demo")
    assert "name: cpl" in config and "sweep_name: demo" in config
    groups = python("-m", "owdfa_bench", "train", "--help").splitlines()
    [sweeps] = [line for line in groups if line.startswith("sweep: ")]
    assert "demo" in sweeps.removeprefix("sweep: ").split(", ")


def _torch_closure() -> list[metadata.Distribution]:
    """torch, torchvision and everything they require, as installed in this interpreter."""
    from packaging.requirements import Requirement

    todo, seen, found = ["torch", "torchvision"], set(), []
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        found.append(dist)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def _link_torch_only(target: Path) -> list[str]:
    """Symlink torch's distributions (code and .dist-info) from this interpreter into `target`,
    nothing else: the fresh venv reuses the 1+ GB install but sees no other package of ours.
    Returns `name==version` pins for them, so pip never upgrades (uninstalls) one."""
    target.mkdir()
    pins = []
    for dist in _torch_closure():
        pins.append(f"{dist.metadata['Name']}=={dist.version}")
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if (base / top).exists() and not (target / top).exists():
                (target / top).symlink_to(base / top)
    return pins


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_trains_a_smoke_cell_outside_the_checkout(tmp_path):
    """Minutes: builds the wheel, creates a venv without system site-packages, gives it this
    interpreter's torch only (a .pth to symlinks of torch's own distributions), installs the
    wheel with its other dependencies from pip's configured indexes, runs `owdfa-bench --help`
    and a smoke cell from a folder outside the checkout."""
    wheel = build_wheel(tmp_path / "dist", tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    bin_dir = env_dir / "bin"
    py = bin_dir / "python"
    site = Path(
        subprocess.check_output(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    pins = _link_torch_only(tmp_path / "torch-only")
    (site / "torch_from_host.pth").write_text(f"{tmp_path / 'torch-only'}\n")
    (tmp_path / "pins.txt").write_text("\n".join(pins) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"OWDFA_BENCH_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args, timeout=1200) -> str:
        done = subprocess.run(
            list(map(str, args)),
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
        return done.stdout

    run(py, "-m", "pip", "install", "-q", "-c", tmp_path / "pins.txt", wheel)
    modules = "owdfa_bench", "hydra", "lightning"
    where = f"import {', '.join(modules)}; print({', '.join(m + '.__file__' for m in modules)})"
    origins = run(py, "-c", where).split()
    assert all(Path(o).is_relative_to(site) for o in origins), origins  # not the checkout's
    assert "train" in run(bin_dir / "owdfa-bench", "--help")
    from conftest import TINY_SYNTH

    run(
        bin_dir / "owdfa-bench",
        "train",
        "method=lower_bound",
        "trainer=smoke",
        "logger=none",
        f"output_root={tmp_path / 'outputs'}",
        *TINY_SYNTH,
    )
    (record,) = (tmp_path / "outputs").rglob("results.json")
    assert '"status": "complete"' in record.read_text()
