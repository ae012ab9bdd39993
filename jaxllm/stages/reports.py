"""Each stage's figure of merit in the pipeline's report: a headline (first eval -> last)
and the panels drawn for it, read from the stage's `metrics.jsonl` lines.

A headline function takes (eval lines, the pipeline record) and returns one line; a panels
function takes (eval lines, train lines, the record) and returns panels, each a dict with a
`title`, `series` of (label, xs, ys), and optionally `xlabel` and horizontal `lines`
{label: y}. The record is `pipeline.json`'s data (the label stage's agreement figures are
in `record["stages"]["label"]`). With `train.eval_at_start`, as in the quick start, the
first eval measures the model a stage started from.
"""

from __future__ import annotations

import math

Series = tuple[str, list, list]


def change(evals: list[dict], key: str, digits: int = 3) -> str:
    """`first -> last` of `key` over the eval lines."""
    first, last = evals[0].get(key, math.nan), evals[-1].get(key, math.nan)
    return f"{first:.{digits}f} -> {last:.{digits}f}"


def beyond_noise(moved: float, se: float | None) -> str:
    """`+0.143 ± 0.060: 2.4 SE, beyond noise`: a change, its standard error and whether
    the change is at least 2 of them (empty when the error is unknown)."""
    if se is None or math.isnan(moved) or math.isnan(se):
        return ""
    if se == 0:
        return f"{moved:+.3f}: " + ("no noise in the estimate" if moved else "no change")
    ratio = abs(moved) / se
    verdict = "beyond noise" if ratio >= 2 else "within noise"
    return f"{moved:+.3f} ± {se:.3f}: {ratio:.1f} SE, {verdict}"


def _parenthesised(*parts: str) -> str:
    """` (a; b)` of the non-empty parts, or nothing."""
    parts = tuple(p for p in parts if p)
    return f" ({'; '.join(parts)})" if parts else ""


def paired_error(evals: list[dict], key: str) -> float | None:
    """The last eval's paired standard error of `key`'s change (`stages.paired`), where it
    is logged against the first of `evals` (its `change_from_step`); else None."""
    first, last = evals[0], evals[-1]
    if last.get("change_from_step") != first.get("step"):
        return None
    return last.get(f"{key}_change_se")


def accuracy_change(evals: list[dict], key: str, count_key: str) -> str:
    """`first -> last` of the accuracy `key`, measured on `count_key` items at each eval,
    and its change against its standard error: the paired one (`paired_error`), where the
    stage logs it (the same prompts at every eval); else that of a difference of two
    independent proportions, sqrt(p (1 - p) (1/n1 + 1/n2)) with p pooled over both (as a
    two-proportion test: no zero error at an accuracy of 0 or 1), which is too large when
    the evals share their prompts."""
    first, last = evals[0], evals[-1]
    n1, n2 = first.get(count_key), last.get(count_key)
    if len(evals) < 2 or not n1 or not n2 or key not in first or key not in last:
        return change(evals, key)
    a1, a2 = first[key], last[key]
    se = paired_error(evals, key)
    if se is None:
        pooled = (a1 * n1 + a2 * n2) / (n1 + n2)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return change(evals, key) + _parenthesised(beyond_noise(a2 - a1, se))


def steps(evals: list[dict]) -> str:
    return f"(step {evals[0]['step']} -> {evals[-1]['step']})"


def series(lines: list[dict], key: str, label: str, x: str = "step") -> Series:
    """(label, xs, ys) of `key` against `x` over the lines that have both."""
    points = [(line[x], line[key]) for line in lines if key in line and x in line]
    return (label, [p[0] for p in points], [p[1] for p in points])


def loss_headline(evals: list[dict], record: dict) -> str:
    return f"held-out loss {change(evals, 'loss')} {steps(evals)}"


def loss_panels(evals: list[dict], trains: list[dict], record: dict) -> list[dict]:
    return [
        {
            "title": "loss (nats/token)",
            "series": [series(trains, "loss", "train"), series(evals, "loss", "held out")],
        }
    ]


def pretrain_headline(evals: list[dict], record: dict) -> str:
    return f"validation loss {change(evals, 'loss')} nats/token {steps(evals)}"


def sft_headline(evals: list[dict], record: dict) -> str:
    """Accuracy of greedy answers to held-out built-in prompts, and the share
    of replies that end with `<|im_end|>` (the held-out loss without built-in prompts)."""
    if "accuracy" not in evals[-1]:
        return loss_headline(evals, record)
    return (
        f"held-out accuracy {accuracy_change(evals, 'accuracy', 'eval_prompts')}, replies "
        f"ending with "
        f"<|im_end|> {change(evals, 'ends_with_im_end')} {steps(evals)}"
    )


def sft_panels(evals: list[dict], trains: list[dict], record: dict) -> list[dict]:
    return [
        {"title": "held-out loss", "series": [series(evals, "loss", "loss")]},
        {
            "title": "held-out greedy replies",
            "series": [
                series(evals, "accuracy", "accuracy"),
                series(evals, "ends_with_im_end", "ends with <|im_end|>"),
            ],
        },
    ]


def _label_agreement(record: dict) -> dict:
    return record["stages"].get("label", {}).get("agreement", {})


def reward_headline(evals: list[dict], record: dict) -> str:
    """Held-out pairwise accuracy on the pairs the labels decide, against the labels' Bayes
    ceiling (the accuracy no reward model can beat on labels this noisy)."""
    ceiling = _label_agreement(record).get("decided_ceiling")
    against = f" (ceiling {ceiling:.3f})" if ceiling is not None else ""
    accuracy = accuracy_change(evals, "decided_accuracy", "decided_comparisons")
    return f"held-out accuracy on decided pairs {accuracy}{against} {steps(evals)}"


def reward_panels(evals: list[dict], trains: list[dict], record: dict) -> list[dict]:
    agreement = _label_agreement(record)
    lines = {
        f"Bayes ceiling ({name})": agreement[key]
        for name, key in (("decided", "decided_ceiling"), ("all pairs", "ceiling"))
        if key in agreement and not math.isnan(agreement[key])
    }
    return [
        {
            "title": "held-out pairwise accuracy",
            "series": [
                series(evals, "decided_accuracy", "decided pairs"),
                series(evals, "accuracy", "all pairs (ties 0.5)"),
            ],
            "lines": lines,
        }
    ]


def ppo_headline(evals: list[dict], record: dict) -> str:
    """Proxy reward (the reward model's score) of sampled held-out replies in standard
    deviations of the starting ones, the gold reward beside it, and the per-token KL."""
    first, last = evals[0], evals[-1]
    rise = (last["reward"] - first["reward"]) / max(first["reward_std"], 1e-9)
    std = f"{rise:+.2f} std of the start" if first["reward_std"] > 1e-6 else ""

    def difference(key: str, se_of) -> str:
        """The change of mean `key` against its paired standard error, where logged,
        else hypot(its two evals' standard errors)."""
        errors = [se_of(line) for line in (first, last)]
        paired = paired_error(evals, key)
        if len(evals) < 2 or (paired is None and None in errors):
            return ""
        se = paired if paired is not None else math.hypot(*errors)
        return beyond_noise(last[key] - first[key], se)

    def proxy_se(line: dict) -> float | None:
        n = line.get("eval_prompts")
        return line["reward_std"] / math.sqrt(n) if n else None

    proxy = difference("reward", proxy_se)
    gold = ""
    if "gold_reward" in last:
        noise = difference("gold_reward", lambda line: line.get("gold_reward_se"))
        gold = f", gold {change(evals, 'gold_reward')}{_parenthesised(noise)}"
    return (
        f"proxy reward {change(evals, 'reward')}{_parenthesised(proxy, std)}{gold}, "
        f"KL {last['kl']:.3f} nats/token {steps(evals)}"
    )


def ppo_panels(evals: list[dict], trains: list[dict], record: dict) -> list[dict]:
    by_kl = [series(evals, "reward", "proxy", x="kl_sequence")]
    by_step = [series(evals, "reward", "proxy")]
    if evals and "gold_reward" in evals[-1]:
        by_kl.append(series(evals, "gold_reward", "gold", x="kl_sequence"))
        by_step.append(series(evals, "gold_reward", "gold"))
    return [
        {"title": "reward vs KL", "xlabel": "KL to the start nats/reply", "series": by_kl},
        {"title": "reward of sampled held-out replies", "series": by_step},
        {"title": "per-token KL of the rollouts", "series": [series(trains, "kl", "kl")]},
    ]


def _calls_tools(evals: list[dict]) -> bool:
    """Whether the evals are tool-use episodes (`tool_call_rate` logged)."""
    return bool(evals) and "tool_call_rate" in evals[-1]


def grpo_headline(evals: list[dict], record: dict) -> str:
    """Held-out greedy accuracy beside the reply's shape: the tool-call rate of tool-use
    episodes, else the `<think>` format rate and think length."""
    if _calls_tools(evals):
        shape = f"tool-call rate {change(evals, 'tool_call_rate')}"
    else:
        shape = (
            f"format rate {change(evals, 'format_rate')}, "
            f"think length {change(evals, 'think_length', 1)}"
        )
    accuracy = accuracy_change(evals, "accuracy", "eval_prompts")
    return f"held-out greedy accuracy {accuracy}, {shape} {steps(evals)}"


def grpo_panels(evals: list[dict], trains: list[dict], record: dict) -> list[dict]:
    shape = ("tool_call_rate",) if _calls_tools(evals) else ("format_rate", "think_length")
    return [
        {"title": f"held-out greedy {key}", "series": [series(evals, key, key)]}
        for key in ("accuracy", *shape)
    ]


def dpo_headline(evals: list[dict], record: dict) -> str:
    accuracy = accuracy_change(evals, "accuracy", "decided_comparisons")
    return f"held-out preference accuracy {accuracy} {steps(evals)}"


def dpo_panels(evals: list[dict], trains: list[dict], record: dict) -> list[dict]:
    return [
        {
            "title": "held-out implicit-reward accuracy",
            "series": [series(evals, "accuracy", "accuracy")],
        }
    ]
