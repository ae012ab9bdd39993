"""The reward-hacking watch: the proxy reward (a reward model) rising while the gold reward
(the simulated labelers' rule) falls.

`HackingWatch` sees one eval at a time (PPO warns from it during training); `watch_report`
reads a finished or running run's `metrics.jsonl` (what `jaxllm watch RUN` prints): the
table of evals, where the gold reward peaked and at what KL, how far each reward moved
from the start and the gold from its peak by the end, and a plot of both against
sqrt(KL per reply), the axis on which Gao et al. (2022) see gold rise then fall.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class WatchReport:
    lines: list[str]  # the table: one line per eval
    warning: str | None  # the watch's warning, or None
    summary: list[str]  # the gold's peak and the end against the start and the peak
    evals: list[dict]  # the eval lines read (those with gold_reward)


def watch_report(run_dir: str | Path, window: int = 3) -> WatchReport:
    """What `jaxllm watch` prints about the run in `run_dir` (its eval lines with a gold
    reward, from PPO or GRPO with a gold rule)."""
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
    first, last = evals[0], evals[-1]
    peak = max(evals, key=lambda e: e["gold_reward"])
    kl = peak.get("kl_sequence", float("nan"))
    proxy_moved = last["reward"] - first["reward"]
    gold_moved = last["gold_reward"] - first["gold_reward"]
    below_peak = peak["gold_reward"] - last["gold_reward"]
    summary = [
        f"gold peaked at step {peak['step']}: {peak['gold_reward']:.3f} (proxy "
        f"{peak['reward']:.3f}) at KL {kl:.3f} nats per reply (sqrt {np.sqrt(max(kl, 0)):.3f})",
        f"from the first eval (step {first['step']}) to the last (step {last['step']}): proxy "
        f"{proxy_moved:+.3f}, gold {gold_moved:+.3f}; the gold ended {below_peak:.3f} below "
        "its peak",
    ]
    return WatchReport(lines, warning, summary, evals)


def plot_watch(report: WatchReport, png_path: str | Path) -> None:
    """Proxy and gold reward of the evals against sqrt(KL per reply), the gold's peak
    marked; each reward on its own axis (they have different scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [np.sqrt(max(e.get("kl_sequence", 0.0), 0.0)) for e in report.evals]
    figure, proxy_axes = plt.subplots(figsize=(7, 4))
    gold_axes = proxy_axes.twinx()
    proxy_axes.plot(x, [e["reward"] for e in report.evals], "o-", color="C0", label="proxy")
    gold = [e["gold_reward"] for e in report.evals]
    gold_axes.plot(x, gold, "s--", color="C1", label="gold")
    peak = int(np.argmax(gold))
    gold_axes.plot([x[peak]], [gold[peak]], "*", color="C3", markersize=14, label="gold peak")
    proxy_axes.set_xlabel("sqrt(KL(policy || reference)), nats per reply")
    proxy_axes.set_ylabel("proxy reward (reward model)", color="C0")
    gold_axes.set_ylabel("gold reward (labelers' rule)", color="C1")
    proxy_axes.grid(alpha=0.3)
    handles = [h for axes in (proxy_axes, gold_axes) for h in axes.get_legend_handles_labels()[0]]
    gold_axes.legend(handles=handles, loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
