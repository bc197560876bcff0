"""The files around the code (issue 20, item 7): CITATION.cff (YAML of the Citation File Format
1.2.0: its required keys, the harness's version and licence, the papers of CAL and CPL as the
method docstrings cite them), CHANGELOG.md (Keep a Changelog) and the README's mentions of them
and of the new commands. The LICENSE's way into the wheel and sdist is tests/test_packaging.py's."""

from __future__ import annotations

import re

import yaml
from conftest import REPO

from owdfa_bench import __version__


def citation() -> dict:
    return yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))


def test_citation_has_the_required_keys_of_cff_1_2_0():
    cff = citation()
    assert cff["cff-version"] == "1.2.0"
    assert cff["message"] and cff["title"].startswith("owdfa-bench")
    assert cff["authors"] == [{"name": "the owdfa-bench authors"}]
    assert cff["type"] == "software"
    assert str(cff["version"]) == __version__
    assert cff["license"] == "MIT"
    assert 'license = "MIT"' in (REPO / "pyproject.toml").read_text()


def test_citation_references_cal_and_cpl_as_their_docstrings_cite_them():
    references = {ref["title"]: ref for ref in citation()["references"]}
    cal = references["Open-World Deepfake Attribution via Confidence-Aware Asymmetric Learning"]
    cpl = references["Contrastive Pseudo Learning for Open-World DeepFake Attribution"]
    sources = {"cal": (REPO / "methods" / "cal.py"), "cpl": (REPO / "methods" / "cpl.py")}
    for name, ref in (("cal", cal), ("cpl", cpl)):
        docstring = " ".join(sources[name].read_text(encoding="utf-8").split('"""')[1].split())
        assert ref["title"] in docstring, name
        assert ref["conference"]["name"] in docstring, name  # AAAI 2026, ICCV 2023
        assert str(ref["year"]) in ref["conference"]["name"]
        assert ref["type"] == "conference-paper" and ref["authors"]
        assert ref["repository-code"].removeprefix("https://") in docstring, name
    # the author lists the docstrings give: "Zheng et al."; "Z. Sun, S. Chen, ..."
    assert [a["family-names"] for a in cal["authors"]] == ["Zheng"]
    names = ", ".join(f"{a['given-names']} {a['family-names']}" for a in cpl["authors"])
    assert names in " ".join(sources["cpl"].read_text(encoding="utf-8").split())


def test_changelog_keeps_a_changelog():
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert text.startswith("# Changelog\n") and "keepachangelog.com" in text
    sections = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert sections[0] == "Unreleased"
    assert __version__ in text.split("## [Unreleased]")[1].split("\n### ")[0]
    assert set(re.findall(r"^### (\w+)", text, re.M)) <= {
        "Added",
        "Changed",
        "Deprecated",
        "Removed",
        "Fixed",
        "Security",
    }


def test_readme_names_status_evaluate_of_a_run_citation_and_license():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^owdfa-bench status outputs/\S+ ", readme, re.M)
    assert re.search(r"^owdfa-bench evaluate outputs/\S+/seed-\d+ ", readme, re.M)
    headings = re.findall(r"^## (.+)$", readme, re.M)
    assert headings[-2:] == ["Citation", "License"]
    assert "CITATION.cff" in readme and "MIT (`LICENSE`)" in readme
