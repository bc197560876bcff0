"""Calibration of the built-in synthetic benchmark on its two bounds (never an open-world method).

Each row is a setting of the generator, data size, image size, backbone and start; the lower and
upper bounds are trained on P1 with the shared CPU schedule (`conf/preset/`) and the table
shows where they land against the targets of the papers' regime:

    lower bound Known ACC >= 95; upper bound All ACC >= 90 and Novel ACC >= 85;
    lower bound Novel ACC <= 60% of the upper bound's.

    python benchmarks/synth_calibration.py --run            # train the missing cells, then print
    python benchmarks/synth_calibration.py --root DIR       # print the table of runs in DIR

A cell is `python run.py method=<bound> logger=none trainer.threads=1 output_root=<root>
sweep_name=<row> seed=<seed> <the row's overrides>` (printed with --commands); a relaunch skips
complete cells. Synthetic data: these numbers say nothing about real deepfakes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOUNDS = ("lower_bound", "upper_bound")

SMALL = [  # the earlier data size: 40 images per known fake class, 30 per novel one, 200 real
    "data.generator.fakes_per_class=40",
    "data.generator.real_per_folder=100",
    "data.budgets.known=40",
    "data.budgets.novel=30",
    "data.budgets.real=200",
    "data.budgets.real_per_folder=100",
]
LARGE = [  # the calibrated size (conf/data/synth.yaml): 100 / 75 / 500
    "data.generator.fakes_per_class=100",
    "data.generator.real_per_folder=250",
    "data.budgets.known=100",
    "data.budgets.novel=75",
    "data.budgets.real=500",
    "data.budgets.real_per_folder=250",
]


def row(size: int, backbone: str, strength: float, pretrained: bool, data: list[str]) -> list[str]:
    return [
        f"data.image_size={size}",
        f"data.backbone.name={backbone}",
        f"data.generator.strength={strength}",
        *([] if pretrained else ["data.pretrain=null"]),
        *data,
    ]


# name -> (overrides, seeds); in the order they were tried
ROWS: dict[str, tuple[list[str], tuple[int, ...]]] = {
    "s32": (row(32, "resnet18", 2.0, False, SMALL), (2025,)),
    "A_pt32": (row(32, "resnet18", 2.0, True, SMALL), (2025,)),
    "B_s3.0": (row(32, "resnet18", 3.0, True, SMALL), (2025,)),
    "B_s4.0": (row(32, "resnet18", 4.0, True, SMALL), (2025,)),
    "C_s3_n100": (row(32, "resnet18", 3.0, True, LARGE), (2025,)),
    "D_s4_n100": (row(32, "resnet18", 4.0, True, LARGE), (2025,)),
    "E_r10t_s4": (row(32, "resnet10t", 4.0, True, SMALL), (2025,)),
    "F_r10t_s4_n100": (row(32, "resnet10t", 4.0, True, LARGE), (2025, 2026, 2027)),
}


def cell_command(name: str, method: str, seed: int, root: Path) -> list[str]:
    overrides, _ = ROWS[name]
    return [
        sys.executable,
        "run.py",
        f"method={method}",
        "logger=none",
        "trainer.threads=1",
        "trainer.progress_bar=false",
        f"output_root={root}",
        f"sweep_name={name}",
        f"seed={seed}",
        *overrides,
    ]


def record(root: Path, name: str, method: str, seed: int) -> dict | None:
    path = root / name / method / "p1" / "k-known" / f"seed-{seed}" / "results.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("status") == "complete" else None


def describe(overrides: list[str]) -> dict[str, str]:
    values = dict(o.split("=", 1) for o in overrides)
    return {
        "px": values["data.image_size"],
        "backbone": values["data.backbone.name"],
        "start": "scratch" if values.get("data.pretrain") == "null" else "pretrained",
        "strength": values["data.generator.strength"],
        "fakes": f"{values['data.budgets.known']}/{values['data.budgets.novel']}",
    }


def table(root: Path) -> str:
    header = (
        "| row | px | backbone | start | strength | images per known/novel fake class | seeds "
        "| LB Known | LB Novel | UB All | UB Novel | LB Novel / UB Novel | in regime |\n"
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [header]
    for name, (overrides, seeds) in ROWS.items():
        lb = [r for s in seeds if (r := record(root, name, "lower_bound", s))]
        ub = [r for s in seeds if (r := record(root, name, "upper_bound", s))]
        if not lb or not ub:
            continue

        def mean(records: list[dict], key: str) -> float:
            return 100 * sum(r["metrics"][key] for r in records) / len(records)

        lbk, lbn = mean(lb, "known_acc"), mean(lb, "novel_acc")
        uba, ubn = mean(ub, "all_acc"), mean(ub, "novel_acc")
        ok = lbk >= 95 and uba >= 90 and ubn >= 85 and lbn <= 0.6 * ubn
        d = describe(overrides)
        lines.append(
            f"| {name} | {d['px']} | {d['backbone']} | {d['start']} | {d['strength']} "
            f"| {d['fakes']} | {min(len(lb), len(ub))} | {lbk:.1f} | {lbn:.1f} | {uba:.1f} "
            f"| {ubn:.1f} | {lbn / ubn:.2f} | {'yes' if ok else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "calibration")
    parser.add_argument("--run", action="store_true", help="train the missing cells first")
    parser.add_argument("--commands", action="store_true", help="print every cell's command")
    args = parser.parse_args(argv)
    for name, (_, seeds) in ROWS.items():
        for method in BOUNDS:
            for seed in seeds:
                command = cell_command(name, method, seed, args.root)
                if args.commands:
                    print(" ".join(command[1:]))
                if args.run and record(args.root, name, method, seed) is None:
                    subprocess.run(command, cwd=REPO, check=True)
    print(table(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
