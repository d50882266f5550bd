"""Sampling on hand-made probability vectors, llama.cpp's chain order, and a chi-square check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alpaca_cpu.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    min_p_filter,
    sample,
    softmax,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)

# float32 logits of log-probabilities round-trip to probabilities within a few float32 ulps.
PROB_TOL = 1e-6
# Significance level of the goodness-of-fit tests: with the fixed seeds they are deterministic,
# and a correct sampler fails them with probability 1e-3 for a random seed.
ALPHA = 1e-3
# Upper 1e-3 quantiles of the chi-square distribution (scipy.stats.chi2.ppf(0.999, df)).
CHI2_CRITICAL_AT_ALPHA = {2: 13.816, 7: 24.322}
N_DRAWS = 10_000


def logits_of(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def kept(filtered: np.ndarray) -> list[int]:
    return np.flatnonzero(np.isfinite(filtered)).tolist()


def frozen(values: list[float]) -> np.ndarray:
    """A read-only float32 array: any in-place change by the code under test raises."""
    x = np.asarray(values, dtype=np.float32)
    x.setflags(write=False)
    return x


# --- softmax and log-probabilities ------------------------------------------------------------


def test_softmax_exact_values_and_removed_tokens() -> None:
    p = softmax(np.array([0.0, math.log(3.0), -np.inf], dtype=np.float32))
    np.testing.assert_allclose(p, [0.25, 0.75, 0.0], atol=PROB_TOL)


def test_softmax_refuses_when_every_token_is_removed() -> None:
    with pytest.raises(ValueError, match="all logits are -inf"):
        softmax(np.full(3, -np.inf, dtype=np.float32))


def test_token_logprobs_is_log_softmax() -> None:
    lp = token_logprobs(frozen([0.0, math.log(3.0)]))
    assert lp.dtype == np.float32
    np.testing.assert_allclose(lp, [math.log(0.25), math.log(0.75)], atol=PROB_TOL)
    big = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 20
    assert np.exp(token_logprobs(big).astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-5)


# --- filters -----------------------------------------------------------------------------------


def test_top_k_keeps_the_k_largest() -> None:
    x = frozen([1.0, 3.0, 2.0, 3.0, 0.0])
    assert kept(top_k_filter(x, 1)) == [1]
    assert kept(top_k_filter(x, 2)) == [1, 3]
    assert kept(top_k_filter(x, 3)) == [1, 2, 3]
    out = top_k_filter(x, 3)
    np.testing.assert_array_equal(out[[1, 2, 3]], [3.0, 2.0, 3.0])  # survivors keep their logits


def test_top_k_ties_at_the_cut_go_to_lower_ids_and_zero_disables() -> None:
    x = frozen([2.0, 1.0, 1.0, 1.0])
    assert kept(top_k_filter(x, 2)) == [0, 1]
    assert kept(top_k_filter(x, 0)) == [0, 1, 2, 3]
    assert kept(top_k_filter(x, 10)) == [0, 1, 2, 3]


@pytest.mark.parametrize("in_play", [3, 40, 200, 3000])
def test_top_k_on_a_mostly_masked_row_equals_a_stable_sort(in_play: int) -> None:
    # a grammar's mask leaves few tokens (the filter then works on those alone): the result is
    # still the first k of a stable descending sort, ties (rounded logits) to the lower ids
    rng = np.random.default_rng(in_play)
    x = np.full(8000, -np.inf, np.float32)
    ids = rng.choice(8000, in_play, replace=False)
    x[ids] = np.round(rng.standard_normal(in_play) * 2).astype(np.float32)
    for k in (1, 5, 40):
        order = np.argsort(-x, kind="stable")[: min(k, in_play)]
        assert kept(top_k_filter(frozen(x), k)) == sorted(order.tolist())


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    # Probabilities by id: 0.15, 0.5, 0.1, 0.25  ->  sorted 0.5 (id 1), 0.25 (id 3), 0.15, 0.1.
    x = logits_of([0.15, 0.5, 0.1, 0.25])
    assert kept(top_p_filter(x, 0.4)) == [1]  # 0.5 already >= 0.4
    assert kept(top_p_filter(x, 0.7)) == [1, 3]  # 0.75 >= 0.7
    assert kept(top_p_filter(x, 0.8)) == [0, 1, 3]  # 0.9 >= 0.8
    assert kept(top_p_filter(x, 0.95)) == [0, 1, 2, 3]
    assert kept(top_p_filter(x, 0.0)) == [1]  # the most likely token always stays
    assert kept(top_p_filter(x, 1.0)) == [0, 1, 2, 3]


def test_top_p_uses_probabilities_of_the_tokens_still_in_play() -> None:
    # After removing id 1 (0.5), the rest renormalise to 0.3, 0.2, 0.5 (ids 0, 2, 3).
    x = logits_of([0.15, 0.5, 0.1, 0.25])
    x[1] = -np.inf
    assert kept(top_p_filter(x, 0.6)) == [0, 3]  # 0.5 + 0.3 = 0.8 >= 0.6


def test_top_p_over_a_large_flat_vocabulary_matches_a_full_sort() -> None:
    # Needs far more than the first candidate batch, and has ties: checks the growing search.
    rng = np.random.default_rng(7)
    x = np.round(rng.standard_normal(5000) * 2, 1).astype(np.float32)
    order = np.argsort(-x, kind="stable")
    cumulative = np.cumsum(softmax(x[order]))
    n_keep = int(np.searchsorted(cumulative, 0.9)) + 1
    assert n_keep > 64 * 8
    assert kept(top_p_filter(x, 0.9)) == sorted(order[:n_keep].tolist())


def test_min_p_keeps_tokens_at_least_p_times_the_best() -> None:
    x = logits_of([0.5, 0.25, 0.15, 0.1])
    assert kept(min_p_filter(x, 0.35)) == [0, 1]  # 0.25 / 0.5 = 0.5; 0.15 / 0.5 = 0.3
    assert kept(min_p_filter(x, 0.25)) == [0, 1, 2]
    assert kept(min_p_filter(x, 1.0)) == [0]
    assert kept(min_p_filter(x, 0.0)) == [0, 1, 2, 3]


# --- penalties and bias ------------------------------------------------------------------------


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    x = frozen([2.0, -2.0, 1.0, 0.0])
    out = apply_penalties(
        x, [0, 1, 1, 3], repeat_penalty=2.0, presence_penalty=0.0, frequency_penalty=0.0
    )
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0, 0.0])


def test_presence_and_frequency_penalties_subtract_per_token_and_per_count() -> None:
    x = frozen([2.0, -2.0, 1.0, 0.5])
    out = apply_penalties(
        x, [0, 1, 1], repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25
    )
    # token 0: 2/2 - (1*0.25 + 0.5) = 0.25; token 1: -2*2 - (2*0.25 + 0.5) = -5; others untouched
    np.testing.assert_array_equal(out, [0.25, -5.0, 1.0, 0.5])


def test_penalties_refuse_token_ids_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="token id 4"):
        apply_penalties(frozen([0.0] * 4), [1, 4], 1.1, 0.0, 0.0)
    with pytest.raises(ValueError, match="token id -1"):
        sample(frozen([0.0] * 4), SamplingParams(temperature=0), np.random.default_rng(0), [-1])


def test_logit_bias_adds_and_bans() -> None:
    x = frozen([0.0, 0.0, 0.0])
    out = apply_logit_bias(x, {2: 1.5, 0: -math.inf})
    np.testing.assert_array_equal(out, [-np.inf, 0.0, 1.5])
    np.testing.assert_array_equal(x, [0.0, 0.0, 0.0])


# --- the whole chain ---------------------------------------------------------------------------


def test_greedy_is_argmax_with_lowest_id_on_ties_and_draws_nothing() -> None:
    rng = np.random.default_rng(3)
    before = rng.bit_generator.state
    assert sample(frozen([0.1, 0.7, 0.7, 0.2]), SamplingParams(temperature=0.0), rng) == 1
    assert rng.bit_generator.state == before


def test_greedy_sees_bias_and_penalties() -> None:
    rng = np.random.default_rng(0)
    x = frozen([1.0, 0.9, 0.0])
    assert sample(x, SamplingParams(temperature=0, logit_bias={2: 5.0}), rng) == 2
    assert sample(x, SamplingParams(temperature=0, repeat_penalty=2.0), rng, [0]) == 1
    assert sample(x, SamplingParams(temperature=0, presence_penalty=0.2), rng, [0]) == 1


def test_bias_is_applied_before_penalties_like_llama_cpp() -> None:
    # llama.cpp: (1 - 3) * 2 = -4 < -3, so token 1 wins. Penalty first would give 0.5 - 3 = -2.5.
    x = frozen([1.0, -3.0])
    params = SamplingParams(temperature=0, logit_bias={0: -3.0}, repeat_penalty=2.0)
    assert sample(x, params, np.random.default_rng(0), [0]) == 1


@pytest.mark.parametrize(("last_n", "expected"), [(0, 3), (1, 2), (2, 1), (3, 0), (-1, 3)])
def test_repeat_last_n_selects_the_penalty_window(last_n: int, expected: int) -> None:
    # History 0, 1, 2, 3 (3 is the most recent); penalty 2 halves each penalised logit.
    x = frozen([1.0, 1.2, 1.4, 1.6])
    params = SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=last_n)
    assert sample(x, params, np.random.default_rng(0), [0, 1, 2, 3]) == expected


def test_only_filter_survivors_are_ever_sampled() -> None:
    rng = np.random.default_rng(11)
    x = frozen([3.0, 2.5, 2.0, 1.0, 0.5])
    params = SamplingParams(temperature=1.5, top_k=2, top_p=1.0, min_p=0.0)
    draws = {sample(x, params, rng) for _ in range(2000)}
    assert draws == {0, 1}


def test_filters_see_logits_before_temperature() -> None:
    # min_p = 0.5 keeps ids 0 and 1 (0.3 / 0.5 >= 0.5, 0.2 / 0.5 < 0.5) whatever the temperature;
    # had temperature 10 come first, id 2 would survive.
    rng = np.random.default_rng(5)
    x = logits_of([0.5, 0.3, 0.2])
    params = SamplingParams(temperature=10.0, top_k=0, top_p=1.0, min_p=0.5)
    draws = {sample(x, params, rng) for _ in range(2000)}
    assert draws == {0, 1}


def test_same_seed_same_tokens_and_input_untouched() -> None:
    x = frozen(list(np.random.default_rng(1).standard_normal(100)))
    params = SamplingParams(
        temperature=0.9,
        top_k=20,
        top_p=0.9,
        min_p=0.01,
        repeat_penalty=1.1,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        logit_bias={5: 2.0},
    )
    history = [5, 7, 7, 9]

    def run(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [sample(x, params, rng, history) for _ in range(50)]

    assert run(42) == run(42)
    assert run(42) != run(43)
    assert len(set(run(42))) > 1


@pytest.mark.parametrize(
    ("top_k", "df"),
    [(0, 7), (3, 2)],
)
def test_temperature_sampling_follows_softmax_of_scaled_logits(top_k: int, df: int) -> None:
    temperature = 0.7
    logits = np.array([1.2, 0.4, -0.3, 0.9, 0.0, -1.0, 0.6, 0.2], dtype=np.float32)
    expected = softmax(logits / np.float32(temperature))
    if top_k:
        survivors = np.argsort(-logits, kind="stable")[:top_k]
        masked = np.zeros_like(expected)
        masked[survivors] = expected[survivors]
        expected = masked / masked.sum()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=1.0, min_p=0.0)
    rng = np.random.default_rng(2024)
    counts = np.bincount(
        [sample(logits, params, rng) for _ in range(N_DRAWS)], minlength=logits.size
    )

    support = expected > 0
    assert counts[~support].sum() == 0
    observed, wanted = counts[support], expected[support] * N_DRAWS
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    assert support.sum() - 1 == df
    assert chi2 < CHI2_CRITICAL_AT_ALPHA[df], f"chi2 = {chi2:.2f} at alpha {ALPHA}"

    # The test has power: the same draws are far from the untempered softmax.
    untempered = softmax(np.where(support, logits, -np.inf)) * N_DRAWS
    chi2_wrong = float(((observed - untempered[support]) ** 2 / untempered[support]).sum())
    assert chi2_wrong > CHI2_CRITICAL_AT_ALPHA[df]


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.01}, "top_p"),
        ({"min_p": 2.0}, "min_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repeat_penalty": 0.0}, "repeat_penalty"),
        ({"repeat_penalty": -1.0}, "repeat_penalty"),
        ({"repeat_last_n": -2}, "repeat_last_n"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"frequency_penalty": -math.inf}, "frequency_penalty"),
        ({"logit_bias": {10: 1.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {1: math.nan}}, "logit_bias"),
        ({"logit_bias": {1: math.inf}}, "logit_bias"),
        ({"logit_bias": {"1": 1.0}}, "logit_bias"),
    ],
)
def test_out_of_range_parameters_are_refused_by_name(changes: dict, name: str) -> None:
    params = SamplingParams(**changes)
    with pytest.raises(ValueError, match=name):
        params.validate(10)
    with pytest.raises(ValueError, match=name):
        sample(frozen([0.0] * 10), params, np.random.default_rng(0))


def test_valid_edge_parameters_are_accepted() -> None:
    SamplingParams(
        temperature=0.0,
        top_p=0.0,
        min_p=1.0,
        top_k=0,
        repeat_last_n=-1,
        logit_bias={0: -math.inf, 9: -100.0},
    ).validate(10)


def test_bad_logits_are_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="NaN"):
        sample(frozen([0.0, math.nan]), SamplingParams(), rng)
    with pytest.raises(ValueError, match="1-D"):
        sample(np.zeros((2, 2), dtype=np.float32), SamplingParams(), rng)
    with pytest.raises(ValueError, match="nothing to sample"):
        sample(frozen([0.0, 1.0]), SamplingParams(logit_bias={0: -math.inf, 1: -math.inf}), rng)
