"""The README and docs/*.md as a reader uses them: every command of a ```bash block composes or
names a real command, and every relative link (and `#anchor`) leads somewhere.

Commands: a `python run.py ...` or `owdfa-bench train ...` line is composed with Hydra's compose
API (the hydra config included, so `hydra/launcher=slurm hydra.launcher.partition=...` is
checked), each cell of its command-line sweep (`method=cal,cpl seed=2025,2026`) apart, and then
checked as a run checks it (`check_config`: every key read, every value in range). The named
sweeps' own cells are tests/test_config.py's. An `owdfa-bench <command>` line names a command of
owdfa_bench/cli.py, its `--options` are options of that command, and the `key=value` overrides
of `train`, `evaluate` and `prepare` compose the same way.

Links: `[text](path#anchor)` outside code resolves to a file or folder of the checkout, and an
anchor to a heading of the Markdown file it names, by GitHub's slugs (what `mkdocs --strict`
would catch after pages move).
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO

from owdfa_bench.cli import COMMANDS

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\S*)[^\n]*\n(.*?)^\1```", re.M | re.S)
OVERRIDE_COMMANDS = {"train", "evaluate", "prepare"}  # their key=value arguments are overrides
HELP = {"-h", "--help", "-V", "--version"}


def shown(path: Path) -> str:
    return str(path.relative_to(REPO))


def bash_commands() -> list[tuple[str, list[str]]]:
    """(where, tokens) of every command in a ```bash block of the pages: continuation lines
    joined, comments dropped, `a && b` split into two commands."""
    commands = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(2) != "bash":
                continue
            first = text.count("\n", 0, match.start(3)) + 1
            joined, starts = [], []  # continuation lines joined, each with its first line
            for offset, line in enumerate(match.group(3).splitlines()):
                if joined and joined[-1].rstrip().endswith("\\"):
                    joined[-1] = joined[-1].rstrip()[:-1] + " " + line
                else:
                    joined.append(line)
                    starts.append(first + offset)
            for line, line_no in zip(joined, starts, strict=True):
                tokens = shlex.split(line, comments=True)
                where = f"{shown(path)}:{line_no}"
                command: list[str] = []
                for token in [*tokens, "&&"]:
                    if token in ("&&", "||", ";"):
                        if command:
                            commands.append((where, command))
                        command = []
                    else:
                        command.append(token)
    return commands


def hydra_arguments() -> list[tuple[str, list[str], bool]]:
    """(where, overrides, multirun) of every `python run.py` line and of the overrides of every
    `owdfa-bench train|evaluate|prepare` line."""
    found = []
    for where, tokens in bash_commands():
        if tokens[:2] == ["python", "run.py"]:
            args = tokens[2:]
        elif is_owdfa_bench(tokens[0]) and len(tokens) > 1 and tokens[1] in OVERRIDE_COMMANDS:
            args = tokens[2:]
            if tokens[1] != "train":  # options and folders are the command's, not Hydra's
                args = [a for a in args if "=" in a and not a.startswith("-")]
        else:
            continue
        found.append((where, [a for a in args if a != "-m"], "-m" in args))
    return found


def is_owdfa_bench(token: str) -> bool:
    return token == "owdfa-bench" or token.endswith("/owdfa-bench")


def cells(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The cells of a command line: its sweep overrides expanded as Hydra's basic sweeper does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override in parsed:
        if override.is_sweep_override():
            assert multirun or any(o.startswith("+sweep=") for o in overrides), (
                f"{override.input_line} sweeps: the command needs -m"
            )
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(cell) for cell in itertools.product(*choices)]


def compose_cell(overrides: list[str]) -> None:
    """Compose as a run does (hydra config included), then the checks a run makes first."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from owdfa_bench.config import check_config
    from owdfa_bench.resources import conf_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        del cfg["hydra"]
    check_config(cfg)


def test_the_pages_have_the_commands_people_copy():
    """The parser sees the commands (a changed fence format would pass every test vacuously)."""
    lines = {where.split(":")[0] for where, _, _ in hydra_arguments()}
    assert {"README.md", "docs/cluster.md", "docs/configuration.md", "docs/real-data.md"} <= lines
    args = [a for _, overrides, _ in hydra_arguments() for a in overrides]
    assert "hydra/launcher=slurm" in args and "+sweep=cal_table2" in args


@pytest.mark.parametrize(
    ("where", "overrides", "multirun"),
    hydra_arguments(),
    ids=[where for where, _, _ in hydra_arguments()],
)
def test_every_run_command_composes(where, overrides, multirun):
    for cell in cells(overrides, multirun):
        try:
            compose_cell(cell)
        except Exception as err:
            pytest.fail(f"{where}: {' '.join(cell)}: {type(err).__name__}: {err}")


def option_names(command: str) -> str:
    """The source of a command's module, where its argparse options are spelled."""
    module, _, _ = COMMANDS[command]
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).read_text(encoding="utf-8")


def test_every_owdfa_bench_command_exists_with_its_options():
    seen = set()
    for where, tokens in bash_commands():
        if not is_owdfa_bench(tokens[0]):
            continue
        assert len(tokens) > 1, f"{where}: owdfa-bench without a command"
        command = tokens[1]
        if command in HELP:
            continue
        assert command in COMMANDS, f"{where}: no command {command!r} in owdfa_bench/cli.py"
        seen.add(command)
        if command == "train":  # Hydra's options
            continue
        source = option_names(command)
        for option in (t.split("=")[0] for t in tokens[2:] if t.startswith("--")):
            assert f'"{option}"' in source, f"{where}: owdfa-bench {command} has no {option}"
    assert {"download", "prepare", "aggregate", "evaluate", "status", "train"} <= seen


# Links: [text](target) and ![alt](target), outside fenced blocks and inline code.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def without_code(text: str) -> str:
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: the text (link targets and formatting dropped), lower case,
    every character but letters, digits, `_`, `-` and spaces removed, spaces turned to `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings; repeated ones get -1, -2, ... as on GitHub."""
    found, counts = set(), {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = github_slug(heading)
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def relative_links(path: Path) -> list[str]:
    targets = LINK.findall(without_code(path.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


def test_github_slugs():
    assert github_slug("Built-in synthetic benchmark (`data=synth`)") == (
        "built-in-synthetic-benchmark-datasynth"
    )
    assert github_slug("P1, every method") == "p1-every-method"
    assert github_slug("One cell, a sweep, the tables") == "one-cell-a-sweep-the-tables"


@pytest.mark.parametrize("page", DOCS, ids=shown)
def test_every_relative_link_resolves(page):
    links = relative_links(page)
    for link in links:
        target, _, anchor = link.partition("#")
        file = (page.parent / target).resolve() if target else page
        assert file.exists(), f"{shown(page)}: {link}: no {target}"
        assert file.is_relative_to(REPO), f"{shown(page)}: {link} leaves the repository"
        if anchor:
            assert file.suffix == ".md", f"{shown(page)}: {link}: an anchor outside Markdown"
            assert anchor in anchors(file), f"{shown(page)}: {link}: no such heading in {target}"


def test_the_readme_links_every_docs_page():
    linked = {
        (REPO / link.partition("#")[0]).resolve()
        for link in relative_links(REPO / "README.md")
        if link.partition("#")[0]
    }
    orphans = [shown(p) for p in DOCS[1:] if p.resolve() not in linked]
    assert not orphans, f"not linked from README.md: {orphans}"
