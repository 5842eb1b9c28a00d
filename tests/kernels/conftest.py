"""Kernel tests run the Triton kernels on the GPU when there is one, else on the CPU through Triton's
interpreter (TRITON_INTERPRET=1, set here before any kernel module is imported). Without triton
installed (`pip install -e .[gpu]` brings it) the tests that need it skip."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

