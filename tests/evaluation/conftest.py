"""stories260K (fp32, eager) for the evaluation tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def stories(stories260k_dir):
    from torchchat.build import BuildSpec, ModelSource, build_model

    source = ModelSource(checkpoint_path=stories260k_dir / "stories260K.bin",
                         tokenizer_path=stories260k_dir / "tok512.model")
    return build_model(BuildSpec(source=source, dtype=torch.float32))
