"""The ``specfleet`` command: run a service, a whole local deployment, or a client."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from specfleet.config import (
    DraftConfig,
    RouterConfig,
    ServiceConfig,
    TargetConfig,
    TrainSpaceConfig,
    add_arguments,
    from_arguments,
)
from specfleet.up import UpConfig, up

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

    up = commands.add_parser(
        "up", help="start redis-server, target, draft and router on this machine",
        description="Start a whole local deployment, one process each: redis-server (unless --redis-url), a target "
                    "service, a draft service (none with --self-draft) and the router. Waits until every part "
                    "reports SERVING and prints where the router listens and where each process serves /metrics. "
                    "With --prompt it answers "
                    "that prompt and stops everything; otherwise it runs until Ctrl-C. A flag marked [target], "
                    "[draft] or [router] is that service's flag of the same name, with its default, passed on to "
                    "it; for the services' other flags start the parts alone (specfleet target|draft|router --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(up, UpConfig)

    train = commands.add_parser(
        "train-space", help="fine-tune a model to draft for itself (SPACE), for `specfleet target --model DIR`",
        description="Fine-tune a model with SPACE's semi-autoregressive SFT: ShareGPT prompts (past the ones the "
                    "benchmarks hold out) answered by the model itself, then transformers' Trainer teaching mask "
                    "tokens to predict the next tokens beside the ordinary next-token loss. Shows progress, saves "
                    "checkpoints, stops at --time-budget-min or --max-steps and writes the model to --out; run it "
                    "again with the same --out to resume. Needs specfleet[train] for the prompts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(train, TrainSpaceConfig)

    gen = commands.add_parser("generate", help="send a prompt to a router and stream the answer",
                              description="Send a prompt to a router's gRPC API and stream the answer, then its "
                                          "speculation stats. A router that wants an API key gets the one in "
                                          "$SPECFLEET_API_KEY.",
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
    gen.add_argument("--tls-ca", default="", help="PEM certificate(s) to trust: talk to a router that serves TLS")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate(args)
    config_cls = {"up": UpConfig, "train-space": TrainSpaceConfig}.get(args.command) or SERVICES[args.command][0]
    try:
        config = from_arguments(config_cls, args)  # checks every value before anything starts
    except ValueError as err:
        print(f"specfleet {args.command}: {err}", file=sys.stderr)
        return 2
    if args.command == "train-space":
        return run_training(config)
    return up(config) if args.command == "up" else run_service(args.command, config)


def run_training(config: TrainSpaceConfig) -> int:
    from specfleet.serving import setup_logging
    from specfleet.training.space_train import train_space

    setup_logging(config.log_level)
    try:
        train_space(config)
    except (ValueError, FileNotFoundError) as err:
        logging.getLogger("specfleet").error("train-space failed: %s", err)
        return 1
    return 0


def run_service(role: str, config: ServiceConfig) -> int:
    from specfleet.serving import setup_logging

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

    from specfleet.client import API_KEY_ENV, make_request, print_stream

    chat = [{"role": "user", "content": args.prompt}] if args.chat else None
    request = make_request(None if chat else args.prompt, chat=chat, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                           stop=args.stop)
    try:
        # A router with API keys wants one: from the environment, not a flag others can read in the process list.
        print_stream(args.router, request, api_key=os.environ.get(API_KEY_ENV, ""), tls_ca=args.tls_ca)
    except grpc.RpcError as err:
        print(f"\nspecfleet generate: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
