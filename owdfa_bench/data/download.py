"""`owdfa-bench download --root DIR`: fetch, unzip and check the OWDFA-40 release.

The release is the Hugging Face dataset `hyzheng/OWDFA40-Benchmark`: one zip per class folder
under `data/` and the dlib 68-landmark predictor at the top. `snapshot_download` puts them in
`DIR/data/*.zip` and `DIR/shape_predictor_68_face_landmarks.dat` (it resumes interrupted
downloads itself). Each zip is extracted into `DIR/<zip name without .zip>/`, as CAL's README
does inside `data/` (`unzip "$z" -d "${z%.zip}"`), but one level up, so `DIR` is at once the
release root (predictor) and the folder of class folders that `data.root` names.

Re-running is safe: a zip whose marker (`<folder>/.owdfa_extracted.json`, holding the zip's size,
mtime and SHA-256 and the CRC-32 of every member) matches is skipped when its members are intact;
an interrupted extraction resumes, rewriting only members that are missing or whose CRC-32 is not
the zip's. Members are checked by content through `owdfa_bench.cache`: by their stamps (no read),
or by hashing (CRC-32) every member of the folder when a stamp misses or
`OWDFA_BENCH_CACHE_CHECK=full` asks. A damaged member is extracted again; when its zip was deleted
(`--delete-zips`), the folder's marker is removed, so the next run fetches the zip again.
Extraction refuses absolute member paths, paths that escape the target folder (zip-slip) and
symbolic links, before writing anything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from owdfa_bench.cache import (
    STAMPS_FILE,
    FileStamp,
    atomic_path,
    content_mismatches,
    file_unchanged,
    read_json,
    stamp_files,
    write_json_atomic,
)
from owdfa_bench.protocols import load_registry

REPO_ID = "hyzheng/OWDFA40-Benchmark"
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
ALLOW_PATTERNS = ["data/*.zip", PREDICTOR_FILE]
ZIP_DIR = "data"
MARKER_FILE = ".owdfa_extracted.json"
MEMBER_DIGEST = "crc32"  # what a zip records per member: checking it needs no hashing at unzip


class UnsafeZipError(ValueError):
    """A zip member would be written outside its target folder."""


def fetch_release(
    root: str | os.PathLike,
    repo_id: str = REPO_ID,
    revision: str | None = None,
    skip_zips: Sequence[str] = (),
) -> Path:
    """Download (or resume) the release's zips and predictor into `root`; returns `root`.

    `skip_zips` are zip names not to fetch (extracted earlier, then deleted with --delete-zips).
    """
    from huggingface_hub import snapshot_download

    local = snapshot_download(
        repo_id,
        repo_type="dataset",
        revision=revision,
        local_dir=str(root),
        allow_patterns=ALLOW_PATTERNS,
        ignore_patterns=[f"{ZIP_DIR}/{name}" for name in skip_zips] or None,
    )
    return Path(local)


def extracted_without_zip(root: str | os.PathLike) -> list[str]:
    """Zip names whose extraction is complete (marker) and whose zip is no longer on disk."""
    root = Path(root)
    names = []
    for marker in sorted(root.glob(f"*/{MARKER_FILE}")):
        name = (read_json(marker) or {}).get("zip", "")
        if name and not (root / ZIP_DIR / name).exists():
            names.append(name)
    return names


def checked_members(archive: zipfile.ZipFile, target: str | os.PathLike) -> list[zipfile.ZipInfo]:
    """Every member, after refusing absolute paths, `..` escapes and symlinks (zip-slip)."""
    base = Path(target).resolve()
    members = archive.infolist()
    for info in members:
        name = info.filename.replace("\\", "/")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise UnsafeZipError(f"{archive.filename}: refusing absolute member path {name!r}")
        if ".." in PurePosixPath(name).parts:
            raise UnsafeZipError(
                f"{archive.filename}: refusing member {name!r}, which escapes the target folder"
            )
        if not (base / name).resolve().is_relative_to(base):
            raise UnsafeZipError(f"{archive.filename}: member {name!r} resolves outside {base}")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeZipError(f"{archive.filename}: refusing symbolic link member {name!r}")
    return members


def target_dir(zip_path: str | os.PathLike, root: str | os.PathLike) -> Path:
    return Path(root) / Path(zip_path).stem


def member_path(info: zipfile.ZipInfo) -> str:
    """A member's path inside its target folder (POSIX separators)."""
    return info.filename.replace("\\", "/")


def damaged_members(target: str | os.PathLike) -> list[str] | None:
    """The members of `target`'s marker that are missing or whose CRC-32 is not the zip's (by
    stamp, or hashed: `cache.content_mismatches`); None when the marker lists none (written by
    an older version, or no marker): then nothing is known about them."""
    target = Path(target)
    listed = (read_json(target / MARKER_FILE) or {}).get("member_crc32")
    if not isinstance(listed, dict):
        return None
    return content_mismatches(target, listed, target / STAMPS_FILE, algorithm=MEMBER_DIGEST)


def is_extracted(zip_path: str | os.PathLike, target: str | os.PathLike) -> bool:
    """True when `target`'s marker records this very zip (size + mtime, or else SHA-256)."""
    recorded = read_json(Path(target) / MARKER_FILE)
    if recorded is None:  # none yet, or torn by a kill: extract (again), resuming
        return False
    size, mtime_ns = recorded.get("size", -1), recorded.get("mtime_ns", -1)
    # a touched or copied zip with the same bytes still counts as extracted
    return file_unchanged(zip_path, FileStamp(size, mtime_ns, recorded.get("sha256", "")))


@dataclass
class ExtractResult:
    zip_name: str
    target: str
    skipped: bool  # marker matched and members intact: nothing done
    written: int = 0  # members written now
    kept: int = 0  # members already present with the zip's CRC-32 (resumed extraction)
    damaged: list[str] = field(default_factory=list)  # damaged members of a deleted zip


def extract_zip(
    zip_path: str | os.PathLike, target: str | os.PathLike, on_bytes=None
) -> ExtractResult:
    """Extract `zip_path` into `target`, resuming, then write the marker.

    Members are written to a temporary name and renamed, so a file under its name is complete;
    one already there is kept when its CRC-32 is the zip's (zipfile checks the CRC-32 of what
    it writes). `on_bytes(n)` is called as bytes are written (progress bar).
    """
    zip_path, target = Path(zip_path), Path(target)
    result = ExtractResult(zip_path.name, str(target), skipped=False)
    with zipfile.ZipFile(zip_path) as archive:
        members = checked_members(archive, target)
        target.mkdir(parents=True, exist_ok=True)
        crcs = {member_path(i): f"{i.CRC:08x}" for i in members if not i.is_dir()}
        stamps = target / STAMPS_FILE
        bad = set(content_mismatches(target, crcs, stamps, algorithm=MEMBER_DIGEST))
        written: dict[str, str] = {}
        for info in members:
            dest = target / member_path(info)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            if member_path(info) not in bad:
                result.kept += 1
                if on_bytes:
                    on_bytes(info.file_size)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            # `out` closes before `atomic_path` renames; the zip's CRC is checked at EOF
            with (
                atomic_path(dest) as partial,
                archive.open(info) as src,
                open(partial, "wb") as out,
            ):
                while block := src.read(1 << 20):
                    out.write(block)
                    if on_bytes:
                        on_bytes(len(block))
            result.written += 1
            written[member_path(info)] = crcs[member_path(info)]
    stamp_files(target, written, stamps, algorithm=MEMBER_DIGEST)
    stamp = FileStamp.of(zip_path, "sha256")
    marker = {
        "zip": zip_path.name,
        "size": stamp.size,
        "mtime_ns": stamp.mtime_ns,
        "sha256": stamp.digest,
        "members": len(members),
        "member_crc32": crcs,
    }
    write_json_atomic(target / MARKER_FILE, marker, indent=2)
    return result


def extract_release(
    root: str | os.PathLike, progress: bool = True, delete_zips: bool = False
) -> list[ExtractResult]:
    """Extract every `root/data/*.zip` not yet extracted or with damaged members (rewriting
    only those), with a rich progress bar over bytes; check the folders of deleted zips too
    (`check_without_zip`)."""
    root = Path(root)
    zips = sorted((root / ZIP_DIR).glob("*.zip"))
    results, todo = check_without_zip(root), []
    for z in zips:
        target = target_dir(z, root)
        if is_extracted(z, target) and damaged_members(target) == []:
            results.append(ExtractResult(z.name, str(target), skipped=True))
        else:
            todo.append((z, target))
    if todo:
        total = 0
        for z, _ in todo:
            with zipfile.ZipFile(z) as archive:
                total += sum(i.file_size for i in archive.infolist())
        if progress:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            )
        else:
            bar = None
        with bar if bar is not None else contextlib.nullcontext():
            task = bar.add_task("unzipping", total=total) if bar else None
            for z, target in todo:
                if bar:
                    bar.update(task, description=f"unzipping {z.name}")
                advance = (lambda n: bar.advance(task, n)) if bar else None
                results.append(extract_zip(z, target, advance))
    if delete_zips:
        for z in zips:
            if is_extracted(z, target_dir(z, root)):
                z.unlink()
    return results


def check_without_zip(root: str | os.PathLike) -> list[ExtractResult]:
    """The folders whose zip was deleted after extraction, checked by content: an intact one is
    skipped; a damaged one loses its marker, so the next `download` fetches its zip again."""
    results = []
    for name in extracted_without_zip(root):
        target = target_dir(name, root)
        damaged = damaged_members(target) or []
        if damaged:
            (target / MARKER_FILE).unlink()
        results.append(ExtractResult(name, str(target), skipped=not damaged, damaged=damaged))
    return results


def missing_classes(root: str | os.PathLike, benchmark: str = "owdfa40") -> list[str]:
    """Registry classes with no folder `<index>_...` directly under `root` (empty = complete)."""
    root = Path(root)
    present = set()
    if root.is_dir():
        for entry in root.iterdir():
            prefix = entry.name.split("_")[0]
            if entry.is_dir() and prefix.isdigit():
                present.add(int(prefix))
    missing = []
    for c in load_registry(benchmark)["classes"]:
        if int(c["index"]) not in present:
            folders = ", ".join(c.get("folders", [])) or f"{c['index']}_..."
            missing.append(f"{c['index']} ({c['code']}, expected {folders})")
    return missing


def cli_download(argv: list[str]) -> int:
    """`owdfa-bench download --root DIR`: fetch, unzip, verify; 0 when every class is there."""
    parser = argparse.ArgumentParser(
        prog="owdfa-bench download",
        description=f"Download the OWDFA-40 release ({REPO_ID}) into DIR, unzip it, check it.",
    )
    parser.add_argument("--root", required=True, help="release folder (becomes data.root)")
    parser.add_argument("--repo-id", default=REPO_ID, help="Hugging Face dataset id")
    parser.add_argument("--revision", default=None, help="dataset revision (branch/tag/commit)")
    parser.add_argument(
        "--no-fetch",
        action="store_true",
        help="skip the download; only unzip and verify what is in DIR/data",
    )
    parser.add_argument(
        "--delete-zips", action="store_true", help="remove each zip once its extraction is complete"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console(stderr=True)
    root = Path(args.root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    try:
        if not args.no_fetch:
            console.print(f"downloading {args.repo_id} into {root} (resumes if interrupted)")
            fetch_release(root, args.repo_id, args.revision, extracted_without_zip(root))
        results = extract_release(root, progress=not args.no_progress, delete_zips=args.delete_zips)
    except (UnsafeZipError, zipfile.BadZipFile, OSError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 1
    skipped = sum(r.skipped for r in results)
    damaged = [r for r in results if r.damaged]
    console.print(
        f"{len(results)} zips: {len(results) - skipped - len(damaged)} extracted now, "
        f"{skipped} already complete"
    )
    for r in damaged:
        console.print(
            f"[red]{r.target}: {len(r.damaged)} files differ from their zip's CRC-32 (e.g. "
            f"{r.damaged[0]}) and {r.zip_name} was deleted; run `owdfa-bench download --root "
            f"{root}` again to fetch it and extract them again[/red]",
            soft_wrap=True,  # one line
        )
    if damaged:
        return 1
    missing = missing_classes(root)
    if missing:
        console.print(
            f"[red]{len(missing)} classes have no folder in {root}:[/red]\n  "
            + "\n  ".join(missing)
            + "\nRe-run this command to resume; check DIR/data for missing zips."
        )
        return 1
    if not (root / PREDICTOR_FILE).is_file():
        console.print(
            f"[yellow]note:[/yellow] {PREDICTOR_FILE} is not in {root} (needed only "
            "for face alignment)"
        )
    console.print(
        f"OWDFA-40 ready. Next:\n  owdfa-bench prepare data=owdfa40 data.root={root}\n"
        f"  python run.py data=owdfa40 data.root={root}"
    )
    return 0
