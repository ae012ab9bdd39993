"""`jaxllm import-hf` and `jaxllm export-hf`: Hugging Face checkpoint folders <-> run folders.

An imported run folder is what a training run leaves: `config.yaml` (the model config
read from `config.json`, `data.tokenizer` pointing at the folder's `tokenizer.json`, and
the chat template), `checkpoints/0` (an Orbax TrainState at step 0 holding the params), the
HF `tokenizer.json`, and `hf_config.json` (the original config, which export starts from so
fields we do not model, like bos/eos ids, survive the round trip, also for the runs that
start from this one). Every stage takes it through its `*_from` / `init_from` key;
`generate` and `chat` load it.

Import streams: each safetensors tensor is read on its own (memory-mapped), converted to
float32 and put onto the mesh in its sharded layout; a stacked param holds one layer's
tensors on the host at a time. The folder is written under a temporary name and renamed
when complete, so a failed import leaves nothing behind.

Our control tokens map onto the model's own where its tokenizer has them and are appended
otherwise; appended rows of the embedding (and of an untied output head) start at the mean
of the model's rows. Export writes `config.json`, `model.safetensors` (float32, rows past
the tokenizer's ids trimmed) and the tokenizer files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxllm.chat_templates import JINJA_TEMPLATES
from jaxllm.checkpoint import Checkpointer
from jaxllm.config import REWARD_HEAD, Config, ModelConfig, to_yaml
from jaxllm.hf.convert import (
    HFConversionError,
    hf_config_from_model,
    hf_names,
    model_config_from_hf,
    read_json_object,
    tensor_maps,
)
from jaxllm.hf.tokenizer import save_hf_tokenizer, tokenizer_from_hf
from jaxllm.model import LanguageModel, Params
from jaxllm.sharding import tree_shardings
from jaxllm.stages.registry import STAGES
from jaxllm.state import TrainState

HF_CONFIG_FILE = "hf_config.json"  # the imported model's own config.json


class SafetensorsFolder:
    """The tensors of a folder's `model.safetensors` or sharded `*.safetensors` files
    (through `model.safetensors.index.json`), read one at a time as float32 numpy."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json_object(index, "").get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFConversionError(f"{index} has no weight_map object")
            files = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise HFConversionError(
                f"{folder} has no model.safetensors (or model.safetensors.index.json); "
                "save the model with save_pretrained(..., safe_serialization=True)"
            )
        self._files = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            handle = _safetensors_call(folder / name, safe_open, str(folder / name), "flax")
            self._files[name] = handle
            for tensor in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                self.file_of[tensor] = name

    def read(self, name: str) -> np.ndarray:
        """One tensor in float32 on the host (bfloat16 files included)."""
        file = self._files[self.file_of[name]]
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            tensor = _safetensors_call(self.file_of[name], file.get_tensor, name)
            return np.asarray(tensor.astype(jnp.float32))


def _safetensors_call(file, function, *args):
    """`function(*args)` with safetensors' own errors (a corrupt or truncated file) as one
    line naming `file`."""
    from safetensors import SafetensorError

    try:
        return function(*args)
    except SafetensorError as error:
        raise HFConversionError(f"{file} does not read as safetensors ({error})") from None


def _appended_ids(tokenizer_json: dict, special_ids: dict[str, int]) -> list[int]:
    """Ids of our control tokens that the model's tokenizer lacked (appended after its ids)."""
    ids = list(tokenizer_json.get("model", {}).get("vocab", {}).values())
    ids += [token["id"] for token in tokenizer_json.get("added_tokens", [])]
    last = max(ids, default=-1)
    return sorted(i for i in special_ids.values() if i > last)


def _checked_tensor_names(tensors: SafetensorsFolder, cfg: ModelConfig) -> None:
    """Every tensor the model needs is there, and nothing else (both named)."""
    needed = {name for m in tensor_maps(cfg) for name in hf_names(m, cfg.num_layers)}
    present = set(tensors.file_of)
    # Tied models may still carry a copy of the embedding as lm_head.weight.
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    ignorable |= {n for n in present if n.endswith("rotary_emb.inv_freq")}
    missing, extra = sorted(needed - present), sorted(present - needed - ignorable)
    if missing:
        raise HFConversionError(
            f"the checkpoint lacks {len(missing)} tensor(s) the config needs: "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
        )
    if extra:
        raise HFConversionError(
            f"the checkpoint has {len(extra)} tensor(s) this model does not use: "
            f"{', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}"
        )


def _host_param(
    tensors: SafetensorsFolder, tensor_map, cfg: ModelConfig, shape, vocab_rows, appended
) -> np.ndarray:
    """One of our params assembled on the host from its HF tensor(s), checked for shape."""
    if tensor_map.per_layer:
        layer_shape = tuple(shape[1:])
        layers = []
        for name in hf_names(tensor_map, cfg.num_layers):
            tensor = tensors.read(name)
            if tensor.size != int(np.prod(layer_shape)):
                raise HFConversionError(
                    f"tensor {name} has shape {tensor.shape}, which does not fit "
                    f"{layer_shape} of the config"
                )
            layers.append(tensor_map.to_ours(tensor, layer_shape))
        return np.stack(layers)
    (name,) = hf_names(tensor_map, cfg.num_layers)
    tensor = tensors.read(name)
    if tensor_map.path[0] in ("token_embedding_vd", "lm_head_dv"):
        # (V, D) in HF, for the embedding and the output head alike
        if tensor.ndim != 2 or tensor.shape[1] != cfg.embed_dim:
            raise HFConversionError(
                f"tensor {name} has shape {tensor.shape}; the config says (vocab, {cfg.embed_dim})"
            )
        grown = np.zeros((vocab_rows, cfg.embed_dim), np.float32)
        grown[: tensor.shape[0]] = tensor
        grown[appended] = tensor.mean(axis=0)  # our new control tokens start at the mean row
        return tensor_map.to_ours(grown, shape)
    if tensor.size != int(np.prod(shape)):
        raise HFConversionError(
            f"tensor {name} has shape {tensor.shape}, which does not fit {tuple(shape)}"
        )
    return tensor_map.to_ours(tensor, tuple(shape))


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _check_new_folder(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise HFConversionError(f"--out {out_dir} is a file; name a new folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise HFConversionError(f"--out {out_dir} exists and is not empty; pick a new folder")


@contextlib.contextmanager
def _staged_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir`, renamed to it on success, removed on failure."""
    _check_new_folder(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def import_hf(hf_dir: str | Path, out_dir: str | Path, mesh) -> list[str]:
    """Write the run folder `out_dir` for the HF checkpoint in `hf_dir`, params laid out on
    `mesh` while converting. Returns notes (one line each) for the user."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir).absolute()
    if not hf_dir.is_dir():
        raise HFConversionError(f"{hf_dir} is not a folder; pass a save_pretrained folder")
    _check_new_folder(out_dir)  # before the conversion's work (and again before the rename)
    hf_config = read_json_object(hf_dir / "config.json", "pass a save_pretrained folder")
    cfg, architecture, notes = model_config_from_hf(hf_config)
    tokenizer_json = read_json_object(
        hf_dir / "tokenizer.json", "the folder needs the model's fast tokenizer file"
    )
    try:
        tokenizer = tokenizer_from_hf(hf_dir / "tokenizer.json")
    except ValueError as error:
        raise HFConversionError(f"tokenizer.json: {error}") from None
    appended = _appended_ids(tokenizer_json, tokenizer.special_ids)
    vocab_rows = max(cfg.vocab_size, tokenizer.vocab_size)
    if vocab_rows > cfg.vocab_size:
        notes.append(f"model.vocab_size={vocab_rows} ({cfg.vocab_size} + our control tokens)")
    cfg.vocab_size = vocab_rows
    tensors = SafetensorsFolder(hf_dir)
    _checked_tensor_names(tensors, cfg)
    model = LanguageModel(cfg)
    shardings = tree_shardings(mesh, model.abstract_params, model.logical_axes, model.rules)
    params: Params = {}
    for tensor_map in tensor_maps(cfg):
        node_abstract, node_sharding = model.abstract_params, shardings
        for key in tensor_map.path:
            node_abstract, node_sharding = node_abstract[key], node_sharding[key]
        host = _host_param(tensors, tensor_map, cfg, node_abstract.shape, vocab_rows, appended)
        _set_path(params, tensor_map.path, jax.device_put(host, node_sharding))
    run_cfg = Config(out_dir=str(out_dir), model=cfg)
    run_cfg.data.tokenizer = str(out_dir / "tokenizer.json")
    run_cfg.chat.template = _chat_template(hf_dir, tokenizer_json)
    with _staged_folder(out_dir) as staging:
        shutil.copyfile(hf_dir / "tokenizer.json", staging / "tokenizer.json")
        (staging / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        write_run_folder(
            staging,
            run_cfg,
            params,
            {"imported_from": str(hf_dir.absolute()), "architecture": architecture},
        )
    notes.append(f"chat.template={run_cfg.chat.template}")
    return notes


def write_run_folder(folder: Path, cfg: Config, params: Params, meta: dict) -> None:
    """`config.yaml` and a step-0 checkpoint of `params` (no optimizer state) in `folder`:
    a run folder every stage's `*_from` key and `generate` accept."""
    (folder / "config.yaml").write_text(to_yaml(cfg))
    checkpointer = Checkpointer(folder / "checkpoints", async_save=False)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=(),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    checkpointer.save(state, meta)
    checkpointer.wait()
    checkpointer.close()


def _chat_template(hf_dir: Path, tokenizer_json: dict) -> str:
    """`chat.template` of an imported folder: the one of ours whose Jinja text its
    tokenizer_config.json carries (what export-hf writes), else ChatML when the vocabulary
    has <|im_start|> (Qwen), else jaxllm."""
    config_path = hf_dir / "tokenizer_config.json"
    if config_path.is_file():
        jinja = read_json_object(config_path, "").get("chat_template")
        for name, text in JINJA_TEMPLATES.items():
            if jinja == text:
                return name
    return "chatml" if "<|im_start|>" in _added_texts(tokenizer_json) else "jaxllm"


def _added_texts(tokenizer_json: dict) -> set[str]:
    return {token["content"] for token in tokenizer_json.get("added_tokens", [])}


def export_hf(run_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Write `config.json`, `model.safetensors` and the tokenizer files of the run in
    `run_dir` into `out_dir` (a new folder). Returns notes (one line each)."""
    from safetensors.numpy import save_file

    from jaxllm.stages.common import load_run

    run_dir, out_dir = Path(run_dir), Path(out_dir).absolute()
    _check_new_folder(out_dir)
    run = load_run(run_dir, "export-hf RUN_DIR")
    cfg, tokenizer = run.cfg.model, run.tokenizer
    rows = tokenizer.vocab_size
    notes = []
    if cfg.vocab_size > rows:
        notes.append(f"vocab rows {rows}..{cfg.vocab_size - 1} (padding, no token) trimmed")
    reward = REWARD_HEAD in cfg.scalar_heads
    left_out = [head for head in cfg.scalar_heads if head != REWARD_HEAD]
    if left_out:
        notes.append(f"scalar heads {left_out} left out (a causal LM has none)")
    tensors: dict[str, np.ndarray] = {}
    if reward:
        tensors["score.weight"], note = _score_head(run.params["heads"][REWARD_HEAD])
        notes.append(note)
    for tensor_map in tensor_maps(cfg):
        if reward and tensor_map.path[0] == "lm_head_dv":
            continue  # a sequence classifier has no output head
        ours = run.params
        for key in tensor_map.path:
            ours = ours[key]
        ours = np.asarray(jax.device_get(ours), np.float32)
        if tensor_map.path[0] == "token_embedding_vd":
            ours = ours[:rows]
        elif tensor_map.path[0] == "lm_head_dv":
            ours = ours[:, :rows]
        names = list(hf_names(tensor_map, cfg.num_layers))
        layers = list(ours) if tensor_map.per_layer else [ours]
        for name, layer in zip(names, layers, strict=True):
            tensors[name] = tensor_map.to_hf(layer)
    special = tokenizer.special_ids
    hf_config = hf_config_from_model(
        cfg,
        rows,
        {
            "bos_token_id": None,
            "eos_token_id": special["<|im_end|>"],
            "pad_token_id": special["<|pad|>"],
        },
        reward,
    )
    original = _original_hf_config(run_dir)
    if original is not None:  # keep the imported model's own ids, context and extra fields
        hf_config = {
            **original,
            **_without_ids(hf_config),
            "max_position_embeddings": max(
                original.get("max_position_embeddings", 0), cfg.max_seq_len
            ),
            "eos_token_id": _with_im_end(original.get("eos_token_id"), special["<|im_end|>"]),
        }
        hf_config.pop("rope_parameters", None)
        notes.append("config.json: the imported model's, with this run's shapes")
    with _staged_folder(out_dir) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
        save_hf_tokenizer(tokenizer, staging)
    return notes


def _score_head(head: Params) -> tuple[np.ndarray, str]:
    """HF's `score.weight` (1, D) for our reward head, and a note on its bias, which HF's
    score layer lacks: the exported scores are ours minus that constant, which comparisons
    (Bradley-Terry, best-of-n, PPO with normalised scores) never see."""
    weight = np.asarray(jax.device_get(head["w_d"]), np.float32)[None, :]
    bias = float(jax.device_get(head["bias"]))
    return weight, (
        "reward head exported as ...ForSequenceClassification (score at the last non-pad "
        f"token; end the text with <|im_end|> as the reward stage does); its bias {bias:+.4g} "
        "is left out, shifting every score by that constant"
    )


def _original_hf_config(run_dir: Path) -> dict | None:
    """The `config.json` of the HF model a run descends from: the run's own `hf_config.json`
    (an imported run), or that of the run it started from (`sft.init_from`, ...), followed
    back while those folders exist. None for a model trained here from scratch."""
    seen: set[Path] = set()
    while run_dir.resolve() not in seen:
        seen.add(run_dir.resolve())
        if (run_dir / HF_CONFIG_FILE).is_file():
            return read_json_object(run_dir / HF_CONFIG_FILE, "")
        config = run_dir / "config.yaml"
        values = yaml.safe_load(config.read_text()) if config.is_file() else None
        if not isinstance(values, dict):
            return None
        starts = [
            (values.get(key.split(".")[0]) or {}).get(key.split(".")[1])
            for key in (spec.start_key for spec in STAGES.values() if spec.start_key)
        ]
        starts = [start for start in starts if start]
        if not starts:
            return None
        run_dir = Path(starts[0])
    return None


def _with_im_end(eos, im_end: int) -> int | list[int]:
    """The model's eos id(s) plus `<|im_end|>`, where our replies stop."""
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return ids + [im_end] if im_end not in ids else (ids[0] if len(ids) == 1 else ids)


def _without_ids(hf_config: dict) -> dict:
    return {k: v for k, v in hf_config.items() if not k.endswith("_token_id")}
