"""``specfleet up``: a whole deployment on this machine, one process per part."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from specfleet.launcher import Deployment, free_port, wait_redis, wait_serving

log = logging.getLogger("specfleet.up")


def up(args: argparse.Namespace) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    router_port, draft_port, target_port = args.port, args.port + 1, args.port + 2
    metrics_ports = {role: free_port() for role in ("router", "draft", "target")}  # one /metrics per process
    deployment = Deployment(Path(args.log_dir) if args.log_dir else None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        redis_url = args.redis_url
        if not redis_url:
            redis_port = free_port()
            wait_redis(deployment.start_redis(redis_port), redis_port)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        common = ["--redis-url", redis_url, "--num-slots", str(args.num_slots), "--max-seq-len", str(args.max_seq_len)]
        target = deployment.start_service("target", ["--model", args.model, "--port", str(target_port), *common,
                                                     "--metrics-port", str(metrics_ports["target"])])
        draft_args = ["--drafter", args.drafter, "--port", str(draft_port), *common,
                      "--metrics-port", str(metrics_ports["draft"])]
        if args.drafter == "model":
            draft_args += ["--model", args.draft_model or args.model]
        draft = deployment.start_service("draft", draft_args)
        log.info("waiting for the draft and target services (the first run converts the model once)")
        wait_serving(target, f"127.0.0.1:{target_port}")
        wait_serving(draft, f"127.0.0.1:{draft_port}")
        router = deployment.start_service("router", [
            "--port", str(router_port), "--targets", f"127.0.0.1:{target_port}",
            "--drafts", f"127.0.0.1:{draft_port}", "--depth", str(args.depth), "--redis-url", redis_url,
            "--metrics-port", str(metrics_ports["router"])])
        wait_serving(router, f"127.0.0.1:{router_port}")
        scrape = ", ".join(f"{role} http://127.0.0.1:{port}/metrics" for role, port in metrics_ports.items())
        print(f"\nspecfleet is up: router on 127.0.0.1:{router_port} (draft {args.drafter} on {draft_port}, "
              f"target {args.model} on {target_port}, Redis {redis_url})\nmetrics: {scrape}", flush=True)
        if args.prompt:
            from specfleet.client import make_request, print_stream

            print(f"\n> {args.prompt}\n", flush=True)
            print_stream(f"127.0.0.1:{router_port}",
                         make_request(chat=[{"role": "user", "content": args.prompt}],
                                      max_new_tokens=args.max_new_tokens))
            return 0
        print(f'try:  specfleet generate --router 127.0.0.1:{router_port} --chat "Write a haiku about GPUs"\n'
              "Ctrl-C stops everything.", flush=True)
        while not stop.wait(0.5):
            for process in deployment.processes:
                if process.popen.poll() is not None:
                    log.error("%s exited with code %d; stopping", process.name, process.popen.returncode)
                    return 1
        return 0
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError) as err:
        print(f"specfleet up: {err}", file=sys.stderr)
        return 1
    finally:
        log.info("stopping all processes")
        deployment.stop()
