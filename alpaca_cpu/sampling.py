"""Token sampling: pure functions over one vector of logits, with an explicit random generator.

The chain follows llama.cpp's default sampler chain (``common/sampling.cpp``):

    logit bias -> repetition / presence / frequency penalties -> top-k -> top-p -> min-p
    -> temperature -> draw one token from the softmax of what is left

so top-k, top-p and min-p see the logits *before* temperature scaling, as in llama.cpp.
``temperature <= 0`` means greedy: the argmax after bias and penalties (the filters cannot change
the argmax, so they are skipped).

Every function returns a new array; the caller's logits are never modified. Removed tokens are
represented by ``-inf`` logits. Probabilities are computed in float64; logit arithmetic stays in
float32 like llama.cpp's. With the same logits, parameters and generator state, ``sample`` returns
the same token and consumes exactly one ``rng.random()`` draw (none when greedy).

Bad parameters, logits or token ids raise ``ValueError`` naming what is wrong (the project's rule
for untrusted input, hence ValueError also for wrong types).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

__all__ = [
    "SamplingParams",
    "apply_logit_bias",
    "apply_penalties",
    "min_p_filter",
    "sample",
    "softmax",
    "token_logprobs",
    "top_k_filter",
    "top_p_filter",
]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, named and defaulted like llama-cpp-python's ``create_completion``.

    ``top_k = 0``, ``top_p = 1`` and ``min_p = 0`` switch the corresponding filter off.
    ``repeat_last_n`` is how many of the most recent tokens the penalties look at: ``0`` switches
    all three penalties off, ``-1`` uses every token given. ``logit_bias`` maps token id to a value
    added to its logit; ``-inf`` bans the token.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None

    def validate(self, n_vocab: int) -> None:
        """Raise ``ValueError`` naming the first parameter that is out of range for ``n_vocab``."""
        if not _is_int(n_vocab) or n_vocab <= 0:
            raise ValueError(f"n_vocab must be a positive integer, got {n_vocab!r}")
        _check_real("temperature", self.temperature, low=0.0, rule=">= 0 (0 means greedy)")
        _check_real("top_p", self.top_p, low=0.0, high=1.0, rule="in [0, 1]")
        _check_real("min_p", self.min_p, low=0.0, high=1.0, rule="in [0, 1]")
        _check_real("repeat_penalty", self.repeat_penalty, low=0.0, low_open=True, rule="> 0")
        _check_real("presence_penalty", self.presence_penalty)
        _check_real("frequency_penalty", self.frequency_penalty)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not _is_int(self.repeat_last_n) or self.repeat_last_n < -1:
            raise ValueError(
                "repeat_last_n must be an integer >= -1 (-1 means all recent tokens, 0 disables "
                f"penalties), got {self.repeat_last_n!r}"
            )
        _check_logit_bias(self.logit_bias, n_vocab)


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_real(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    rule: str = "finite",
) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and value > high
    if below or above:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _check_logit_bias(bias: Mapping[int, float] | None, n_vocab: int) -> None:
    if bias is None:
        return
    if not isinstance(bias, Mapping):
        raise ValueError(  # noqa: TRY004
            f"logit_bias must be a mapping of token id to bias, got {type(bias)}"
        )
    for token, value in bias.items():
        if not _is_int(token) or not 0 <= token < n_vocab:
            raise ValueError(
                f"logit_bias token id {token!r} is outside the vocabulary [0, {n_vocab})"
            )
        # -inf is allowed: it bans the token (llama.cpp's --ignore-eos does the same).
        if (
            isinstance(value, bool)
            or not isinstance(value, Real)
            or math.isnan(value)
            or value == math.inf
        ):
            raise ValueError(
                f"logit_bias for token {token} must be a finite number or -inf, got {value!r}"
            )


def _as_logits(logits: np.ndarray) -> np.ndarray:
    """The logits as a 1-D float32 array (a view when possible), refusing NaN and +inf."""
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {x.shape}")
    if np.isnan(x).any() or np.isposinf(x).any():
        raise ValueError("logits contain NaN or +inf; the model output is not usable")
    return x


def _token_ids(tokens: Sequence[int], n_vocab: int, what: str) -> np.ndarray:
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
        bad = ids[(ids < 0) | (ids >= n_vocab)][0]
        raise ValueError(f"{what} contains token id {bad}, outside the vocabulary [0, {n_vocab})")
    return ids


def apply_logit_bias(logits: np.ndarray, bias: Mapping[int, float] | None) -> np.ndarray:
    """Return a copy of ``logits`` with ``bias[token]`` added to each listed token's logit."""
    x = _as_logits(logits).copy()
    if bias:
        _check_logit_bias(bias, x.shape[0])
        ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
        x[ids] += values
    return x


def apply_penalties(
    logits: np.ndarray,
    recent_tokens: Sequence[int],
    repeat_penalty: float,
    presence_penalty: float,
    frequency_penalty: float,
) -> np.ndarray:
    """Penalise tokens that occur in ``recent_tokens`` (the window the caller chose), llama.cpp style.

    For each distinct token seen ``count`` times: a positive logit is divided by
    ``repeat_penalty`` and a non-positive one multiplied by it (dividing a negative logit would
    make the token *more* likely), then ``count * frequency_penalty + presence_penalty`` is
    subtracted.
    """
    x = _as_logits(logits).copy()
    ids = _token_ids(recent_tokens, x.shape[0], "recent_tokens")
    if ids.size == 0:
        return x
    tokens, counts = np.unique(ids, return_counts=True)
    seen = x[tokens]
    penalty = np.float32(repeat_penalty)
    seen = np.where(seen <= 0, seen * penalty, seen / penalty)
    seen -= counts.astype(np.float32) * np.float32(frequency_penalty) + np.float32(presence_penalty)
    x[tokens] = seen
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities (float64) of a logits vector; ``-inf`` logits get probability 0."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max() if x.size else -np.inf
    if not np.isfinite(top):
        raise ValueError("every token has been removed (all logits are -inf); nothing to sample")
    e = np.exp(x - top)
    return e / e.sum()


def token_logprobs(logits: np.ndarray) -> np.ndarray:
    """Log-softmax of the raw logits (float32), for OpenAI-style ``logprobs``."""
    x = _as_logits(logits).astype(np.float64)
    top = x.max()
    if not np.isfinite(top):
        raise ValueError("every logit is -inf; log-probabilities are undefined")
    shifted = x - top
    return (shifted - np.log(np.exp(shifted).sum())).astype(np.float32)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` highest logits (``k <= 0`` keeps all); ties at the cut go to lower ids."""
    return _top_k(_as_logits(logits), k)


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= x.shape[0]:
        return x.copy()
    # A grammar's mask leaves most of the vocabulary at -inf, where a partition of the whole
    # row is several times slower than of the tokens still in play: take those first.
    live = x > -np.inf
    in_play = np.count_nonzero(live)
    if in_play <= k:
        return x.copy()
    out = np.full_like(x, -np.inf)
    if in_play < x.shape[0] // 2:
        ids = np.flatnonzero(live)  # ascending: ties still go to the lower ids
        kept = ids[_largest(x[ids], k)]
    else:
        kept = _largest(x, k)
    out[kept] = x[kept]
    return out


def _largest(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest values, ties at the cut broken towards lower positions
    (so the result is the first ``k`` of a stable descending sort), in O(n)."""
    n = values.shape[0]
    if k >= n:
        return np.arange(n)
    kth = np.partition(values, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(values > kth)
    ties = np.flatnonzero(values == kth)[: k - above.size]
    return np.concatenate([above, ties])


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least ``p``.

    Probabilities are the softmax over the tokens still in play; ``p >= 1`` keeps all, and the
    most likely token is always kept. Ties in probability are taken in id order.
    """
    return _top_p(_as_logits(logits), p)


# Top-p first sorts only this many of the most likely tokens, and grows the set (x8) only when
# they do not reach p: sorting a whole 50k vocabulary costs milliseconds per token.
_TOP_P_FIRST_CANDIDATES = 64


def _top_p(x: np.ndarray, p: float) -> np.ndarray:
    if p >= 1.0:
        return x.copy()
    ids = np.flatnonzero(x > -np.inf)
    if ids.size == 0:
        return x.copy()
    logit = x[ids]
    probs = softmax(logit)
    k = _TOP_P_FIRST_CANDIDATES
    while True:
        best = _largest(logit, k)
        best = best[np.argsort(-logit[best], kind="stable")]  # descending, ties in id order
        cumulative = np.cumsum(probs[best])
        if cumulative[-1] >= p or best.size == ids.size:
            break
        k *= 8
    n_keep = min(int(np.searchsorted(cumulative, p, side="left")) + 1, best.size)
    kept = ids[best[:n_keep]]
    out = np.full_like(x, -np.inf)
    out[kept] = x[kept]
    return out


def min_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep tokens whose probability is at least ``p`` times the most likely token's (``p <= 0``
    keeps all). In logits: ``logit >= max_logit + log(p)``, as llama.cpp computes it."""
    return _min_p(_as_logits(logits), p)


def _min_p(x: np.ndarray, p: float) -> np.ndarray:
    if p <= 0.0:
        return x.copy()
    threshold = x.max() + np.float32(math.log(p))
    return np.where(x >= threshold, x, np.float32(-np.inf))


def _penalty_window(recent_tokens: Sequence[int], last_n: int) -> Sequence[int]:
    if last_n == 0:
        return ()
    if last_n == -1 or last_n >= len(recent_tokens):
        return recent_tokens
    return recent_tokens[len(recent_tokens) - last_n :]


def _greedy(x: np.ndarray) -> int:
    if not np.isfinite(x.max()):
        raise ValueError("every token has been removed (all logits are -inf); nothing to sample")
    return int(np.argmax(x))  # first maximum, i.e. the lowest id among ties, like llama.cpp


def sample(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    recent_tokens: Sequence[int] = (),
) -> int:
    """Pick the next token id from ``logits`` (shape ``(n_vocab,)``) with llama.cpp's chain.

    ``recent_tokens`` is the token history (prompt and generated); the penalties use its last
    ``params.repeat_last_n`` entries.
    """
    x = _as_logits(logits)
    n_vocab = x.shape[0]
    params.validate(n_vocab)

    if params.logit_bias:
        x = apply_logit_bias(x, params.logit_bias)
    window = _penalty_window(recent_tokens, params.repeat_last_n)
    penalties_on = (
        params.repeat_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )
    if penalties_on and len(window) > 0:
        x = apply_penalties(
            x, window, params.repeat_penalty, params.presence_penalty, params.frequency_penalty
        )
    else:
        _token_ids(window, n_vocab, "recent_tokens")  # refuse bad ids even when penalties are off

    if params.temperature <= 0.0:
        return _greedy(x)

    x = _top_k(x, params.top_k)
    x = _top_p(x, params.top_p)
    x = _min_p(x, params.min_p)

    # Temperature, then one inverse-CDF draw over the survivors (in id order).
    ids = np.flatnonzero(x > -np.inf)
    if ids.size == 0:
        raise ValueError("every token has been removed (all logits are -inf); nothing to sample")
    probs = softmax(x[ids] / np.float32(params.temperature))
    cumulative = np.cumsum(probs)
    u = rng.random() * cumulative[-1]
    j = min(int(np.searchsorted(cumulative, u, side="right")), ids.size - 1)
    return int(ids[j])
