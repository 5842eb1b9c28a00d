"""How chat, generate and server open: the build spec's notes said, compile options and the draft's
spec checked before anything loads, then the model built, its chat format chosen, an engine made
(with the draft attached). Each command keeps only what is its own (prompt, slots, the loop)."""
from __future__ import annotations

import argparse

from torchchat.cli import args as cli_args


class Opening:
    """One command's start. `notes`: what `build_spec` had to say (settings overridden); `speculative`:
    the command takes the draft-model flags."""

    def __init__(self, args: argparse.Namespace, spec, notes: list[str], *, streams_text: bool,
                 speculative: bool = True):
        self.args, self.spec, self._notes = args, spec, notes
        self.notices = cli_args.Notices(streams_text=streams_text)
        self.compile = cli_args.compile_options(args, self.notices)
        self.draft = cli_args.draft_spec(args, spec) if speculative else None
        self.built = None  # torchchat.build.BuiltModel, once `build` ran

    def build(self):
        """The model (notes first: settings overridden, then what the build says)."""
        self.notices.say(*self._notes)
        self.built = cli_args.build(self.spec, self.notices)
        return self.built

    def chat_format(self):
        """The model's chat format (a ChatSetup) per --chat-template (None or auto: the model's own);
        its notices are said."""
        from torchchat.generation.chat_format import resolve_chat_format

        template = self.args.chat_template
        override = None if template in (None, "auto") else template
        built = self.built
        setup = resolve_chat_format(built.tokenizer, override, built.chat_template, built.is_chat)
        self.notices.say(*setup.notices)
        return setup

    def engine(self, max_seq_len: int, slots: int = 1):
        """An Engine of `max_seq_len` positions and `slots` sequences at once (more than one: batched
        samples), the draft model (if any) built and attached."""
        from torchchat.generation.engine import make_engine

        engine = make_engine(self.built, self.compile, max_seq_len=max_seq_len,
                             parallel_prefill=not self.args.sequential_prefill, slots=slots)
        if self.draft is not None:
            engine.attach_draft(cli_args.build(self.draft, self.notices).runtime, self.args.speculate_k)
        return engine
