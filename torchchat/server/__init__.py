"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over one Engine, and the chat page it serves.

Import `torchchat.server.app` only where fastapi is wanted: this package's `__init__` imports nothing."""
