"""Whole Hugging Face folders (config.json, safetensors, tokenizer.json, tokenizer_config.json with a
chat template) of Llama's relatives through build_model and the engine: the chat prompt renders and
tokenizes as transformers' tokenizer does, the family's end-of-turn token stops a reply, and greedy
decoding gives transformers' greedy tokens."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_family_folders import write_folder  # noqa: E402
from test_hf_families import CASES  # noqa: E402

from torchchat.build import BuildSpec, ModelSource, build_model  # noqa: E402
from torchchat.generation.chat_format import as_messages, resolve_chat_format  # noqa: E402
from torchchat.generation.engine import GenerationConfig, make_engine  # noqa: E402
from torchchat.generation.sampling import SamplingParams  # noqa: E402

FOLDERS = {  # case of test_hf_families -> tokenizer family, the end-of-turn token
    "qwen2.5-tied-qkv-bias": ("qwen", "<|im_end|>"),
    "qwen3-qk-norm-head-dim": ("qwen", "<|im_end|>"),
    "gemma2-softcaps-sliding": ("gemma", "<end_of_turn>"),
    "gemma3-local-global-rope": ("gemma", "<end_of_turn>"),
    "phi4mini-longrope-long-tied": ("phi", "<|end|>"),
    "smollm3-nope-layers": ("smollm", "<|im_end|>"),
}
MESSAGES = [{"role": "system", "content": "You count stars."}, {"role": "user", "content": "Hello, how are you?"}]


@pytest.mark.parametrize("case", list(FOLDERS))
def test_folder_chats_like_transformers(case, tmp_path):
    family, end_of_turn = FOLDERS[case]
    config_cls, model_cls, kwargs = CASES[case]
    if family == "gemma":  # Gemma 2's template has no system role; keep the turns every template takes
        messages = MESSAGES[1:]
    else:
        messages = MESSAGES
    hf = write_folder(tmp_path, config_cls, model_cls, kwargs, family)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)

    built = build_model(BuildSpec(source=ModelSource(checkpoint_path=tmp_path), dtype=torch.float32))
    setup = resolve_chat_format(built.tokenizer)
    assert setup.format.name == "hf" and setup.is_chat
    text = setup.format.render(as_messages(messages))
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    engine = make_engine(built, max_seq_len=64)
    ids = engine.chat_prompt(messages, setup.format)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert built.tokenizer.special_id(end_of_turn) in built.tokenizer.stop_ids | setup.format.stop_ids(built.tokenizer)

    cfg = GenerationConfig(max_new_tokens=8, sampling=SamplingParams(temperature=0), stop_ids=frozenset())
    ours = list(engine.tokens(ids, cfg))
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=8)
    assert ours == out[0, len(ids):].tolist()
