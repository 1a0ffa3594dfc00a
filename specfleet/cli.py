"""The ``specfleet`` command: run a service, a whole local deployment, or a client."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from specfleet.config import DraftConfig, RouterConfig, TargetConfig, add_arguments, from_arguments

SERVICES = {
    "target": (TargetConfig, "run a target service: the big model, verifying drafts"),
    "draft": (DraftConfig, "run a draft service: proposes draft tokens (ngram or a small model)"),
    "router": (RouterConfig, "run the router: the public Generate API and the speculation loop"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specfleet",
        description="Distributed, lossless speculative decoding: a router drives draft and target services "
                    "over gRPC; the output is exactly what the target model alone would produce.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config_cls, help_text) in SERVICES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_arguments(sub, config_cls)

    up = commands.add_parser("up", help="start redis-server, target, draft and router on this machine",
                             description="Start a whole local deployment as separate processes, wait until "
                                         "every part reports SERVING, and print where the router listens. "
                                         "Ctrl-C stops them all.",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    up.add_argument("--model", default="smollm2-135m", help="target model: preset name or local folder")
    up.add_argument("--drafter", default="ngram", choices=["ngram", "model"], help="draft service kind")
    up.add_argument("--draft-model", default="", help="model for --drafter model (sharing the target's tokenizer)")
    up.add_argument("--depth", default="auto", help="draft tokens per step: auto, or a fixed K (0: plain decoding)")
    up.add_argument("--port", type=int, default=50050, help="router port (draft and target use the next two)")
    up.add_argument("--redis-url", default="", help="use this Redis instead of starting redis-server")
    up.add_argument("--max-seq-len", type=int, default=2048, help="longest sequence the services hold")
    up.add_argument("--num-slots", type=int, default=16, help="sequences each service holds at once")
    up.add_argument("--log-dir", default="", help="write each process's log here instead of the terminal")
    up.add_argument("--prompt", default="", help="answer this one prompt through the router, then stop everything")
    up.add_argument("--max-new-tokens", type=int, default=64, help="with --prompt: tokens to generate")

    gen = commands.add_parser("generate", help="send a prompt to a router and stream the answer",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--router", default="127.0.0.1:50050", help="router address")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message (chat template)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in SERVICES:
        return run_service(args.command, args)
    if args.command == "up":
        from specfleet.up import up

        return up(args)
    return generate(args)


def run_service(role: str, args: argparse.Namespace) -> int:
    from specfleet.serving import setup_logging

    config_cls, _ = SERVICES[role]
    try:
        config = from_arguments(config_cls, args)
    except ValueError as err:
        print(f"specfleet {role}: {err}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    if role == "target":
        from target_service.server import run
    elif role == "draft":
        from draft_service.server import run
    else:
        from router.server import run
    try:
        asyncio.run(run(config))
    except (ValueError, ConnectionError, FileNotFoundError) as err:
        logging.getLogger("specfleet").error("%s cannot start: %s", role, err)
        return 1
    return 0


def generate(args: argparse.Namespace) -> int:
    import grpc

    from specfleet.client import make_request, print_stream

    chat = [{"role": "user", "content": args.prompt}] if args.chat else None
    request = make_request(None if chat else args.prompt, chat=chat, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                           stop=args.stop)
    try:
        print_stream(args.router, request)
    except grpc.RpcError as err:
        print(f"\nspecfleet generate: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
