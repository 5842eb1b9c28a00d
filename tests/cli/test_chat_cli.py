"""`torchchat.py chat` driven as a user drives it: through stdin, and through a pseudo-terminal."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from tests.cli.helpers import ROOT, run_cli


@pytest.fixture(autouse=True)
def _history_in_tmp(tmp_path, monkeypatch):
    """Chats on a terminal keep their history; the tests' goes to a temporary file, not the user's."""
    monkeypatch.setenv("TORCHCHAT_CHAT_HISTORY", str(tmp_path / "chat_history"))


def _stories(folder) -> list[str]:
    return ["--checkpoint-path", str(folder / "stories260K.bin"), "--tokenizer-path", str(folder / "tok512.model"),
            "--device", "cpu", "--dtype", "fp32", "--temperature", "0"]


def _chat(folder, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("chat", *_stories(folder), *extra, input=stdin)


def _replies(stdout: str) -> list[str]:
    return [line.split("Model: ", 1)[1] for line in stdout.splitlines() if "Model: " in line]


def _expected_replies(folder, turns, max_new_tokens, system=None, template="none"):
    """The same conversation through the library: what the CLI must print."""
    from tests.generation.runtimes import stories_runtime
    from torchchat.generation.chat_format import make_format
    from torchchat.generation.chat_session import ChatSession
    from torchchat.generation.engine import Engine, GenerationConfig
    from torchchat.generation.sampling import SamplingParams
    from torchchat.generation.steps import Steps
    from torchchat.tokenizer.load import load_tokenizer

    tok = load_tokenizer(folder / "tok512.model")
    runtime = stories_runtime(folder)
    engine = Engine(runtime, tok, Steps(runtime.forward, runtime.device), 512)
    session = ChatSession(engine, make_format(template, tok), system)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=0.0))
    out = []
    for text in turns:
        session.add_user(text, cfg)
        out.append("".join(r.text for r in session.reply(cfg)))
    return out


def test_two_turns_then_bye_with_a_draft(stories260k_dir):
    turns = ["Once upon a time", "The dog was happy"]
    draft = str(stories260k_dir / "stories260K.bin")
    result = _chat(stories260k_dir, "\n".join(turns) + "\n/bye\nnever read\n", "--max-new-tokens", "30",
                   "--draft-checkpoint-path", draft, "--speculate-k", "3", "--stats")
    assert result.returncode == 0, result.stderr
    assert "not known to be tuned for chat" in result.stderr  # a base model, said so
    assert "Traceback" not in result.stderr
    assert result.stdout.count("User: ") == 3 and result.stdout.rstrip().endswith("Exiting chat.")
    # Greedy speculative replies are the model's own (computed here without a draft).
    assert _replies(result.stdout) == _expected_replies(stories260k_dir, turns, 30)
    stats = [line for line in result.stderr.splitlines() if line.startswith("[30 tokens")]
    assert len(stats) == 2 and all("draft acceptance" in line and "k=3" in line for line in stats)
    assert "+ 0 reused" in stats[0] and "+ 0 reused" not in stats[1]  # turn 2 reused turn 1's cache


def test_llama2_template_and_system_prompt(stories260k_dir):
    turns = ["Tell me a story.", "And then?"]
    result = _chat(stories260k_dir, "\n".join(turns) + "\n/bye\n", "--max-new-tokens", "20",
                   "--chat-template", "llama2", "--system-prompt", "You tell stories.")
    assert result.returncode == 0, result.stderr
    assert "chat template: llama2" in result.stdout
    assert _replies(result.stdout) == _expected_replies(stories260k_dir, turns, 20, "You tell stories.", "llama2")
    for stop_text in ("</s>", "<s>", "[INST]"):
        assert all(stop_text not in reply for reply in _replies(result.stdout))


def test_overlong_message_then_full_context_then_eof(stories260k_dir):
    stdin = "word " * 120 + "\n" + "\n".join(f"Turn {i}: the cat sat." for i in range(5)) + "\n"  # no /bye: EOF
    result = _chat(stories260k_dir, stdin, "--max-seq-length", "96", "--max-new-tokens", "30")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert "context holds 96; shorten it" in out  # the over-long message was refused, the chat went on
    assert "[The context is full: starting a fresh one" in out
    assert len(_replies(out)) == 5 and out.rstrip().endswith("Exiting chat.")


def test_wrong_template_is_one_line_error(stories260k_dir):
    result = _chat(stories260k_dir, "", "--chat-template", "llama3")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: the llama3 chat template needs a Llama 3 tokenizer")
    assert "Traceback" not in result.stderr


class Terminal:
    """The chat command on a pseudo-terminal: what a user at a keyboard sees and types."""

    def __init__(self, argv):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: run the command with the pty as its controlling terminal
            # As a shell starts a foreground command: SIGINT at its default. A test run launched in
            # the background of a non-interactive shell inherits SIGINT ignored, which exec keeps and
            # Python then leaves alone (no KeyboardInterrupt), so every Ctrl-C below would be lost.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.chdir(ROOT)
            os.execv(argv[0], argv)
        self.seen = ""
        self.cursor = 0  # expect() looks for text after the previous match

    def expect(self, text: str, timeout=120.0) -> str:
        """Wait until `text` appears after the previous match; returns what was seen up to its end."""
        deadline = time.monotonic() + timeout
        while text not in self.seen[self.cursor :]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {text!r}; saw:\n{self.seen}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the command ended before {text!r}; saw:\n{self.seen}")
                self.seen += chunk.decode("utf-8", "replace")
        start = self.cursor
        self.cursor = self.seen.index(text, start) + len(text)
        return self.seen[start : self.cursor]

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout=30.0, kill=True) -> int:
        """The command's exit code. Past `timeout`: kill it and fail, or (kill=False) raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if ready:
                    self.seen += os.read(self.fd, 4096).decode("utf-8", "replace")
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        if not kill:
            raise TimeoutError
        os.kill(self.pid, 9)
        raise AssertionError(f"the command did not exit; saw:\n{self.seen}")


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_terminal_session_system_prompt_ctrl_c_ctrl_d(stories260k_dir):
    term = Terminal([sys.executable, str(ROOT / "torchchat.py"), "chat", *_stories(stories260k_dir),
                     "--max-new-tokens", "480"])
    term.expect("System prompt (Enter for none): ")  # asked for, since no --system-prompt was given
    term.send(b"You tell stories.\r")
    term.expect("User: ")
    for text in (b"Once upon a time\r", b"The end\r"):
        term.send(text)
        term.expect("Model: ")
        term.send(b"\x03")  # Ctrl-C during a reply stops that reply; the chat goes on
        term.expect("[interrupted]")
        term.expect("User: ")
    term.send(b"\x04")  # Ctrl-D at the prompt: leave cleanly
    assert term.wait() == 0
    assert term.seen.rstrip().endswith("Exiting chat.") and "Traceback" not in term.seen

    term = Terminal([sys.executable, str(ROOT / "torchchat.py"), "chat", *_stories(stories260k_dir),
                     "--system-prompt", ""])
    term.expect("User: ")
    # Ctrl-C at the prompt: leave cleanly too. CPython's readline prints the prompt, then blocks in select()
    # on stdin without a timeout: a SIGINT landing between the two is noted but not acted on until the next
    # wake-up (measured: 3 of 6 immediate Ctrl-Cs here). A user presses again; so does the test.
    for _ in range(10):
        term.send(b"\x03")
        try:
            code = term.wait(timeout=3.0, kill=False)
            break
        except TimeoutError:
            continue
    else:
        raise AssertionError(f"ten Ctrl-Cs at the prompt did not end the chat; saw:\n{term.seen}")
    assert code == 0
    assert term.seen.rstrip().endswith("Exiting chat.") and "Traceback" not in term.seen


def _history_lines(path) -> list[str]:
    # libedit writes a header line; GNU readline writes the lines alone.
    return [line for line in path.read_text().splitlines() if line != "_HiStOrY_V2_"]


def _next_reply(term) -> str:
    term.expect("Model: ")
    return term.expect("User: ").removesuffix("User: ").replace("\r\n", "\n").strip()


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_terminal_line_editing_and_history(stories260k_dir, tmp_path):
    pytest.importorskip("readline", reason="this Python has no readline module: chat falls back to input()")
    history = tmp_path / "chat_history"
    history.write_text("The dog was happy\n")  # an earlier session's line
    turns = ["Once upon a time", "The dog was happy"]
    want = _expected_replies(stories260k_dir, turns, 12)
    term = Terminal([sys.executable, str(ROOT / "torchchat.py"), "chat", *_stories(stories260k_dir),
                     "--system-prompt", "", "--max-new-tokens", "12"])
    term.expect("User: ")
    term.send(b"Once upon a tme")
    term.send(b"\x1b[D\x1b[D")  # left arrow twice: the cursor moves back before "me" (not "^[[D" typed)
    term.send(b"i\r")
    assert _next_reply(term) == want[0].strip()  # the model got the edited line
    term.send(b"\x12dog")  # Ctrl-R: reverse search finds the earlier session's line
    term.send(b"\r")
    assert _next_reply(term) == want[1].strip()
    term.send(b"/bye\r")
    assert term.wait() == 0
    assert _history_lines(history) == ["The dog was happy", *turns, "/bye"]


def test_line_input_without_readline_is_plain_input(monkeypatch, tmp_path):
    """Where Python has no readline module, chat reads lines with input() and keeps no history file."""
    import io

    from torchchat.cli import line_input

    monkeypatch.setitem(sys.modules, "readline", None)  # import readline -> ImportError
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    with line_input.LineInput(tmp_path / "h") as lines:
        assert lines.readline is None
        assert lines.read("User: ") == "hello"
    assert not (tmp_path / "h").exists()


def test_generate_with_a_chat_template_formats_one_turn_and_says_base_model(stories260k_dir):
    from dataclasses import replace

    from tests.generation.runtimes import stories_runtime
    from torchchat.generation.chat_format import Message, make_format
    from torchchat.generation.engine import Engine, GenerationConfig
    from torchchat.generation.sampling import SamplingParams
    from torchchat.generation.steps import Steps
    from torchchat.tokenizer.load import load_tokenizer

    result = run_cli("generate", *_stories(stories260k_dir), "--chat-template", "llama2", "--system-prompt",
                     "You tell stories.", "--prompt", "Tell me a story.", "--max-new-tokens", "25")
    assert result.returncode == 0, result.stderr
    assert "not known to be tuned for chat" in result.stderr

    tok = load_tokenizer(stories260k_dir / "tok512.model")
    fmt = make_format("llama2", tok)
    ids = fmt.encode(tok, [Message("system", "You tell stories."), Message("user", "Tell me a story.")])
    runtime = stories_runtime(stories260k_dir)
    engine = Engine(runtime, tok, Steps(runtime.forward, runtime.device), 512)
    cfg = GenerationConfig(max_new_tokens=25, sampling=SamplingParams(temperature=0.0))
    reply = "".join(r.text for r in engine.stream(ids, replace(cfg, stop_ids=fmt.stop_ids(tok))))
    assert result.stdout == "Tell me a story." + reply + "\n"
