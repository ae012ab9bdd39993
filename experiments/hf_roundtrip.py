"""A Hugging Face model in, fine-tuned, and out again, offline on a CPU.

    python experiments/hf_roundtrip.py [--out runs/hf_roundtrip] [sft overrides ...]

Stands in for a published checkpoint with a small random-init `Qwen2ForCausalLM` saved by
`transformers` (q/k/v biases, GQA, Qwen's `<|im_start|>`/`<|im_end|>` tokens and ChatML),
then runs what a user runs on a real one (docs/hf.md):

1. `jaxllm import-hf HF_DIR --out RUN` (the run writes chats in the model's own ChatML
   template, `chat.template=model`, and stops on its `<|im_end|>`);
2. `jaxllm sft --config experiments/configs/sft_builtin.yaml sft.init_from=RUN ...`;
3. `jaxllm export-hf SFT_RUN --out HF_OUT`;
4. `transformers` loads HF_OUT: the largest logit difference from jaxllm's on a held-out
   prompt, and both libraries' greedy replies to it, which must be the same tokens (exit
   status 1 otherwise).
Needs `transformers` and CPU `torch` (`pip install -e .[hf-test]`). Every step resumes or
is skipped when its folder is already complete.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.chat import render_for_generation
from jaxllm.cli import main as jaxllm
from jaxllm.generate import Generator
from jaxllm.hf.tokenizer import save_hf_tokenizer
from jaxllm.stages.common import load_run
from jaxllm.tokenizer import load_tokenizer

CONFIGS = Path(__file__).parent / "configs"
QWEN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def qwen_style_tokenizer_json() -> dict:
    """A byte-level `tokenizer.json` (our `bytes` vocabulary as HF writes it) whose only
    added tokens are Qwen3's control and reasoning tokens, at ids 256-260, and that adds no
    BOS (as Qwen's)."""
    with tempfile.TemporaryDirectory() as scratch:
        save_hf_tokenizer(load_tokenizer("bytes"), scratch)
        tokenizer_json = json.loads((Path(scratch) / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    tokenizer_json["model"]["vocab"] = {text: i for text, i in vocab.items() if i < 256}
    template = tokenizer_json["added_tokens"][0]
    tokenizer_json["added_tokens"] = [
        {**template, "id": 256 + index, "content": content}
        for index, content in enumerate(QWEN_TOKENS)
    ]
    tokenizer_json["post_processor"] = None
    return tokenizer_json


def write_qwen_style_tokenizer(folder: Path) -> None:
    """Qwen's tokenizer files in `folder`: `qwen_style_tokenizer_json`, its eos and pad
    tokens, and ChatML as the chat template."""
    (folder / "tokenizer.json").write_text(json.dumps(qwen_style_tokenizer_json()))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def write_stand_in(folder: Path) -> None:
    """A random Qwen2 model of the shakespeare preset's width, saved as `save_pretrained`
    writes a published one."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    write_qwen_style_tokenizer(folder)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=256 + len(QWEN_TOKENS),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)


def compare_with_transformers(run_dir: Path, hf_dir: Path, question: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    run = load_run(run_dir)
    prompt = render_for_generation(run.tokenizer, [{"role": "user", "content": question}])
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([prompt])).logits.numpy()[0]
        their_reply = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=list(run.tokenizer.stop_ids),
            pad_token_id=run.tokenizer.pad_id,
        )[0, len(prompt) :].tolist()
    ours = np.asarray(run.model.logits(run.params, jnp.asarray([prompt])))[0]
    gap = np.abs(ours[:, : theirs.shape[-1]] - theirs).max()
    generator = Generator(run.model, run.tokenizer.vocab_size, run.tokenizer.pad_id, 32)
    completion = generator(
        run.params,
        [prompt],
        jax.random.key(0),
        temperature=0.0,
        stop_ids=list(run.tokenizer.stop_ids),
    )
    our_reply = completion.row(0)
    print(f"hf_roundtrip: prompt {run.tokenizer.decode(prompt)!r}")
    print(f"hf_roundtrip: max |logit difference|, jaxllm vs transformers: {gap:.2e}")
    print(f"hf_roundtrip: jaxllm reply       {run.tokenizer.decode(our_reply)!r}")
    print(f"hf_roundtrip: transformers reply {run.tokenizer.decode(their_reply)!r}")
    print(f"hf_roundtrip: same tokens: {our_reply == their_reply}")
    if gap > 1e-3 or our_reply != their_reply:
        raise SystemExit("error: jaxllm and transformers disagree on the exported model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hf_roundtrip"))
    parser.add_argument("overrides", nargs="*", help="extra sft dotted.key=value overrides")
    args = parser.parse_args()
    out = args.out.absolute()
    if not (out / "stand_in" / "config.json").is_file():
        write_stand_in(out / "stand_in")
    if not (out / "imported" / "config.yaml").is_file():
        assert jaxllm(["import-hf", str(out / "stand_in"), "--out", str(out / "imported")]) == 0
    sft = [
        "sft",
        "--config",
        str(CONFIGS / "sft_builtin.yaml"),
        f"sft.init_from={out / 'imported'}",
        f"out_dir={out / 'sft'}",
        "train.steps=300",
        "train.eval_every=150",
        "sft.eval_prompts=42",
        "sft.builtin_examples=4000",  # the config's 40,000 are more than 300 steps read
        "optimizer.warmup_steps=30",
        *args.overrides,
    ]
    assert jaxllm(sft) == 0
    if not (out / "exported" / "config.json").is_file():
        assert jaxllm(["export-hf", str(out / "sft"), "--out", str(out / "exported")]) == 0
    compare_with_transformers(out / "sft", out / "exported", "What is 12 + 7?")


if __name__ == "__main__":
    main()
