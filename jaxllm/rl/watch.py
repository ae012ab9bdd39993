"""The reward-hacking watch: the proxy reward (a reward model) rising while the gold reward
(the simulated labelers' rule) falls.

`HackingWatch` sees one eval at a time (PPO warns from it during training); `watch_table`
reads a finished or running run's `metrics.jsonl` (what `jaxllm watch RUN` prints).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxllm.errors import UserError
from jaxllm.metrics import read_metrics


class HackingWatch:
    """Warns once when, between the last `window` evals and the `window` before, the
    proxy's mean rose while the gold's fell by more than twice its standard error (so
    sampling noise alone rarely fires it): the policy is over-optimising the reward model."""

    def __init__(self, window: int):
        self.window, self.history, self.warned = window, [], False

    def add(self, step: int, proxy: float, gold: float, gold_se: float) -> str | None:
        """`gold_se`: the standard error of this eval's mean gold reward."""
        self.history.append((proxy, gold, gold_se**2))
        w = self.window
        if self.warned or len(self.history) < 2 * w:
            return None
        recent, before = np.mean(self.history[-w:], 0), np.mean(self.history[-2 * w : -w], 0)
        noise = 2 * np.sqrt((recent[2] + before[2]) / w)
        if recent[0] > before[0] and before[1] - recent[1] > noise:
            self.warned = True
            return (
                f"warning: reward hacking at step {step}? over the last {w} evals the proxy "
                f"reward rose {before[0]:.3f} -> {recent[0]:.3f} while the gold reward fell "
                f"{before[1]:.3f} -> {recent[1]:.3f} (more than twice its standard error)"
            )
        return None


def watch_table(run_dir: str | Path, window: int = 3) -> tuple[list[str], str | None]:
    """(one line per eval: step, proxy, gold, KL per token and per reply; the watch's
    warning or None) of the run in `run_dir`."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; pass the out_dir of an RL run")
    evals = [r for r in read_metrics(path) if r["split"] == "eval" and "gold_reward" in r]
    if not evals:
        raise UserError(f"{path} has no eval line with gold_reward; run PPO with ppo.gold_rule set")
    watch, warning = HackingWatch(window), None
    lines = [f"{'step':>6} | {'proxy':>7} | {'gold':>7} | {'KL/token':>8} | {'KL/reply':>8}"]
    for e in evals:
        lines.append(
            f"{e['step']:>6} | {e['reward']:>7.3f} | {e['gold_reward']:>7.3f} | "
            f"{e.get('kl', float('nan')):>8.3f} | {e.get('kl_sequence', float('nan')):>8.3f}"
        )
        said = watch.add(e["step"], e["reward"], e["gold_reward"], e.get("gold_reward_se", 0.0))
        warning = warning or said
    return lines, warning
