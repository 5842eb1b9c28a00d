"""A `.pt2` from someone else must not run code through a pickle: torch's package reader unpickles a
torch.export program's weights, constants and sample inputs with `weights_only=False` before it looks
at the compiled model. These archives are crafted here (no compiler needed, so the tests are fast)."""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from torchchat.errors import ExportError
from torchchat.runtime.aoti_archive import check_package

from tests.export.test_export_cli_errors import _one_error_line
from torchchat.cli import main

MARKERS = {"archive_format": b"pt2", "archive_version": b"0", "byteorder": b"little", ".data/version": b"6\n"}
FAKE_SO = "data/aotinductor/model/abc.wrapper.so"


class _Payload:
    """Unpickling this creates `marker`: harmless, but code the file's author chose."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious_export_program(marker: Path) -> dict[str, bytes]:
    """The members of torch.export.save(ep) for a one-parameter module, with the weight replaced by a
    pickle that torch's reader loads with weights_only=False."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.w

    buf = io.BytesIO()
    torch.export.save(torch.export.export(M(), (torch.ones(2),)), buf)
    with zipfile.ZipFile(buf) as zf:
        members = {"/".join(n.split("/")[1:]): zf.read(n) for n in zf.namelist()}
    config = members["data/weights/model_weights_config.json"].replace(b'"use_pickle": false', b'"use_pickle": true')
    members["data/weights/model_weights_config.json"] = config
    members["data/weights/weight_0"] = pickle.dumps(_Payload(marker), protocol=2)
    return members


def _archive(path: Path, members: dict[str, bytes], root: str = "pkg") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(f"{root}/{name}", data)
    return path


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "pwned"
    members = {**MARKERS, FAKE_SO: b"\x7fELF" + bytes(64), **_malicious_export_program(marker)}
    return _archive(tmp_path / "evil.pt2", members), marker


def test_torch_reader_would_run_the_pickle(crafted, tmp_path, monkeypatch):
    """The crafted file is a real attack: torch's own loader runs the payload (then fails)."""
    import torch._inductor

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where torch's loader leaves its extraction folder
    path, marker = crafted
    with pytest.raises(Exception):
        torch._inductor.aoti_load_package(str(path))
    assert marker.exists()


def test_generate_refuses_it_without_running_it(crafted, stories260k_dir, capsys):
    path, marker = crafted
    code = main(["generate", "--aoti-package-path", str(path), "--tokenizer-path",
                 str(stories260k_dir / "tok512.model"), "--prompt", "hi", "--max-new-tokens", "2"])
    line = _one_error_line(capsys)
    assert code != 0 and "refusing" in line and "pickle" in line, line
    assert not marker.exists()


@pytest.mark.parametrize("member, data, why", [
    ("data/aotinductor/model/weights.pt", b"x", "pickle file"),
    ("data/aotinductor/model/blob", pickle.dumps([1, 2], protocol=2), "is a pickle"),
    ("data/aotinductor/model/blob", b"PK\x03\x04torch.save", "is a pickle"),
    ("data/sample_inputs/model.pt", b"PK\x03\x04", "not part of an AOT Inductor package"),
    ("data/constants/model_constants_config.json", b"{}", "not part of an AOT Inductor package"),
    ("extra/x", b"x", "not part of an AOT Inductor package"),
    ("../../escape", b"x", "outside the package"),
])
def test_members_other_than_the_compiled_model_are_refused(tmp_path, member, data, why):
    path = _archive(tmp_path / "m.pt2", {**MARKERS, FAKE_SO: b"\x7fELF", member: data})
    with pytest.raises(ExportError, match=why):
        check_package(path, "--aoti-package-path")


def test_compiled_model_members_pass(tmp_path):
    members = {**MARKERS, FAKE_SO: b"\x7fELF", "data/aotinductor/model/abc.wrapper.cpp": b"//",
               "data/aotinductor/model/abc_metadata.json": b"{}", ".data/serialization_id": b"1"}
    assert check_package(_archive(tmp_path / "m.pt2", members), "--aoti-package-path") == "pkg"


def test_crc_mismatch_is_refused(tmp_path):
    path = _archive(tmp_path / "m.pt2", {**MARKERS, FAKE_SO: b"\x7fELF" + b"A" * 4000})
    data = bytearray(path.read_bytes())
    at = data.index(b"A" * 100)
    data[at] ^= 0xFF  # stored (uncompressed) member: the byte changes, the CRC in the header does not
    path.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="damaged"):
        check_package(path, "--aoti-package-path")


def test_failed_load_leaves_no_extraction_folder(tmp_path, monkeypatch):
    """The native loader extracts to $TMPDIR/aotinductor_*; a library that does not load must not
    leave that folder behind."""
    import tempfile

    from torchchat.runtime.aoti_archive import load_package

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    path = _archive(tmp_path / "m.pt2", {**MARKERS, FAKE_SO: b"\x7fELF" + bytes(64)})
    with pytest.raises(ExportError, match="could not be loaded"):
        load_package(path, "--aoti-package-path")
    assert not list(tmp_path.glob("aotinductor_*"))
