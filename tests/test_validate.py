"""Validation metrics and budgets."""

from __future__ import annotations

import numpy as np

from edge_lora.config import ValidateConfig
from edge_lora.stages.validate import budget_failures, eval_ids, hidden_metrics, logits_metrics


def test_identical_logits_are_perfect():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 50)).astype(np.float32)
    ids = rng.integers(0, 50, size=20)
    m = logits_metrics(ref, ref.copy(), ref + 1.0, ids)
    assert m["mean_kl"] == 0 and m["top1_agreement"] == 1 and m["max_abs_logit_error"] == 0
    # a constant shift of the logits is the same distribution
    assert np.isclose(m["perplexity_base"], m["perplexity_reference"])


def test_kl_and_agreement_see_differences():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(30, 40))
    cand = ref + rng.normal(scale=2.0, size=ref.shape)
    m = logits_metrics(ref, cand, ref, rng.integers(0, 40, size=30))
    assert m["mean_kl"] > 0.1 and m["top1_agreement"] < 1


def test_hidden_metrics():
    h = np.random.default_rng(2).normal(size=(1, 5, 8))
    m = hidden_metrics(h, h, h * 2)
    assert m["hidden_rel_error"] == 0 and np.isclose(m["min_cosine"], 1)


def test_budgets():
    config = ValidateConfig(min_top1_agreement=0.99, max_mean_kl=1e-3, max_exact_match_drop=0.01)
    good = {"top1_agreement": 1.0, "mean_kl": 1e-6, "exact_match_drop": 0.0, "generation_agreement": 1.0}
    assert budget_failures(good, config) == []
    bad = {"top1_agreement": 0.9, "mean_kl": 1e-2, "exact_match_drop": 0.05, "generation_agreement": 1.0}
    fails = budget_failures(bad, config)
    assert len(fails) == 3 and any("top-1" in f for f in fails)


def test_eval_ids_without_tokenizer_are_fixed():
    a, b = eval_ids(None, 64, 100), eval_ids(None, 64, 100)
    assert a.shape == (1, 64) and np.array_equal(a, b) and a.max() < 100
