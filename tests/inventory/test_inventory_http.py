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
