"""The model registry shipped as data (models.json): known models, aliases, where they come from."""
