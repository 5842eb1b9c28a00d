"""lm-eval's own `local-completions` backend against the server: it finds the tokenizer routes
(remote tokenizer), scores with echo + logprobs, and gets what `torchchat.py eval`'s adapter computes
in-process for the same token ids."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import shared_path
from tests.server.conftest import API_KEY

pytest.importorskip("lm_eval", reason="lm-eval is in the eval extra: pip install -e '.[eval]'")
pytest.importorskip("tenacity", reason="lm-eval's API backends need tenacity, in the test extra: pip install -e '.[test]'")

PAIRS = [("Once upon a time, there was a little girl named", " Lily"),
         ("The cat sat on the", " mat and looked at the sun."),
         ("Tom had a red ball. He", " liked to play")]


def test_local_completions_loglikelihood_equals_the_eval_adapter(api_server):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from torchchat.build import BuildSpec, ModelSource, build_model
    from torchchat.evaluation.adapter import TorchchatLM

    api = LocalCompletionsAPI(base_url=api_server.base_url + "/v1/completions", model="x", auth_token=API_KEY,
                              header={"Authorization": f"Bearer {API_KEY}"}, max_length=256)
    assert api.tokenizer_backend == "remote"  # found /tokenizer_info by itself
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    served = api.loglikelihood(reqs)

    folder = shared_path("models", "stories260K")
    built = build_model(BuildSpec(source=ModelSource(checkpoint_path=folder / "stories260K.bin",
                                                     tokenizer_path=folder / "tok512.model"), dtype=torch.float32))
    lm = TorchchatLM(built.runtime, built.tokenizer, max_length=256)
    ids = [api._encode_pair(c, x) for c, x in PAIRS]  # the remote tokenizer's ids, as lm-eval sent them
    assert ids[0][0] == built.tokenizer.encode(PAIRS[0][0], bos=False)
    local = lm._loglikelihood_tokens([(pair, c, x) for pair, (c, x) in zip(PAIRS, ids)])
    for (s_lp, s_greedy), (l_lp, l_greedy) in zip(served, local):
        assert s_lp == pytest.approx(l_lp, abs=1e-3) and s_greedy == l_greedy
    assert all(lp < 0 for lp, _ in served)
