#!/usr/bin/env bash
# pdflatex for the LaTeX compile tests (tests/latex_compile.py): Debian's
# texlive-latex-recommended (pdflatex, booktabs, graphicx), apt-get installed only where pdflatex
# is absent, so a second run does nothing. `make test` runs it before pytest. Without root it
# says what to install and exits 0: the compile tests then skip, naming the reason.
set -euo pipefail

PACKAGES=(texlive-latex-recommended)

if command -v pdflatex >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "latex install: pdflatex missing; as root: apt-get install ${PACKAGES[*]}" \
        "(the LaTeX compile tests skip until then)" >&2
    exit 0
fi
echo "latex install: apt-get install ${PACKAGES[*]} (pdflatex missing; about a minute)" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } \
    >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi
