"""Tiny Hugging Face folders of Llama's relatives for tests: random weights (transformers' own classes),
a byte-level BPE tokenizer.json trained on a few sentences, and a tokenizer_config.json with the
family's chat template (shortened from the published ones) and end-of-turn token."""
from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "Once upon a time there was a little robot who liked to count the stars.",
    "The quick brown fox jumps over the lazy dog; 12345 67890!",
    "Hello, how are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
]

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
          " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Gemma has no system role: a system message opens the first user message, as in the published template.
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\\n\\n' %}"
         "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
         "{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
         "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] | trim"
         " + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
PHI = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
       "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")

# family -> (special tokens, bos, eos, chat template)
TOKENIZERS = {
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", GEMMA),
    "phi": (["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"], None, "<|endoftext|>", PHI),
    "smollm": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML),
}


def write_tokenizer(folder: Path, family: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials, bos, eos, template = TOKENIZERS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": eos,
              "bos_token": bos, "add_bos_token": False, "model_max_length": 128}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def write_folder(folder: Path, config_cls: str, model_cls: str, kwargs: dict, family: str):
    """Save a random model of `model_cls` and a tokenizer to `folder`; returns the transformers model."""
    import transformers

    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # non-trivial norms and biases too
    model.eval().save_pretrained(folder)
    write_tokenizer(folder, family, kwargs["vocab_size"])
    return model
