"""The stages' headlines: each change beside its standard error and a verdict."""

from jaxllm.stages import reports


def test_a_change_is_judged_against_the_standard_error_of_the_difference():
    # sqrt(.214 .786 / 56) = 0.0548, sqrt(.357 .643 / 56) = 0.0640: hypot 0.0843.
    evals = [
        {"step": 0, "accuracy": 0.214, "eval_prompts": 56, "ends_with_im_end": 0.5},
        {"step": 9, "accuracy": 0.357, "eval_prompts": 56, "ends_with_im_end": 0.9},
    ]
    assert reports.sft_headline(evals, {}).startswith(
        "held-out accuracy 0.214 -> 0.357 (+0.143 ± 0.084: 1.7 SE, within noise),"
    )
    evals[1]["eval_prompts"] = evals[0]["eval_prompts"] = 224  # 4x the prompts: 2x the ratio
    assert "(+0.143 ± 0.042: 3.4 SE, beyond noise)" in reports.grpo_headline(
        [{**e, "format_rate": 1.0, "think_length": 0.0} for e in evals], {}
    )
    assert reports.beyond_noise(0.0, 0.0, 0.0, 0.0) == "+0.000: no change"
    assert reports.beyond_noise(0.5, 0.6, None, 0.1) == ""  # an old line without a count


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


def test_reward_and_dpo_count_their_decided_pairs():
    evals = [
        {"step": 0, "decided_accuracy": 0.5, "accuracy": 0.5, "decided_pairs": 100},
        {"step": 5, "decided_accuracy": 0.8, "accuracy": 0.8, "decided_pairs": 100},
    ]
    # hypot(0.05, 0.04) = 0.0640: 0.3 / 0.064 = 4.7
    noise = "(+0.300 ± 0.064: 4.7 SE, beyond noise)"
    assert noise in reports.reward_headline(evals, {"stages": {}})
    assert noise in reports.dpo_headline(evals, {})
