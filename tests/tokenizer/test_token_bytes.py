"""Every tokenizer kind spells its tokens' bytes (Tokenizer.token_bytes) so that a grammar library
can mask them: the bytes of encoded text are the text, and random logits masked by a JSON schema's
grammar give conforming JSON."""
from __future__ import annotations

import json

import pytest

from tests.generation.test_constraints import SCHEMA, TEXT, _generate

pytest.importorskip("llguidance", reason="constrained decoding needs llguidance (pyproject.toml pins it)")


# -- token bytes -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama2_gguf():
    from tests.conftest import shared_path
    from tests.tokenizer.conftest import SPM_CASES, VOCAB_TESTS
    from torchchat.tokenizer.gguf import tokenizer_from_gguf

    return tokenizer_from_gguf(shared_path(*VOCAB_TESTS, SPM_CASES))


@pytest.mark.parametrize("name", ["tok512", "llama2_tok", "llama3_tok", "llama3_hf", "llama2_hf", "llama2_gguf"])
def test_token_bytes_spell_encoded_text(request, name):
    tok = request.getfixturevalue(name)
    spelled = tok.token_bytes()
    assert len(spelled) == tok.vocab_size
    ids = tok.encode(TEXT)
    got = b"".join(spelled[i] for i in ids)
    # SentencePiece-style vocabularies (Llama 2, tok512) add a dummy-prefix space that decode drops.
    assert got in (TEXT.encode(), b" " + TEXT.encode())
    for special in tok.stop_ids | ({tok.bos_id} - {None}):
        assert spelled[special] is None


@pytest.mark.parametrize("name", ["tok512", "llama3_tok", "llama2_hf"])
def test_random_logits_under_a_schema_give_conforming_json(request, name):
    from torchchat.generation.constraints import json_schema_grammar

    jsonschema = pytest.importorskip("jsonschema")
    tok = request.getfixturevalue(name)
    grammar = json_schema_grammar(SCHEMA)
    for seed in range(3):
        out, reason = _generate(tok, grammar, 200, seed)
        assert reason == "stop"
        jsonschema.validate(json.loads(tok.decode(out[:-1])), SCHEMA)


