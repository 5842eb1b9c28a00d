"""stories260K.gguf (a real llama.cpp export) against stories260K.bin and llama2.c's own greedy output."""
from __future__ import annotations

import torch

from torchchat.checkpoint import LoadOptions
from torchchat.checkpoint.gguf import load_gguf
from torchchat.checkpoint.llama2c import load_llama2c


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


def test_generate_from_gguf_alone_matches_llama2c(stories260k_dir):
    """`--gguf-path` and nothing else: config and tokenizer come from the file."""
    from tests.cli.helpers import run_cli

    r = run_cli("generate", "--gguf-path", stories260k_dir / "stories260K.gguf", "--prompt", "", "--temperature", "0",
                "--max-new-tokens", "200", "--dtype", "fp32", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (stories260k_dir / "expected_greedy_200.txt").read_text() + "\n"


def test_build_keeps_q4_0_linears_int4_on_cpu_bf16(stories260k_dir, tmp_path):
    from tests.checkpoint.gguf_build import write_llama_gguf
    from torchchat.build import BuildSpec, ModelSource, build_model

    config, state = load_llama2c(stories260k_dir / "stories260K.bin")
    path = tmp_path / "stories260K-q4_0.gguf"
    # Rows of 172 (ffn_down) are not whole Q4_0 blocks: llama.cpp keeps such tensors in float, so do we.
    write_llama_gguf(path, config, state, kind_of=lambda n, w: "Q4_0" if w.ndim == 2 and w.shape[1] % 32 == 0 else "F32")
    source = ModelSource(gguf_path=path, tokenizer_path=stories260k_dir / "tok512.model")
    # torchao's int4 path: where torchchat's native CPU kernels are off or cannot be built.
    built = build_model(BuildSpec(source, dtype=torch.bfloat16, cpu_kernels=False))
    layer = built.model.layers[0]
    assert type(layer.attention.wq.weight).__name__ == "Int4OpaqueTensor"
    assert type(layer.feed_forward.w2.weight) is torch.nn.Parameter and layer.feed_forward.w2.weight.dtype == torch.bfloat16
    built.runtime.setup(1, 16)
    logits = built.runtime.forward(torch.tensor([[1, 403, 407]]), torch.arange(3))
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()

    from torchchat.model.packed import PackedLinear, kernels_unavailable

    if kernels_unavailable() is None:  # the default on the CPU: the Q4_0 blocks as they are in the file
        packed = build_model(BuildSpec(source, dtype=torch.bfloat16)).model
        assert type(packed.layers[0].attention.wq) is PackedLinear
        assert type(packed.layers[0].feed_forward.w2) is torch.nn.Linear  # an F32 tensor in the file
        packed.setup_caches(1, 16)
        with torch.no_grad():
            got = packed(torch.tensor([[1, 403, 407]]), torch.arange(3))
        assert ((got - logits).norm() / logits.norm()).item() < 0.05
