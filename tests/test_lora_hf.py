"""A LoRA run exported to Hugging Face: merged weights that `transformers` loads, and a PEFT
adapter that `peft.PeftModel` loads onto the export of the run it started from, both giving
the LoRA run's logits. Needs the `hf-test` extra (torch, transformers, peft)."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_families import family_folder  # noqa: E402

from jaxllm.cli import main as cli_main  # noqa: E402
from jaxllm.config import Config, LoraConfig, load_config  # noqa: E402
from jaxllm.generate import Generator  # noqa: E402
from jaxllm.hf.checkpoints import write_run_folder  # noqa: E402
from jaxllm.lora import adapters_of, join  # noqa: E402
from jaxllm.model import LanguageModel  # noqa: E402
from jaxllm.stages.common import load_run  # noqa: E402

TOKENS_BT = np.random.default_rng(0).integers(0, 256, (2, 24))


def lora_sft(out_dir, base_dir, *overrides: str) -> None:
    """4 SFT steps of rank-4 adapters at a large lr on `base_dir`'s model, in-process."""
    argv = [
        "sft",
        f"sft.init_from={base_dir}",
        "data.path=builtin",
        "sft.builtin_examples=32",
        "sft.eval_prompts=0",
        "train.seq_len=128",
        "train.batch_size=8",
        "train.samples=0",
        "train.eval_every=100",
        "train.steps=4",
        "checkpoint.every=4",
        "optimizer.lr=0.05",
        "optimizer.warmup_steps=0",
        "lora.rank=4",
        "lora.alpha=8",
        f"out_dir={out_dir}",
        *overrides,
    ]
    assert cli_main(argv) == 0


# Per family: the LoRA run's extra settings and the export's --base-model (None: default).
VARIANTS = {
    "llama3": ([], None),
    "qwen3": (
        [
            "lora.rslora=true",
            "lora.train_embeddings=true",
            "lora.targets=[q,v,o,down]",
            # 32 examples, packed best-fit, left greedy chat replies of newlines only: the
            # chat test needs text of at least two characters to compare
            "sft.builtin_examples=64",
        ],
        "Qwen/Qwen3-0.6B",
    ),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def lora_run(request, tmp_path_factory):
    """(root, the imported run's folder, the LoRA run's folder, the loaded LoRA run, its
    --base-model): a tiny model of the family imported and fine-tuned with adapters."""
    root = tmp_path_factory.mktemp(request.param)
    family_folder(root / "hf", request.param)
    assert cli_main(["import-hf", str(root / "hf"), "--out", str(root / "base")]) == 0
    overrides, base_model = VARIANTS[request.param]
    lora_sft(root / "lora", root / "base", *overrides)
    return root, root / "base", root / "lora", load_run(root / "lora"), base_model


def our_logits(run) -> np.ndarray:
    return np.asarray(run.model.logits(run.params, jnp.asarray(TOKENS_BT)))


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(TOKENS_BT)).logits.numpy()


def test_the_adapters_trained(lora_run):
    run = lora_run[3]
    b = run.params["blocks"]["attention"]["q_lora"]["b"]
    assert np.abs(np.asarray(b)).max() > 1e-2  # B left zero would export the base


def test_merged_export_gives_the_lora_runs_logits_and_greedy_text(lora_run, capsys):
    root, base, lora, run, _ = lora_run
    out = root / "merged"
    assert cli_main(["export-hf", str(lora), "--out", str(out)]) == 0
    targets = ",".join(run.cfg.lora.targets)
    assert f"LoRA adapters (rank 4 on {targets}) merged" in capsys.readouterr().out
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected = our_logits(run)
    assert np.abs(expected - our_logits(load_run(base))).max() > 0.1  # the adapters count
    np.testing.assert_allclose(hf_logits(exported), expected, rtol=1e-5, atol=1e-4)
    prompts = TOKENS_BT[:, :12]
    with torch.no_grad():  # stops at the export's eos ids, then pads with 0
        theirs = exported.generate(
            torch.as_tensor(prompts),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )[:, prompts.shape[1] :].numpy()
    eos_ids = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    generator = Generator(run.model, run.tokenizer.vocab_size, 0, 12)
    ours = generator(
        run.params, prompts.tolist(), jax.random.key(0), temperature=0.0, stop_ids=eos_ids
    )
    np.testing.assert_array_equal(ours.tokens[:, : theirs.shape[1]], theirs)


HF_MODULES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


def test_peft_adapter_on_the_base_export_gives_the_lora_runs_logits(lora_run, capsys):
    root, base, lora, run, base_model = lora_run
    assert cli_main(["export-hf", str(base), "--out", str(root / "base_hf")]) == 0
    argv = ["export-hf", str(lora), "--out", str(root / "adapter"), "--adapter"]
    assert cli_main(argv + (["--base-model", base_model] if base_model else [])) == 0
    if base_model is None:  # the HF folder the run it started from was imported from
        assert f"base_model_name_or_path: {root / 'hf'}" in capsys.readouterr().out
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    lora_cfg = run.cfg.lora
    expected = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or str(root / "hf"),
        "r": 4,
        "lora_alpha": 8.0,
        "use_rslora": lora_cfg.rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(HF_MODULES[t] for t in lora_cfg.targets),
        "modules_to_save": ["embed_tokens"] if lora_cfg.train_embeddings else None,
    }
    assert {key: config[key] for key in expected} == expected
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(root / "base_hf").eval()
    adapted = peft.PeftModel.from_pretrained(base_hf, root / "adapter").eval()
    np.testing.assert_allclose(hf_logits(adapted), our_logits(run), rtol=1e-5, atol=1e-4)


def write_run(folder, *overrides: str) -> tuple[Config, LanguageModel]:
    """An empty run folder's config of the tiny model (bytes tokenizer: 264 ids, 320 rows)
    with `overrides`, and its model."""
    cfg = load_config(None, ["preset=tiny", *overrides])
    cfg.out_dir = str(folder)
    folder.mkdir(parents=True)
    return cfg, LanguageModel(cfg.model, lora=cfg.lora)


def random_params(model: LanguageModel, seed: int) -> dict:
    """Params of `model`'s shapes, drawn in numpy (eager JAX init compiles op by op):
    weights (and adapters, B included) N(0, 0.2^2), vectors (norm scales) near 1."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        noise = rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
        return noise if len(leaf.shape) >= 2 else 1.0 + noise

    return jax.tree.map(draw, model.abstract_params)


def test_an_adapter_of_a_run_started_from_a_run_of_ours_loads_onto_its_export(tmp_path, capsys):
    """The base is `export-hf BASE_RUN` (padding rows trimmed); embeddings trained with an
    untied head travel whole as modules_to_save, trimmed alike."""
    untied = "model.tie_embeddings=false"
    base_cfg, base = write_run(tmp_path / "base", untied)
    base_params = random_params(base, 1)
    write_run_folder(tmp_path / "base", base_cfg, base_params, {})
    cfg, model = write_run(
        tmp_path / "lora",
        untied,
        "lora.rank=4",
        "lora.rslora=true",
        "lora.train_embeddings=true",
        f"sft.init_from={tmp_path / 'base'}",
    )
    drawn = random_params(model, 2)  # B nonzero, so the adapters count
    params = join(base_params, adapters_of(drawn))
    params |= {key: drawn[key] for key in ("token_embedding_vd", "lm_head_dv")}  # trained
    write_run_folder(tmp_path / "lora", cfg, params, {})
    for argv in (["base"], ["lora", "--adapter"]):
        out = tmp_path / f"{argv[0]}_hf"
        assert cli_main(["export-hf", str(tmp_path / argv[0]), "--out", str(out), *argv[1:]]) == 0
    assert f"load the adapter onto the folder `jaxllm export-hf {tmp_path / 'base'}" in (
        capsys.readouterr().out
    )
    config = json.loads((tmp_path / "lora_hf" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert config["use_rslora"] is True
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf").eval()
    before = hf_logits(base_hf)
    adapted = peft.PeftModel.from_pretrained(base_hf, tmp_path / "lora_hf").eval()
    ours = np.asarray(model.logits(params, jnp.asarray(TOKENS_BT)))[..., :264]
    assert np.abs(ours - before).max() > 0.1
    np.testing.assert_allclose(hf_logits(adapted), ours, rtol=1e-5, atol=1e-4)
    # --dtype bfloat16: the same tensors, rounded
    argv = ["export-hf", str(tmp_path / "lora"), "--out", str(tmp_path / "bf16"), "--adapter"]
    assert cli_main([*argv, "--dtype", "bfloat16"]) == 0
    full, half = (
        load_file(tmp_path / d / "adapter_model.safetensors") for d in ("lora_hf", "bf16")
    )
    assert sorted(full) == sorted(half) and len(full) == 2 * 7 * 2 + 2
    for name, tensor in full.items():
        assert half[name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(half[name], tensor.astype(jnp.bfloat16), err_msg=name)


def test_attention_adapters_of_an_moe_model_load_with_peft(tmp_path):
    """Qwen3-MoE: adapters on q, k, v, o export (the experts' are refused below)."""
    family_folder(tmp_path / "hf", "qwen3_moe")
    assert cli_main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "base")]) == 0
    base = load_run(tmp_path / "base")
    cfg = copy.deepcopy(base.cfg)
    cfg.out_dir = str(tmp_path / "lora")
    cfg.lora = LoraConfig(rank=4, alpha=8.0, targets=["q", "k", "v", "o"])
    cfg.sft.init_from = str(tmp_path / "base")
    model = LanguageModel(cfg.model, lora=cfg.lora)
    params = join(base.params, adapters_of(random_params(model, 5)))
    (tmp_path / "lora").mkdir()
    write_run_folder(tmp_path / "lora", cfg, params, {})
    for run, out in (("base", "base_hf"), ("lora", "adapter")):
        argv = ["export-hf", str(tmp_path / run), "--out", str(tmp_path / out)]
        assert cli_main(argv + (["--adapter"] if run == "lora" else [])) == 0
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf").eval()
    before = hf_logits(base_hf)
    adapted = peft.PeftModel.from_pretrained(base_hf, tmp_path / "adapter").eval()
    ours = np.asarray(model.logits(params, jnp.asarray(TOKENS_BT)))
    assert np.abs(ours - before).max() > 0.1
    np.testing.assert_allclose(hf_logits(adapted), ours, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "overrides, export_args, message",
    [
        ([], ["--adapter"], "has no adapters (its lora.rank is 0); export it without --adapter"),
        (
            ["lora.rank=4", "model.scalar_heads=[reward]"],
            ["--adapter"],
            "is a reward model, whose score head a causal-LM adapter cannot carry",
        ),
        (
            [
                "lora.rank=4",
                "lora.targets=[q,up]",
                "model.family=qwen3_moe",
                "model.qk_norm=true",
                "model.num_experts=4",
                "model.experts_per_token=2",
                "model.expert_mlp_dim=32",
            ],
            ["--adapter"],
            "has adapters on the MoE experts (up), which PEFT cannot load",
        ),
        (["lora.rank=4"], ["--base-model", "x"], "--base-model names the base of an adapter"),
    ],
    ids=["no_adapters", "reward", "moe_experts", "base_model_without_adapter"],
)
def test_bad_adapter_export_is_one_error_line_and_writes_nothing(
    tmp_path, capsys, overrides, export_args, message
):
    cfg, model = write_run(tmp_path / "run", *overrides)
    write_run_folder(tmp_path / "run", cfg, random_params(model, 0), {})
    argv = ["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out"), *export_args]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


CHAT = "What is 7 * 6? Think step by step."


def test_generate_chat_prints_what_the_merged_and_the_peft_exports_generate(lora_run, capsys):
    """The outside check's form: `jaxllm generate --chat` on the LoRA run prints the
    greedy chat text transformers generates from the merged export, and from the PEFT
    adapter on the base export."""
    root, base, lora, _, base_model = lora_run
    exports = {name: root / f"{name}_chat" for name in ("merged", "base", "adapter")}
    assert cli_main(["export-hf", str(lora), "--out", str(exports["merged"])]) == 0
    assert cli_main(["export-hf", str(base), "--out", str(exports["base"])]) == 0
    argv = ["export-hf", str(lora), "--out", str(exports["adapter"]), "--adapter"]
    assert cli_main(argv + (["--base-model", base_model] if base_model else [])) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(exports["merged"]).eval()
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(exports["base"]).eval()
    adapted = peft.PeftModel.from_pretrained(base_hf, exports["adapter"]).eval()
    texts = []
    for model, folder in ((merged, exports["merged"]), (adapted, exports["base"])):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    assert texts[0] == texts[1] and len(set(texts[0])) >= 2, texts
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(lora), "--prompt", CHAT, "--chat"]
    assert cli_main([*argv, "--temperature", "0", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == texts[0] + "\n"
