"""The pipeline's report: `out_dir/report.md`, one PNG per stage, and a one-line summary per
stage with its headline figure.

What each stage's figure shows worked is the stage's registered headline and panels
(`jaxllm.stages.reports`), read from its `metrics.jsonl` (first eval against last; with
`train.eval_at_start`, as in the quick start, the first eval measures the model the stage
started from); the label stage's is the comparisons written and the Bayes ceiling of the
held-out labels (the accuracy no reward model can beat on labels this noisy). Plus a table
of each policy's greedy answers to the same held-out built-in prompts (chosen once, at the
first policy stage, among prompts no stage trains on; the capital family's facts repeat by
design), and each stage's wall time (of the run that finished it).

The lineage table is read from each stage's `inputs.json` (`jaxllm.run_inputs`): the runs
it started from (by stage name when a pipeline folder, with the step read) and its data
(with a content hash's first digits). A start run whose folder now holds another run or
another step than the one read is marked, so the report never shows a lineage that no
longer exists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from jaxllm.data import builtin_chat
from jaxllm.metrics import read_metrics
from jaxllm.run_inputs import RECORD_FILE, read_record, recorded_inputs, run_identity
from jaxllm.stages.registry import STAGES

REPORT = "report.md"
LABEL = "label"  # the pipeline's labelling step (not a training stage)
LABELS_TRAIN, LABELS_EVAL = "labels_train.jsonl", "labels_eval.jsonl"  # what it writes


def report_examples(plan, count: int) -> list[dict[str, str]]:
    """`count` built-in prompts (families in turn) that no stage of `plan` trains on (held
    out from SFT's conversations and the RL stages' and labels' prompts), each with its
    `expected` answer."""
    from jaxllm.config import load_config

    seen: list[builtin_chat.Example] = []
    for stage in plan.cfg.stages:
        key = STAGES[stage].builtin_examples_key if stage in STAGES else None
        if key is not None:
            cfg = load_config(
                plan.base_files[stage], plan.overrides[stage], False, plan.sections[stage]
            )
            if cfg.data.path != builtin_chat.NAME:
                continue
            number = OmegaConf.select(OmegaConf.structured(cfg), key)
            seen += builtin_chat.examples(number, cfg.train.seed, cfg.data.builtin_family_names())
        elif stage == LABEL:
            seen += builtin_chat.examples(plan.cfg.label.prompts, plan.cfg.label.seed)
    return [
        {"prompt": e.prompt, "expected": e.answer}
        for e in builtin_chat.held_out(count, seed=7_919, train=seen)
    ]


def policy_answers(run_dir: Path, examples: list[dict[str, str]]) -> list[dict]:
    """The run's greedy reply to each example's `prompt` (up to 48 tokens, `<think>` kept),
    whether its answer is the `expected` one, and whether it ends with a stop token
    (`<|im_end|>` in jaxllm's template)."""
    import jax

    from jaxllm.chat import render_for_generation, reply_answer
    from jaxllm.generate import Generator
    from jaxllm.stages.common import load_run

    run = load_run(run_dir, "the report's policy")
    tokenizer = run.tokenizer
    prompts = [
        render_for_generation(tokenizer, [{"role": "user", "content": e["prompt"]}])
        for e in examples
    ]
    room = run.model.cfg.max_seq_len - max(map(len, prompts))
    if room < 1:
        return []
    generator = Generator(run.model, tokenizer.vocab_size, tokenizer.pad_id, min(48, room))
    stops = list(tokenizer.stop_ids)
    completion = generator(run.params, prompts, jax.random.key(0), temperature=0.0, stop_ids=stops)
    answers = []
    for i, example in enumerate(examples):
        reply = completion.row(i)
        answers.append(
            {
                "prompt": example["prompt"],
                "reply": tokenizer.decode(t for t in reply if t not in stops),
                "correct": reply_answer(tokenizer, reply) == example["expected"],
                "ends_with_im_end": any(t in stops for t in reply),
            }
        )
    return answers


def _metric_lines(run_dir: Path, split: str) -> list[dict]:
    """The run's `metrics.jsonl` lines of `split` (none when it has no file)."""
    path = run_dir / "metrics.jsonl"
    return [r for r in read_metrics(path) if r["split"] == split] if path.is_file() else []


def headline(stage: str, run_dir: Path, entry: dict, record: dict) -> str:
    """One line: the stage's figure of merit, first eval -> last (its registered headline;
    the label stage's comparisons and their Bayes ceiling)."""
    if stage == LABEL:
        reports, agreement = entry["reports"], entry["agreement"]
        written = [reports[name]["written"] for name in (LABELS_TRAIN, LABELS_EVAL)]
        return (
            f"{written[0]} training + {written[1]} held-out comparisons; Bayes ceiling of the "
            f"held-out labels {agreement['decided_ceiling']:.3f} on the pairs they decide"
        )
    evals = _metric_lines(run_dir, "eval")
    if not evals:
        return "no eval lines"
    return STAGES[stage].headline(evals, record)


def plot_stage(stage: str, run_dir: Path, record: dict, path: Path) -> bool:
    """Draw `stage`'s panels into `path`; False when there is nothing to draw."""
    evals, trains = _metric_lines(run_dir, "eval"), _metric_lines(run_dir, "train")
    panels = STAGES[stage].panels(evals, trains, record)
    if not any(xs for panel in panels for _, xs, _ in panel["series"]):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, xs, ys in panel["series"]:
            ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", label=label, markersize=3)
        for label, value in panel.get("lines", {}).items():
            ax.axhline(value, linestyle="--", color="grey", linewidth=1)
            ax.annotate(label, (0.02, value), xycoords=("axes fraction", "data"), fontsize=7)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(panel.get("xlabel", "step"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(stage)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _cell(text: str, limit: int = 100) -> str:
    """`text` as one markdown table cell, cut to `limit` characters."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def _run_cell(key: str, run: dict, out_dir: Path) -> str:
    """`policy_from: sft at step 20`; marked when that folder now holds something else."""
    path = Path(run["path"])
    name = path.name if path.parent == out_dir.resolve() else str(path)
    text = f"{key.split('.')[-1]}: {name}" + (f" at step {run['step']}" if "step" in run else "")
    now = run_identity(str(path))
    if (now.get("run_id"), now.get("step")) != (run.get("run_id"), run.get("step")):
        text += " (**that folder now holds another run or step**)"
    return text


def _data_cell(key: str, identity: dict) -> str:
    """`data.path: FILE (sha256 1a2b3c4d)`, or the value of a built-in or `hf:` input."""
    content = identity.get("content") or {}
    digest = f" (sha256 {content['sha256'][:8]})" if "sha256" in content else ""
    return f"{key}: {identity.get('value', identity.get('path'))}{digest}"


def lineage_lines(out_dir: Path, stages: list[str]) -> list[str]:
    """The report's lineage table: per stage, the start runs and data its `inputs.json`
    records."""
    lines = ["## Lineage", "", "| stage | started from | data |", "|---|---|---|"]
    for stage in stages:
        inputs = recorded_inputs(read_record(out_dir / stage / RECORD_FILE))
        runs = [
            _run_cell(key, run, out_dir)
            for key, value in inputs.items()
            if isinstance(value, list)
            for run in value
        ]
        data = [
            _data_cell(key, value)
            for key, value in inputs.items()
            if key.startswith("data.") and key != "data.tokenizer" and isinstance(value, dict)
        ]
        lines.append(f"| {stage} | {'; '.join(runs) or '-'} | {'; '.join(data) or '-'} |")
    return lines


def write_report(plan, record: dict[str, Any]) -> tuple[Path, list[str]]:
    """Write `out_dir/report.md` and `out_dir/report/STAGE.png`; return the report's path
    and the summary lines (one per finished stage)."""
    out_dir = Path(plan.cfg.out_dir)
    finished = [s for s in plan.cfg.stages if s in record["stages"]]
    headlines, sections = {}, []
    for stage in finished:
        entry, run_dir = record["stages"][stage], out_dir / stage
        line = headlines[stage] = headline(stage, run_dir, entry, record)
        wall = f"Wall time {entry['wall_s']:.0f} s; run: `{run_dir}`."
        section = [f"## {stage}", "", f"{line}. {wall}"]
        png = out_dir / "report" / f"{stage}.png"
        if stage != LABEL and plot_stage(stage, run_dir, record, png):
            section += ["", f"![{stage}](report/{stage}.png)"]
        sections.append("\n".join(section))
    total = sum(record["stages"][s]["wall_s"] for s in finished)
    lines = [
        "# The whole life of a model",
        "",
        f"Stages, in the order they ran: {', '.join(plan.cfg.stages)} (what each started from: "
        f"Lineage, below); out_dir `{out_dir}`; {total:.0f} s of stage "
        "wall time (each stage's last run). A stage's first eval (with `train.eval_at_start`) "
        "measures the model it started from. Beside a change: its standard error and whether "
        "it is at least two of them (beyond noise) or not (within noise). Where both evals "
        "score the same held-out prompts one by one (GRPO's accuracy, PPO's rewards), the "
        "error is the paired one, sd(d) / sqrt(n) of the per-prompt changes d; elsewhere it "
        "is that of two independent estimates, sqrt(se_first^2 + se_last^2).",
        "",
        "| stage | headline | wall time |",
        "|---|---|---|",
        *(
            f"| {s} | {_cell(line, 1000)} | {record['stages'][s]['wall_s']:.0f} s |"
            for s, line in headlines.items()
        ),
        "",
        *lineage_lines(out_dir, finished),
        "",
        "\n\n".join(sections),  # a blank line between a stage's plot and the next heading
    ]
    answered = [s for s in finished if record["stages"][s].get("answers")]
    if answered:
        by_prompt = {s: {a["prompt"]: a for a in record["stages"][s]["answers"]} for s in answered}
        lines += [
            "",
            "## Greedy answers to held-out prompts after each stage",
            "",
            "✓: the answer (after any `</think>`) is right. Replies are cut at 48 tokens.",
            "",
            "| prompt | expected | " + " | ".join(answered) + " |",
            "|---|---|" + "---|" * len(answered),
        ]
        for example in record.get("report_examples", []):
            cells = []
            for s in answered:
                answer = by_prompt[s].get(example["prompt"])
                mark = "✓ " if answer and answer["correct"] else ""
                cells.append(mark + _cell(answer["reply"]) if answer else "")
            head = f"| {_cell(example['prompt'])} | {_cell(example['expected'])} | "
            lines.append(head + " | ".join(cells) + " |")
    path = out_dir / REPORT
    partial = path.with_name(f".{REPORT}.partial")
    partial.write_text("\n".join(lines) + "\n")
    os.replace(partial, path)
    summary = [
        f"{s:>8}: {line} [{record['stages'][s]['wall_s']:.0f} s]" for s, line in headlines.items()
    ]
    return path, summary
