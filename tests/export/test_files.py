"""An export interrupted by SIGTERM leaves no hidden temporary folder beside its target."""
import signal
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = """
import sys, time
from pathlib import Path
from torchchat.export.files import written_in_place
with written_in_place(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_sigterm_mid_write_leaves_nothing(tmp_path):
    target = tmp_path / "model.pt2"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert any(p.name.startswith(".model.pt2.") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert list(tmp_path.iterdir()) == []
