"""The README's loss example runs as printed (its asserts check agreement with the whole batch)."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_losses_example_runs():
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## Using the losses in your own JAX project", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})


def test_readme_starts_with_the_two_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    first = text.index("## The two commands")
    assert text.index("make train") > first and text.index("make test") > first
    assert "make test" in open(os.path.join(REPO, ".ci", "run")).read()


def test_preference_losses_example_runs():
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## Preference losses in your own JAX project", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
