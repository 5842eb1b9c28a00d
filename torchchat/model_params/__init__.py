"""Params tables shipped as data: one JSON file per known architecture, named by its table key."""
