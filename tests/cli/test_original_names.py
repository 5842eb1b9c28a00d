"""Flags the original torchchat documented, kept under their old names."""
from __future__ import annotations

from torchchat.cli import build_parser, main


def test_load_gguf_is_gguf_path(stories260k_dir, capsys):
    for command in ("generate", "chat", "export", "eval", "server"):
        args = build_parser(command).parse_args([command, "--load-gguf", "m.gguf"])
        assert str(args.gguf_path) == "m.gguf"
    outputs = []
    for flag in ("--gguf-path", "--load-gguf"):
        capsys.readouterr()
        code = main(["generate", flag, str(stories260k_dir / "stories260K.gguf"), "--dtype", "fp32",
                     "--prompt", "Once upon a time", "--max-new-tokens", "10", "--temperature", "0"])
        out, err = capsys.readouterr()
        assert code == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("Once upon a time")


def test_eval_compile_is_a_flag_and_refused_for_exported_models(stories260k_dir, tmp_path, capsys):
    assert build_parser("eval").parse_args(["eval", "--compile"]).compile
    (tmp_path / "m.pte").write_bytes(b"")  # refused before it is read
    code = main(["eval", "--pte-path", str(tmp_path / "m.pte"), "--tokenizer-path",
                 str(stories260k_dir / "tok512.model"), "--compile"])
    err = capsys.readouterr().err
    assert code != 0 and "compiled already" in err and "Traceback" not in err
