"""Generation: sampling, the prefill/decode steps (the only compile boundary), and the engine that
generate, chat, server and eval share."""
