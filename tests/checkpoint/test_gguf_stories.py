"""stories260K.gguf (a real llama.cpp export) against stories260K.bin and llama2.c's own greedy output."""
from __future__ import annotations

import torch

from torchchat.checkpoint import LoadOptions
from torchchat.checkpoint.gguf import load_gguf
from torchchat.checkpoint.llama2c import load_llama2c

from tests.conftest import shared_path


def _greedy(loaded, steps: int = 200) -> list[int]:
    """BOS, then `steps` argmax tokens, one position at a time (as llama2.c's run.c does)."""
    from torchchat.build import load_weights
    from torchchat.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(loaded[0])
    load_weights(model, dict(loaded[1]), "stories260K")
    model.to(torch.float32).eval().requires_grad_(False)
    model.setup_caches(1, steps + 1)
    tokens = [1]
    with torch.no_grad():
        for pos in range(steps):
            logits = model(torch.tensor([[tokens[-1]]]), torch.tensor([pos]))
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


def test_gguf_holds_the_bin_weights_and_architecture(stories260k_dir):
    gguf = load_gguf(stories260k_dir / "stories260K.gguf", LoadOptions(tokenizer=False))
    config, state = load_llama2c(stories260k_dir / "stories260K.bin")
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "head_dim", "rope_base"):
        assert getattr(gguf.config, field) == getattr(config, field), field
    assert gguf.config.max_seq_len == 2048  # llama.context_length; the .bin header says 512
    expected = dict(state, **{"output.weight": state["tok_embeddings.weight"]})  # the .bin shares the classifier
    assert set(gguf.state_dict) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(gguf.state_dict[name], tensor), name


def test_greedy_text_matches_the_bin(stories260k_dir):
    """expected_greedy_200.txt is llama2.c's greedy output for stories260K.bin."""
    import sentencepiece

    from_gguf = load_gguf(stories260k_dir / "stories260K.gguf", LoadOptions(tokenizer=False))
    tokens = _greedy((from_gguf.config, from_gguf.state_dict))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(stories260k_dir / "tok512.model"))
    assert sp.decode(tokens) == (stories260k_dir / "expected_greedy_200.txt").read_text()
