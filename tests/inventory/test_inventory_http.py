"""Direct-URL downloads (stories260K from its huggingface.co URLs, mirrored by HF_ENDPOINT to the local
file host in conftest.py) with torchchat's own HTTP downloader."""
from __future__ import annotations

import pytest

from torchchat.errors import DownloadError
from torchchat.inventory.download import DownloadOptions, download_model
from torchchat.inventory.http import resolve_url
from torchchat.model.registry import resolve_model

from tests.inventory.conftest import Cut, Served

BIN = "/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin"
TOK = "/karpathy/tinyllamas/resolve/main/stories260K/tok512.model"


def test_urls_follow_hf_endpoint(hub):
    assert resolve_url("https://huggingface.co" + BIN) == hub.url + BIN
    assert resolve_url("https://github.com/karpathy/llama2.c/raw/master/tokenizer.model").startswith("https://github.com/")


def test_full_download_installs_checkpoint_and_tokenizer(hub, tinyllamas, model_dir):
    hub.redirect.add(BIN)  # the checksum arrives on the redirect, as from huggingface.co
    folder = download_model(resolve_model("stories260k"), DownloadOptions(model_dir))
    assert folder == model_dir / "stories260K"
    assert sorted(p.name for p in folder.iterdir()) == ["stories260K.bin", "tok512.model"]
    assert (folder / "stories260K.bin").read_bytes() == tinyllamas[BIN]
    assert (folder / "tok512.model").read_bytes() == tinyllamas[TOK]
    assert sorted(p.name for p in model_dir.iterdir()) == ["stories260K"]


def test_interrupted_transfer_keeps_part_and_resumes(hub, tinyllamas, model_dir):
    cut = Cut(at=100_000, times=1)
    hub.served[BIN] = Served(cut=cut)
    entry = resolve_model("stories260K")
    with pytest.raises(DownloadError) as e:
        download_model(entry, DownloadOptions(model_dir))
    msg = str(e.value)
    assert "interrupted after 100000 of" in msg and "was not created" in msg and "resumes" in msg
    assert not (model_dir / "stories260K").exists()
    assert (model_dir / ".partial" / "stories260K" / "stories260K.bin.part").stat().st_size == 100_000

    hub.log.clear()
    folder = download_model(entry, DownloadOptions(model_dir))
    assert (folder / "stories260K.bin").read_bytes() == tinyllamas[BIN]
    assert [r[2] for r in hub.requests_for(BIN)] == ["bytes=100000-"]


@pytest.mark.parametrize("redirect", [False, True], ids=["direct", "checksum-on-redirect"])
def test_corrupted_file_is_refused(hub, tinyllamas, model_dir, redirect):
    hub.served[BIN] = Served(corrupt=True)
    if redirect:
        hub.redirect.add(BIN)
    entry = resolve_model("stories260K")
    with pytest.raises(DownloadError, match="corrupted download"):
        download_model(entry, DownloadOptions(model_dir))
    assert not (model_dir / "stories260K").exists()
    assert not list((model_dir / ".partial").rglob("stories260K.bin*"))  # neither kept nor half-kept


def test_missing_file_is_an_http_error(hub, model_dir):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_model(resolve_model("stories260K"), DownloadOptions(model_dir))
    assert list(model_dir.iterdir()) == []


def test_html_page_instead_of_checkpoint_is_refused(hub, tinyllamas, model_dir):
    hub.files[BIN] = b"<html><body>Sign in</body></html>" * 10
    with pytest.raises(DownloadError, match="do not load"):
        download_model(resolve_model("stories260K"), DownloadOptions(model_dir))
    assert list(model_dir.iterdir()) == []


@pytest.mark.parametrize("reply", ["from-zero", "ignore"])
def test_resume_answered_from_byte_zero_is_not_appended(hub, tinyllamas, model_dir, reply):
    """A mirror that answers `Range: bytes=N-` with the whole file (a 206 saying bytes 0-, or a 200)
    must not have it appended to the N bytes already here: the file would be installed corrupt."""
    entry = resolve_model("stories260K")
    hub.served[BIN] = Served(cut=Cut(at=100_000, times=1))
    with pytest.raises(DownloadError):
        download_model(entry, DownloadOptions(model_dir))
    hub.served[BIN] = Served(range_reply=reply)
    folder = download_model(entry, DownloadOptions(model_dir))
    assert (folder / "stories260K.bin").read_bytes() == tinyllamas[BIN]


def test_second_download_of_one_model_is_refused_in_one_line(hub, tinyllamas, model_dir):
    from torchchat.inventory.download import download_lock

    entry = resolve_model("stories260K")
    with download_lock(entry, model_dir):
        with pytest.raises(DownloadError, match=r"another download of stories260K is running \(pid \d+\)"):
            download_model(entry, DownloadOptions(model_dir))
    folder = download_model(entry, DownloadOptions(model_dir))  # the lock is gone with its holder
    assert (folder / "stories260K.bin").read_bytes() == tinyllamas[BIN]
    assert sorted(p.name for p in model_dir.iterdir()) == ["stories260K"]


def test_second_download_in_another_process_is_refused(hub, tinyllamas, model_dir):
    import subprocess
    import sys

    from torchchat.inventory.download import download_lock

    entry = resolve_model("stories260K")
    with download_lock(entry, model_dir):
        proc = subprocess.run([sys.executable, "torchchat.py", "download", "stories260K", "--model-directory",
                               str(model_dir)], capture_output=True, text=True, timeout=60,
                              cwd=__import__("pathlib").Path(__file__).resolve().parents[2])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "another download" in proc.stderr


def test_ctrl_c_keeps_what_arrived_and_exits_130(hub, tinyllamas, model_dir, monkeypatch, capsys):
    from torchchat.cli import main
    from torchchat.inventory import http

    real_read = http.http.client.HTTPResponse.read
    calls = []

    def read_then_interrupt(self, *args):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real_read(self, *args)

    monkeypatch.setattr(http, "_CHUNK", 50_000)
    monkeypatch.setattr(http.http.client.HTTPResponse, "read", read_then_interrupt)
    code = main(["download", "stories260K", "--model-directory", str(model_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130
    assert err[-1].startswith("Error: download of stories260K interrupted") and "kept" in err[-1]
    part = model_dir / ".partial" / "stories260K" / "stories260K.bin.part"
    assert part.stat().st_size == 100_000
