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


def test_ci_also_runs_the_slow_tests_the_readme_command_leaves_out():
    """The README's command is the quick suite (pytest.ini leaves `slow` out); CI runs it and
    then the slow tests, whose `-m slow` on the command line replaces addopts' `-m`."""
    import configparser
    ini = configparser.ConfigParser()
    ini.read(os.path.join(ROOT, "pytest.ini"))
    assert ini["pytest"]["addopts"].split() == ["-m", '"not', 'slow"']
    _, test = _commands()
    lines = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    slow = [i for i, ln in enumerate(lines) if ln.strip().startswith("python -m pytest -m slow")]
    assert slow and slow[0] > lines.index(test), "CI must run `python -m pytest -m slow` after"
    assert lines[-1].strip() == '[ "$quick" -eq 0 ] && [ "$slow" -eq 0 ]', "both must pass"


def test_every_requirement_is_pinned():
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in open(os.path.join(ROOT, name)):
            line = line.split("#")[0].strip()
            if line:
                assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+]+", line), line
