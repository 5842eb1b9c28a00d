"""The one Llama-family Transformer, its configuration and the table of known models."""
