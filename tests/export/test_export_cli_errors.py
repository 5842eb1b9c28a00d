"""Bad input to `export` and to the exported-model flags: one clear line, non-zero exit, nothing
written. None of these reaches a compiler, so they are fast."""
import re
import shutil
import zipfile

import pytest

from torchchat.cli import main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.fixture
def stories(stories260k_dir):
    return ["--checkpoint-path", str(stories260k_dir / "stories260K.bin"),
            "--tokenizer-path", str(stories260k_dir / "tok512.model")]


@pytest.mark.parametrize("outputs, pattern", [
    ([], r"nothing to export"),
    (["--output-aoti-package-path", "{tmp}/model.zip"], r"must end in \.pt2"),
    (["--output-pte-path", "{tmp}/model.pt2"], r"must end in \.pte"),
    (["--output-dso-path", "{tmp}/model.dll"], r"must end in \.so"),
    (["--output-pte-path", "{tmp}/no/such/folder/model.pte"], r"folder .* does not exist"),
    (["--output-pte-path", "{tmp}/m.pte", "--dtype", "bf16"], r"ExecuTorch export supports --dtype fp32"),
    (["--output-pte-path", "{tmp}/m.pte", "--quantize", '{"linear:int8": {"groupsize": 0}}'],
     r"ExecuTorch export supports --quantize linear:a8w4dq and embedding, not linear:int8"),
    # torchao's path (--no-cpu-kernels); with torchchat's CPU kernels a8w4dq exports to AOTI and runs fast.
    (["--output-aoti-package-path", "{tmp}/m.pt2", "--quantize", '{"linear:a8w4dq": {"groupsize": 32}}',
      "--no-cpu-kernels"],
     r"linear:a8w4dq is the ExecuTorch .* recipe"),
    (["--output-aoti-package-path", "{tmp}/m.pt2", "--dtype", "fp16"], r"supports --dtype fp32 or bf16"),
])
def test_export_refuses_before_compiling(outputs, pattern, stories, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in outputs]
    assert main(["export", *stories, *args]) == 2
    assert re.search(pattern, _one_error_line(capsys))
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_int4_on_fp32(stories, tmp_path, capsys):
    """torchao's int4 kernels want bf16 (torchchat's CPU kernels, the default on the CPU, take fp32 too); the
    refusal comes before any compiler runs and writes nothing."""
    code = main(["export", *stories, "--output-aoti-package-path", str(tmp_path / "m.pt2"),
                 "--quantize", '{"linear:int4": {"groupsize": 32}}', "--no-cpu-kernels"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert re.search(r"^Error: .*'linear:int4' needs a bf16 model .*got fp32; use --dtype bf16", lines[-1])
    assert list(tmp_path.iterdir()) == []


def test_export_does_not_read_an_exported_model(stories, tmp_path, capsys):
    art = tmp_path / "x.pte"
    art.write_bytes(b"\0" * 64)
    assert main(["export", "--pte-path", str(art), "--output-pte-path", str(tmp_path / "y.pte")]) == 2
    assert "drop --pte-path" in _one_error_line(capsys)


def _garbage(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not a model\n" * 100)
    return path


def _truncated_zip(tmp_path):
    path = tmp_path / "cut.pt2"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("cut/data/aotinductor/model/model.so", b"\x7fELF" + b"\0" * 100_000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _elf_without_sidecar(tmp_path):
    path = tmp_path / "lonely.so"
    shutil.copy(shutil.which("true"), path)
    return path


@pytest.mark.parametrize("case, code, pattern", [
    ("garbage pte", 1, r"not an ExecuTorch program"),
    ("garbage pt2", 1, r"not an AOT Inductor package"),
    ("truncated pt2", 1, r"damaged or truncated"),
    ("garbage so", 1, r"not a shared library"),
    ("so without sidecar", 1, r"lonely\.so\.json .* is missing"),
    ("missing file", 2, r"does not exist"),
    ("two artifacts", 2, r"give one exported artifact"),
    ("with --quantize", 2, r"quantization is fixed"),
    ("with --compile", 2, r"compiled already"),
])
def test_exported_model_flags_refuse_bad_input(case, code, pattern, stories260k_dir, tmp_path, capsys):
    tok = ["--tokenizer-path", str(stories260k_dir / "tok512.model")]
    pte = _garbage(tmp_path, "g.pte")
    args = {
        "garbage pte": ["--pte-path", pte],
        "garbage pt2": ["--aoti-package-path", _garbage(tmp_path, "g.pt2")],
        "truncated pt2": ["--aoti-package-path", _truncated_zip(tmp_path)],
        "garbage so": ["--dso-path", _garbage(tmp_path, "g.so")],
        "so without sidecar": ["--dso-path", _elf_without_sidecar(tmp_path)],
        "missing file": ["--pte-path", tmp_path / "nope.pte"],
        "two artifacts": ["--pte-path", pte, "--aoti-package-path", _garbage(tmp_path, "g.pt2")],
        "with --quantize": ["--pte-path", pte, "--quantize", '{"linear:int8": {"groupsize": 0}}'],
        "with --compile": ["--pte-path", pte, "--compile"],
    }[case]
    assert main(["generate", *map(str, args), *tok, "--max-new-tokens", "3"]) == code
    assert re.search(pattern, _one_error_line(capsys))


def test_executorch_refusal_quotes_the_shipped_mobile_recipe(stories, tmp_path, capsys):
    """The recipe the refusal suggests is the one `--quantize mobile` applies, read from its file."""
    import json

    from torchchat.quantize import RECIPE_DIR

    main(["export", *stories, "--output-pte-path", str(tmp_path / "m.pte"), "--quantize", '{"linear:int8": {}}'])
    line = _one_error_line(capsys)
    quoted = line.split("try --quantize mobile: ", 1)[1]
    assert json.loads(quoted) == json.loads((RECIPE_DIR / "mobile.json").read_text())
