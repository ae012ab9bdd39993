"""`jaxllm <command>`: one command per training stage (`jaxllm.stages.registry`: pretrain,
sft, reward, dpo, ppo, grpo), pipeline, generate, chat, label, watch, eval, tokenizer train,
import-hf, export-hf.

    jaxllm STAGE --config FILE [dotted.key=value ...]
    jaxllm pipeline --config FILE [key=value | STAGE.dotted.key=value ...]
    jaxllm generate --checkpoint RUN_DIR --prompt TEXT [sampling options]
    jaxllm chat --checkpoint RUN_DIR [--system TEXT] [--hide-thinking] [--tools NAMES]
                [--max-turns N] [sampling options]
    jaxllm label --checkpoint RUN_DIR --prompts FILE|builtin --output FILE [--judge J] [options]
    jaxllm watch RUN_DIR [--window N] [--plot FILE.png]
    jaxllm eval --checkpoint RUN_DIR --tasks T1,T2 [--include-path DIR] [--num-fewshot N]
                [--limit N] [--apply-chat-template] [--output FILE.json]
    jaxllm eval --checkpoint RUN_DIR --data PROMPTS [--samples K] [--max-new-tokens N]
                [--temperature T] [--max-turns N --tools NAMES] [--output FILE.json]
    jaxllm tokenizer train --input PATH --vocab-size N --output FILE.tiktoken
    jaxllm import-hf HF_DIR --out RUN_DIR [--mesh DATA,FSDP,TENSOR]
    jaxllm export-hf RUN_DIR --out HF_DIR [--adapter [--base-model NAME_OR_PATH]]

`main` is the one error boundary: a mistake the user can fix (config, data, mesh, a path
that cannot be read or written) prints one `error:` line per problem and exits with status
2; Ctrl-C before training starts exits 130 with one line; anything else is a bug, re-raised
with a line asking to report it. A run stopped by SIGTERM/SIGINT saves a checkpoint first
and exits with 128 + the signal number; running the same command again resumes it. A run
whose out_dir already holds its last step changes nothing and exits 0. On the CPU,
`main` first has glibc keep freed memory for reuse (`jaxllm.host_memory`), so that a
step's temporaries are not faulted in afresh each step.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import pathlib
import signal
import sys

from jaxllm.errors import UserError
from jaxllm.host_memory import cpu_only, keep_freed_host_memory


def _train(args: argparse.Namespace) -> int:
    """Run the stage named by the command on the shared loop."""
    from jaxllm.config import load_stage_config
    from jaxllm.distributed import initialize
    from jaxllm.run_dir import exclusive_out_dir
    from jaxllm.stages.registry import STAGES
    from jaxllm.trainer import refuse_another_stage

    cfg, inherited = load_stage_config(args.command, args.config, args.overrides)
    initialize(cfg.distributed)
    is_main = jax_process_index() == 0
    if inherited and is_main:
        print(f"{args.command}: inherited from the run it starts from:", *inherited, sep="\n  ")
    refuse_another_stage(pathlib.Path(cfg.out_dir), args.command)  # before data is cached there
    with exclusive_out_dir(cfg.out_dir) if is_main else contextlib.nullcontext():
        result = STAGES[args.command].run(cfg)
    if result.already_finished:
        print(
            f"{args.command}: the run in {cfg.out_dir} is already done (step {result.final_step}"
            " = train.steps); nothing changed; raise train.steps to train further"
        )
        return 0
    if result.stopped_by_signal is not None:
        name = signal.Signals(result.stopped_by_signal).name
        print(
            f"stopped by {name} at step {result.final_step}; checkpoint saved in "
            f"{cfg.out_dir}/checkpoints; run the same command to resume",
            file=sys.stderr,
        )
        return 128 + result.stopped_by_signal
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    """Run the stages of a pipeline config in order (see `jaxllm.pipeline`)."""
    from jaxllm.pipeline import run_pipeline

    result = run_pipeline(args.config, args.overrides)
    if result.stopped_by_signal is not None:
        return 128 + result.stopped_by_signal
    if result.report is None:  # not process 0 of several: it prints nothing more
        return 0
    print("\npipeline: " + (f"ran {', '.join(result.ran)}" if result.ran else "nothing to run"))
    if result.skipped:
        print(f"pipeline: skipped (finished before) {', '.join(result.skipped)}")
    print(*result.summary, sep="\n")
    print(f"report: {result.report}")
    return 0


def jax_process_index() -> int:
    import jax

    return jax.process_index()


TASK_ONLY = ("include_path", "num_fewshot", "apply_chat_template", "fewshot_as_multiturn")
PROMPTS_ONLY = (
    "samples",
    "max_new_tokens",
    "temperature",
    "max_turns",
    "tools",
    "answer_format",
    "prompt_field",
    "answer_field",
    "data_answer_format",
)


def _eval(args: argparse.Namespace) -> int:
    """Harness tasks (`--tasks`) or accuracy and pass@k on prompts (`--data`); see
    `jaxllm.eval`."""
    from jaxllm import eval as evaluation
    from jaxllm.data.prompts import PromptFields
    from jaxllm.errors import ConfigError

    if (args.tasks is None) == (args.data is None):
        raise ConfigError("eval: pass --tasks (harness tasks) or --data (prompts), one of them")
    wrong = [
        name
        for name in (PROMPTS_ONLY if args.tasks is not None else TASK_ONLY)
        if getattr(args, name) is not None and getattr(args, name) is not False
    ]
    if wrong:
        options = ", ".join("--" + name.replace("_", "-") for name in wrong)
        mode = "--tasks" if args.tasks is not None else "--data"
        raise ConfigError(f"eval: {options} do(es) not apply with {mode}; drop it")
    if args.tasks is not None:
        evaluation.run_tasks(
            args.checkpoint,
            args.tasks,
            include_path=args.include_path,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            apply_chat_template=args.apply_chat_template,
            fewshot_as_multiturn=args.fewshot_as_multiturn,
            batch_size=args.batch_size or 16,
            seed=args.seed,
            output=args.output,
        )
        return 0
    evaluation.run_prompts(
        args.checkpoint,
        args.data,
        samples=args.samples or 8,
        max_new_tokens=args.max_new_tokens or 128,
        temperature=1.0 if args.temperature is None else args.temperature,
        max_turns=args.max_turns or 1,
        tools=args.tools or (),
        answer_format=args.answer_format or "auto",
        fields=PromptFields(
            args.prompt_field or "prompt",
            args.answer_field or "answer",
            args.data_answer_format or "plain",
        ),
        hf_split=args.hf_split,
        limit=args.limit,
        batch_size=args.batch_size or 64,
        seed=args.seed,
        output=args.output,
    )
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from jaxllm.data.corpus import iter_documents
    from jaxllm.tokenizer import train_bpe

    output = pathlib.Path(args.output)
    if output.suffix != ".tiktoken":  # what data.tokenizer reads as a file, not a name
        raise UserError(
            f"--output {output}: name the file *.tiktoken (e.g. {output.stem}.tiktoken)"
        )
    if output.is_file():  # (a folder there is refused as one before training)
        raise UserError(f"--output {output} exists; remove it or choose another name")
    documents = iter_documents(args.input, args.text_field)
    tokenizer = train_bpe(documents, args.vocab_size, args.output)
    specials = len(tokenizer.special_ids)
    ranks = tokenizer.vocab_size - specials
    print(
        f"wrote {args.output}: {ranks} ranks + {specials} special tokens "
        f"({tokenizer.vocab_size} ids)"
    )
    if ranks < args.vocab_size:
        print(
            f"note: the text supports only {ranks} of the {args.vocab_size} ranks asked for "
            "(no pair of tokens occurs in it that is not merged yet); give more text for a "
            "larger vocabulary",
            file=sys.stderr,
        )
    return 0


DEFAULT_NEW_TOKENS = 256


def _new_token_budget(requested: int | None, room: int, why: str) -> int:
    """`requested` new tokens (default `DEFAULT_NEW_TOKENS`) capped at the `room` the context
    leaves; one stderr line says so when the user asked for more than fits."""
    from jaxllm.generate import GenerationError

    if room < 1:
        raise GenerationError(f"{why} leaves no room for new tokens; shorten the prompt")
    if requested is not None and requested > room:
        print(f"note: --max-new-tokens {requested} capped at {room}: {why}", file=sys.stderr)
    return min(DEFAULT_NEW_TOKENS if requested is None else requested, room)


def _load_for_generation(args: argparse.Namespace):
    """(tokenizer, model, params) from a run folder's config.yaml and newest checkpoint."""
    from jaxllm.stages.common import load_run

    run = load_run(args.checkpoint)
    return run.tokenizer, run.model, run.params


def _generator(tokenizer, model, budget: int):
    """A Generator of `budget` new tokens that samples as the model's own library does: over
    every row of an imported model (transformers' logits include rows past its tokenizer's
    ids), over the tokenizer's ids for a run of ours (the rest are padding rows)."""
    from jaxllm.generate import Generator
    from jaxllm.hf.tokenizer import library_vocab_size

    vocab_size = library_vocab_size(tokenizer, model.cfg.vocab_size)
    return Generator(model, vocab_size, tokenizer.pad_id, budget)


def _sampling(args: argparse.Namespace) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}


def _generate(args: argparse.Namespace) -> int:
    import jax

    tokenizer, model, params = _load_for_generation(args)
    if args.chat:
        from jaxllm.chat import render_for_generation

        prompt = render_for_generation(tokenizer, [{"role": "user", "content": args.prompt}])
        stops = list(tokenizer.stop_ids)
    else:
        prompt = tokenizer.encode_prompt(args.prompt)
        stops = tokenizer.generation_stop_ids()
    context = model.cfg.max_seq_len
    budget = _new_token_budget(
        args.max_new_tokens,
        context - len(prompt),
        f"the prompt has {len(prompt)} tokens and model.max_seq_len={context}",
    )
    generator = _generator(tokenizer, model, budget)
    completion = generator(
        params, [prompt], jax.random.key(args.seed), stop_ids=stops, **_sampling(args)
    )
    new_ids = [t for t in completion.row(0) if t not in stops]
    print(tokenizer.decode(new_ids, skip_special_tokens=True))
    return 0


def _chat(args: argparse.Namespace) -> int:
    import jax

    from jaxllm.chat import render_for_generation
    from jaxllm.tools import check_tools, tool_names, tool_schemas

    allowed = tool_names() if args.tools is None else args.tools
    check_tools(allowed, "--tools")
    # A model's own template lists the tools only when they are named (ours lists none), so
    # a plain chat renders as the model's library does; calls run either way.
    tools = tool_schemas(allowed) if args.tools is not None else None
    tokenizer, model, params = _load_for_generation(args)
    budget = _new_token_budget(
        args.max_new_tokens,
        model.cfg.max_seq_len // 2,
        f"a reply gets half of model.max_seq_len={model.cfg.max_seq_len}, the conversation "
        "the other half",
    )
    generator = _generator(tokenizer, model, budget)
    context = model.cfg.max_seq_len - budget
    history = [{"role": "system", "content": args.system}] if args.system else []
    first = bool(args.system)  # the first message that may be forgotten
    key = jax.random.key(args.seed)

    def reply(turn: int, index: int) -> str | None:
        """Stream the model's `index`th reply to the `turn`th input line (None when the
        conversation no longer fits the context)."""
        prompt = render_for_generation(tokenizer, history, tools)
        while len(prompt) > context and _forget_oldest_turn(history, first):
            prompt = render_for_generation(tokenizer, history, tools)
        if len(prompt) > context:
            print(
                f"error: the conversation since your message takes {len(prompt)} tokens of "
                f"its {context} with the tool results; send a new message",
                file=sys.stderr,
            )
            return None
        turn_key = jax.random.fold_in(jax.random.fold_in(key, turn), index)
        stream = generator.stream(
            params, prompt, turn_key, stop_ids=list(tokenizer.stop_ids), **_sampling(args)
        )
        return _show_reply(tokenizer, stream, args.hide_thinking)

    print("chat: type a message, /exit or end of input to quit", file=sys.stderr)
    for turn, line in enumerate(sys.stdin or ()):  # None: standard input is closed
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if not text.strip():
            continue
        message = {"role": "user", "content": text}
        alone = len(render_for_generation(tokenizer, [*history[:first], message], tools))
        if alone > context:  # cannot fit even alone: say so, keep the conversation as it is
            print(
                f"error: that message takes {alone} tokens of the conversation's {context} "
                f"(model.max_seq_len={model.cfg.max_seq_len} less the reply's {budget}); "
                "send a shorter one",
                file=sys.stderr,
            )
            continue
        history.append(message)
        _reply_with_tools(history, functools.partial(reply, turn), allowed, args.max_turns)
    return 0


def _forget_oldest_turn(history: list[dict], first: int) -> bool:
    """Drop the oldest exchange after the system message (a user message and the replies
    and tool results after it), unless it is the last one; whether one was dropped."""
    later_users = [i for i in range(first + 1, len(history)) if history[i]["role"] == "user"]
    if not later_users:
        return False
    del history[first : later_users[0]]
    return True


def _show_reply(tokenizer, stream, hide_thinking: bool) -> str:
    """Print a streamed reply after `assistant> ` as its characters complete; its text,
    reasoning and tool calls included, stop token not."""
    from jaxllm.chat import visible_tokens

    reply: list[int] = []
    shown: list[int] = []
    printed = ""
    print("assistant> ", end="", flush=True)
    for token in visible_tokens(tokenizer, _recording(stream, reply), hide_thinking):
        shown.append(token)
        text = tokenizer.decode(shown, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # a character split over tokens waits for its rest
            print(text[len(printed) :], end="", flush=True)
            printed = text
    print(tokenizer.decode(shown, skip_special_tokens=True)[len(printed) :], flush=True)
    return tokenizer.decode(t for t in reply if t not in tokenizer.stop_ids)


def _reply_with_tools(history: list[dict], reply, allowed: list[str], max_turns: int) -> None:
    """Up to `max_turns` assistant replies to the user's last message. `reply(index)` writes
    (and shows) one, or None when the conversation no longer fits; while a reply calls
    `allowed` tools, each call runs, its result is shown as `[tool NAME] RESULT` and added
    as a `tool` message, and the model replies again."""
    from jaxllm.tools import parse_tool_calls, run_tool_call

    for index in range(max_turns):
        content = reply(index)
        if content is None:
            return
        history.append({"role": "assistant", "content": content})
        calls = parse_tool_calls(content) if allowed else []
        if not calls:
            return
        for call in calls:
            result = run_tool_call(call, allowed)
            print(f"[tool {call.name or '?'}] {result.content}", flush=True)
            history.append({"role": "tool", "name": call.name or "", "content": result.content})
    print(
        f"note: --max-turns {max_turns} replies reached; the model has not yet answered "
        "its tools' results",
        file=sys.stderr,
    )


def _label(args: argparse.Namespace) -> int:
    from jaxllm.data import builtin_chat, tool_task
    from jaxllm.data.prompts import read_prompts
    from jaxllm.label import sample_and_judge, sample_and_label
    from jaxllm.stages.common import load_run

    if args.num_prompts is not None and args.num_prompts < 1:
        raise UserError(f"--num-prompts {args.num_prompts}: label at least 1 prompt")
    if args.prompts == builtin_chat.NAME and args.num_prompts is None:
        raise UserError("--prompts builtin needs --num-prompts N (how many to draw)")
    if args.prompts == tool_task.NAME:  # read_prompts gives its held-out prompts, for evals
        raise UserError(
            "--prompts calculator: the tool task's prompts are for GRPO and eval; to label "
            "some, write them with jaxllm.data.tool_task.write_files and pass prompts.jsonl"
        )
    prompts = read_prompts(args.prompts, args.num_prompts, args.seed)
    judge = _judge(args.judge, args.tau) if args.judge else None
    run = load_run(args.checkpoint)
    sampling = {
        "replies": args.replies,
        "tau": args.tau,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }
    if judge is None:
        report = sample_and_label(run, prompts, args.output, rule=args.rule, **sampling)
        print(f"wrote {args.output}: {report.summary()}")
        return 0
    report, agreement = sample_and_judge(
        run, prompts, args.output, judge=judge, judge_name=args.judge, rule=args.rule, **sampling
    )
    print(f"wrote {args.output}: {report.summary()}")
    print(
        f"judge {args.judge}: agrees with the gold rule '{args.rule}' on "
        f"{agreement['gold_agreement']:.3f} of {agreement['gold_decided_pairs']} pairs it "
        f"decides, with the simulated labelers (tau {args.tau}) on "
        f"{agreement['human_agreement']:.3f}; {agreement['confident_share']:.2f} of labels "
        f"have p >= 0.9; report: {args.output}.agreement.json and .png"
    )
    return 0


def _judge(spec: str, tau: float):
    """The judge `--judge` names: gold:RULE, or a run (a reward run judges by its scores,
    any other run is asked which reply is better)."""
    from jaxllm.rl.judges import GoldJudge, PolicyJudge, RewardModelJudge
    from jaxllm.rl.labelers import GOLD_RULES
    from jaxllm.stages.common import load_run

    if spec.startswith("gold:"):
        rule = spec.removeprefix("gold:")
        if rule not in GOLD_RULES:
            raise UserError(
                f"--judge {spec}: unknown gold rule; use gold:{' or gold:'.join(GOLD_RULES)}"
            )
        return GoldJudge(GOLD_RULES[rule], tau)
    run = load_run(spec, "--judge")
    from jaxllm.config import REWARD_HEAD

    return RewardModelJudge(run) if REWARD_HEAD in run.model.cfg.scalar_heads else PolicyJudge(run)


def _watch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from jaxllm.rl.watch import plot_watch, watch_report

    if args.window < 1:
        raise UserError(f"--window {args.window}: compare at least 1 eval each side")
    report = watch_report(args.run_dir, args.window)
    plot = Path(args.plot) if args.plot else Path(args.run_dir) / "watch.png"
    if not plot.suffix:
        plot = plot.with_name(plot.name + ".png")  # what the plot is written as
    plot_watch(report, plot)
    print("\n".join([*report.lines, *report.summary]))
    print(report.warning or f"no reward hacking seen (window of {args.window} evals)")
    print(f"plot: {plot}")
    return 0


def _recording(tokens, into: list[int]):
    for token in tokens:
        into.append(token)
        yield token


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a training run's out_dir")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"default {DEFAULT_NEW_TOKENS}, capped at what the context leaves (chat: half of it)",
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off")
    parser.add_argument("--seed", type=_seed, default=0)


def _import_hf(args: argparse.Namespace) -> int:
    import jax

    from jaxllm.config import MeshConfig
    from jaxllm.errors import ConfigError
    from jaxllm.hf.checkpoints import import_hf
    from jaxllm.sharding import make_mesh

    try:
        data, fsdp, tensor = (int(part) for part in args.mesh.split(","))
    except ValueError:
        raise ConfigError(
            f"--mesh={args.mesh} must be three integers DATA,FSDP,TENSOR (-1: the rest)"
        ) from None
    sizes = (data, fsdp, tensor)
    devices = None if -1 in sizes else jax.devices()[: data * fsdp * tensor]
    mesh = make_mesh(MeshConfig(data, fsdp, tensor), devices)
    for note in import_hf(args.hf_dir, args.out, mesh):
        print(f"import-hf: {note}")
    print(f"import-hf: wrote {args.out}; start a stage from it with sft.init_from={args.out}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from jaxllm.hf.checkpoints import export_hf

    notes = export_hf(
        args.run_dir, args.out, args.dtype, args.max_shard_size, args.adapter, args.base_model
    )
    for note in notes:
        print(f"export-hf: {note}")
    if args.adapter:
        print(
            f"export-hf: wrote {args.out} (peft: PeftModel.from_pretrained(base, {args.out}), "
            "base = AutoModelForCausalLM.from_pretrained(base_model_name_or_path))"
        )
        return 0
    hf_config = json.loads((pathlib.Path(args.out) / "config.json").read_text())
    classifier = hf_config["architectures"][0].endswith("ForSequenceClassification")
    auto = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    print(f"export-hf: wrote {args.out} (transformers: {auto}.from_pretrained)")
    return 0


def _seed(text: str) -> int:
    """A --seed value: an integer in [0, 2**31)."""
    seed = int(text)
    if not 0 <= seed < 2**31:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 2**31)")
    return seed


_seed.__name__ = "seed"  # argparse names the type in its message: "invalid seed value"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


_positive.__name__ = "positive integer"


def _tool_list(text: str) -> list[str]:
    """A --tools value: comma-separated names ('' for none)."""
    return [name.strip() for name in text.split(",") if name.strip()]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error:` line, like every other
    mistake, instead of a usage block (subcommands' parsers are of this class too)."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            message += " (a stage's settings are dotted.key=value, e.g. train.steps=200)"
        print(f"error: {self.prog}: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


STAGE_USAGE = "    jaxllm STAGE --config FILE [dotted.key=value ...]"


def build_parser() -> argparse.ArgumentParser:
    from jaxllm.stages.registry import STAGES  # no JAX: a stage's module loads when it runs

    # The module docstring's command lines, its STAGE line written out per registered stage.
    usage = "\n\n".join(__doc__.split("\n\n")[1:2])
    per_stage = "\n".join(
        f"    jaxllm {name} --config FILE [dotted.key=value ...]" for name in STAGES
    )
    usage = usage.replace(STAGE_USAGE, per_stage)
    parser = _Parser(
        prog="jaxllm",
        description="Train a language model through its whole life; one command per stage or "
        "tool:\n\n" + usage,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    for name, spec in STAGES.items():
        stage = commands.add_parser(name, help=spec.help)
        stage.add_argument("--config", help="YAML config file")
        stage.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
        stage.set_defaults(run=_train)

    pipeline = commands.add_parser(
        "pipeline", help="several stages in order on one state (pretrain -> sft -> ... -> grpo)"
    )
    pipeline.add_argument("--config", required=True, help="the pipeline's YAML file")
    pipeline.add_argument(
        "overrides", nargs="*", help="key=value (the pipeline's) or STAGE.dotted.key=value"
    )
    pipeline.set_defaults(run=_pipeline)

    generate = commands.add_parser("generate", help="complete a prompt from a checkpoint")
    _add_sampling_options(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat template"
    )
    generate.set_defaults(run=_generate)

    chat = commands.add_parser("chat", help="interactive chat with a checkpoint (streams)")
    _add_sampling_options(chat)
    chat.add_argument("--system", default="", help="a system message")
    chat.add_argument(
        "--hide-thinking",
        action="store_true",
        help="do not show the <think>...</think> part of replies",
    )
    chat.add_argument(
        "--tools",
        type=_tool_list,
        default=None,
        help="tools the model may call, comma-separated (default: every registered tool; "
        "'' for none)",
    )
    chat.add_argument(
        "--max-turns",
        type=_positive,
        default=3,
        help="most assistant replies per message while the model calls tools (default 3)",
    )
    chat.set_defaults(run=_chat)

    label = commands.add_parser(
        "label", help="sample replies from a run; label them by simulated people or a judge"
    )
    label.add_argument(
        "--checkpoint", "--policy", required=True, help="the run to sample from (out_dir)"
    )
    label.add_argument("--prompts", required=True, help="a prompts .jsonl file/folder or builtin")
    label.add_argument(
        "--num-prompts", type=int, default=None, help="the first N prompts (builtin: required)"
    )
    label.add_argument("--output", "--out", required=True, help="the preference .jsonl to write")
    label.add_argument("--replies", "--k", type=int, default=4, help="K replies sampled per prompt")
    label.add_argument(
        "--judge",
        default=None,
        help="AI feedback instead of simulated rankings: a reward run, any other run (asked "
        "'A or B?'), or gold:RULE; every pair gets a label_probability",
    )
    label.add_argument(
        "--rule",
        default="length",
        help="the gold rule: length (40 characters) or liked_words (with --judge: for the "
        "agreement report)",
    )
    label.add_argument(
        "--tau", type=float, default=0.1, help="labeler noise: P(a>b) = sigmoid((ga-gb)/tau)"
    )
    label.add_argument("--temperature", type=float, default=1.0)
    label.add_argument("--max-new-tokens", type=int, default=48)
    label.add_argument("--seed", type=_seed, default=0)
    label.set_defaults(run=_label)

    watch = commands.add_parser("watch", help="proxy against gold reward of an RL run's evals")
    watch.add_argument("run_dir", metavar="RUN_DIR", help="the run's out_dir")
    watch.add_argument("--window", type=int, default=3, help="evals each side of a comparison")
    watch.add_argument(
        "--plot",
        default=None,
        help="the PNG of proxy and gold against sqrt(KL); default RUN_DIR/watch.png",
    )
    watch.set_defaults(run=_watch)

    _add_eval_parser(commands)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    train = tokenizer_commands.add_parser("train", help="train a BPE vocabulary (.tiktoken)")
    train.add_argument("--input", required=True, help="a .txt/.jsonl file or a folder")
    train.add_argument("--vocab-size", type=int, required=True, help="ranks, >= 256")
    train.add_argument("--output", required=True, help="where to write the .tiktoken file")
    train.add_argument("--text-field", default="text", help="the text field of .jsonl lines")
    train.set_defaults(run=_tokenizer_train)

    import_hf = commands.add_parser(
        "import-hf",
        help="a Hugging Face folder (Llama, Mistral, Qwen2, Qwen3, Gemma 3, ...) -> a run folder",
    )
    import_hf.add_argument("hf_dir", metavar="HF_DIR", help="a save_pretrained folder")
    import_hf.add_argument("--out", required=True, help="the run folder to write (new)")
    import_hf.add_argument(
        "--mesh",
        default="1,-1,1",
        help="DATA,FSDP,TENSOR axis sizes the params are laid out on while converting (the "
        "first devices when no size is -1)",
    )
    import_hf.set_defaults(run=_import_hf)
    export_hf = commands.add_parser(
        "export-hf", help="a run folder -> a Hugging Face folder (config, safetensors, tokenizer)"
    )
    export_hf.add_argument("run_dir", metavar="RUN_DIR", help="a run's out_dir")
    export_hf.add_argument("--out", required=True, help="the folder to write (new)")
    export_hf.add_argument(
        "--dtype",
        default="float32",
        help="the safetensors' dtype: float32 (default) or bfloat16; config.json says it",
    )
    export_hf.add_argument(
        "--max-shard-size",
        default="5GB",
        help="larger weights are split into model-0000k-of-0000N.safetensors files of at "
        "most this size with an index, as save_pretrained does (e.g. 5GB, 500MB, 2GiB)",
    )
    export_hf.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run's adapters as a PEFT adapter folder (adapter_config.json, "
        "adapter_model.safetensors) instead of merged weights; its base is the export of "
        "the run it started from",
    )
    export_hf.add_argument(
        "--base-model",
        metavar="NAME_OR_PATH",
        help="the adapter's base_model_name_or_path (default: the HF folder the run it "
        "started from was imported from, else that run's folder)",
    )
    export_hf.set_defaults(run=_export_hf)
    return parser


def _add_eval_parser(commands) -> None:
    from jaxllm.answers import ANSWER_FORMATS

    evaluate = commands.add_parser(
        "eval",
        help="score a run: lm-evaluation-harness tasks, or accuracy and pass@k on prompts",
    )
    evaluate.add_argument("--checkpoint", required=True, help="the run to score (out_dir)")
    evaluate.add_argument("--tasks", type=_tool_list, help="harness tasks, comma-separated")
    evaluate.add_argument(
        "--data", help="prompts with answers: a .jsonl file/folder, builtin or calculator"
    )
    evaluate.add_argument("--output", help="write the results as JSON here")
    evaluate.add_argument(
        "--limit", type=float, help="the first N documents/prompts of each task (a fraction < 1)"
    )
    evaluate.add_argument("--batch-size", type=_positive, help="rows per compiled call")
    evaluate.add_argument("--seed", type=_seed, default=0)
    tasks = evaluate.add_argument_group("harness tasks (--tasks)")
    tasks.add_argument("--include-path", help="a folder of local task YAMLs")
    tasks.add_argument("--num-fewshot", type=int, help="examples in each prompt")
    tasks.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="write each request in the run's chat template (as the harness's flag)",
    )
    tasks.add_argument(
        "--fewshot-as-multiturn",
        action="store_true",
        help="few-shot examples as chat turns (with --apply-chat-template)",
    )
    prompts = evaluate.add_argument_group("prompts with answers (--data)")
    prompts.add_argument("--samples", type=_positive, help="K sampled replies per prompt (8)")
    prompts.add_argument("--max-new-tokens", type=_positive, help="reply budget (128)")
    prompts.add_argument("--temperature", type=float, help="of the sampled replies (1.0)")
    prompts.add_argument(
        "--max-turns", type=_positive, help="assistant turns of a tool-use episode (1)"
    )
    prompts.add_argument("--tools", type=_tool_list, help="tools offered, comma-separated")
    prompts.add_argument(
        "--answer-format",
        choices=ANSWER_FORMATS,
        help="how a reply's answer is read (auto: \\boxed{}, then '#### N', else the text)",
    )
    prompts.add_argument(
        "--prompt-field", help="a row's prompt text when it has no prompt/messages (prompt)"
    )
    prompts.add_argument("--answer-field", help="the row's field holding the answer (answer)")
    prompts.add_argument(
        "--data-answer-format",
        choices=ANSWER_FORMATS,
        help="how the answer field is read: plain, gsm8k ('#### N'), boxed (MATH), ...",
    )
    prompts.add_argument(
        "--hf-split", default="train", help="the split of --data hf:NAME without :SPLIT"
    )
    evaluate.set_defaults(run=_eval)


# What to do about an OSError, by errno; the rest get the generic advice.
OS_ERROR_FIXES = {
    errno.ENOSPC: "free some disk space, then run the same command again",
    errno.EFBIG: "it passes the largest file this process may write (ulimit -f, or the "
    "filesystem's limit); raise the limit or write elsewhere",
    errno.EDQUOT: "free some disk space, then run the same command again",
    errno.EROFS: "choose a writable place",
    errno.EACCES: "check its permissions or choose another place",
    errno.EPERM: "check its permissions or choose another place",
    errno.EISDIR: "it is a folder; name a file",
    errno.ENOTDIR: "a part of it is a file, not a folder; choose another path",
    errno.EEXIST: "something is already there; choose another path",
}


def _describe_os_error(error: OSError) -> str:
    if error.strerror is None:  # raised with a message of its own
        return str(error)
    path = f"{error.filename}: " if error.filename is not None else ""
    fix = OS_ERROR_FIXES.get(error.errno, "check the path, its permissions and the free space")
    return f"{path}{error.strerror}; {fix}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if cpu_only():  # before JAX starts its threads (see jaxllm.host_memory)
        keep_freed_host_memory()
    try:
        return args.run(args)
    except (UserError, ValueError) as error:
        lines = str(error).splitlines() or [type(error).__name__]
    except OSError as error:
        lines = [_describe_os_error(error)]
    except KeyboardInterrupt:
        print(
            "error: interrupted by Ctrl-C (SIGINT) outside training; run the command again",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT
    except Exception:
        print(
            "jaxllm: internal error, not a mistake in your input; please report it with the "
            "traceback below",
            file=sys.stderr,
        )
        raise
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
