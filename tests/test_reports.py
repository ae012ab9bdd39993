"""The stages' headlines: each change beside its standard error and a verdict."""

import json
import math

import numpy as np
import pytest

from jaxllm.stages import reports
from jaxllm.stages.paired import FILE, FirstEval


def test_an_accuracy_change_is_judged_as_a_difference_of_two_proportions():
    # Pooled p = (0.214 + 0.357) / 2 = 0.2855: sqrt(p (1 - p) (1/56 + 1/56)) = 0.0854.
    evals = [
        {"step": 0, "accuracy": 0.214, "eval_prompts": 56, "ends_with_im_end": 0.5},
        {"step": 9, "accuracy": 0.357, "eval_prompts": 56, "ends_with_im_end": 0.9},
    ]
    assert reports.sft_headline(evals, {}).startswith(
        "held-out accuracy 0.214 -> 0.357 (+0.143 ± 0.085: 1.7 SE, within noise),"
    )
    evals[1]["eval_prompts"] = evals[0]["eval_prompts"] = 224  # 4x the prompts: 2x the ratio
    assert "(+0.143 ± 0.043: 3.4 SE, beyond noise)" in reports.grpo_headline(
        [{**e, "format_rate": 1.0, "think_length": 0.0} for e in evals], {}
    )
    # From 0 to 1 on 10: p = 0.5, sqrt(0.25 x 0.2) = 0.224 (each side's own error is 0).
    moved = [{"step": 0, "accuracy": 0.0, "decided_comparisons": 10}, {"step": 3, "accuracy": 1.0}]
    moved[1]["decided_comparisons"] = 10
    assert "(+1.000 ± 0.224: 4.5 SE, beyond noise)" in reports.dpo_headline(moved, {})
    assert "SE" not in reports.sft_headline(evals[:1], {})  # one eval: nothing to judge
    assert reports.beyond_noise(0.0, 0.0) == "+0.000: no change"
    assert reports.beyond_noise(0.1, None) == ""  # an old line without a count


def test_a_tool_use_grpo_stage_is_told_by_its_tool_call_rate_not_the_think_format():
    evals = [
        {"step": 0, "accuracy": 0.0, "eval_prompts": 100, "tool_call_rate": 0.04},
        {"step": 30, "accuracy": 0.55, "eval_prompts": 100, "tool_call_rate": 1.0},
    ]
    for line in evals:
        line.update(format_rate=0.0, think_length=0.0)
    evals[1].update(accuracy_change_se=0.05, change_from_step=0)
    assert reports.grpo_headline(evals, {}) == (
        "held-out greedy accuracy 0.000 -> 0.550 (+0.550 ± 0.050: 11.0 SE, beyond noise), "
        "tool-call rate 0.040 -> 1.000 (step 0 -> 30)"
    )
    titles = [panel["title"] for panel in reports.grpo_panels(evals, [], {})]
    assert titles == ["held-out greedy accuracy", "held-out greedy tool_call_rate"]
    without = [{k: v for k, v in line.items() if k != "tool_call_rate"} for line in evals]
    assert "format rate 0.000 -> 0.000, think length 0.0 -> 0.0" in reports.grpo_headline(
        without, {}
    )


def test_ppo_judges_the_proxy_and_the_gold_reward_each_against_its_own_noise():
    # proxy: se = 0.3 / sqrt(36) = 0.05 each, hypot 0.0707; gold: hypot(0.03, 0.04) = 0.05.
    first = {"reward": -0.3, "reward_std": 0.3, "eval_prompts": 36, "kl": 0.0, "step": 0}
    last = {"reward": -0.1, "reward_std": 0.3, "eval_prompts": 36, "kl": 0.1, "step": 4}
    first.update(gold_reward=-0.45, gold_reward_se=0.03)
    last.update(gold_reward=-0.40, gold_reward_se=0.04)
    assert reports.ppo_headline([first, last], {}) == (
        "proxy reward -0.300 -> -0.100 (+0.200 ± 0.071: 2.8 SE, beyond noise; +0.67 std of the "
        "start), gold -0.450 -> -0.400 (+0.050 ± 0.050: 1.0 SE, within noise), "
        "KL 0.100 nats/token (step 0 -> 4)"
    )


def test_reward_and_dpo_judge_accuracy_on_their_decided_comparisons():
    evals = [
        {"step": 0, "decided_accuracy": 0.5, "accuracy": 0.5, "decided_comparisons": 100},
        {"step": 5, "decided_accuracy": 0.8, "accuracy": 0.8, "decided_comparisons": 100},
    ]
    # Pooled p = 0.65: sqrt(0.65 x 0.35 x 0.02) = 0.0675; 0.3 / 0.0675 = 4.4.
    noise = "(+0.300 ± 0.067: 4.4 SE, beyond noise)"
    assert noise in reports.reward_headline(evals, {"stages": {}})
    assert noise in reports.dpo_headline(evals, {})


def test_a_change_on_the_same_prompts_is_judged_by_its_paired_error():
    # GRPO logs accuracy_change_se where the evals share their prompts: it replaces the
    # two-proportion error (0.043 for 0.214 -> 0.357 on 224 prompts).
    evals = [
        {"step": 0, "accuracy": 0.214, "eval_prompts": 224, "format_rate": 1.0},
        {"step": 9, "accuracy": 0.357, "eval_prompts": 224, "format_rate": 1.0},
    ]
    evals[1].update(accuracy_change_se=0.025, change_from_step=0, think_length=0.0)
    evals[0]["think_length"] = 0.0
    assert "(+0.143 ± 0.025: 5.7 SE, beyond noise)" in reports.grpo_headline(evals, {})
    # PPO: the paired error of each reward where logged, hypot of the two evals' otherwise.
    first = {"reward": -0.3, "reward_std": 0.3, "eval_prompts": 36, "kl": 0.0, "step": 0}
    last = {"reward": -0.1, "reward_std": 0.3, "eval_prompts": 36, "kl": 0.1, "step": 4}
    first.update(gold_reward=-0.45, gold_reward_se=0.03)
    last.update(gold_reward=-0.40, gold_reward_se=0.04, gold_reward_change_se=0.02)
    last["change_from_step"] = 0
    headline = reports.ppo_headline([first, last], {})
    assert "(+0.200 ± 0.071: 2.8 SE, beyond noise;" in headline
    assert "gold -0.450 -> -0.400 (+0.050 ± 0.020: 2.5 SE, beyond noise)" in headline
    # An error against another eval than the first (a file an earlier attempt left): unused.
    last["change_from_step"] = 2
    assert "(+0.050 ± 0.050: 1.0 SE, within noise)" in reports.ppo_headline([first, last], {})


def test_the_first_eval_is_kept_and_each_later_one_gets_its_paired_error(tmp_path):

    prompts = [f"prompt {i}" for i in range(6)]
    first = np.array([1, 0, 0, 1, 0, 0], np.float32)
    now = np.array([1, 1, 1, 1, 0, 0], np.float32)  # two gained, none lost
    watch = FirstEval(tmp_path, prompts)
    assert watch.change_errors(0, {"accuracy": first}) == {}
    # d = (0, 1, 1, 0, 0, 0): mean 1/3, squared deviations 4/3 in all, sample variance
    # 4/15, error sqrt(4/15 / 6) = sqrt(4/90); McNemar's form, g = 2/6 gained and none
    # lost, n/(n-1) (g + l - (g - l)^2) / n = 6/5 x 2/9 / 6, is the same.
    expected = math.sqrt(4 / 90)
    errors = watch.change_errors(20, {"accuracy": now})
    assert errors == {
        "accuracy_change_se": pytest.approx(expected, rel=1e-12),
        "change_from_step": 0,
    }
    # A resumed run reads the first eval back and reports the same error.
    resumed = FirstEval(tmp_path, prompts)
    assert resumed.change_errors(20, {"accuracy": now}) == errors
    # A run cut off before its first checkpoint evaluates step 0 again: kept anew, no error.
    assert FirstEval(tmp_path, prompts).change_errors(0, {"accuracy": now}) == {}
    assert json.loads((tmp_path / FILE).read_text())["values"]["accuracy"] == now.tolist()
    # Other prompts: the kept eval is not theirs.
    assert FirstEval(tmp_path, prompts[:5]).change_errors(20, {"accuracy": now[:5]}) == {}
