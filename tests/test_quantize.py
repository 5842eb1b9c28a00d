"""--quantize recipes: parsing, the precedence of precision/executor against --dtype/--device, and the
checks against a model's shapes and the device, all before any weight exists."""
import json

import pytest
import torch

from torchchat.errors import QuantizationError
from torchchat.model.config import ModelConfig
from torchchat.model.registry import params_table
from torchchat.model.packed import kernels_unavailable
from torchchat.quantize import RECIPE_DIR, QuantPlan, Scheme, parse_quantize, shipped_recipes

SHIPPED = ["cuda-32.json", "cuda.json", "desktop.json", "mobile-32.json", "mobile.json", "pi5.json"]


@pytest.fixture(scope="module")
def stories260k_config() -> ModelConfig:
    """The real stories260K header (DATA.md): dim 64, hidden 172, 5 layers, 8 heads, 4 kv heads."""
    return ModelConfig.from_params(
        dict(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, max_seq_len=512,
             tie_embeddings=True)
    )


def test_empty_plan_applies_nothing_and_overrides_nothing(stories260k_config):
    for empty in (None, "", "   ", "{}"):
        plan = parse_quantize(empty)
        assert plan.is_empty and plan.schemes == () and plan.to_json() == {}
        assert plan.resolve("fp32", "cpu") == ("fp32", "cpu", [])
        assert plan.validate(stories260k_config, "cpu", torch.float32) == []


def test_shipped_recipes_are_found_by_name_and_parse():
    assert shipped_recipes() == SHIPPED
    for name in SHIPPED:
        by_name = parse_quantize(name)
        assert by_name == parse_quantize(name.removesuffix(".json"))
        assert by_name == QuantPlan.from_dict(json.loads((RECIPE_DIR / name).read_text()))
        assert by_name.schemes, name
    mobile = parse_quantize("mobile.json")
    assert mobile.embedding == Scheme("embedding", 4, 32)
    assert mobile.linear == Scheme("linear:a8w4dq", None, 256)
    assert parse_quantize("cuda.json").to_json() == {
        "linear:int4": {"groupsize": 256}, "precision": {"dtype": "bf16"}, "executor": {"accelerator": "cuda"}
    }


def test_a_file_beside_the_user_wins_over_a_shipped_recipe(tmp_path, monkeypatch):
    (tmp_path / "cuda.json").write_text('{"linear:int8": {"groupsize": 64}}')
    monkeypatch.chdir(tmp_path)
    assert parse_quantize("cuda.json").linear == Scheme("linear:int8", 8, 64)
    assert parse_quantize(str(tmp_path / "cuda.json")).linear == Scheme("linear:int8", 8, 64)


def test_defaults_are_filled_in_and_the_plan_round_trips():
    plan = parse_quantize('{"linear:int8": {}, "embedding": {"bitwidth": 4}, "precision": {"dtype": "bfloat16"}}')
    assert plan.linear == Scheme("linear:int8", 8, 0)
    assert plan.embedding == Scheme("embedding", 4, 0)
    assert plan.dtype == "bf16"  # canonical name
    assert [s.key for s in plan.schemes] == ["embedding", "linear:int8"]  # the order they are applied in
    assert parse_quantize(json.dumps(plan.to_json())) == plan
    assert QuantPlan.from_dict(plan.to_json()) == plan
    assert parse_quantize('{"linear:int4": {}}').linear.groupsize == 128
    assert parse_quantize('{"linear:a8w4dq": {}}').linear.groupsize == 256


@pytest.mark.parametrize(
    "recipe, expected",
    [
        ('{"linear:int2": {}}', "unknown key 'linear:int2'; valid keys: embedding, linear:int8, linear:int4, "
                                "linear:a8w4dq, linear:a8wxdq, embedding:wx, linear:afpwx, precision, executor"),
        ('{"linear:int8": {"bitwidth": 3}}', "'linear:int8' bitwidth 3 is not valid; valid: 8, 4"),
        ('{"embedding": {"bitwidth": 2}}', "'embedding' bitwidth 2 is not valid; valid: 8, 4"),
        ('{"linear:int8": {"groupsize": 48}}',
         "groupsize 48 is not valid; valid: 0, 32, 64, 128, 256 (0 = per channel)"),
        ('{"linear:int4": {"groupsize": 0}}', "'linear:int4' groupsize 0 is not valid; valid: 32, 64, 128, 256"),
        ('{"linear:a8w4dq": {"groupsize": 512}}',
         "'linear:a8w4dq' groupsize 512 is not valid; valid: 32, 64, 128, 256"),
        ('{"embedding": {"groupsize": true}}', "groupsize true is not valid"),
        ('{"linear:int8": {"groupsize": "32"}}', 'groupsize "32" is not valid'),
        ('{"linear:int4": {"bitwidth": 4}}', "'linear:int4' has no option 'bitwidth'; valid options: groupsize"),
        ('{"linear:int4": 32}', "'linear:int4' takes an object of options (groupsize), got 32"),
        ('{"linear:int8": {}, "linear:int4": {}}', "'linear:int8' and 'linear:int4' both quantize the linear layers"),
        ('{"precision": {"dtype": "int8"}}', "precision dtype 'int8' is not valid; valid: fp32, float32, float, fp16"),
        ('{"precision": "bf16"}', 'takes exactly {"dtype": ...}'),
        ('{"executor": {"accelerator": "tpu"}}',
         "executor accelerator 'tpu' is not valid; valid: cpu, cuda, cuda:N, mps"),
        ('{"executor": {"accelerator": "cuda", "threads": 4}}', 'takes exactly {"accelerator": ...}'),
        ('{"linear:int8": {"groupsize": 32}', "not valid JSON"),
        ("[1, 2]", "a recipe is a JSON object, got list"),
        ("no-such-recipe.json", "not inline JSON, not a file, and not a shipped recipe; shipped recipes: cuda-32.json"),
    ],
)
def test_invalid_recipes_give_one_line_listing_what_is_valid(recipe, expected):
    with pytest.raises(QuantizationError) as info:
        parse_quantize(recipe)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_command_line_dtype_and_device_override_the_recipe_with_a_note():
    plan = parse_quantize("cuda.json")
    assert plan.resolve(None, None) == ("bf16", "cuda", [])
    dtype, device, notes = plan.resolve("fp32", "cpu")
    assert (dtype, device) == ("fp32", "cpu")
    assert notes == [
        "--dtype fp32 overrides the recipe's precision dtype bf16",
        "--device cpu overrides the recipe's executor accelerator cuda",
    ]
    # The same dtype under another name is no override.
    assert plan.resolve("bfloat16", "cuda") == ("bfloat16", "cuda", [])
    # A recipe without precision/executor leaves the choice to the flags, or to the caller's defaults.
    assert parse_quantize('{"linear:int8": {}}').resolve(None, None) == (None, None, [])
    assert parse_quantize('{"linear:int8": {}}').resolve("fp16", "cuda") == ("fp16", "cuda", [])


def test_validate_names_the_layers_a_groupsize_skips(stories260k_config):
    # stories260K: rows of 64 (dim) everywhere except w2, whose row is hidden_dim 172.
    notes = parse_quantize('{"linear:a8w4dq": {"groupsize": 32}}').validate(stories260k_config, "cpu", torch.float32)
    assert notes == [
        "linear:a8w4dq: 5 layer(s) left unquantized, row length 172 is not a multiple of groupsize 32: "
        "layers.0.feed_forward.w2, layers.1.feed_forward.w2, layers.2.feed_forward.w2, layers.3.feed_forward.w2 "
        "and 1 more"
    ]
    assert parse_quantize('{"linear:int8": {"groupsize": 32}}').validate(stories260k_config, "cpu", torch.bfloat16) == [
        notes[0].replace("a8w4dq", "int8")]


def test_per_channel_int8_skips_rows_torchs_cpu_kernel_miscomputes(stories260k_config):
    """torch 2.13's CPU `_weight_int8pack_mm` (what --compile and AOTI turn bf16 int8 into) reads
    past a row that is not a multiple of 8, so its result depends on memory: the compiled model
    (tests/test_quantize_models.py) is the check that it is wrong; here, that the rule skips exactly
    those layers."""
    notes = parse_quantize('{"linear:int8": {"groupsize": 0}}').validate(stories260k_config, "cpu", torch.bfloat16)
    assert notes == ["linear:int8: 5 layer(s) left unquantized, row length 172 is not a multiple of 8 (torch's CPU "
                     "int8 kernel): layers.0.feed_forward.w2, layers.1.feed_forward.w2, layers.2.feed_forward.w2, "
                     "layers.3.feed_forward.w2 and 1 more"]
    assert [n for n in parse_quantize('{"linear:int8": {}}').validate(stories260k_config, "cpu", torch.float32)
            if "multiple of 8" in n] == []
    assert parse_quantize('{"linear:int8": {}}').validate(stories260k_config, "cuda", torch.bfloat16) == []


def test_validate_warns_where_int8_is_slower_than_no_quantization(stories260k_config):
    # torchao's path (no native CPU kernels, e.g. no compiler); with the kernels int8 is fast in fp32 too.
    notes = parse_quantize('{"linear:int8": {}}').validate(stories260k_config, "cpu", torch.float32, cpu_kernels=False)
    assert notes == ["linear:int8 on an fp32 CPU model runs slower than no quantization (torchao 0.18); "
                     "it pays off with --dtype bf16"]
    if kernels_unavailable() is None:
        assert not any("slower" in n for n in parse_quantize('{"linear:int8": {}}').validate(
            stories260k_config, "cpu", torch.float32))
    assert parse_quantize('{"linear:int8": {"bitwidth": 4}}').validate(stories260k_config, "cpu", torch.float32) == []


def test_validate_rejects_a_groupsize_that_fits_no_layer(stories260k_config):
    with pytest.raises(QuantizationError, match=r"groupsize 128 fits no layer of this model \(row length 64 is not "
                       r"a multiple of groupsize 128; row length 172 .*groupsizes that fit: 0, 32, 64$"):
        parse_quantize('{"linear:int8": {"groupsize": 128}}').validate(stories260k_config, "cpu", torch.float32)
    with pytest.raises(QuantizationError,
                       match="'embedding' groupsize 256 fits no layer.*groupsizes that fit: 0, 32, 64$"):
        parse_quantize('{"embedding": {"groupsize": 256}}').validate(stories260k_config, "cpu", torch.float32)


def test_validate_int4_cpu_packing_limits(stories260k_config):
    with pytest.raises(QuantizationError,
                       match="groupsize 256 has no CPU kernel in torchao; on cpu valid groupsizes are 32, 64, 128"):
        parse_quantize("cuda.json").validate(params_table("stories110M"), "cpu", torch.bfloat16, cpu_kernels=False)
    if kernels_unavailable() is None:  # the native kernels take any groupsize, in fp32 too
        assert parse_quantize("cuda.json").validate(params_table("stories110M"), "cpu", torch.float32) == []
    # torchao's CPU int4 packing also needs out_features % 16 == 0: stories260K's w1/w3 (172 outputs) stay float.
    notes = parse_quantize('{"linear:int4": {"groupsize": 32}}').validate(stories260k_config, "cpu", torch.bfloat16,
                                                                          cpu_kernels=False)
    assert any(n.startswith("linear:int4: 10 layer(s) left unquantized, 172 output features are not a multiple of 16")
               for n in notes)


def test_validate_rejects_schemes_the_device_cannot_run(stories260k_config):
    cfg = params_table("stories15M")
    with pytest.raises(QuantizationError, match="'linear:int8' cannot run on mps; it runs on: cpu, cuda"):
        parse_quantize('{"linear:int8": {}}').validate(cfg, "mps", torch.float16)
    with pytest.raises(QuantizationError, match="'linear:int4' needs a bf16 model .*got fp16; use --dtype bf16"):
        parse_quantize("cuda.json").validate(cfg, "cuda:0", torch.float16)
    with pytest.raises(QuantizationError, match="'linear:int4' needs a bf16 model .*got fp32; use --dtype bf16"):
        parse_quantize("desktop.json").validate(cfg, "cpu", torch.float32, cpu_kernels=False)
    # precision/executor alone run anywhere
    assert parse_quantize('{"precision": {"dtype": "fp16"}}').validate(cfg, "mps", torch.float16) == []


def test_validate_matches_the_real_module_tree():
    """validate() works from the config alone (on the meta device); its layer names are the model's."""
    from torchchat.model.transformer import Transformer

    cfg = ModelConfig.from_params(dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, vocab_size=256))
    notes = parse_quantize('{"linear:int8": {"groupsize": 64}}').validate(cfg, "cpu", torch.bfloat16)
    modules = Transformer(cfg).named_modules()
    skipped = [name for name, m in modules if isinstance(m, torch.nn.Linear) and m.in_features == 96]
    assert skipped == ["layers.0.feed_forward.w2", "layers.1.feed_forward.w2"]
    assert notes == [f"linear:int8: 2 layer(s) left unquantized, row length 96 is not a multiple of groupsize 64: "
                     f"{', '.join(skipped)}"]
