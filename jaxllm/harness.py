"""A jaxllm run as an lm-evaluation-harness model: `JaxLLM`, registered as `jaxllm`.

EleutherAI's harness (the optional `eval` extra; imported only here) asks a model three
things, and `JaxLLM` answers each in batches on the compiled forward and the Generator:
- `loglikelihood((context, continuation))`: sum_t log p(cont_t | context, cont_<t) over the
  continuation's tokens, and whether greedy decoding would have written every one of them;
- `loglikelihood_rolling(text)`: the whole text's log-likelihood in the harness's disjoint
  windows of at most `max_length` tokens, each conditioned on the one token before it;
- `generate_until(context, gen_kwargs)`: greedy (or sampled, `do_sample`) text up to
  `max_gen_toks` tokens, cut at the first of the `until` strings.

It reads text as the harness's own Hugging Face model (`lm_eval --model hf`) does on the
same run after `jaxllm export-hf`, so both print the same scores:
- a text is encoded as the exported `tokenizer.encode(text)`: with the tokenizer's BOS when
  it has one (`<|start|>` for jaxllm's own tokenizers, Llama 3's `<|begin_of_text|>`, none
  for Qwen), unless the text already starts with it; control-token strings in the text
  become their ids; a context's trailing spaces move to the continuation, whose ids are
  what the whole text adds to the context's;
- an empty context is the prefix token alone (BOS, else the eos token);
- a row longer than `max_length` (`model.max_seq_len`) keeps its last tokens;
- log-probabilities are log_softmax over the model's vocabulary (`losses.token_logprobs`):
  an imported model's every row, a run of ours the tokenizer's ids (the rows export keeps);
- `--apply_chat_template` renders the messages with the run's chat template as text,
  as transformers' `apply_chat_template(tokenize=False)` does; a reply started in the last
  message is continued, not closed (`continue_final_message`).

Use it from Python as any harness model:

    import lm_eval
    from jaxllm.harness import JaxLLM
    results = lm_eval.simple_evaluate(model=JaxLLM("runs/sft"), tasks=["arc_easy"])

or by name once this module is imported: `model="jaxllm", model_args="checkpoint=runs/sft"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from jaxllm.chat_templates import JINJA_TEMPLATES, JinjaChatTemplate
from jaxllm.generate import Generator
from jaxllm.hf.tokenizer import HFTokenizer, library_vocab_size
from jaxllm.losses import scaled_vocab_logits, token_logprobs
from jaxllm.stages.common import load_run

MIN_WIDTH = 16  # the narrowest scoring row; wider ones are powers of two up to max_length
DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for generate_until


def _width(length: int, limit: int) -> int:
    """The bucket a row of `length` tokens is padded to: a power of two >= MIN_WIDTH, at
    most `limit` (so a run compiles a few shapes, whatever its requests)."""
    return min(max(MIN_WIDTH, 1 << (length - 1).bit_length()), limit)


@register_model("jaxllm")
class JaxLLM(TemplateLM):
    """The run in `checkpoint` (a jaxllm out_dir: its config.yaml and newest checkpoint;
    imported, LoRA or trained here) as a harness LM; `batch_size` rows per compiled call,
    `seed` the key of sampled generations (row i of a call draws with fold_in)."""

    def __init__(self, checkpoint: str, batch_size: int | str = 16, seed: int = 0, **_ignored):
        super().__init__()
        run = load_run(checkpoint)
        self.run_dir = Path(checkpoint)
        self.cfg, self.model, self.params = run.cfg, run.model, run.params
        self.jaxllm_tokenizer = run.tokenizer
        self.rows = int(batch_size) if str(batch_size).isdigit() else 16  # "auto": 16
        self.seed = seed
        self.max_length = self.cfg.model.max_seq_len
        # As the exported model's logits (`hf.tokenizer.library_vocab_size`).
        self.vocab_size = library_vocab_size(run.tokenizer, self.cfg.model.vocab_size)
        self._generators: dict[int, Generator] = {}
        self._score = jax.jit(self._scored_rows)

    # --- tokens as the exported Hugging Face tokenizer writes them ----------------------

    @property
    def eot_token_id(self) -> int:
        """The tokenizer's eos token (jaxllm's `<|im_end|>`; an imported model's own)."""
        tokenizer = self.jaxllm_tokenizer
        if isinstance(tokenizer, HFTokenizer):
            eos = tokenizer.named_id("eos_token")
            return eos if eos is not None else tokenizer.pad_id
        return tokenizer.stop_ids[0]

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: the BOS token, else the eos token."""
        if isinstance(self.jaxllm_tokenizer, HFTokenizer):
            bos = self.jaxllm_tokenizer.named_id("bos_token")
            return bos if bos is not None else self.eot_token_id
        return self.jaxllm_tokenizer.document_start_ids[0]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        """Hugging Face's `tokenizer.encode(string)`: its BOS unless `add_special_tokens` is
        False or the text starts with it; control-token strings become their ids."""
        tokenizer = self.jaxllm_tokenizer
        if add_special_tokens is None:
            bos_text = tokenizer.decode([self.prefix_token_id])
            add_special_tokens = not has_bos_prefix(string, bos_text)
        if isinstance(tokenizer, HFTokenizer):
            encode = tokenizer.encode_prompt if add_special_tokens else tokenizer.encode
            return encode(string)
        ids = tokenizer.encode_chat_text(string)[0]
        return [*tokenizer.document_start_ids, *ids] if add_special_tokens else ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.jaxllm_tokenizer.decode(tokens, skip_special_tokens=True)

    @property
    def tokenizer_name(self) -> str:
        return str(self.run_dir.resolve()).replace("/", "__")

    def _template(self) -> JinjaChatTemplate:
        template = self.jaxllm_tokenizer.chat_template
        if isinstance(template, JinjaChatTemplate):
            return template
        return JinjaChatTemplate(f"jaxllm's {template} template", JINJA_TEMPLATES[template])

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The Jinja source of the run's chat template (what the harness records and hashes
        into its cache keys), None when no template is applied."""
        return self._template().source if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The messages as the template's text: with the assistant's opening when
        `add_generation_prompt`, else ending where the last message's content ends."""
        text, _ = self._template().render(chat_history, add_generation_prompt)
        if add_generation_prompt:
            return text
        last = chat_history[-1]["content"]
        for content in (last, last.strip()):
            if content and content in text:
                return text[: text.rindex(content) + len(content)]
        return text

    # --- scoring ------------------------------------------------------------------------

    def _scored_rows(self, params, tokens_bt, targets_bt, segment_ids_bt):
        """(log p(target) (B, T) float32, whether the target is the argmax (B, T))."""
        logits_btv = self.model.logits(params, tokens_bt, None, segment_ids_bt)
        greedy_bt = jnp.argmax(scaled_vocab_logits(logits_btv, 1.0, self.vocab_size), -1)
        logp_bt = token_logprobs(logits_btv, targets_bt, vocab_size=self.vocab_size)
        return logp_bt, greedy_bt == targets_bt

    def _score_pairs(
        self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, all greedy) per (context ids, continuation
        ids); rows longer than `max_length` + 1 keep their last tokens. Longest first, in
        calls of `self.rows` rows padded to a power-of-two width."""
        inputs = []
        for context, continuation in pairs:
            whole = (context + continuation)[-(self.max_length + 1) :]
            inputs.append((whole, min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
        bar = tqdm(total=len(inputs), desc="jaxllm: log-likelihoods", disable=disable_tqdm)
        for first in range(0, len(order), self.rows):
            chunk = order[first : first + self.rows]
            width = _width(len(inputs[chunk[0]][0]) - 1, self.max_length)
            tokens = np.full((self.rows, width), self.jaxllm_tokenizer.pad_id, np.int32)
            targets = np.zeros((self.rows, width), np.int32)
            segments = np.zeros((self.rows, width), np.int32)
            for row, index in enumerate(chunk):
                whole, _ = inputs[index]
                tokens[row, : len(whole) - 1] = whole[:-1]
                targets[row, : len(whole) - 1] = whole[1:]
                segments[row, : len(whole) - 1] = 1
            logp, greedy = jax.device_get(self._score(self.params, tokens, targets, segments))
            for row, index in enumerate(chunk):
                whole, count = inputs[index]
                span = slice(len(whole) - 1 - count, len(whole) - 1)
                results[index] = (float(logp[row, span].sum()), bool(greedy[row, span].all()))
            bar.update(len(chunk))
        bar.close()
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_):
        """The harness's tokenized requests: ((context, continuation), context ids,
        continuation ids) each."""
        return self._score_pairs([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._score_pairs(windows, disable_tqdm), strict=True):
            totals[owner] += logp
        return totals

    # --- generation ---------------------------------------------------------------------

    def _generator(self, budget: int) -> Generator:
        if budget not in self._generators:
            pad = self.jaxllm_tokenizer.pad_id
            self._generators[budget] = Generator(self.model, self.vocab_size, pad, budget)
        return self._generators[budget]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        eos_text = self.jaxllm_tokenizer.decode([self.eot_token_id])
        stops = self.jaxllm_tokenizer.generation_stop_ids()
        base_key = jax.random.key(self.seed)  # request i draws with fold_in(base_key, i)
        bar = tqdm(total=len(requests), desc="jaxllm: generating", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            budget = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - budget
            if room < 1:
                raise ValueError(
                    f"max_gen_toks={budget} leaves no room for a context in "
                    f"model.max_seq_len={self.max_length}"
                )
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0
            sampling = {
                "temperature": temperature,
                "top_k": int(kwargs.get("top_k") or 0),
                "top_p": float(kwargs.get("top_p") or 1.0),
            }
            generator = self._generator(budget)
            for first in range(0, len(indices), self.rows):
                chunk = indices[first : first + self.rows]
                prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in chunk]
                keys = jax.vmap(jax.random.fold_in, (None, 0))(base_key, np.array(chunk))
                completion = generator(self.params, prompts, keys, stop_ids=stops, **sampling)
                for row, index in enumerate(chunk):
                    text = self.tok_decode(completion.row(row))
                    results[index] = postprocess_generated_text(text, until, None)
                bar.update(len(chunk))
        bar.close()
        return results
