"""Reading chat lines from a terminal with line editing and history, as any REPL does.

Python's `readline` module (GNU readline or libedit), once imported, makes `input()` edit lines: arrow
keys, Home/End, Ctrl-R reverse search, Up/Down through earlier lines. It is imported only when stdin and
stdout are both terminals (piped input needs none of it, and readline may write terminal escapes to a
piped stdout), and where the module is missing (Windows, Pythons built without it) plain `input()` is used.
History is kept between sessions in a file under torchchat's folder in the home directory.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

HISTORY_LENGTH = 1000  # lines kept in the history file


def history_path() -> Path | None:
    """$TORCHCHAT_CHAT_HISTORY (empty: no history file), else ~/.torchchat/chat_history (beside the
    model cache)."""
    env = os.environ.get("TORCHCHAT_CHAT_HISTORY")
    if env is not None:
        return Path(env).expanduser() if env else None
    return Path.home() / ".torchchat" / "chat_history"


def _import_readline() -> ModuleType | None:
    try:
        import readline
    except ImportError:
        return None
    return readline


class LineInput:
    """`with LineInput(path) as lines: text = lines.read("User: ")`. Raises EOFError / KeyboardInterrupt as
    input() does. The history file is read on entry and written on exit; an unreadable or unwritable one
    costs the history, never the chat."""

    def __init__(self, history_file: Path | None):
        self.history_file = history_file
        self.readline: ModuleType | None = None

    def __enter__(self) -> "LineInput":
        if sys.stdin.isatty() and sys.stdout.isatty():
            self.readline = _import_readline()
        if self.readline is not None and self.history_file is not None:
            try:
                self.readline.read_history_file(str(self.history_file))
            except OSError:  # no history yet, or not readable: start an empty one
                pass
        return self

    def read(self, prompt: str) -> str:
        return input(prompt)

    def __exit__(self, *exc) -> None:
        if self.readline is None or self.history_file is None:
            return
        try:
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            self.readline.set_history_length(HISTORY_LENGTH)
            self.readline.write_history_file(str(self.history_file))
        except OSError as e:
            print(f"[chat history not saved to {self.history_file}: {e.strerror}]", file=sys.stderr)
