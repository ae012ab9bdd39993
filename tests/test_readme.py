"""The README's notebook example runs as written."""

import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_notebook_example_trains_one_step():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert int(namespace["state"].step) == 1
    assert math.isfinite(float(namespace["metrics"]["loss"]))
    assert float(namespace["metrics"]["num_tokens"]) == 8 * 64
