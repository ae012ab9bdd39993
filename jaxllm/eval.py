"""`jaxllm eval`: a run scored on the field's benchmarks, or on any prompts with answers.

Two modes:
- **Harness tasks** (`run_tasks`): EleutherAI's lm-evaluation-harness runs its tasks (the
  built-in ones where their datasets are reachable, or local task YAMLs from
  `--include-path`) on the run as a harness model (`jaxllm.harness.JaxLLM`), and prints its
  own results table. The figures equal `lm_eval --model hf` on the run's `export-hf`.
- **Prompts with answers** (`run_prompts`): the prompts a GRPO run reads (`.jsonl` lines
  with `prompt` or `messages` and an `answer`, optionally `family` and `tools`; or
  `builtin`, or `calculator`: the tool task's held-out prompts, 100 unless `--limit`, the
  ones its GRPO stage evaluates with the same seed; with `--max-turns 3 --tools calculator`
  as that stage). Per family: greedy accuracy with its standard error sqrt(a (1 - a) / n),
  and from K sampled replies per prompt the unbiased pass@k = 1 - C(n - c, k) / C(n, k)
  (Chen et al. 2021; c of the n = K samples right) for k = 1, 2, 4, ... <= K. A reply is
  right by the `correct` reward's rule (`jaxllm.answers`: math-verify where both sides
  parse as math, else the exact rule). GRPO's held-out evals report the same figures
  (`answer_figures`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxllm.data import builtin_chat, tool_task
from jaxllm.data.prompts import PromptFields, offered_tools, read_prompts, rendered_prompts
from jaxllm.errors import ConfigError, DataError, UserError


def pass_at_k(correct: int, samples: int, k: int) -> float:
    """The unbiased pass@k of `correct` right answers among `samples` (Chen et al. 2021):
    the chance that k of the samples drawn without replacement hold a right one."""
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def pass_ks(samples: int) -> list[int]:
    """k = 1, 2, 4, ... up to `samples` (and `samples` itself)."""
    ks = [1 << i for i in range(samples.bit_length()) if 1 << i <= samples]
    return ks if ks[-1] == samples else [*ks, samples]


def answer_figures(
    greedy_correct: np.ndarray,
    sampled_correct: np.ndarray | None,
    families: Sequence[str],
    ks: Sequence[int],
) -> dict[str, float]:
    """`accuracy` (the mean of `greedy_correct`, (P,)) and `pass_at_<k>` for each k (from
    `sampled_correct`, (P, K), when given), overall and per family (`accuracy_<family>`,
    `pass_at_<k>_<family>`)."""
    families = np.asarray(families)
    passes = {}
    if sampled_correct is not None:
        n = sampled_correct.shape[1]
        for k in ks:
            passes[k] = np.array([pass_at_k(int(row.sum()), n, k) for row in sampled_correct])
    figures = {"accuracy": float(np.mean(greedy_correct))}
    figures.update({f"pass_at_{k}": float(values.mean()) for k, values in passes.items()})
    for family in sorted(set(families.tolist())):
        rows = families == family
        figures[f"accuracy_{family}"] = float(np.mean(greedy_correct[rows]))
        for k, values in passes.items():
            figures[f"pass_at_{k}_{family}"] = float(values[rows].mean())
    return figures


def standard_error(accuracy: float, n: int) -> float:
    """sqrt(a (1 - a) / n): the standard error of an accuracy measured on n prompts."""
    return math.sqrt(accuracy * (1.0 - accuracy) / n) if n else float("nan")


def check_output(path: str | None) -> None:
    """Refuse, before any work, an `--output` that is a folder or whose folder is missing."""
    if path is None:
        return
    if Path(path).is_dir():
        raise ConfigError(f"--output {path} is a folder; name a .json file")
    if not Path(path).parent.is_dir():
        raise ConfigError(f"--output {path}: the folder {Path(path).parent} does not exist")


def write_json(path: str | Path, content: dict) -> None:
    """`content` as JSON in `path`, whole or not at all (a temporary file renamed)."""
    from jaxllm.tokenizer import write_file_atomically

    text = json.dumps(content, indent=2, default=str) + "\n"
    write_file_atomically(path, text.encode())


# --- harness tasks -------------------------------------------------------------------------


def _task_manager(include_path: str | None):
    """The harness's TaskManager over its own tasks and `include_path`'s YAMLs."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path}: no such folder of task YAMLs")
    return TaskManager(include_path=include_path)


def _broken_yaml(folder: Path) -> str | None:
    """'FILE: why' of the first task YAML under `folder` that the harness cannot read (it
    skips such a file with a log line, and its task is then missing), None if all read."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the harness's own reading

    for path in sorted(folder.rglob("*.yaml")):
        try:
            load_yaml(path, resolve_func=False)
        except Exception as error:  # yaml's errors, not a mapping, a missing include
            return f"{path}: {(str(error).strip() or repr(error)).splitlines()[0]}"
    return None


def run_tasks(
    checkpoint: str,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool = False,
    batch_size: int = 16,
    seed: int = 0,
    output: str | None = None,
) -> dict:
    """Run harness `tasks` on the run in `checkpoint`; print the harness's table and
    return its results (also written to `output` as JSON when given)."""
    try:
        import lm_eval
    except ImportError:
        raise UserError(
            "jaxllm eval --tasks runs EleutherAI's lm-evaluation-harness, which is not "
            "installed; run bash scripts/setup.sh (or pip install 'jaxllm[eval]')"
        ) from None
    from lm_eval.utils import make_table

    from jaxllm.harness import JaxLLM

    check_output(output)
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit {limit} must be > 0 (a count, or a fraction below 1)")
    manager = _task_manager(include_path)
    known = set(manager.all_tasks)
    missing = [task for task in tasks if task not in known and not manager.match_tasks([task])]
    if missing:
        broken = _broken_yaml(Path(include_path)) if include_path else None
        if broken:
            raise DataError(
                f"--tasks: no task named {', '.join(missing)}; a task YAML in --include-path "
                f"does not parse: {broken}"
            )
        where = f" or in --include-path {include_path}" if include_path else ""
        raise ConfigError(
            f"--tasks: no task named {', '.join(missing)} in the harness{where}; "
            "`lm_eval ls tasks` lists the harness's, and a local task is a YAML with "
            "`task: NAME` in the --include-path folder"
        )
    model = JaxLLM(checkpoint, batch_size=batch_size, seed=seed)
    try:
        results = lm_eval.simple_evaluate(
            model=model,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=fewshot_as_multiturn,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (FileNotFoundError, ValueError) as error:
        first = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise DataError(f"--tasks {','.join(tasks)}: the harness could not run: {first}") from None
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if output:
        write_json(output, {k: results[k] for k in ("results", "versions", "n-shot", "config")})
        print(f"eval: wrote {output}")
    return results


# --- prompts with answers ----------------------------------------------------------------


def run_prompts(
    checkpoint: str,
    data: str,
    *,
    samples: int = 8,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    max_turns: int = 1,
    tools: Sequence[str] = (),
    answer_format: str = "auto",
    fields: PromptFields | None = None,
    hf_split: str = "train",
    limit: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    output: str | None = None,
) -> dict[str, float]:
    """Greedy accuracy and pass@k per family of the run in `checkpoint` on the prompts
    `data` (see the module docstring; `fields` maps a dataset's columns, as `data.*_field`
    and `data.answer_format` do for GRPO); prints a table, writes JSON to `output`."""
    import jax
    from tqdm import tqdm

    from jaxllm.generate import Generator
    from jaxllm.hf.tokenizer import library_vocab_size
    from jaxllm.rl.episodes import roll_out
    from jaxllm.rl.rewards import make_rewards
    from jaxllm.rl.rollouts import group_keys
    from jaxllm.stages.common import load_run
    from jaxllm.tools import check_tools

    if samples < 1 or max_new_tokens < 1 or max_turns < 1:
        raise ConfigError("--samples, --max-new-tokens and --max-turns must be >= 1")
    check_tools(tools, "--tools")
    check_output(output)
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit {limit} must be > 0 (a count, or a fraction below 1)")
    count = int(limit) if limit is not None and limit >= 1 else None  # else all, then a share
    if count is None:  # a built-in task's default: how many of its prompts to draw
        count = {builtin_chat.NAME: 140, tool_task.NAME: 100}.get(data)
    prompts = read_prompts(data, count, seed, fields or PromptFields(), hf_split)
    with_tools = sum(1 for p in prompts if p.fields.get("tools"))
    if with_tools and max_turns == 1:
        print(
            f"warning: {with_tools} of the {len(prompts)} prompts name tools, which one turn "
            "never runs; pass --max-turns 3 to let the replies call them",
            file=sys.stderr,
        )
    if limit is not None and limit < 1:
        prompts = prompts[: max(1, math.ceil(len(prompts) * limit))]
    missing = [p for p in prompts if p.fields.get("answer") is None]
    if missing:
        raise DataError(
            f"{missing[0].where or data}: a prompt without an 'answer'; eval --data needs "
            "the answer of every prompt"
        )
    run = load_run(checkpoint)
    tokenizer, model = run.tokenizer, run.model
    room = model.cfg.max_seq_len - max_new_tokens
    where = f"model.max_seq_len={model.cfg.max_seq_len} less --max-new-tokens={max_new_tokens}"
    offered = list(tools) if max_turns > 1 else None
    prompt_ids = rendered_prompts(tokenizer, prompts, room, where, offered)
    vocab = library_vocab_size(tokenizer, model.cfg.vocab_size)
    generator = Generator(model, vocab, tokenizer.pad_id, max_new_tokens)
    correct_fn = make_rewards(
        {"correct": 1.0}, tokenizer, max_new_tokens, 1, answer_format=answer_format
    )["correct"]
    stops = list(tokenizer.stop_ids)

    def judged(rows: Sequence[int], keys, temperature: float) -> np.ndarray:
        chosen = [prompts[i] for i in rows]
        rollout = roll_out(
            generator,
            run.params,
            tokenizer,
            [prompt_ids[i] for i in rows],
            keys,
            stop_ids=stops,
            max_turns=max_turns,
            messages=[p.messages for p in chosen],
            tools=[offered_tools(p, tools) for p in chosen] if max_turns > 1 else (),
            temperature=temperature,
        )
        return np.array(
            [
                correct_fn(p.text, "", {**p.fields, "completion_ids": reply})
                for p, reply in zip(chosen, rollout.replies(), strict=True)
            ],
            np.float32,
        )

    key = jax.random.key(seed)
    all_keys = group_keys(key, len(prompts), samples)  # row i * K + g: fold_in(fold_in(key, i), g)
    greedy = np.zeros(len(prompts), np.float32)
    sampled = np.zeros((len(prompts), samples), np.float32)
    per_call = max(1, batch_size // samples)
    bar = tqdm(total=len(prompts), desc="eval: prompts", file=sys.stderr)
    for first in range(0, len(prompts), per_call):
        rows = list(range(first, min(first + per_call, len(prompts))))
        greedy[rows] = judged(rows, key, 0.0)
        repeated = [i for i in rows for _ in range(samples)]
        keys = all_keys[first * samples : (rows[-1] + 1) * samples]
        sampled[rows] = judged(repeated, keys, temperature).reshape(len(rows), samples)
        bar.update(len(rows))
    bar.close()
    families = [str(p.fields.get("family", "all")) for p in prompts]
    ks = pass_ks(samples)
    figures = answer_figures(greedy, sampled, families, ks)
    _print_table(figures, families, ks)
    if output:
        setup = {
            "checkpoint": checkpoint,
            "data": data,
            "prompts": len(prompts),
            "samples": samples,
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "max_turns": max_turns,
            "tools": list(tools),
            "answer_format": answer_format,
            "seed": seed,
        }
        write_json(output, {"setup": setup, "figures": figures})
        print(f"eval: wrote {output}")
    return figures


def _print_table(figures: dict[str, float], families: Sequence[str], ks: Sequence[int]) -> None:
    """One row per family and one for all: n, greedy accuracy ± its standard error, and
    pass@k for each k."""
    counts = {family: families.count(family) for family in sorted(set(families))}
    rows = [("all", len(families), "")]
    if len(counts) > 1 or "all" not in counts:
        rows += [(family, n, f"_{family}") for family, n in counts.items()]
    width = max(len(name) for name, _, _ in rows)
    header = f"{'family':<{width}}  {'n':>5}  {'accuracy':>15}" + "".join(
        f"  {'pass@' + str(k):>8}" for k in ks
    )
    print(header)
    for name, n, suffix in rows:
        accuracy = figures[f"accuracy{suffix}"]
        line = f"{name:<{width}}  {n:>5}  {accuracy:>7.3f} ± {standard_error(accuracy, n):.3f}"
        line += "".join(f"  {figures[f'pass_at_{k}{suffix}']:>8.3f}" for k in ks)
        print(line)
