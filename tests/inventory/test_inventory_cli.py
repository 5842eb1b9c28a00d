"""download / list / where / remove through the command line."""
from __future__ import annotations

import os
import subprocess
import sys

from torchchat.cli import main

from tests.conftest import ROOT


def _row(out: str, name: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(name + " "))
    return line.split()


def test_list_where_remove_cycle(hub, tinyllamas, model_dir, capsys):
    md = ["--model-directory", str(model_dir)]
    assert main(["list", *md]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["MODEL", "ALIASES", "DOWNLOADED"]
    assert _row(out, "stories260K") == ["stories260K", "stories260k"]  # known, aliases shown, not downloaded
    assert _row(out, "meta-llama/Llama-3.2-1B-Instruct") == [
        "meta-llama/Llama-3.2-1B-Instruct", "llama3.2-1b,", "llama3.2-1b-instruct,", "llama3.2"]

    assert main(["where", "stories260k", *md]) == 2
    assert "not downloaded" in capsys.readouterr().err

    assert main(["download", "stories260k", *md]) == 0
    assert "downloaded" in capsys.readouterr().err
    assert main(["list", *md]) == 0
    assert _row(capsys.readouterr().out, "stories260K")[-1] == "yes"
    assert main(["where", "stories260k", *md]) == 0
    assert capsys.readouterr().out.strip() == str(model_dir / "stories260K")

    assert main(["remove", "stories260k", *md]) == 0
    assert not (model_dir / "stories260K").exists()
    assert list(model_dir.iterdir()) == []  # no trash or staging left behind
    assert main(["remove", "stories260k", *md]) == 0
    assert "nothing to remove" in capsys.readouterr().err


def test_partial_download_is_listed_and_removed(hub, tinyllamas, model_dir, capsys):
    from tests.inventory.conftest import Cut, Served

    hub.served["/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin"] = Served(cut=Cut(at=1000, times=1))
    md = ["--model-directory", str(model_dir)]
    assert main(["download", "stories260K", *md]) == 1
    assert "interrupted" in capsys.readouterr().err
    main(["list", *md])
    assert _row(capsys.readouterr().out, "stories260K")[-1] == "partial"
    assert main(["remove", "stories260K", *md]) == 0
    assert list(model_dir.iterdir()) == []


def test_unknown_model_names_close_matches(model_dir, capsys):
    assert main(["download", "stories260", "--model-directory", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stories260K" in err


def test_download_gated_model_with_hf_token_flag(hub, stories_hf_files, model_dir, capsys):
    from tests.inventory.conftest import Repo

    files = dict(stories_hf_files)
    files["original/tokenizer.model"] = files.pop("tokenizer.model")
    hub.repos["meta-llama/Llama-3.2-1B-Instruct"] = Repo(files=files, gated=True)
    hub.tokens.add("hf_ok")
    md = ["--model-directory", str(model_dir)]
    assert main(["download", "llama3.2-1b", *md]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "gated" in last and "--hf-token" in last
    assert main(["download", "llama3.2-1b", "--hf-token", "hf_ok", *md]) == 0
    assert (model_dir / "meta-llama" / "Llama-3.2-1B-Instruct" / "original" / "tokenizer.model").is_file()


def test_download_honours_hf_endpoint_environment(hub, stories_repo, tmp_path):
    """A fresh process: HF_ENDPOINT and TORCHCHAT_MODELDIR as a user sets them, no monkeypatching."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "TORCHCHAT_MODELDIR": str(tmp_path / "md"),
           "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_TOKEN", None)
    result = subprocess.run([sys.executable, str(ROOT / "torchchat.py"), "download", "llama2-base"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "md" / "meta-llama" / "Llama-2-7b-hf" / "model.safetensors").read_bytes() == \
        stories_repo.files["model.safetensors"]


def test_ctrl_c_during_download_exits_130_and_keeps_the_partial_file(hub, tinyllamas, model_dir, capsys, monkeypatch):
    """The transfer is read 64 KiB at a time (the progress bar moves on a slow link); Ctrl-C after the
    second read keeps those bytes in the .part file, and the next download resumes from them."""
    import tqdm.auto

    reads = []

    class CtrlCAfterTwoReads(tqdm.auto.tqdm):
        def update(self, n=1):
            super().update(n)
            reads.append(n)
            if len(reads) == 2:
                raise KeyboardInterrupt

    plain = tqdm.auto.tqdm
    monkeypatch.setattr(tqdm.auto, "tqdm", CtrlCAfterTwoReads)
    md = ["--model-directory", str(model_dir)]
    assert main(["download", "stories260K", *md]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "resumes" in err and "Traceback" not in err
    assert reads == [64 * 1024] * 2
    assert (model_dir / ".partial" / "stories260K" / "stories260K.bin.part").stat().st_size == 2 * 64 * 1024

    monkeypatch.setattr(tqdm.auto, "tqdm", plain)
    assert main(["download", "stories260K", *md]) == 0
    path = "/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin"
    assert (model_dir / "stories260K" / "stories260K.bin").read_bytes() == tinyllamas[path]
    assert [r[2] for r in hub.requests_for(path)][-1] == f"bytes={2 * 64 * 1024}-"
