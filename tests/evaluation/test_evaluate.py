"""Choices run_eval makes before handing over to lm-eval."""
from __future__ import annotations

from torchchat.evaluation.evaluate import DEFAULT_BATCH_SIZE, default_batch_size


def test_default_batch_keeps_a_forwards_logits_under_a_gib():
    assert default_batch_size(True, 512, 512) == DEFAULT_BATCH_SIZE  # stories260K: tiny logits
    assert default_batch_size(True, 2048, 32000) == 4  # Llama 2: 262 MB per row
    assert default_batch_size(True, 256, 32000) == DEFAULT_BATCH_SIZE == 8
    assert default_batch_size(True, 2048, 128256) == 1  # Llama 3: 1.05 GB per row
    assert default_batch_size(True, 1024, 128256) == 2
    assert default_batch_size(False, 128, 512) == 1  # exported programs take one row
