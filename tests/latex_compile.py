"""Compile a generated LaTeX table with pdflatex and read the log: the real check that a table
compiles and fits the text width (tests/latex_check.py only checks its shape).

The table is `\\input` into a minimal article with the packages its leading comment names
(`% Needs \\usepackage{...}`); a bare `tabular` file goes into a `table` float here, as a user
would put it. `table*` is compiled in a two-column article, where it spans both columns.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO / "tests" / "latex" / "install.sh"
OVERFULL_TOLERANCE_PT = 1.0  # TeX's own \hfuzz is 0.1 pt; a point is invisible in print
PACKAGES = re.compile(r"^%.*\\usepackage\{([^}]*)\}", re.M)
OVERFULL = re.compile(r"^Overfull \\hbox \(([\d.]+)pt too wide\)", re.M)
ENVIRONMENT = re.compile(r"^%.*LaTeX environment: ([a-z*]+)\.", re.M)
TOO_TALL = re.compile(r"Float too large for page by ([\d.]+)pt", re.M)


@dataclass
class Compiled:
    returncode: int
    errors: list[str] = field(default_factory=list)  # the log's "! ..." lines
    overfull_pt: list[float] = field(default_factory=list)  # each Overfull \hbox, in pt
    too_tall_pt: list[float] = field(default_factory=list)  # each float taller than the page
    log: str = ""

    def problems(self, tolerance_pt: float = OVERFULL_TOLERANCE_PT) -> list[str]:
        """Why the table is not fit to print: empty when it compiled and fits the text."""
        found = [f"pdflatex error: {e}" for e in self.errors]
        if self.returncode and not self.errors:
            found.append(f"pdflatex exited {self.returncode}: {self.log[-500:]}")
        found += [f"{w} pt wider than the text" for w in self.overfull_pt if w > tolerance_pt]
        found += [f"a float {h} pt taller than the page" for h in self.too_tall_pt]
        return found


def find_pdflatex() -> str | None:
    """pdflatex, installed by tests/latex/install.sh when absent (it apt-gets as root)."""
    if shutil.which("pdflatex") is None:
        subprocess.run(["bash", str(INSTALL_SCRIPT)], check=False, timeout=900)
    return shutil.which("pdflatex")


def environment_of(tex: str) -> str:
    """The LaTeX environment a generated table names in its leading comment."""
    found = ENVIRONMENT.search(tex)
    if found is None:
        raise ValueError("no '% ... LaTeX environment: ...' comment: not a generated table")
    return found.group(1)


def needed_packages(tex: str) -> list[str]:
    """The packages a generated table names in its leading comment."""
    return [name.strip() for group in PACKAGES.findall(tex) for name in group.split(",")]


def document(tex_name: str, packages: list[str], environment: str) -> str:
    """A minimal article that inputs the table file `tex_name`."""
    options = "[twocolumn]" if environment == "table*" else ""
    body = rf"\input{{{tex_name}}}"
    if environment == "tabular":  # the user's own float
        body = "\\begin{table}[t]\n\\centering\n" + body + "\n\\end{table}"
    uses = f"\\usepackage{{{','.join(packages)}}}\n" if packages else ""
    return (
        f"\\documentclass{options}{{article}}\n{uses}\\begin{{document}}\n"
        f"Text before the table.\n\n{body}\n\nText after the table.\n\\end{{document}}\n"
    )


def compile_table(
    tex: str, workdir: Path, environment: str, pdflatex: str = "pdflatex"
) -> Compiled:
    """Compile the table text `tex` in a minimal document under `workdir`; read the log."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "table.tex").write_text(tex, encoding="utf-8")
    (workdir / "main.tex").write_text(
        document("table", needed_packages(tex), environment), encoding="utf-8"
    )
    done = subprocess.run(
        [pdflatex, "-interaction=nonstopmode", "-halt-on-error", "main.tex"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    log_path = workdir / "main.log"
    log = log_path.read_text(encoding="utf-8", errors="replace") if log_path.exists() else ""
    return Compiled(
        returncode=done.returncode,
        errors=[line for line in log.splitlines() if line.startswith("!")],
        overfull_pt=[float(w) for w in OVERFULL.findall(log)],
        too_tall_pt=[float(h) for h in TOO_TALL.findall(log)],
        log=log or done.stdout,
    )
