"""`jaxllm label`: sample replies from a run and label them, by simulated people or a judge.

For each prompt, K replies are sampled from the run (`jaxllm.rl.rollouts`), duplicates and
empty replies are dropped, and a noisy labeler of a gold rule (`jaxllm.rl.labelers`) ranks
the rest; prompts left with fewer than two distinct replies are skipped and counted. Each
written line is a ranking record of `jaxllm.data.preferences` (`prompt`, `responses`,
`scores`, ties where the gold is equal) plus `gold` (the rule's reward of each reply),
`rule` and `tau`, so a reward model can train on it and later stages can measure the gold
reward beside their proxy.
With `--judge` (AI feedback: a reward run, a policy asked which reply is better, or the
gold rule's soft probability), every pair of a prompt's replies becomes a pair record with
`label_probability`, and with a gold rule an agreement report says how far the judge
agrees with the gold and with the simulated people, and how calibrated it is.
The output is written whole or not at all (a temporary file renamed at the end).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from jaxllm.data.prompts import Prompt, rendered_prompts
from jaxllm.errors import UserError
from jaxllm.generate import Generator
from jaxllm.rl.judges import Judge
from jaxllm.rl.labelers import GOLD_RULES, bayes_ceiling, label
from jaxllm.rl.rollouts import sample_groups
from jaxllm.stages.common import LoadedRun

ROWS_PER_CALL = 256  # sampler rows per call: bounds the KV cache of a long prompt list


@dataclass
class LabelReport:
    prompts: int = 0
    written: int = 0
    skipped_too_few: int = 0  # fewer than two distinct non-empty replies
    duplicates: int = 0  # replies dropped as a copy of an earlier one
    empty: int = 0
    truncated: int = 0  # replies cut off at max_new_tokens (no stop token)

    def summary(self) -> str:
        return (
            f"{self.written} of {self.prompts} prompts labelled; {self.skipped_too_few} skipped "
            f"with fewer than 2 distinct replies; replies dropped: {self.duplicates} duplicate, "
            f"{self.empty} empty; {self.truncated} replies cut off without a stop token"
        )


def sample_replies(
    run: LoadedRun,
    prompts: list[Prompt],
    *,
    replies: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    report: LabelReport,
) -> list[tuple[Prompt, list[str]]]:
    """(prompt, its distinct non-empty replies of `replies` sampled from `run`, in sampling
    order) for each prompt left with at least two; dropped replies and skipped prompts
    are counted in `report`."""
    if replies < 2:
        raise UserError(f"--replies {replies}: a ranking needs at least 2 replies per prompt")
    tokenizer, context = run.tokenizer, run.model.cfg.max_seq_len
    budget = min(max_new_tokens, context - 1)
    ids = rendered_prompts(
        tokenizer, prompts, context - budget, f"--max-new-tokens {budget} of {context} context"
    )
    generator = Generator(run.model, tokenizer.vocab_size, tokenizer.pad_id, budget)
    stops = list(tokenizer.stop_ids)
    completion = sample_groups(
        generator,
        run.params,
        ids,
        replies,
        jax.random.key(seed),
        max_rows=ROWS_PER_CALL,
        temperature=temperature,
        stop_ids=stops,
    )
    report.prompts = len(prompts)
    kept = []
    for index, prompt in enumerate(prompts):
        texts: list[str] = []
        for row in range(index * replies, (index + 1) * replies):
            tokens = completion.row(row)
            report.truncated += not any(t in stops for t in tokens)
            text = tokenizer.decode(t for t in tokens if t not in stops)
            if not text.strip():
                report.empty += 1
            elif text in texts:
                report.duplicates += 1
            else:
                texts.append(text)
        if len(texts) < 2:
            report.skipped_too_few += 1
        else:
            kept.append((prompt, texts))
    report.written = len(kept)
    return kept


def _checked_output(output: str | Path, rule: str | None, tau: float) -> Path:
    """`output` as a Path, once the gold rule (None: none), the noise and the output are
    known to be usable."""
    if rule is not None and rule not in GOLD_RULES:
        raise UserError(f"unknown gold rule '{rule}'; use one of {', '.join(GOLD_RULES)}")
    if not tau >= 0:
        raise UserError(f"--tau {tau} must be >= 0 (0: a labeler without noise)")
    output = Path(output)
    if output.exists():
        raise UserError(f"{output} exists; remove it or choose another --output")
    return output


def _write_whole(output: Path, lines: list[dict]) -> None:
    """Write `lines` as JSONL to `output` whole or not at all (a renamed temporary file)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as file:
            for line in lines:
                file.write(json.dumps(line) + "\n")
    except OSError as error:  # a full disk: nothing half-written left, the path named
        partial.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(output)) from None
    os.replace(partial, output)


def sample_and_label(
    run: LoadedRun,
    prompts: list[Prompt],
    output: str | Path,
    *,
    replies: int,
    rule: str,
    tau: float,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> LabelReport:
    """Write one labelled ranking per prompt (with >= 2 distinct replies) to `output`."""
    output = _checked_output(output, rule, tau)
    report = LabelReport()
    kept = sample_replies(
        run,
        prompts,
        replies=replies,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        report=report,
    )
    rng = np.random.default_rng(seed)
    lines = [
        {**label(prompt.messages, texts, GOLD_RULES[rule], tau, rng), "rule": rule, "tau": tau}
        for prompt, texts in kept
    ]
    _write_whole(output, lines)
    return report


def label_agreement(path: Path, tau: float) -> dict[str, float]:
    """The Bayes ceiling and the gold rule's own accuracy on these labels, over every pair
    (ties, equal gold or equal score, count 0.5) and over the pairs the labels decide
    (`path`: a labelled .jsonl that `sample_and_label` wrote, with `gold` and `scores`)."""
    gold_pairs, decided_pairs, agreement, decided_agreement = [], [], [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        gold, scores = record["gold"], record["scores"]
        for i, j in itertools.combinations(range(len(gold)), 2):
            gold_pairs.append((gold[i], gold[j]))
            if scores[i] == scores[j]:
                agreement.append(0.5)
                continue
            agrees = (
                0.5 if gold[i] == gold[j] else float((gold[i] > gold[j]) == (scores[i] > scores[j]))
            )
            agreement.append(agrees)
            decided_agreement.append(agrees)
            decided_pairs.append((gold[i], gold[j]))

    def mean(values):
        return sum(values) / len(values) if values else math.nan

    return {
        "ceiling": bayes_ceiling(gold_pairs, tau) if gold_pairs else math.nan,
        "rule": mean(agreement),
        "decided_ceiling": bayes_ceiling(decided_pairs, tau) if decided_pairs else math.nan,
        "decided_rule": mean(decided_agreement),
    }


def sample_and_judge(
    run: LoadedRun,
    prompts: list[Prompt],
    output: str | Path,
    *,
    judge: Judge,
    judge_name: str,
    replies: int,
    rule: str | None,
    tau: float,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> tuple[LabelReport, dict | None]:
    """AI feedback: every pair of each prompt's distinct replies labelled by `judge` as a
    pair record with `label_probability` (the better-judged reply as `chosen`, so p >=
    0.5), plus `judge`; with a gold `rule`, each record keeps `gold` ([chosen, rejected])
    and the agreement report (`agreement_report`) is written beside the output as
    `<output>.agreement.json` and `.png`. Returns (report, agreement or None)."""
    output = _checked_output(output, rule, tau)
    report = LabelReport()
    kept = sample_replies(
        run,
        prompts,
        replies=replies,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        report=report,
    )
    pairs = [  # (prompt, reply a, reply b)
        (prompt, a, b) for prompt, texts in kept for a, b in itertools.combinations(texts, 2)
    ]
    if not pairs:
        raise UserError("no prompt has two distinct replies to compare; sample more --replies")
    probability = judge(
        [p.messages for p, _, _ in pairs], [a for _, a, _ in pairs], [b for _, _, b in pairs]
    )
    lines = []
    for (prompt, a, b), p in zip(pairs, probability, strict=True):
        chosen, rejected, p = (a, b, float(p)) if p >= 0.5 else (b, a, 1 - float(p))
        line = {
            "prompt": prompt.messages,
            "chosen": chosen,
            "rejected": rejected,
            "label_probability": p,
            "judge": judge_name,
        }
        if rule is not None:
            line.update(gold=[GOLD_RULES[rule](chosen), GOLD_RULES[rule](rejected)], rule=rule)
        lines.append(line)
    agreement = None
    if rule is not None:
        agreement = agreement_report(lines, tau)
        base = output.with_name(output.name + ".agreement")
        base.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{base}.json").write_text(json.dumps(agreement, indent=1) + "\n")
        plot_calibration(agreement, Path(f"{base}.png"), judge_name)
    _write_whole(output, lines)
    return report, agreement


CALIBRATION_BINS = 10


def agreement_report(lines: list[dict], tau: float) -> dict:
    """How an AI judge's labels (pair records with `label_probability` p = P(chosen better)
    and `gold`) agree with the gold rule and with the simulated people:
    - `gold_agreement`: share of the pairs the gold decides where the judge prefers the
      gold's better reply (p = 0.5 counts 0.5);
    - `human_agreement`: expected share of the simulated labelers' (noise tau) choices the
      judge's preference matches, P_h = sigmoid((g_chosen - g_rejected) / tau);
    - `calibration`: pairs binned by the judge's P(a better) for a random orientation (both
      orientations of each pair are counted), per bin the mean predicted probability, the
      simulated labelers' P_h and the gold's frequency (ties 0.5), and the count;
    - `confident_share`: share of labels with p >= 0.9; `mean_label_probability`."""
    gold_votes, human_votes, bins = [], [], [[] for _ in range(CALIBRATION_BINS)]
    for line in lines:
        p = line["label_probability"]
        gap = line["gold"][0] - line["gold"][1]
        judge_side = 0.5 if p == 0.5 else 1.0  # the judge prefers `chosen` (p >= 0.5)
        if gap != 0:
            gold_votes.append(judge_side if gap > 0 else 1 - judge_side)
        human = 0.5 if gap == 0 else _logistic(gap / tau) if tau > 0 else float(gap > 0)
        human_votes.append(judge_side * human + (1 - judge_side) * (1 - human))
        gold = 0.5 if gap == 0 else float(gap > 0)
        for predicted, humans, golds in ((p, human, gold), (1 - p, 1 - human, 1 - gold)):
            index = min(int(predicted * CALIBRATION_BINS), CALIBRATION_BINS - 1)
            bins[index].append((predicted, humans, golds))
    calibration = [
        {
            "bin": [i / CALIBRATION_BINS, (i + 1) / CALIBRATION_BINS],
            "predicted": float(np.mean([x[0] for x in entries])),
            "human": float(np.mean([x[1] for x in entries])),
            "gold": float(np.mean([x[2] for x in entries])),
            "count": len(entries),
        }
        for i, entries in enumerate(bins)
        if entries
    ]
    probabilities = np.array([line["label_probability"] for line in lines])
    return {
        "pairs": len(lines),
        "gold_decided_pairs": len(gold_votes),
        "gold_agreement": float(np.mean(gold_votes)) if gold_votes else float("nan"),
        "human_agreement": float(np.mean(human_votes)),
        "confident_share": float(np.mean(probabilities >= 0.9)),
        "mean_label_probability": float(probabilities.mean()),
        "tau": tau,
        "calibration": calibration,
    }


def _logistic(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def plot_calibration(agreement: dict, png_path: Path, judge_name: str) -> None:
    """Reliability diagram: the judge's predicted probability against the simulated
    labelers' and the gold's frequency per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = agreement["calibration"]
    figure, axes = plt.subplots(figsize=(5, 4.5))
    axes.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    predicted = [r["predicted"] for r in rows]
    axes.plot(predicted, [r["human"] for r in rows], "o-", label="simulated labelers")
    axes.plot(predicted, [r["gold"] for r in rows], "s--", label="gold rule")
    axes.set_xlabel(f"{judge_name}: P(a better)")
    axes.set_ylabel("frequency a is better")
    axes.set_title(
        f"gold agreement {agreement['gold_agreement']:.3f}, "
        f"confident {agreement['confident_share']:.2f}",
        fontsize=9,
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
