"""`owdfa-bench <command>`: training (`train`, the same as `python run.py` in a checkout) and the
tools around it."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

# command -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS = {
    "train": (
        "owdfa_bench.train",
        "cli_train",
        "train one cell, or a sweep with -m: Hydra overrides as for python run.py",
    ),
    "aggregate": (
        "owdfa_bench.report.main",
        "cli_aggregate",
        "seed-aggregated tables, diagnostics and plots of a sweep folder",
    ),
    "status": (
        "owdfa_bench.status",
        "cli_status",
        "where each run of a sweep folder stands: complete, running, failed, missing, ...",
    ),
    "synth-preview": (
        "owdfa_bench.data.synth",
        "cli_synth_preview",
        "PNG grid of the built-in synthetic benchmark",
    ),
    "evaluate": (
        "owdfa_bench.evaluate",
        "cli_evaluate",
        "evaluate a run folder with its own config, or a checkpoint (an official CAL release)",
    ),
    "download": (
        "owdfa_bench.data.download",
        "cli_download",
        "fetch and unpack the OWDFA-40 release",
    ),
    "fetch-weights": (
        "owdfa_bench.weights",
        "cli_fetch_weights",
        "download the paper's ImageNet weights once, for machines without internet",
    ),
    "prepare": (
        "owdfa_bench.data.faces",
        "cli_prepare",
        "crop faces once with dlib and cache them",
    ),
}


def usage() -> str:
    lines = ["usage: owdfa-bench <command> [args]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "owdfa-bench train --help lists the config groups and Hydra's options."]
    lines += ["owdfa-bench --version (-V) prints the version."]
    return "\n".join(lines)


def package_version() -> str:
    """The installed distribution's version; in a checkout that is not installed, the
    package's own `__version__`."""
    try:
        return importlib.metadata.version("owdfa-bench")
    except importlib.metadata.PackageNotFoundError:
        from owdfa_bench import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"owdfa-bench {package_version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"owdfa-bench: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    from owdfa_bench.errors import exit_on_user_error  # a user error: one line, exit status 1

    run_command = getattr(importlib.import_module(module), function)
    return int(exit_on_user_error(lambda: run_command(rest), f"owdfa-bench {command}") or 0)


if __name__ == "__main__":
    sys.exit(main())
