"""Hub downloads with the real huggingface_hub client against the local fake hub (conftest.py)."""
from __future__ import annotations

import pytest

from torchchat.errors import DownloadError
from torchchat.inventory.download import DownloadOptions, download_model
from torchchat.inventory.hub import choose_files
from torchchat.model.registry import resolve_model

from tests.inventory.conftest import Cut, Repo, Served

WANTED = {"config.json", "model.safetensors", "tokenizer.model"}


def _untouched(model_dir):
    """The model directory holds nothing: no model, no partial download."""
    return list(model_dir.iterdir()) == []


def test_full_download_installs_hf_layout(hub, stories_repo, model_dir):
    folder = download_model(resolve_model("llama2-base"), DownloadOptions(model_dir))
    assert folder == model_dir / "meta-llama" / "Llama-2-7b-hf"
    assert {p.name for p in folder.iterdir()} == WANTED  # no README/.gitattributes, no .cache bookkeeping
    for name in WANTED:
        assert (folder / name).read_bytes() == stories_repo.files[name]
    assert sorted(p.name for p in model_dir.iterdir()) == ["meta-llama"]  # staging folder gone


def test_download_of_present_model_fetches_nothing(hub, stories_repo, model_dir):
    download_model(resolve_model("llama2-base"), DownloadOptions(model_dir))
    before = len(hub.log)
    download_model(resolve_model("llama2-base"), DownloadOptions(model_dir))
    assert len(hub.log) == before


def test_gated_without_token_is_401_with_what_to_do(hub, stories_files_gated, model_dir):
    with pytest.raises(DownloadError) as e:
        download_model(resolve_model("llama3.2-1b"), DownloadOptions(model_dir))
    msg = str(e.value)
    assert "gated" in msg and "401" in msg and "hf auth login" in msg
    assert f"{hub.url}/meta-llama/Llama-3.2-1B-Instruct" in msg  # where to accept the licence
    assert _untouched(model_dir)


def test_gated_with_unauthorised_token_is_403_with_what_to_do(hub, stories_files_gated, model_dir):
    with pytest.raises(DownloadError) as e:
        download_model(resolve_model("llama3.2-1b"), DownloadOptions(model_dir, hf_token="hf_not_approved"))
    msg = str(e.value)
    assert "403" in msg and "no access" in msg and "accept its licence" in msg
    assert _untouched(model_dir)


def test_gated_with_authorised_token_downloads(hub, stories_files_gated, model_dir):
    hub.tokens.add("hf_approved")
    folder = download_model(resolve_model("llama3.2-1b"), DownloadOptions(model_dir, hf_token="hf_approved"))
    assert (folder / "original" / "tokenizer.model").is_file()


def test_unknown_repository_says_not_found(hub, model_dir):
    with pytest.raises(DownloadError, match="not found"):
        download_model(resolve_model("mistral"), DownloadOptions(model_dir))
    assert _untouched(model_dir)


def test_dropped_connection_resumes_with_a_range_request(hub, stories_repo, model_dir):
    # huggingface_hub writes in 10 MiB chunks and resumes from the last whole chunk: the file must be larger.
    big = bytes(range(256)) * (12 << 12)  # 12 MiB
    stories_repo.files["model.safetensors"] = big
    hub.served["model.safetensors"] = Served(cut=Cut(at=11 << 20, times=1))
    folder = download_model(resolve_model("llama2-base"), DownloadOptions(model_dir))
    assert (folder / "model.safetensors").read_bytes() == big
    ranges = [r[2] for r in hub.requests_for("/model.safetensors") if r[0] == "GET"]
    assert len(ranges) == 2 and ranges[0] is None
    start = int(ranges[1][len("bytes="):-1])
    assert 0 < start <= 11 << 20  # the second request asked only for the rest


def test_interrupted_transfer_leaves_no_model_and_keeps_finished_files(hub, stories_repo, model_dir):
    size = len(stories_repo.files["model.safetensors"])
    cut = Cut(at=size // 2, times=100)  # more than huggingface_hub's retries
    hub.served["model.safetensors"] = Served(cut=cut)
    entry = resolve_model("llama2-base")
    with pytest.raises(DownloadError) as e:
        download_model(entry, DownloadOptions(model_dir))
    assert "interrupted" in str(e.value) and "was not created" in str(e.value) and "resumes" in str(e.value)
    assert not (model_dir / entry.name).exists()
    staged = model_dir / ".partial" / entry.name
    assert (staged / "config.json").is_file() and not (staged / "model.safetensors").exists()

    cut.times = 0
    hub.log.clear()
    folder = download_model(entry, DownloadOptions(model_dir))
    assert (folder / "model.safetensors").read_bytes() == stories_repo.files["model.safetensors"]
    assert not [r for r in hub.requests_for("/config.json") if r[0] == "GET"]  # finished files are not fetched again
    assert not (model_dir / ".partial").exists()


def test_corrupted_file_is_refused_and_fetched_again(hub, stories_repo, model_dir):
    hub.served["model.safetensors"] = Served(corrupt=True)
    entry = resolve_model("llama2-base")
    with pytest.raises(DownloadError, match=r"corrupted download: model.safetensors \(sha256"):
        download_model(entry, DownloadOptions(model_dir))
    assert not (model_dir / entry.name).exists()
    assert not (model_dir / ".partial" / entry.name / "model.safetensors").exists()

    hub.served.clear()
    hub.log.clear()
    folder = download_model(entry, DownloadOptions(model_dir))
    assert (folder / "model.safetensors").read_bytes() == stories_repo.files["model.safetensors"]
    assert not [r for r in hub.requests_for("/config.json") if r[0] == "GET"]  # verified before: kept


def test_offline_mode_says_how_to_download(hub, stories_repo, model_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        download_model(resolve_model("llama2-base"), DownloadOptions(model_dir))
    assert _untouched(model_dir)


@pytest.mark.parametrize(
    "files, expected",
    [
        # Safetensors win over .bin and Meta's consolidated files; tokenizer files come along.
        (["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "model.safetensors.index.json", "pytorch_model.bin", "original/consolidated.00.pth", "original/params.json",
          "tokenizer.model", "tokenizer.json", "README.md"],
         ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "model.safetensors.index.json", "tokenizer.json", "tokenizer.model"]),
        (["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
          "pytorch_model.bin.index.json", "tokenizer.model"],
         ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
          "pytorch_model.bin.index.json", "tokenizer.model"]),
        (["original/consolidated.00.pth", "original/consolidated.01.pth", "original/params.json", "tokenizer.model"],
         ["original/consolidated.00.pth", "original/consolidated.01.pth", "original/params.json", "tokenizer.model"]),
    ],
)
def test_choose_files_prefers_safetensors(files, expected):
    assert choose_files(files, "tokenizer.model", "org/repo") == expected


def test_choose_files_refuses_repo_without_loadable_weights():
    with pytest.raises(DownloadError, match="no weights torchchat can load"):
        choose_files(["config.json", "model.gguf", "tokenizer.model"], "tokenizer.model", "org/repo")
    with pytest.raises(DownloadError, match="has no original/tokenizer.model"):
        choose_files(["config.json", "model.safetensors"], "original/tokenizer.model", "org/repo")


@pytest.fixture
def stories_files_gated(hub, stories_hf_files) -> Repo:
    """The converted stories260K as the gated meta-llama/Llama-3.2-1B-Instruct (tokenizer under original/)."""
    files = dict(stories_hf_files)
    files["original/tokenizer.model"] = files.pop("tokenizer.model")
    repo = Repo(files=files, lfs={"model.safetensors", "original/tokenizer.model"}, gated=True)
    hub.repos["meta-llama/Llama-3.2-1B-Instruct"] = repo
    return repo
