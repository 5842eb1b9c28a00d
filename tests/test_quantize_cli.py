"""--quantize through `generate`, in process (cli.main): notes on stderr, one-line errors, text out."""
import pytest

from torchchat.cli import main


@pytest.fixture(scope="module")
def stories(stories260k_dir):
    return ["generate", "--checkpoint-path", str(stories260k_dir / "stories260K.bin"), "--tokenizer-path",
            str(stories260k_dir / "tok512.model"), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "30",
            "--prompt", "Once upon a time", "--no-cpu-kernels"]  # torchao's path (tests/test_quantize_packed.py: the other)


def test_generate_with_a_recipe_prints_overrides_and_skipped_layers(stories, capsys):
    recipe = '{"precision": {"dtype": "bf16"}, "embedding": {"bitwidth": 8}, "linear:int8": {"groupsize": 32}}'
    assert main([*stories, "--quantize", recipe, "--dtype", "fp32"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time") + 20
    assert "--dtype fp32 overrides the recipe's precision dtype bf16" in err
    assert "linear:int8: 5 layer(s) left unquantized, row length 172 is not a multiple of groupsize 32" in err
    assert "linear:int8 on an fp32 CPU model runs slower than no quantization" in err


@pytest.mark.parametrize(
    "recipe, message",
    [
        ('{"linear:int5": {}}', "unknown key 'linear:int5'; valid keys: embedding, linear:int8, linear:int4"),
        ("cuda.json", "groupsize 256 has no CPU kernel in torchao; on cpu valid groupsizes are 32, 64, 128"),
        ('{"linear:int4": {"groupsize": 128}}', "groupsize 128 fits no layer of this model"),
        ('{"linear:a8w4dq": {"groupsize": 32}}', None),
    ],
    ids=["unknown key", "no cpu kernel", "fits no layer", "valid"],
)
def test_bad_recipes_get_one_clear_line(stories, recipe, message, capsys):
    code = main([*stories, "--quantize", recipe, "--dtype", "bf16", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
        return
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert code == 2 and errors == [err.splitlines()[-1]] and message in errors[0], err
    assert "Traceback" not in err
