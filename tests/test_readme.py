"""README opens with the two commands, and CI runs the same test command."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert text.startswith("---\n")
    body = text.split("\n---\n", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)\n```", body, flags=re.S)
    assert body.lstrip().startswith("```bash"), "README must open with the commands"
    return blocks[0].strip(), blocks[1].strip()


def test_readme_opens_with_start_and_test_commands():
    start, test = _commands()
    assert "pip install -r requirements.txt" in start
    assert "pytest" in test and "requirements-dev.txt" in test


def test_ci_calls_the_readme_test_command():
    _, test = _commands()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert test in ci.splitlines()


def test_the_readme_command_runs_every_test_and_names_the_quick_suite():
    """The README's test command (what CI runs) runs the whole suite: pytest.ini filters
    nothing out. The quick suite (`-m "not slow"`) is named right after the two commands."""
    import configparser
    ini = configparser.ConfigParser()
    ini.read(os.path.join(ROOT, "pytest.ini"))
    assert "-m" not in ini["pytest"].get("addopts", "").split()
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert 'python -m pytest -m "not slow"' in readme[:3000]


def test_every_requirement_is_pinned():
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in open(os.path.join(ROOT, name)):
            line = line.split("#")[0].strip()
            if line:
                assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+]+", line), line
