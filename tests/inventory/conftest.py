"""Local stand-ins for the Hugging Face Hub and for a plain file host, on 127.0.0.1, so that the real
huggingface_hub client and torchchat's HTTP downloader run against them.

The hub side answers what huggingface_hub 2.4 asks for in `model_info(files_metadata=True)` and
`snapshot_download`: GET /api/models/<repo>[/revision/<rev>] (siblings with sizes, blob ids and LFS
sha256), GET /api/models/<repo>/tree/<rev>, and HEAD/GET /<repo>/resolve/<rev>/<file> with X-Repo-Commit,
ETag / X-Linked-Etag / X-Linked-Size and Range support. Gated repositories answer 401 without a token
and 403 with a token that has no access, with the X-Error-Code header the real hub sends. Files can be
served corrupted (bytes differ from the listed checksum) or cut off (the connection drops after N bytes).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.conftest import shared_path

COMMIT = "a" * 40


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Cut:
    at: int  # bytes of the file served before the connection drops
    times: int  # how many more requests are cut (then the file is served whole)


@dataclass
class Served:
    """How the servers treat one file: flip a byte (corrupt) and/or drop the connection (cut)."""

    corrupt: bool = False
    cut: Cut | None = None
    range_reply: str | None = None  # None: honour Range; "ignore": 200 with the whole file;
    # "from-zero": 206 whose body (and Content-Range) start at byte 0, as a broken mirror answers


@dataclass
class Repo:
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)  # paths stored with LFS (sha256 ETag)
    gated: bool = False


@dataclass
class Hub:
    url: str
    repos: dict[str, Repo] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # plain files by URL path
    redirect: set[str] = field(default_factory=set)  # plain-file paths answered by a 302 carrying X-Linked-Etag
    served: dict[str, Served] = field(default_factory=dict)  # by repo file path or plain-file URL path
    tokens: set[str] = field(default_factory=set)  # tokens with access to gated repositories
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range header)

    def requests_for(self, suffix: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.log if r[1].endswith(suffix)]


def _siblings(repo: Repo) -> list[dict]:
    out = []
    for path, data in repo.files.items():
        item = {"rfilename": path, "size": len(data), "blobId": git_sha1(data)}
        if path in repo.lfs:
            item["lfs"] = {"size": len(data), "sha256": sha256(data), "pointerSize": 134}
        out.append(item)
    return out


def _tree(repo: Repo) -> list[dict]:
    out = []
    for path, data in repo.files.items():
        item = {"type": "file", "path": path, "size": len(data), "oid": git_sha1(data)}
        if path in repo.lfs:
            item["lfs"] = {"oid": sha256(data), "size": len(data), "pointerSize": 134}
        out.append(item)
    return out


def _handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            self._route(body=False)

        def do_GET(self):
            self._route(body=True)

        def _send(self, code: int, headers: dict[str, str], payload: bytes = b"", body: bool = True):
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(payload) if body else 0))
            self.end_headers()
            if body and payload:
                self.wfile.write(payload)

        def _json(self, obj):
            self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode())

        def _error(self, code: int, error_code: str, message: str, body: bool):
            self._send(code, {"X-Error-Code": error_code, "X-Error-Message": message}, message.encode(), body)

        def _route(self, body: bool):
            path = self.path.split("?")[0]
            hub.log.append((self.command, path, self.headers.get("Range")))
            m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?$", path)
            if m and m.group(1) in hub.repos:
                repo = hub.repos[m.group(1)]
                return self._json({"id": m.group(1), "sha": COMMIT, "private": False,
                                   "gated": "manual" if repo.gated else False, "siblings": _siblings(repo)})
            m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/[^/]+$", path)
            if m and m.group(1) in hub.repos:
                return self._json(_tree(hub.repos[m.group(1)]))
            m = re.match(r"^/([^/]+/[^/]+)/resolve/[^/]+/(.+)$", path)
            if m and m.group(1) in hub.repos:
                return self._resolve(m.group(1), hub.repos[m.group(1)], m.group(2), body)
            if path in hub.files:
                return self._plain(path, body)
            self._error(404, "RepoNotFound", "Repository not found", body)

        def _resolve(self, name: str, repo: Repo, file: str, body: bool):
            if repo.gated:
                auth = self.headers.get("Authorization", "")
                if not auth.startswith("Bearer "):
                    return self._error(401, "GatedRepo", f"Access to model {name} is restricted. You must have access "
                                       "to it and be authenticated to access it. Please log in.", body)
                if auth[len("Bearer "):] not in hub.tokens:
                    return self._error(403, "GatedRepo", f"Access to model {name} is restricted and you are not in "
                                       f"the authorized list. Visit {hub.url}/{name} to ask for access.", body)
            if file not in repo.files:
                return self._error(404, "EntryNotFound", f"{file} does not exist", body)
            data = repo.files[file]
            headers = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes"}
            if file in repo.lfs:
                headers.update({"X-Linked-Etag": f'"{sha256(data)}"', "X-Linked-Size": str(len(data)),
                                "ETag": f'"{sha256(data)}"'})
            else:
                headers["ETag"] = f'"{git_sha1(data)}"'
            self._file(file, data, headers, body)

        def _plain(self, path: str, body: bool):
            data = hub.files[path]
            headers = {"Accept-Ranges": "bytes", "X-Linked-Etag": f'"{sha256(data)}"'}
            if path in hub.redirect and "cdn=1" not in self.path:
                # Like huggingface.co: a 302 carrying the checksum, to a URL that does not repeat it.
                return self._send(302, {"Location": path + "?cdn=1", **headers}, body=body)
            if "cdn=1" in self.path:
                headers.pop("X-Linked-Etag")
            self._file(path, data, headers, body)

        def _file(self, key: str, data: bytes, headers: dict[str, str], body: bool):
            served = hub.served.get(key, Served())
            if served.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            start = 0
            rng = self.headers.get("Range") if served.range_reply != "ignore" else None
            if rng:
                start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                if start >= len(data):
                    return self._send(416, {"Content-Range": f"bytes */{len(data)}"}, body=body)
                if served.range_reply == "from-zero":
                    start = 0
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            code = 206 if rng else 200
            headers["Content-Length"] = str(len(data) - start)
            cut = served.cut if body else None
            if cut is None or cut.times <= 0:
                return self._send(code, headers, data[start:], body)
            cut.times -= 1
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if start < cut.at:
                self.wfile.write(data[start : cut.at])
            self.wfile.flush()
            self.close_connection = True

    return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake hub; huggingface_hub and torchchat point at it for the test's duration (HF_ENDPOINT,
    online mode, no stored token)."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), None)
    state = Hub(url=f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _handler(state)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    # What HF_ENDPOINT sets when huggingface_hub is imported (the subprocess test sets the variable itself).
    monkeypatch.setattr(constants, "ENDPOINT", state.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", state.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def hf_layout(state_dict: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """Our (Meta-named, adjacent-pair RoPE) weights -> Hugging Face Llama names, with q/k permuted to HF's
    half-split layout as transformers' convert_llama_weights_to_hf does."""

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
        rows, cols = w.shape
        return w.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    out = {"model.embed_tokens.weight": state_dict["tok_embeddings.weight"], "model.norm.weight": state_dict["norm.weight"],
           "lm_head.weight": state_dict.get("output.weight", state_dict["tok_embeddings.weight"])}
    for key, value in state_dict.items():
        m = re.match(r"layers\.(\d+)\.(.+)\.weight$", key)
        if not m:
            continue
        if m.group(2) == "attention.wq":
            value = permute(value, n_heads)
        elif m.group(2) == "attention.wk":
            value = permute(value, n_kv_heads)
        out[f"model.layers.{m.group(1)}.{names[m.group(2)]}.weight"] = value
    return {k: v.contiguous().clone() for k, v in out.items()}


@pytest.fixture(scope="session")
def stories_hf_files() -> dict[str, bytes]:
    """stories260K converted to a Hugging Face Llama repository (config.json, model.safetensors,
    tokenizer.model), as file contents."""
    from safetensors.torch import save

    from torchchat.checkpoint.llama2c import load_llama2c

    config, state = load_llama2c(shared_path("models", "stories260K", "stories260K.bin"))
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.max_seq_len, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    return {
        "config.json": json.dumps(hf_config, indent=1).encode(),
        "model.safetensors": save(hf_layout(state, config.n_heads, config.n_kv_heads)),
        "tokenizer.model": shared_path("models", "stories260K", "tok512.model").read_bytes(),
        "README.md": b"stories260K in Hugging Face layout, for tests\n",
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    }


@pytest.fixture
def stories_repo(hub, stories_hf_files) -> Repo:
    """The converted stories260K served as the registry's meta-llama/Llama-2-7b-hf (its tokenizer file,
    tokenizer.model, is what the registry expects)."""
    repo = Repo(files=dict(stories_hf_files), lfs={"model.safetensors", "tokenizer.model"})
    hub.repos["meta-llama/Llama-2-7b-hf"] = repo
    return repo


@pytest.fixture
def tinyllamas(hub) -> dict[str, bytes]:
    """The stories260K direct-URL files (models.json points at huggingface.co, which HF_ENDPOINT mirrors)."""
    files = {
        "/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin":
            shared_path("models", "stories260K", "stories260K.bin").read_bytes(),
        "/karpathy/tinyllamas/resolve/main/stories260K/tok512.model":
            shared_path("models", "stories260K", "tok512.model").read_bytes(),
    }
    hub.files.update(files)
    return files


@pytest.fixture
def model_dir(tmp_path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path
