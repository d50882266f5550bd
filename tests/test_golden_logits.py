"""The engine matches llama.cpp's logits on the real model (SmolLM2-135M-Instruct).

Teacher forcing: the prompt ids and llama.cpp's 48 greedy ids are fed in, and at every step our
logits are compared with llama.cpp's top-5 (tests/data/smollm2_greedy.json).
"""

from __future__ import annotations

import numpy as np
import pytest

import alpaca_cpu

# llama.cpp quantizes activations to int8 and keeps K/V in F16, so a correct float32
# implementation lands around max 0.8-1.1 and mean 0.3 (issue #2); a wrong RoPE base gives a
# mean of 1.4 and a wrong RoPE pairing a mean of 5.
MAX_STEP_DIFF = 1.5
MAX_MEAN_DIFF = 0.40
# Where llama.cpp's top-1 beats its top-2 by more than this, our argmax must agree.
DECISIVE_MARGIN = 1.0


def compare(logits: np.ndarray, case: dict) -> tuple[float, float]:
    """(largest difference, mean over steps of the per-step largest difference)."""
    step_max = []
    for step, top5 in enumerate(case["top5_logits"]):
        row = logits[step]
        ids = np.array([i for i, _ in top5])
        vals = np.array([v for _, v in top5])
        step_max.append(float(np.abs(row[ids] - vals).max()))
        if vals[0] - vals[1] > DECISIVE_MARGIN:
            assert int(row.argmax()) == ids[0], f"{case['name']}: step {step} argmax differs"
    return max(step_max), float(np.mean(step_max))


@pytest.fixture(scope="module")
def model(smollm2_path) -> alpaca_cpu.Model:
    return alpaca_cpu.Model(smollm2_path, n_ctx=512)


@pytest.mark.real_model
def test_teacher_forced_prefill_matches_llama_cpp(model, golden_greedy) -> None:
    for case in golden_greedy["models"]["q4_1"]["cases"]:
        tokens = case["prompt_ids"] + case["generated_ids"]
        logits = model.forward(tokens, all_logits=True)
        n_prompt = len(case["prompt_ids"])
        # The logits that predict generated token i come from position n_prompt - 1 + i.
        steps = logits[n_prompt - 1 : n_prompt - 1 + len(case["top5_logits"])]
        worst, mean = compare(steps, case)
        assert worst <= MAX_STEP_DIFF, f"{case['name']}: max difference {worst:.3f}"
        assert mean <= MAX_MEAN_DIFF, f"{case['name']}: mean difference {mean:.3f}"


@pytest.mark.real_model
def test_token_by_token_decode_matches_llama_cpp(model, golden_greedy) -> None:
    for case in golden_greedy["models"]["q4_1"]["cases"]:
        prompt, generated = case["prompt_ids"], case["generated_ids"]
        rows = [model.forward(prompt)]
        for i, tok in enumerate(generated[: len(case["top5_logits"]) - 1]):
            rows.append(model.forward([tok], start_pos=len(prompt) + i))
        worst, mean = compare(np.stack(rows), case)
        assert worst <= MAX_STEP_DIFF, f"{case['name']}: max difference {worst:.3f}"
        assert mean <= MAX_MEAN_DIFF, f"{case['name']}: mean difference {mean:.3f}"
