"""Every Python snippet of the README runs as it stands (offline, embedded MiniLM)."""

import re

import pytest

from conftest import ROOT


def readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_snippets():
    assert len(readme_snippets()) >= 2


@pytest.mark.real
@pytest.mark.parametrize("index", range(len(readme_snippets())))
def test_readme_snippet_runs(minilm_path, tmp_path, monkeypatch, index, recwarn):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_snippets()[index], f"README.md snippet {index + 1}", "exec"), {"__name__": "__readme__"})
    assert not [w for w in recwarn if "eval mode" in str(w.message)], "a snippet trained a model in eval mode"
