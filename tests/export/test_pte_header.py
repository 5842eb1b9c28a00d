"""A .pte's extended header (program size, segment offsets) is checked against the file before the
native runtime reads through it. Crafted headers: no ExecuTorch needed."""
import pytest

from torchchat.errors import ExportError
from torchchat.runtime.executorch import check_pte


def _pte(program_size: int, base: int, segments: int, root: int = 60, length: int = 32, total: int | None = None) -> bytes:
    head = (root.to_bytes(4, "little") + b"ET12" + b"eh00" + length.to_bytes(4, "little")
            + program_size.to_bytes(8, "little") + base.to_bytes(8, "little") + segments.to_bytes(8, "little"))
    total = total if total is not None else (base + segments if base else program_size)
    return head + bytes(total - len(head))


@pytest.mark.parametrize("data, ok", [
    (_pte(400, 512, 100), True),
    (_pte(400, 0, 0), True),
    (_pte(400, 512, 100, total=600), False),  # truncated segments
    (_pte(400, 512, 100, total=700), False),  # bytes beyond the last segment
    (_pte(4000, 0, 0, total=400), False),  # program larger than the file
    (_pte(400, 300, 212), False),  # segments overlap the program
    (_pte(400, 512, 100, root=900), False),
    (_pte(400, 512, 100, length=9999), False),
    (b"\0\0\0\0ET12" + bytes(10), False),
])
def test_header_must_describe_the_file(tmp_path, data, ok):
    path = tmp_path / "m.pte"
    path.write_bytes(data)
    if ok:
        check_pte(path, "--pte-path")
    else:
        with pytest.raises(ExportError, match="damaged or truncated"):
            check_pte(path, "--pte-path")
