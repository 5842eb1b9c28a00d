"""Eager runtimes for engine tests: the real stories260K, and a random draft of the same vocabulary; and
`drive`, which runs a BatchEngine over requests that join at given steps."""
from __future__ import annotations

import torch

from torchchat.build import load_weights
from torchchat.checkpoint import load_checkpoint
from torchchat.checkpoint.state_dict import normalize
from torchchat.model.config import ModelConfig
from torchchat.model.transformer import Transformer
from torchchat.runtime.base import EagerRuntime


def stories_runtime(folder) -> EagerRuntime:
    loaded = load_checkpoint(folder / "stories260K.bin")
    with torch.device("meta"):
        model = Transformer(loaded.config)
    load_weights(model, normalize(loaded.state_dict, loaded.config), "stories260K.bin")
    return EagerRuntime(model.eval().requires_grad_(False))


def random_runtime(vocab_size=512, seed=0) -> EagerRuntime:
    cfg = ModelConfig.from_params(dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                       multiple_of=16, max_seq_len=512))
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return EagerRuntime(model.eval().requires_grad_(False))


def drive(engine, requests, join_at):
    """Add request i before step join_at[i] (once a slot is free) and step until all are done: (each
    request's tokens, {request index: its Sequence})."""
    seqs, outs, step = {}, {i: [] for i in range(len(requests))}, 0
    while len(seqs) < len(requests) or engine.active:
        for i, r in enumerate(requests):
            if i not in seqs and join_at[i] <= step and engine.free_slots():
                seqs[i] = engine.add(r)
        owner = {id(s): i for i, s in seqs.items()}
        for o in engine.step():
            outs[owner[id(o.seq)]].append(o.token)
        step += 1
    return [outs[i] for i in range(len(requests))], seqs
