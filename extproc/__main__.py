"""The command line: serve | demo | sim | check-config | usage | export."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from extproc import __version__
from extproc.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maas-extproc",
        description="Envoy ext_authz + ext_proc sidecar that meters LLM traffic per user and tier.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC sidecar (ext_authz + ext_proc)")
    serve.add_argument("--config", help="YAML config file (default: built-in defaults)")
    serve.add_argument("--workers", type=int, help="worker processes, on ports base..base+N-1")
    serve.add_argument("--port", type=int, help="gRPC base port (overrides server.port)")

    demo = sub.add_parser("demo", help="run Envoy + sidecar + model simulator on loopback")
    demo.add_argument("--config", help="sidecar config (default: deploy/local/config.yaml)")
    demo.add_argument("--port", type=int, default=8080, help="Envoy listener port (0: any free)")
    demo.add_argument("--workers", type=int, default=1, help="sidecar worker processes")
    demo.add_argument(
        "--era",
        choices=("tiers", "subscriptions"),
        default="tiers",
        help="the MaaS to play: tiers, or subscriptions (API keys, MaaSSubscriptions, a maas-api stand-in)",
    )
    demo.add_argument(
        "--layout",
        choices=("lean", "full", "accesslog"),
        default="lean",
        help='how Envoy meets the sidecar (README "Layouts"): lean (default: HTTP ext_authz, usage '
        "read by Envoy), full (gRPC ext_authz + ext_proc STREAMED, the fallback), accesslog",
    )

    sim = sub.add_parser("sim", help="run the OpenAI-compatible model simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000)
    sim.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between SSE chunks")

    maas_api = sub.add_parser(
        "maas-api", help="run the maas-api stand-in (API-key validation, subscription selection)"
    )
    maas_api.add_argument("--host", default="127.0.0.1")
    maas_api.add_argument("--port", type=int, default=8443)
    maas_api.add_argument(
        "--objects", required=True, help="YAML: MaaSSubscription, MaaSAuthPolicy, MaaSModelRef"
    )
    maas_api.add_argument(
        "--keys",
        required=True,
        help="YAML: keys: [{key, id, name, username, groups, subscription}]",
    )
    maas_api.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    maas_api.add_argument("--tls-key", help="and this key (PEM)")

    check = sub.add_parser(
        "check-config", help="validate a config file and every file it names, then exit"
    )
    check.add_argument("file")

    usage = sub.add_parser("usage", help="print a user's token usage from the store")
    usage.add_argument("--config", help="config file naming the store (or MAAS_EXTPROC_STORE_URL)")
    usage.add_argument(
        "--user",
        required=True,
        help="user id (tiers: service-account name; subscriptions: username)",
    )
    usage.add_argument("--from", dest="start", help="first day, YYYY-MM-DD (default: today)")
    usage.add_argument("--to", dest="end", help="last day, YYYY-MM-DD (default: today)")
    usage.add_argument("--format", choices=("table", "json", "csv"), default="table")
    usage.add_argument(
        "--group-by",
        choices=("day", "model", "subscription", "key"),
        default="day",
        help="one row per day, model, subscription (with its tokenMetadata) or API key",
    )

    export = sub.add_parser(
        "export",
        help="copy charge records from the export stream into JSONL or CSV (consumer group)",
        description=(
            "Read the charge records of the export stream (export.stream) as one consumer of a "
            "Redis consumer group and write one line per record. A batch is acknowledged only "
            "after it is written and flushed, so delivery is at least once: after a crash the "
            "unacknowledged records come again; each line carries stream and stream_id (and "
            "request_id) to drop repeats. Without --follow, stop once the stream is drained."
        ),
    )
    export.add_argument("--config", help="config file naming the store (or MAAS_EXTPROC_STORE_URL)")
    export.add_argument(
        "--group",
        default="export",
        help="consumer group: each group gets every record once (default: export)",
    )
    export.add_argument(
        "--consumer",
        help="this reader's name in the group; reuse it after a crash (default: the host name)",
    )
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--output", help="append to this file, fsynced per batch (default: stdout)")
    export.add_argument(
        "--follow", action="store_true", help="keep reading new records until SIGINT / SIGTERM"
    )
    export.add_argument(
        "--from-start",
        action="store_true",
        help="a group created now starts at the oldest retained record (default: new ones only)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("MAAS_EXTPROC_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"maas-extproc: config error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from extproc import config as config_mod

    if args.command == "check-config":
        from extproc import config_files

        loaded = config_mod.load(args.file, os.environ)
        files = config_files.check(loaded)  # every file it names, read as serve reads it
        plans = (
            f"tiers={loaded.tiers.source}"
            if loaded.maas.era == "tiers"
            else f"era=subscriptions, selection={loaded.subscriptions.selection}"
        )
        print(
            f"{args.file}: ok (identity={loaded.identity.source}, {plans}, "
            f"store={config_mod.redact_url(str(loaded.store.url))})"
        )
        for checked in files:
            print(f"  read {checked}")
        return 0
    if args.command == "maas-api":
        import ssl
        from pathlib import Path

        from extproc.sim.maas_api import MaasApiStandIn, serve_stand_in

        tls = None
        if args.tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(args.tls_cert, args.tls_key)
        stand_in = MaasApiStandIn.from_files(Path(args.objects), Path(args.keys))
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_stand_in(args.host, args.port, stand_in, tls))
        return 0
    if args.command == "sim":
        from extproc.sim.server import SimConfig, serve_forever

        sim_config = SimConfig(chunk_delay_s=args.chunk_delay_ms / 1000)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_forever(args.host, args.port, sim_config))
        return 0
    if args.command == "serve":
        from dataclasses import replace

        from extproc import config_files
        from extproc.app import run

        loaded = config_mod.load(args.config, os.environ)
        # Refuse to start (exit 2) on a file the workers could not read, rather than have the
        # supervisor restart failing workers forever; check-config runs this same check.
        config_files.check(loaded)
        server = loaded.server
        if args.workers:
            server = replace(server, workers=args.workers)
        if args.port:
            server = replace(server, port=args.port)
        logging.getLogger().setLevel(server.log_level.upper())
        return run(replace(loaded, server=server))
    if args.command == "demo":
        from extproc.demo import run_demo

        return run_demo(args.config, args.port, args.workers, args.era, args.layout)
    if args.command == "usage":
        from extproc.observability.usage_cli import run_usage

        loaded = config_mod.load(args.config, os.environ, serving=False)
        return run_usage(loaded, args.user, args.start, args.end, args.format, args.group_by)
    if args.command == "export":
        from extproc.export.cli import run_export

        loaded = config_mod.load(args.config, os.environ, serving=False)
        return run_export(
            loaded,
            args.group,
            args.consumer,
            args.format,
            args.output,
            args.follow,
            args.from_start,
        )
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
