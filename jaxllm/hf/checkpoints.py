"""`jaxllm import-hf` and `jaxllm export-hf`: Hugging Face checkpoint folders <-> run folders.

An imported run folder is what a training run leaves: `config.yaml` (the model config
read from `config.json`, `data.tokenizer` pointing at the run folder, `chat.template:
model`), `checkpoints/0` (an Orbax TrainState at step 0 holding the params), the model's
tokenizer files (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`,
`chat_template.jinja`, `generation_config.json`, those present; see `jaxllm.hf.tokenizer`),
and `hf_config.json` (the original config, which export starts from so
fields we do not model, like bos/eos ids, survive the round trip, also for the runs that
start from this one). Every stage takes it through its `*_from` / `init_from` key;
`generate` and `chat` load it.

Import streams: each safetensors tensor is read on its own (memory-mapped), converted to
float32 and put onto the mesh in its sharded layout; a stacked param holds one layer's
tensors on the host at a time. The folder is written under a temporary name and renamed
when complete, so a failed import leaves nothing behind.

The model keeps its own vocabulary: no jaxllm control token is added, no embedding row
appended. Export writes `config.json`, `model.safetensors` (rows past the tokenizer's ids
trimmed) and the tokenizer files: an imported model's own with the chat template in use and
`generation_config.json` (eos ids = the stop ids), or jaxllm's own written for
transformers. A LoRA run exports merged (W + s A B), or with `adapter=True` as a PEFT
adapter (`jaxllm.hf.peft`) for the export of the run it started from.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxllm.chat_templates import MODEL_TEMPLATE
from jaxllm.checkpoint import Checkpointer
from jaxllm.config import REWARD_HEAD, Config, ModelConfig, to_yaml
from jaxllm.errors import UserError
from jaxllm.hf import peft
from jaxllm.hf.convert import HFConversionError, read_json_object
from jaxllm.hf.tokenizer import (
    GENERATION_CONFIG_FILE,
    TOKENIZER_FILES,
    HFTokenizer,
    generation_config_of_model,
    hf_token_ids,
    library_vocab_size,
    save_tokenizer,
)
from jaxllm.model import LanguageModel, Params
from jaxllm.models import family, family_of_architecture
from jaxllm.models.base import ROPE_KEYS, TensorMap
from jaxllm.sharding import tree_shardings
from jaxllm.stages.registry import STAGES
from jaxllm.staging import new_staging
from jaxllm.state import TrainState
from jaxllm.trainer import RUN_FILE

if TYPE_CHECKING:
    from jaxllm.stages.common import LoadedRun

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


def _save_safetensors(tensors: dict[str, np.ndarray], file: Path) -> None:
    """`tensors` written to `file` as safetensors (PyTorch's metadata); a write that fails
    (a full disk, a file-size limit) is the OSError it was, naming `file`."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    try:
        save_file(tensors, str(file), metadata={"format": "pt"})
    except SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(file)) from None


def _at(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _checked_tensor_names(
    tensors: SafetensorsFolder, cfg: ModelConfig, maps: list[TensorMap], abstract: Params
) -> None:
    """Every tensor the model needs is there, and nothing else (both named)."""
    needed = {name for m in maps for name in m.hf_names(_at(abstract, m.path).shape)}
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
    tensors: SafetensorsFolder, tensor_map: TensorMap, cfg: ModelConfig, shape
) -> np.ndarray:
    """One of our params assembled on the host from its HF tensor(s), checked for shape: a
    stacked param (layers[, experts], ...) from one tensor per layer (and expert)."""
    stacked = tensor_map.stacked_axes
    if stacked:
        item_shape = tuple(shape[stacked:])
        items = []
        for name in tensor_map.hf_names(shape):
            tensor = tensors.read(name)
            if tensor.size != int(np.prod(item_shape)):
                raise HFConversionError(
                    f"tensor {name} has shape {tensor.shape}, which does not fit "
                    f"{item_shape} of the config"
                )
            items.append(tensor_map.to_ours(tensor, item_shape))
        return np.stack(items).reshape(shape)
    (name,) = tensor_map.hf_names(shape)
    tensor = tensors.read(name)
    # (V, D) in HF, for the embedding and the output head alike
    embedding = tensor_map.path[0] in ("token_embedding_vd", "lm_head_dv")
    if embedding and (tensor.ndim != 2 or tensor.shape[1] != cfg.embed_dim):
        raise HFConversionError(
            f"tensor {name} has shape {tensor.shape}; the config says (vocab, {cfg.embed_dim})"
        )
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
    """A temporary folder beside `out_dir`, renamed to it on success, removed on failure
    (an OSError about a file in it then names the file under `out_dir`)."""
    _check_new_folder(out_dir)
    staging = new_staging(out_dir)  # a killed export's or import's staging removed first
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # a folder's usual mode, not mkdtemp's private 0700
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except OSError as error:  # a full disk: named by the folder asked for, not the staging
        if error.filename is None or staging not in Path(error.filename).parents:
            raise
        name = out_dir / Path(error.filename).relative_to(staging)
        raise OSError(error.errno, error.strerror, str(name)) from None
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
    architecture = (hf_config.get("architectures") or [None])[0]
    model_family = family_of_architecture(architecture)
    cfg, notes = model_family.config_from_hf(hf_config)
    if not (hf_dir / "tokenizer.json").is_file():
        raise HFConversionError(
            f"{hf_dir} has no tokenizer.json; the folder needs the model's fast tokenizer file"
        )
    tokenizer = HFTokenizer(hf_dir)  # one DataError line when it does not load
    if tokenizer.vocab_size > cfg.vocab_size:
        raise HFConversionError(
            f"tokenizer.json has {tokenizer.vocab_size} ids but config.json's vocab_size is "
            f"{cfg.vocab_size}; the embedding has no row for the ids past it"
        )
    tensors = SafetensorsFolder(hf_dir)
    model = LanguageModel(cfg)
    maps = model_family.tensor_maps(cfg)
    _checked_tensor_names(tensors, cfg, maps, model.abstract_params)
    shardings = tree_shardings(mesh, model.abstract_params, model.logical_axes, model.rules)
    params: Params = {}
    for tensor_map in maps:
        shape = _at(model.abstract_params, tensor_map.path).shape
        host = _host_param(tensors, tensor_map, cfg, shape)
        _set_path(params, tensor_map.path, jax.device_put(host, _at(shardings, tensor_map.path)))
    run_cfg = Config(out_dir=str(out_dir), model=cfg)
    run_cfg.data.tokenizer = str(out_dir)
    run_cfg.chat.template = MODEL_TEMPLATE
    with _staged_folder(out_dir) as staging:
        _copy_tokenizer_files(hf_dir, hf_config, staging)
        (staging / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        write_run_folder(
            staging,
            run_cfg,
            params,
            {"imported_from": str(hf_dir.absolute()), "architecture": architecture},
        )
    notes.append(_template_note(tokenizer))
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


def _copy_tokenizer_files(hf_dir: Path, hf_config: dict, folder: Path) -> None:
    """The model's tokenizer files (`TOKENIZER_FILES`, those present) copied into the run
    `folder`; without a `generation_config.json`, one with `config.json`'s bos/eos/pad ids,
    which transformers' `generate` then stops on."""
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, folder / name)
    generation = generation_config_of_model(hf_config)
    if not (hf_dir / GENERATION_CONFIG_FILE).is_file() and generation:
        (folder / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2))


def _template_note(tokenizer: HFTokenizer) -> str:
    """What the run's `chat.template=model` means for this model."""
    try:
        return f"chat.template=model ({tokenizer.chat_template.origin})"
    except UserError:
        return (
            "chat.template=model, but the model has no chat template: chat stages need "
            "chat.template=PATH.jinja"
        )


def export_hf(
    run_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    adapter: bool = False,
    base_model: str | None = None,
) -> list[str]:
    """Write `config.json`, the weights and the tokenizer files of the run in `run_dir` into
    `out_dir` (a new folder), as `save_pretrained` does: safetensors in `dtype` (float32 or
    bfloat16), one `model.safetensors`, or shards of at most `max_shard_size` (e.g. "5GB",
    "500MB", "2GiB"; a bigger tensor gets a shard of its own) with
    `model.safetensors.index.json`. Config and tensor names are those of the run's
    `model.family`; a LoRA run's adapters are merged into the weights. With `adapter`, a
    LoRA run's PEFT adapter instead (`export_adapter`; `base_model` is its
    `base_model_name_or_path`). Returns notes (one line each)."""
    from jaxllm.stages.common import load_run

    if dtype not in EXPORT_DTYPES:
        raise HFConversionError(
            f"--dtype {dtype} is not supported; use {' or '.join(EXPORT_DTYPES)}"
        )
    if base_model is not None and not adapter:
        raise HFConversionError("--base-model names the base of an adapter; add --adapter")
    shard_bytes = parse_size(max_shard_size)
    run_dir, out_dir = Path(run_dir), Path(out_dir).absolute()
    _check_new_folder(out_dir)
    run = load_run(run_dir, "export-hf RUN_DIR")
    if adapter:
        return export_adapter(run, run_dir, out_dir, dtype, base_model)
    cfg, tokenizer = run.cfg.model, run.tokenizer
    model_family = family(cfg.family)
    rows = library_vocab_size(tokenizer, cfg.vocab_size)  # padding rows of ours trimmed
    notes = []
    if cfg.vocab_size > rows:
        notes.append(f"vocab rows {rows}..{cfg.vocab_size - 1} (padding, no token) trimmed")
    params = run.params
    if run.model.lora is not None:
        params = run.model.merged_params(params)
        notes.append(
            f"LoRA adapters (rank {run.model.lora.rank} on {','.join(run.model.lora.targets)}) "
            "merged into the weights; --adapter writes them as a PEFT adapter instead"
        )
    reward = REWARD_HEAD in cfg.scalar_heads
    left_out = [head for head in cfg.scalar_heads if head != REWARD_HEAD]
    if left_out:
        notes.append(f"scalar heads {left_out} left out (a causal LM has none)")
    # A sequence classifier has no LM head; its score head goes first.
    maps = [m for m in model_family.tensor_maps(cfg) if not (reward and m.path[0] == "lm_head_dv")]
    tensors = _hf_tensors(params, maps, rows, dtype)
    if reward:
        score, note = _score_head(run.params["heads"][REWARD_HEAD])
        notes.append(note)
        tensors = itertools.chain([("score.weight", score.astype(jnp.dtype(dtype)))], tensors)
    hf_config = _hf_config(
        model_family.config_to_hf(cfg), rows, dtype, hf_token_ids(tokenizer), reward
    )
    original = _original_hf_config(run_dir)
    if original is not None:  # keep the imported model's own ids, context and extra fields
        hf_config = {
            **{key: value for key, value in original.items() if key not in ROPE_KEYS},
            **_without_ids(hf_config),
            "max_position_embeddings": max(
                original.get("max_position_embeddings", 0), cfg.max_seq_len
            ),
        }
        notes.append("config.json: the imported model's, with this run's shapes")
    with _staged_folder(out_dir) as staging:
        _write_safetensors(staging, tensors, shard_bytes)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
        save_tokenizer(tokenizer, staging)
    return notes


def export_adapter(
    run: LoadedRun, run_dir: Path, out_dir: Path, dtype: str, base_model: str | None
) -> list[str]:
    """Write the LoRA run `run` (a `LoadedRun` of `run_dir`) into `out_dir` as a PEFT
    adapter: `adapter_config.json` and `adapter_model.safetensors` (`jaxllm.hf.peft`), for
    the base `base_model` (default: what `_adapter_base` finds). Returns notes."""
    peft.check_adapter_export(run_dir, run.cfg)
    cfg = run.cfg.model
    maps = family(cfg.family).tensor_maps(cfg)
    notes = []
    if base_model is None:
        base_model, note = _adapter_base(run_dir)
        notes.append(note)
    if run.cfg.lora.base_dtype != "float32":
        notes.append(
            f"the adapters were trained on a {run.cfg.lora.base_dtype} base; PEFT adds them "
            "to the base export's float weights (as QLoRA adapters are used)"
        )
    tensors = dict(peft.adapter_tensors(run.params, maps, dtype))
    saved_modules = []
    if run.cfg.lora.train_embeddings:
        embeddings = peft.embedding_maps(maps)
        rows = library_vocab_size(run.tokenizer, cfg.vocab_size)  # as the base export's
        saved = _hf_tensors(run.params, embeddings, rows, dtype)
        tensors |= peft.saved_module_tensors(saved, cfg.tie_embeddings)
        saved_modules = [peft.module_name(m) for m in embeddings]
        notes.append(f"trained embeddings saved whole (modules_to_save: {saved_modules})")
    config = peft.adapter_config(
        run.cfg.lora,
        peft.target_modules(run.params, maps),
        saved_modules,
        cfg.tie_embeddings,
        base_model,
    )
    left_out = list(cfg.scalar_heads)
    if left_out:
        notes.append(f"scalar heads {left_out} left out (a causal LM has none)")
    with _staged_folder(out_dir) as staging:
        _save_safetensors(tensors, staging / peft.ADAPTER_WEIGHTS_FILE)
        (staging / peft.ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return notes


def _adapter_base(run_dir: Path) -> tuple[str | None, str]:
    """(`base_model_name_or_path` of the LoRA run in `run_dir`'s adapter, a note): the HF
    folder the run it started from was imported from, or else that run's folder (whose
    `export-hf` is the base); None for a run that started from no run."""
    start = _start_run(run_dir)
    if start is None:
        return None, (
            f"base_model_name_or_path: none, {run_dir} started from no run; pass "
            "--base-model NAME_OR_PATH"
        )
    imported = _imported_from(start)
    if imported is not None:
        return imported, (
            f"base_model_name_or_path: {imported} (the model {start} was imported from; "
            "--base-model NAME_OR_PATH names another)"
        )
    return str(start.absolute()), (
        f"base_model_name_or_path: {start} is a run folder: load the adapter onto the folder "
        f"`jaxllm export-hf {start} --out BASE_DIR` writes, or pass --base-model NAME_OR_PATH"
    )


def _imported_from(run_dir: Path) -> str | None:
    """The HF folder `import-hf` wrote the run folder `run_dir` from (its checkpoint's
    meta), or None for any other run."""
    if not (run_dir / HF_CONFIG_FILE).is_file():
        return None
    checkpointer = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        step = checkpointer.latest_step()
        if step is None:
            return None
        meta = checkpointer.read_meta(step)
    finally:
        checkpointer.close()
    imported = meta.get("imported_from") if isinstance(meta, dict) else None
    return imported if isinstance(imported, str) else None


EXPORT_DTYPES = ("float32", "bfloat16")
SIZE_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def parse_size(size: str | int) -> int:
    """Bytes of a size as transformers' `max_shard_size` writes it: an int, or "5GB",
    "500MB", "2GiB" (GB = 10^9 bytes, GiB = 2^30)."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)?\s*", str(size).upper())
    if not match or float(match[1]) <= 0:
        raise HFConversionError(
            f"--max-shard-size {size} is not a size; write e.g. 5GB, 500MB or 2GiB"
        )
    return int(float(match[1]) * SIZE_UNITS.get(match[2] or "", 1))


def _hf_config(
    family_fields: dict, vocab_size: int, dtype: str, special_ids: dict, reward: bool
) -> dict:
    """A `config.json`: the family's fields for our model, `vocab_size` rows, the weights'
    `dtype`, bos/eos/pad ids (`special_ids`, None where absent). `reward`: as
    `...ForSequenceClassification` with one label (a reward model's score head)."""
    hf = {
        **family_fields,
        "vocab_size": vocab_size,
        "dtype": dtype,  # transformers 5; 4 reads torch_dtype
        "torch_dtype": dtype,
        **special_ids,
    }
    if reward:
        hf["architectures"] = [
            name.replace("ForCausalLM", "ForSequenceClassification") for name in hf["architectures"]
        ]
        hf["num_labels"] = 1
        hf["id2label"], hf["label2id"] = {"0": REWARD_HEAD}, {REWARD_HEAD: 0}
    return hf


def _hf_tensors(
    params: Params, maps: list[TensorMap], vocab_rows: int, dtype: str
) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor in HF's layout and `dtype`) of every param `maps` names, one param
    on the host at a time; embedding and output-head rows past `vocab_rows` trimmed."""
    for tensor_map in maps:
        ours = np.asarray(jax.device_get(_at(params, tensor_map.path)), np.float32)
        if tensor_map.path[0] == "token_embedding_vd":
            ours = ours[:vocab_rows]
        elif tensor_map.path[0] == "lm_head_dv":
            ours = ours[:, :vocab_rows]
        stacked = tensor_map.stacked_axes
        items = ours.reshape(-1, *ours.shape[stacked:]) if stacked else [ours]
        for name, item in zip(tensor_map.hf_names(ours.shape), items, strict=True):
            yield name, tensor_map.to_hf(item).astype(jnp.dtype(dtype))


def _write_safetensors(
    folder: Path, tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int
) -> None:
    """`tensors` in `folder` as save_pretrained lays them out: one `model.safetensors`, or,
    past `max_shard_bytes`, `model-0000k-of-0000N.safetensors` filled in order and
    `model.safetensors.index.json` (metadata.total_size, weight_map). One shard in memory."""
    shards: list[list[str]] = []
    shard: dict[str, np.ndarray] = {}
    total_bytes = shard_bytes = 0

    def write_shard() -> None:
        _save_safetensors(shard, folder / f"shard-{len(shards)}")
        shards.append(list(shard))
        shard.clear()

    for name, tensor in tensors:
        if shard and shard_bytes + tensor.nbytes > max_shard_bytes:
            write_shard()
            shard_bytes = 0
        shard[name] = tensor
        shard_bytes += tensor.nbytes
        total_bytes += tensor.nbytes
    write_shard()
    if len(shards) == 1:
        os.replace(folder / "shard-0", folder / "model.safetensors")
        return
    weight_map = {}
    for index, names in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(folder / f"shard-{index}", folder / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


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
    while run_dir is not None and run_dir.resolve() not in seen:
        seen.add(run_dir.resolve())
        if (run_dir / HF_CONFIG_FILE).is_file():
            return read_json_object(run_dir / HF_CONFIG_FILE, "")
        run_dir = _start_run(run_dir)
    return None


def _start_run(run_dir: Path) -> Path | None:
    """The run the run in `run_dir` started from (its stage's start key, `sft.init_from`,
    ...: the stage `run.json` names, else any stage's that is set), or None (trained from
    scratch, or no readable `config.yaml`)."""
    config = run_dir / "config.yaml"
    values = yaml.safe_load(config.read_text()) if config.is_file() else None
    if not isinstance(values, dict):
        return None
    try:
        stage = json.loads((run_dir / RUN_FILE).read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        stage = None
    specs = [STAGES[stage]] if stage in STAGES else list(STAGES.values())
    starts = [
        (values.get(key.split(".")[0]) or {}).get(key.split(".")[1])
        for key in (spec.start_key for spec in specs if spec.start_key)
    ]
    starts = [start for start in starts if start]
    return Path(starts[0]) if starts else None


def _without_ids(hf_config: dict) -> dict:
    return {k: v for k, v in hf_config.items() if not k.endswith("_token_id")}
