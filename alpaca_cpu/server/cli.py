"""`alpaca-server`: serve a model over an OpenAI-compatible HTTP API.

    alpaca-server                                   # the default model, 127.0.0.1:8080
    alpaca-server -m model.gguf --parallel 8 --api-key KEY

Concurrent requests are decoded together, one batch per step (`--parallel` slots).
Ctrl-C or SIGTERM drains: no new requests, running ones get a few seconds, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from ..cli.chat import UserError, _int_at_least, _version, resolve_model

PROG = "alpaca-server"
DRAIN_SECONDS = 5  # running requests get this long to finish after Ctrl-C / SIGTERM


def build_parser() -> argparse.ArgumentParser:
    from ..chat_format import BUILTIN_FORMATS

    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve a LLaMA-family GGUF model over an OpenAI-compatible HTTP API "
                    "(/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, "
                    "/health, /metrics). With no -m, serves SmolLM2-135M-Instruct, fetched "
                    "once into the user cache.")
    p.add_argument("-m", "--model", metavar="PATH", help="GGUF model file (default: SmolLM2)")
    p.add_argument("--model-dir", metavar="DIR", help="where the default model is cached")
    p.add_argument("--alias", metavar="NAME",
                   help="the model id clients name (default: the file name without .gguf)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface; use --api-key then)")
    p.add_argument("--port", type=_int_at_least(0), default=8080)
    p.add_argument("-c", "--ctx-size", type=_int_at_least(0), default=4096, metavar="N",
                   help="context per slot in tokens; 0 = the model's training context")
    p.add_argument("--parallel", type=_int_at_least(1), default=4, metavar="N",
                   help="requests decoded together (KV cache slots of -c tokens each)")
    p.add_argument("-b", "--batch-size", type=_int_at_least(1), default=256, metavar="N",
                   help="tokens per engine step: every running stream's next token, then "
                        "chunks of prompts being prefilled")
    p.add_argument("-t", "--threads", type=_int_at_least(1), default=None, metavar="N",
                   help="threads (default: one per physical core)")
    p.add_argument("--chat-format", choices=BUILTIN_FORMATS, default=None,
                   help="a built-in chat format instead of the model file's template")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("ALPACA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $ALPACA_API_KEY; none)")
    p.add_argument("--max-queue", type=_int_at_least(0), default=64, metavar="N",
                   help="requests waiting for a slot; beyond, 503 with Retry-After")
    p.add_argument("--max-tokens-limit", type=_int_at_least(1), default=32768, metavar="N",
                   help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=_int_at_least(1), default=1 << 20, metavar="N",
                   help="largest request body (413 beyond)")
    p.add_argument("--no-webui", dest="webui", action="store_false",
                   help="do not serve the chat page at / (the API only)")
    p.add_argument("--verbose", action="store_true", help="log more (uvicorn's own log too)")
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    return p


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..gguf_file import open_model_file
    from ..llama import Llama
    from .app import ServerSettings, create_app

    path = resolve_model(args)
    n_ctx = args.ctx_size or open_model_file(path).config.context_length
    llama = Llama(path, n_ctx=n_ctx, n_threads=args.threads, chat_format=args.chat_format,
                  n_seq_max=args.parallel)
    settings = ServerSettings(model_id=args.alias or Path(path).name.removesuffix(".gguf"),
                              api_key=args.api_key or None, max_queue=args.max_queue,
                              max_tokens_limit=args.max_tokens_limit,
                              max_body_bytes=args.max_body_bytes, n_batch=args.batch_size,
                              webui=args.webui)
    app = create_app(llama, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False,
                            log_level="info" if args.verbose else "warning",
                            timeout_graceful_shutdown=DRAIN_SECONDS)
    server = uvicorn.Server(config)
    print(f"{PROG}: serving {settings.model_id} on http://{args.host}:{args.port} "
          f"({args.parallel} slots of {n_ctx} tokens, {llama.model.n_threads} threads, "
          f"{llama.model.isa}){'; API key required' if settings.api_key else ''}"
          f"{'' if args.webui else '; no chat page (--no-webui)'}",
          file=sys.stderr, flush=True)
    # uvicorn handles SIGINT / SIGTERM while it runs (stop accepting, drain, shut down) and
    # raises them again afterwards for the handlers it found: these, so the exit status is 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    print(f"{PROG}: stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # incl. a model file refused, not enough memory
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while loading
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
