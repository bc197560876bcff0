"""A fast shape check of a generated LaTeX table (braces, environments, columns per row), run
where pdflatex is absent too; tests/latex_compile.py compiles the tables: the real check."""

from __future__ import annotations

import re


def _count_columns(colspec: str) -> int:
    spec = re.sub(r"[pmb]\{[^}]*\}", "c", colspec)  # p{3cm} is one column
    spec = re.sub(r"[@!>]\{[^}]*\}|\|", "", spec)
    return sum(ch in "lcrX" for ch in spec)


def _rows(body: str) -> list[str]:
    """A tabular body cut at its row ends: `\\\\` outside braces (a `\\shortstack{a\\\\b}` head
    is one cell)."""
    rows, depth, start, i = [], 0, 0, 0
    while i < len(body):
        if body.startswith("\\\\", i) and depth == 0:
            rows.append(body[start:i])
            start = i = i + 2
            continue
        if body[i] == "\\":  # an escaped character or a command name: skip its first char
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(body[i], 0)
        i += 1
    return [*rows, body[start:]]


def check_latex(text: str) -> list[str]:
    """Problems that would stop a LaTeX table from compiling; empty when well formed.

    Checks balanced braces, matched \\begin/\\end pairs, balanced `$` per tabular row, and that
    every tabular row spans as many columns as its column spec (counting \\multicolumn).
    """
    problems = []
    depth = 0
    unescaped = re.sub(r"\\[{}$&%#_]", "", text.replace(r"\\", ""))
    for ch in unescaped:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            problems.append("a '}' closes a brace that was never opened")
            depth = 0
    if depth:
        problems.append(f"{depth} brace(s) left open")

    stack: list[str] = []
    for kind, env in re.findall(r"\\(begin|end)\{([^}]*)\}", text):
        if kind == "begin":
            stack.append(env)
        elif not stack or stack.pop() != env:
            problems.append(f"\\end{{{env}}} does not close the innermost open environment")
    problems += [f"\\begin{{{env}}} is never closed" for env in stack]

    for colspec, body in re.findall(
        r"\\begin\{tabular\}\{([^}]*)\}(.*?)\\end\{tabular\}", text, flags=re.S
    ):
        ncols = _count_columns(colspec)
        for number, row in enumerate(_rows(body), start=1):
            content = re.sub(r"\\(top|mid|bottom)rule|\\cmidrule(\([a-z]*\))?\{[^}]*\}", "", row)
            if not content.strip():
                continue
            if len(re.findall(r"(?<!\\)\$", content)) % 2:
                problems.append(f"tabular row {number}: unbalanced $")
            cells = re.split(r"(?<!\\)&", content)
            span = 0
            for cell in cells:
                multi = re.search(r"\\multicolumn\{(\d+)\}", cell)
                span += int(multi.group(1)) if multi else 1
            if span != ncols:
                problems.append(
                    f"tabular row {number} spans {span} columns, the spec has {ncols}: "
                    f"{content.strip()[:60]}"
                )
    return problems
