"""The noise of a held-out figure's change since a stage's first eval, when every eval
measures the same prompts: the paired standard error.

A held-out mean (greedy accuracy, gold reward) is measured at each eval on the same P
prompts. Its change since the first eval is mean(d), with d_p = x_p(now) - x_p(first) per
prompt, and the change's standard error is sd(d) / sqrt(P) (the sample sd, P - 1 degrees
of freedom: the paired t-test's error; for 0/1 values the paired test's of two
proportions, from the prompts gained and lost). The two evals' own
errors combined, sqrt(se_first^2 + se_now^2), ignore that a prompt easy (or hard) at the
first eval is mostly easy (or hard) at the last, and overstate the noise of the change.

The first eval's per-prompt values are kept in `out_dir/eval_first.json` (written whole,
by process 0; every process reads it on resume, and only process 0 logs), so a resumed
run logs what the uninterrupted run would. Each error is logged with `change_from_step`,
the step of the eval it compares with: a reader pairs it only with that eval (a file left
by an earlier attempt, or one kept anew when the held-out prompts changed, is then not
mistaken for the change since the metrics' first eval).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jaxllm.tokenizer import write_file_atomically

FILE = "eval_first.json"


class FirstEval:
    """A stage's first eval of `prompts` (their texts), and each later eval's paired error
    against it."""

    def __init__(self, out_dir: str | Path, prompts: Sequence[str]):
        self.path = Path(out_dir) / FILE
        self.digest = hashlib.sha256("\0".join(prompts).encode()).hexdigest()
        self.first = self._read()

    def _read(self) -> dict | None:
        """The kept first eval, or None when there is none (or it is of other prompts)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(data, dict) and data.get("prompts") == self.digest
        return data if ok and isinstance(data.get("values"), dict) else None

    def change_errors(self, step: int, values: dict[str, np.ndarray]) -> dict[str, float]:
        """`{key}_change_se` for each `values[key]` ((P,), per prompt): the standard error
        of mean(values[key]) - mean(its first eval's), and `change_from_step`, that eval's
        step. At the first eval (no earlier one
        kept, or one kept at this step or later, from a run cut off before its checkpoint)
        it keeps these values instead and returns {}."""
        if self.first is None or self.first["step"] >= step:
            self.first = {
                "step": step,
                "prompts": self.digest,
                "values": {key: np.asarray(x, np.float64).tolist() for key, x in values.items()},
            }
            if jax.process_index() == 0:
                write_file_atomically(self.path, json.dumps(self.first).encode())
            return {}
        errors = {}
        for key, now in values.items():
            first = self.first["values"].get(key)
            if first is None or len(first) != len(now) or len(now) < 2:
                continue
            d = np.asarray(now, np.float64) - np.asarray(first, np.float64)
            errors[f"{key}_change_se"] = float(d.std(ddof=1) / math.sqrt(len(d)))
        return {**errors, "change_from_step": self.first["step"]} if errors else {}
