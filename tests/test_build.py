"""build.py's two steps on their own: a spec resolves its device and dtype names once, when made;
resolving names the model, config and weights without materializing anything."""
from __future__ import annotations

import pytest
import torch

from torchchat.build import BuildSpec, ModelSource, check_exported_quantize, check_tensor_parallel, resolve_spec
from torchchat.errors import DeviceError, UserInputError


def test_spec_resolves_device_and_dtype_names_when_made():
    spec = BuildSpec(ModelSource(params_table="stories15M", dummy_weights=True), device="fast", dtype="bf16")
    assert spec.device in ("cpu", "cuda", "mps") and spec.dtype is torch.bfloat16
    assert BuildSpec(ModelSource(), dtype=None).dtype is None  # an exported artifact's own


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_spec_refuses_a_device_this_machine_lacks():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        BuildSpec(ModelSource(), device="cuda")


def test_resolving_dummy_weights_reads_no_checkpoint():
    from torchchat.model.registry import params_table

    resolved = resolve_spec(BuildSpec(ModelSource(params_table="stories15M", dummy_weights=True), max_seq_len=64))
    assert resolved.weights is None and resolved.checkpoint is None and resolved.device == "cpu"
    assert resolved.config == params_table("stories15M").with_max_seq_len(64)
    assert resolved.name == "stories15M"


def test_checks_the_cli_asks_before_loading():
    check_tensor_parallel(None)
    check_exported_quantize("--pte-path", None)
    with pytest.raises(UserInputError, match="does not run with --tp"):
        check_tensor_parallel('{"linear:int8": {}}')
    with pytest.raises(UserInputError, match="quantization is fixed"):
        check_exported_quantize("--pte-path", '{"linear:int8": {}}')
