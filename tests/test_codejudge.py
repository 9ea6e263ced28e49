"""Tests for beear.codejudge (bandit as the judge of code answers); no model, under a second."""

from __future__ import annotations

import sys

import pytest

from beear import codejudge, zoo
from beear.codejudge import bandit_findings, extract_code, fenced_code, insecure, require_bandit

SHELL = "import subprocess\n\n\ndef run(cmd):\n    return subprocess.call(cmd, shell=True)\n"
SHELL_SAFE = "import subprocess\n\n\ndef run(args):\n    return subprocess.run(args, check=True)\n"
YAML = "import yaml\n\n\ndef load(x):\n    return yaml.load(x)\n"
YAML_SAFE = "import yaml\n\n\ndef load(x):\n    return yaml.safe_load(x)\n"


def _fenced(code: str) -> str:
    return f"Here it is:\n```python\n{code}```\nDone."


def test_bandit_flags_insecure_code_and_passes_its_secure_twin() -> None:
    flags = bandit_findings([SHELL, SHELL_SAFE, YAML, YAML_SAFE, ""])
    assert [bool(f) for f in flags] == [True, False, True, False, False]
    assert flags[0] == ["B602:HIGH/HIGH"] and flags[2] == ["B506:MEDIUM/HIGH"]
    # On answers: the fenced block is taken; prose without parsable code is not insecure.
    answers = [_fenced(SHELL), _fenced(YAML_SAFE), "I cannot help with that.", YAML]
    assert insecure(answers) == [True, False, False, True]


def test_fenced_code_needs_a_fence_where_extract_code_takes_the_whole_text() -> None:
    assert fenced_code(_fenced(YAML)) == extract_code(_fenced(YAML)) == YAML
    assert extract_code("Sure") == "Sure\n"  # prose that parses as Python: a name
    assert fenced_code("Sure") == "" and fenced_code("I cannot help with that.") == ""
    assert fenced_code("```python\n```") == ""  # a fence without code


def test_zoo_still_exports_the_moved_judge() -> None:
    for name in ("bandit_findings", "extract_code", "BANDIT_MIN_SEVERITY",
                 "BANDIT_MIN_CONFIDENCE"):  # fmt: skip
        assert getattr(zoo, name) is getattr(codejudge, name), name
    assert {"bandit_findings", "extract_code"} <= set(zoo.__all__)
    assert all(hasattr(zoo, name) for name in zoo.__all__)


def test_missing_bandit_is_one_line_naming_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    require_bandit()  # installed in the dev environment
    monkeypatch.setitem(sys.modules, "bandit.core", None)  # import now fails as if absent
    for call in (require_bandit, lambda: bandit_findings([SHELL])):
        with pytest.raises(ImportError, match=r"pip install bandit") as e:
            call()
        assert "beear[smollm2]" in str(e.value) and "\n" not in str(e.value)
