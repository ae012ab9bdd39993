"""Watches over an RL run: reward hacking, and a collapse of what the policy learns.

The reward-hacking watch: the proxy reward (a reward model) rising while the gold reward
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


def _fell(recent: np.ndarray, before: np.ndarray) -> bool:
    """Whether the mean of `recent` lies below the mean of `before` by more than twice the
    standard error of their difference (each window's spread over its length)."""
    noise = 2.0 * np.sqrt(recent.var() / len(recent) + before.var() / len(before))
    return before.mean() - recent.mean() > max(noise, 1e-6)


class CollapseWatch:
    """Warns once, naming the likely cause, when what an RL run learns collapses:

    - **breaking apart**: the rollouts' mean reward over the last `window` iterations fell
      below the `window` before by more than twice its standard error while the sampled
      tokens' mean negative log-probability (an estimate of the policy's entropy) rose:
      most often a step too large (lower `optimizer.lr`, add warm-up, or a KL term);
    - **a shortcut**: the `correct` reward fell that way while `format` held or rose: the
      policy keeps the format reward and loses the answers;
    - **entropy collapse**: the entropy estimate fell below a quarter of its first
      window's while the reward did not rise (and is not at the best it ever was, as a
      solved task's is): the policy samples almost one reply, so groups stop comparing
      anything (raise the temperature, GRPO's `eps_high` or PPO's `entropy_coef`);
    - **held-out accuracy** fell below its best eval by more than twice the standard
      error of their difference, at two evals in a row.
    """

    def __init__(
        self,
        window: int,
        kl_term: str = "grpo.beta (a KL term)",
        entropy_options: str = "grpo.temperature or grpo.eps_high (clip-higher)",
    ):
        """`kl_term`, `entropy_options`: the stage's options its advice names (GRPO's by
        default) for a step too large and for a collapsed entropy."""
        self.window, self.warned = window, False
        self.kl_term, self.entropy_options = kl_term, entropy_options
        self.rollouts: list[tuple[float, float, float, float]] = []
        self.evals: list[tuple[int, float, int]] = []
        self.falls = 0

    def _say(self, text: str) -> str:
        self.warned = True
        return f"warning: {text}"

    def add_rollout(
        self, step: int, reward: float, entropy: float, correct: float, format_: float
    ) -> str | None:
        """One iteration's rollout means (`correct`, `format`: nan when not rewarded)."""
        self.rollouts.append((reward, entropy, correct, format_))
        w = self.window
        if self.warned or w < 1 or len(self.rollouts) < 2 * w:
            return None
        history = np.asarray(self.rollouts)
        recent, before, first = history[-w:], history[-2 * w : -w], history[:w]
        span = f"iterations {step - 2 * w + 1}-{step - w} -> {step - w + 1}-{step}"
        reward_fell = _fell(recent[:, 0], before[:, 0])
        if reward_fell and recent[:, 1].mean() > before[:, 1].mean():
            return self._say(
                f"the policy is breaking apart at step {step}: the rollouts' mean reward fell "
                f"{before[:, 0].mean():.3f} -> {recent[:, 0].mean():.3f} ({span}) while their "
                f"entropy rose {before[:, 1].mean():.2f} -> {recent[:, 1].mean():.2f}; most "
                f"often the step is too large: lower optimizer.lr, add warm-up or raise "
                f"{self.kl_term}"
            )
        correct_known = not np.isnan(history[:, 2]).any() and not np.isnan(history[:, 3]).any()
        if (
            correct_known
            and _fell(recent[:, 2], before[:, 2])
            and recent[:, 3].mean() >= before[:, 3].mean()
        ):
            return self._say(
                f"a shortcut at step {step}: the correct reward fell {before[:, 2].mean():.3f} "
                f"-> {recent[:, 2].mean():.3f} ({span}) while the format reward held "
                f"({before[:, 3].mean():.3f} -> {recent[:, 3].mean():.3f}); the policy keeps the "
                "format and loses the answers: lower optimizer.lr or the format reward's weight"
            )
        reward_stuck = first[:, 0].mean() >= recent[:, 0].mean() < history[:, 0].max()
        if recent[:, 1].mean() < 0.25 * first[:, 1].mean() and reward_stuck:
            return self._say(
                f"entropy collapse at step {step}: the rollouts' entropy fell "
                f"{first[:, 1].mean():.2f} -> {recent[:, 1].mean():.2f} with no rise in reward; "
                f"near-identical replies teach nothing: raise {self.entropy_options}"
            )
        return None

    def add_eval(self, step: int, accuracy: float, count: int) -> str | None:
        """One held-out eval's greedy accuracy over `count` prompts."""
        self.evals.append((step, accuracy, count))
        if self.warned or len(self.evals) < 3:
            return None
        best_step, best, n = max(self.evals[:-1], key=lambda e: e[1])
        se = np.sqrt(best * (1 - best) / n + accuracy * (1 - accuracy) / count)
        self.falls = self.falls + 1 if best - accuracy > max(2 * se, 1e-6) else 0
        if self.falls >= 2:
            return self._say(
                f"held-out accuracy fell from {best:.3f} (step {best_step}) to {accuracy:.3f} "
                f"at step {step}, more than twice its standard error at two evals in a row: "
                "the run is unlearning (lower optimizer.lr, or keep the best checkpoint)"
            )
        return None


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
