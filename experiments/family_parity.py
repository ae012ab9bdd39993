"""Float32 logits of each model family against `transformers`, as a table.

    python experiments/family_parity.py

For every family of `tests/test_families.py` (random models with the real configs'
ratios, saved by `transformers`, imported with `jaxllm import-hf`): the largest |logit| of
2 x 32 tokens at every position and the largest |difference| from `transformers`' own
forward pass. Needs `transformers` and CPU `torch` (`bash scripts/setup.sh`).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_families as families  # noqa: E402  (tests/: the folders the parity tests use)


def main() -> None:
    print("| family | max \\|logit\\| | max \\|difference\\| |")
    print("|---|---|---|")
    for name in families.FAMILY_CONFIGS:
        root = Path(tempfile.mkdtemp())
        model = families.hf_folder(root / "hf", name)
        run = families.import_run(root / "hf", root / "run")
        ours = np.asarray(run.model.logits(run.params, jnp.asarray(families.TOKENS_BT)))
        theirs = families.hf_logits(model, families.TOKENS_BT)
        print(f"| {name} | {np.abs(theirs).max():.2f} | {np.abs(ours - theirs).max():.1e} |")


if __name__ == "__main__":
    main()
