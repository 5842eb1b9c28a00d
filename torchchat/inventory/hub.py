"""Hugging Face Hub repositories, through huggingface_hub (its progress bars, resumable transfers,
HF_ENDPOINT, and the token from --hf-token, HF_TOKEN or `hf auth login`).

One listing call gives the repository's files with their sizes and checksums; only the files torchchat
reads are fetched (safetensors preferred over `.bin`, either over Meta's `original/consolidated.*.pth`,
plus config and tokenizer files), into the staging folder; then each is checked against the listing:
size, and sha256 for LFS files or the git blob sha1 for the others."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from torchchat.errors import DownloadError

_CONFIG_FILES = ("config.json", "generation_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
_BIN_RE = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin$")
_CONSOLIDATED_RE = re.compile(r"original/consolidated\.\d+\.pth$")
_CHUNK = 8 << 20


@dataclass(frozen=True)
class RemoteFile:
    path: str  # inside the repository, "/"-separated
    size: int | None
    sha256: str | None = None  # LFS files
    git_sha1: str | None = None  # files stored in git itself (the blob id)


def choose_files(available: list[str], tokenizer_file: str, repo: str) -> list[str]:
    """The files of a repository torchchat needs: one weight format (safetensors, else pytorch_model*.bin,
    else Meta's original/consolidated.*.pth with params.json), config.json, and the tokenizer files."""
    names = set(available)
    top = [p for p in available if "/" not in p]
    safetensors = [p for p in top if p.endswith(".safetensors")]
    bins = [p for p in top if _BIN_RE.match(p)]
    consolidated = [p for p in available if _CONSOLIDATED_RE.match(p)]
    if safetensors and "config.json" in names:
        weights = safetensors + [p for p in ("model.safetensors.index.json",) if p in names]
    elif bins and "config.json" in names:
        weights = bins + [p for p in ("pytorch_model.bin.index.json",) if p in names]
    elif consolidated and "original/params.json" in names:
        weights = consolidated + ["original/params.json"]
    else:
        raise DownloadError(
            f"{repo} holds no weights torchchat can load (config.json with *.safetensors or pytorch_model*.bin, or "
            "original/consolidated.*.pth with params.json)"
        )
    if tokenizer_file not in names:
        raise DownloadError(f"{repo} has no {tokenizer_file}, the tokenizer models.json names for it")
    extras = [p for p in (*_CONFIG_FILES, *_TOKENIZER_FILES, tokenizer_file) if p in names]
    return sorted(set(weights + extras))


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path, progress) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            progress.update(len(chunk))
    return h.hexdigest()


def verify(folder: Path, files: list[RemoteFile]) -> None:
    """Check each file's size and checksum against the hub's listing. A file that fails is deleted (so the
    next download fetches it again) and DownloadError names it."""
    from tqdm.auto import tqdm

    bad = []
    total = sum(f.size or 0 for f in files if f.sha256)
    with tqdm(total=total, unit="B", unit_scale=True, desc="Verifying checksums", disable=None) as bar:
        for f in files:
            local = folder / f.path
            if not local.is_file():
                bad.append(f"{f.path} (missing)")
                continue
            size = local.stat().st_size
            if f.size is not None and size != f.size:
                bad.append(f"{f.path} ({size} bytes, expected {f.size})")
            elif f.sha256 and _sha256(local, bar) != f.sha256:
                bad.append(f"{f.path} (sha256 differs from the hub's)")
            elif f.git_sha1 and not f.sha256 and _git_blob_sha1(local) != f.git_sha1:
                bad.append(f"{f.path} (git checksum differs from the hub's)")
            else:
                continue
            local.unlink(missing_ok=True)
    if bad:
        raise DownloadError(f"corrupted download: {', '.join(bad)}; the bad files were deleted, run download again")


def _explain(e: Exception, repo: str, endpoint: str) -> str:
    """One line saying why the hub refused or failed, and what to do."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    page = f"{endpoint}/{repo}"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError):
        if status == 403:
            return (
                f"your Hugging Face token has no access to the gated model {repo} (403): accept its licence at "
                f"{page} and wait for approval, or use a token of an account that has access"
            )
        return (
            f"{repo} is gated and needs a Hugging Face login ({status}): accept its licence at {page}, then run "
            "`hf auth login` (or pass --hf-token, or set HF_TOKEN)"
        )
    if isinstance(e, RepositoryNotFoundError):
        return (
            f"{repo} was not found at {endpoint}, or it is private ({status}): check the name, and log in with "
            "`hf auth login` (or pass --hf-token) if it is yours"
        )
    if isinstance(e, HfHubHTTPError) and status == 401:
        return "the Hugging Face token was rejected (401): run `hf auth login` again or pass a valid --hf-token"
    if isinstance(e, HfHubHTTPError) and status == 403:
        return f"access to {repo} was refused (403): check that your token may read it ({page})"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"downloading {repo} from {endpoint} failed: {first}"


def list_repo(repo: str, token: str | None) -> tuple[str, list[RemoteFile]]:
    """(commit sha, files with sizes and checksums) of a repository's default branch."""
    from huggingface_hub import HfApi

    info = HfApi(token=token).model_info(repo, files_metadata=True)
    files = [
        RemoteFile(
            path=s.rfilename,
            size=s.lfs.size if s.lfs else s.size,
            sha256=s.lfs.sha256 if s.lfs else None,
            git_sha1=None if s.lfs else s.blob_id,
        )
        for s in info.siblings or []
    ]
    return info.sha, files


def download_repo(repo: str, tokenizer_file: str, staging: Path, token: str | None) -> None:
    """Fetch and verify the files torchchat needs from `repo` into `staging` (HF layout). Raises
    DownloadError, with what to do, on refusal, network failure or a corrupted file."""
    import httpx2
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    endpoint = constants.ENDPOINT
    try:
        revision, remote = list_repo(repo, token)
        wanted = choose_files([f.path for f in remote], tokenizer_file, repo)
        # Exact names: fnmatch treats [ ] * ? as patterns; repository file names never contain them.
        snapshot_download(
            repo, revision=revision, local_dir=staging, cache_dir=staging / ".cache" / "hub",
            allow_patterns=wanted, token=token,
        )
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        if constants.is_offline_mode():
            raise DownloadError("HF_HUB_OFFLINE is set, so nothing can be downloaded: unset it and try again") from e
        raise DownloadError(_explain(e, repo, endpoint)) from e
    except (httpx2.ConnectError, httpx2.TimeoutException) as e:
        raise DownloadError(f"cannot reach {endpoint} ({e}); check the network connection or HF_ENDPOINT") from e
    except httpx2.TransportError as e:  # the connection dropped mid-transfer, after huggingface_hub's retries
        raise DownloadError(f"the transfer from {endpoint} was interrupted ({e})") from e
    except (HfHubHTTPError, httpx2.HTTPError) as e:
        raise DownloadError(_explain(e, repo, endpoint)) from e
    except OSError as e:  # huggingface_hub's size consistency check after its own retries
        raise DownloadError(f"the transfer of {repo} was cut short ({str(e).splitlines()[0]})") from e
    verify(staging, [f for f in remote if f.path in set(wanted)])
