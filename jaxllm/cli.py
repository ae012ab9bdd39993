"""`jaxllm <command>`: pretrain, tokenizer train.

    jaxllm pretrain --config FILE [dotted.key=value ...]
    jaxllm tokenizer train --input PATH --vocab-size N --output FILE.tiktoken

A mistake the user can fix (config, data, mesh) prints one `error:` line per problem and
exits with status 2. A run stopped by SIGTERM/SIGINT saves a checkpoint first and exits
with 128 + the signal number; running the same command again resumes it.
"""

from __future__ import annotations

import argparse
import signal
import sys

from jaxllm.errors import UserError


def _pretrain(args: argparse.Namespace) -> int:
    from jaxllm.config import load_config
    from jaxllm.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    result = pretrain(cfg)
    if result.stopped_by_signal is not None:
        name = signal.Signals(result.stopped_by_signal).name
        print(
            f"stopped by {name} at step {result.final_step}; checkpoint saved in "
            f"{cfg.out_dir}/checkpoints; run the same command to resume",
            file=sys.stderr,
        )
        return 128 + result.stopped_by_signal
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from jaxllm.config import DataConfig
    from jaxllm.data.corpus import iter_documents
    from jaxllm.tokenizer import train_bpe

    documents = iter_documents(DataConfig(path=args.input).path, args.text_field)
    tokenizer = train_bpe(documents, args.vocab_size, args.output)
    specials = len(tokenizer.special_ids)
    print(
        f"wrote {args.output}: {tokenizer.vocab_size - specials} ranks + {specials} special "
        f"tokens ({tokenizer.vocab_size} ids)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser("pretrain", help="pre-train a causal LM on a text corpus")
    pretrain.add_argument("--config", help="YAML config file")
    pretrain.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    pretrain.set_defaults(run=_pretrain)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    train = tokenizer_commands.add_parser("train", help="train a BPE vocabulary (.tiktoken)")
    train.add_argument("--input", required=True, help="a .txt/.jsonl file or a folder")
    train.add_argument("--vocab-size", type=int, required=True, help="ranks, >= 256")
    train.add_argument("--output", required=True, help="where to write the .tiktoken file")
    train.add_argument("--text-field", default="text", help="the text field of .jsonl lines")
    train.set_defaults(run=_tokenizer_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UserError, ValueError) as error:
        for line in str(error).splitlines() or [type(error).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
