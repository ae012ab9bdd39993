"""The stages' headlines: each change beside its standard error and a verdict."""

from jaxllm.stages import reports


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
