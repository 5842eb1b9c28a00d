"""`server`: serve the model over an OpenAI-compatible HTTP API (and the chat page at `/`)."""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from dataclasses import dataclass

from torchchat.cli import args as cli_args

# Without --max-seq-length the KV cache holds this many positions (or the model's own limit, if
# smaller): a Llama 3.1 model's 131072 would allocate tens of GB up front.
DEFAULT_CONTEXT = 8192

# Sequence slots without --max-concurrent. A decode step reads every weight once whatever the batch, so
# rows are nearly free while a step is bound by reading weights, and cost their arithmetic once it is
# bound by compute. Measured on the 2-core CPU at the stories15M shape (docs/performance.md): a step of 8
# rows costs 2.0x a step of one, 16 rows 2.4x. A 1B model needs ~2 GFLOP per token, so 16 rows on two
# AVX2 cores take longer in arithmetic than reading the weights does: 8 keeps a step of a real model
# within about twice a single step (each client still gets half its solo speed) while multiplying
# throughput. A GPU has the arithmetic for 16 rows of a 7B model before a step costs more. Small models
# gain from more slots: --max-concurrent 16 served 16 stories15M clients at 5.6x one client's rate.
DEFAULT_SLOTS_CPU = 8
DEFAULT_SLOTS_CUDA = 16
# Without --max-concurrent, fewer slots when their KV caches (allocated up front) would take more than
# this: a Llama 3.1 8B bf16 slot of 8192 positions is 1 GiB, and the model itself needs the rest.
DEFAULT_KV_BUDGET_CPU = 4 << 30
DEFAULT_KV_BUDGET_CUDA = 16 << 30


def _most_slots(device_type: str) -> int:
    return DEFAULT_SLOTS_CUDA if device_type == "cuda" else DEFAULT_SLOTS_CPU


def default_slots(config, context: int, dtype, device_type: str) -> tuple[int, int]:
    """(slots, KV bytes per slot) without --max-concurrent: `_most_slots`, fewer where their KV caches
    would take more than the device's budget."""
    itemsize = dtype.itemsize if dtype is not None else 4
    per_slot = 2 * config.n_layers * config.n_kv_heads * config.head_dim * context * itemsize
    budget = DEFAULT_KV_BUDGET_CUDA if device_type == "cuda" else DEFAULT_KV_BUDGET_CPU
    return max(1, min(_most_slots(device_type), budget // max(per_slot, 1))), per_slot


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 5000  # 0: any free port (printed when ready)
    api_key: str | None = None
    open_browser: bool = False
    max_request_bytes: int = 8 << 20
    verbose: bool = False
    max_concurrent: int | None = None  # None: DEFAULT_SLOTS_CPU / DEFAULT_SLOTS_CUDA by device


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Everything `server` and `browser` share."""
    cli_args.add_model_source(p)
    cli_args.add_build(p)
    cli_args.add_compile(p)
    from torchchat.generation.chat_format import TEMPLATE_CHOICES

    g = p.add_argument_group("server")
    g.add_argument("--chat-template", choices=(*TEMPLATE_CHOICES, "auto"), default=None,
                   help="How chat messages become a prompt (default auto: the registry's template, else the "
                        "tokenizer's chat_template, else plain text turns)")
    g.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=5000, help="Port to listen on (0: any free port)")
    g.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                   help="Sequences generated together (continuous batching; each holds a KV-cache row of "
                        f"--max-seq-length positions). Default {DEFAULT_SLOTS_CPU} on CPU, {DEFAULT_SLOTS_CUDA} on CUDA")
    g.add_argument("--api-key", default=os.environ.get("TORCHCHAT_API_KEY"),
                   help="Require 'Authorization: Bearer KEY' on /v1 requests (default $TORCHCHAT_API_KEY)")
    g.add_argument("--max-request-bytes", type=int, default=8 << 20,
                   help="Largest request body accepted; larger ones are answered 413 (default 8 MiB)")
    cli_args.add_verbose(p)


def register(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    add_arguments(p)
    return p


def server_options(args: argparse.Namespace, open_browser: bool) -> ServerOptions:
    from torchchat.errors import UserInputError

    if not 0 <= args.port <= 65535:
        raise UserInputError(f"--port {args.port}: give a port in 0..65535 (0 picks a free one)")
    # Clients strip the key they send (and so does the check), so a key pasted with a newline or
    # spaces would never match: use it stripped.
    api_key = args.api_key.strip() if args.api_key is not None else None
    if api_key is not None and not api_key:
        raise UserInputError("--api-key is empty; give a key, or leave the flag out to accept every request")
    if args.max_request_bytes < 1024:
        raise UserInputError(f"--max-request-bytes {args.max_request_bytes}: give at least 1024")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UserInputError(f"--max-concurrent {args.max_concurrent}: give at least 1")
    return ServerOptions(host=args.host, port=args.port, api_key=api_key, open_browser=open_browser,
                         verbose=bool(args.verbose), max_request_bytes=args.max_request_bytes,
                         max_concurrent=args.max_concurrent)


def run(args: argparse.Namespace) -> int:
    return serve(args, server_options(args, open_browser=False))


def _require_dependencies() -> None:
    from torchchat.errors import MissingDependencyError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"the server needs fastapi and uvicorn ({e.name} is missing); install them with: "
            "pip install -e '.[server]'"
        ) from e


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails in a second, not after the load."""
    from torchchat.errors import UserInputError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        # create_server's own message repeats the address; the errno's text is enough.
        reason = e.strerror if isinstance(e, socket.gaierror) or not e.errno else os.strerror(e.errno)
        raise UserInputError(f"cannot listen on {host}:{port}: {reason}; pick another --port or --host") from e


def _url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(args: argparse.Namespace, options: ServerOptions) -> int:
    from torchchat.cli.opening import Opening

    _require_dependencies()
    notes: list[str] = []
    spec = cli_args.build_spec(args, notes)
    opening = Opening(args, spec, notes, streams_text=False, speculative=False)
    sock = _listen(options.host, options.port)
    try:
        return _serve_on(sock, args, opening, options)
    finally:
        sock.close()


def _serve_on(sock, args, opening, options: ServerOptions) -> int:
    import uvicorn

    from torchchat.generation.batch import make_batch_engine
    from torchchat.server import protocol
    from torchchat.server.app import create_app
    from torchchat.server.served import ServedModel, downloaded_models
    from torchchat.server.worker import ModelWorker

    built = opening.build()
    context = args.max_seq_length or min(built.config.max_seq_len, DEFAULT_CONTEXT)
    runtime = built.runtime
    slots = options.max_concurrent
    if slots is None:
        slots, per_slot = default_slots(built.config, context, built.dtype, runtime.device.type)
        if slots < _most_slots(runtime.device.type):
            print(f"{slots} concurrent sequences (each slot's KV cache takes {per_slot / 2**30:.1f} GiB at "
                  f"{context} positions); raise it with --max-concurrent or lower --max-seq-length",
                  file=sys.stderr)
    if slots > 1 and not getattr(runtime, "supports_batching", False):
        print(f"{type(runtime).__name__} runs one sequence at a time: serving requests one by one "
              "(--max-concurrent 1)", file=sys.stderr)
        slots = 1
    engine = make_batch_engine(built, opening.compile, max_batch=slots, max_seq_len=context,
                               parallel_prefill=not args.sequential_prefill)
    setup = opening.chat_format()
    served = ServedModel(
        id=built.name,
        tokenizer=built.tokenizer,
        chat_format=setup.format,
        chat_stop_ids=setup.format.stop_ids(built.tokenizer),
        context=engine.max_seq_len,
        fingerprint=protocol.system_fingerprint(built.name, str(opening.spec.dtype), str(engine.device),
                                                args.quantize or ""),
        aliases=built.entry.aliases if built.entry is not None else (),
    )
    url = _url(options.host, sock.getsockname()[1])

    def ready() -> None:
        where = "" if options.host in url else f" (listening on {options.host})"
        print(f"Serving {served.id} (context {served.context} tokens, {slots} concurrent): API at {url}/v1, chat page at {url}/{where}",
              file=sys.stderr, flush=True)
        if options.open_browser:
            threading.Thread(target=_open_browser, args=(url,), daemon=True).start()

    app = create_app(ModelWorker(engine, built.tokenizer), served, api_key=options.api_key,
                     other_models=lambda: downloaded_models(opening.spec.source.model_directory), on_ready=ready,
                     max_request_bytes=options.max_request_bytes)
    config = uvicorn.Config(app, log_level="info" if options.verbose else "warning", access_log=options.verbose,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def _open_browser(url: str) -> None:
    import webbrowser

    if not webbrowser.open(url + "/"):
        print(f"No web browser found: open {url}/ yourself", file=sys.stderr, flush=True)
