"""`maas-extproc demo`: start the local stack, print what to try, stop every child on Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from extproc.stack import Era, LocalStack, Topology

DEMO_KEYS = {
    "free": "demo-free-key",
    "premium": "demo-premium-key",
    "enterprise": "demo-enterprise-key",
}
MODEL_PATH = "/llm/facebook-opt-125m-simulated/v1"
# deploy/local/subscriptions/maas-api-keys.yaml: bound to simulator-subscription (alice) and
# premium-subscription (bob).
SUBSCRIPTION_KEYS = {
    "alice": "sk-oai-demoAlice01_aliceSecretForTheLocalDemo",
    "bob": "sk-oai-demoBob01_bobSecretForTheLocalDemo",
}


def _http_ports(stack: LocalStack) -> list[str]:
    """The `lean` layout's HTTP port line: admission checks and the settle filter's calls."""
    if not stack.authz_http_ports:
        return []
    ports = ",".join(map(str, stack.authz_http_ports))
    return [f"  sidecar HTTP     127.0.0.1:{ports}   (/check, /settle)"]


def instructions(stack: LocalStack) -> str:
    url = stack.url
    chat = f"{url}{MODEL_PATH}/chat/completions"
    lines = [
        "",
        "maas-extproc local stack is up:",
        f"  gateway (Envoy)  {url}",
        f"  layout           {stack.topology}   (demo --layout full: the STREAMED fallback)",
        f"  sidecar gRPC     127.0.0.1:{','.join(map(str, stack.sidecar_ports))}",
        *_http_ports(stack),
        f"  metrics          http://127.0.0.1:{stack.metrics_ports[0]}/metrics",
        f"  usage API        http://127.0.0.1:{stack.usage_port}/v1/usage",
        f"  model simulator  {stack.sim_url}   (what it served: {stack.sim_url}/_sim/records)",
        f"  logs             {stack.log_dir}",
        "",
        "Demo keys: " + ", ".join(f"{tier}={key}" for tier, key in DEMO_KEYS.items()),
        "",
        "# A streamed chat completion (premium tier), with usage in the last chunk:",
        f"curl -sN {chat} -H 'Authorization: Bearer {DEMO_KEYS['premium']}' "
        '-H \'Content-Type: application/json\' -d \'{"model": "facebook/opt-125m", '
        '"stream": true, "stream_options": {"include_usage": true}, '
        '"messages": [{"role": "user", "content": "Hello there"}]}\'',
        "",
        "# A non-streamed one; the X-RateLimit-* headers show the budget left:",
        f"curl -si {chat} -H 'Authorization: Bearer {DEMO_KEYS['premium']}' "
        '-H \'Content-Type: application/json\' -d \'{"model": "facebook/opt-125m", '
        '"max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}\'',
        "",
        "# The free tier has 100 tokens a minute; the third call gets 429 with Retry-After:",
        f"for i in 1 2 3; do curl -s -o /dev/null -w '%{{http_code}}\\n' {chat} "
        f"-H 'Authorization: Bearer {DEMO_KEYS['free']}' -H 'Content-Type: application/json' "
        '-d \'{"model": "facebook/opt-125m", "max_tokens": 60, '
        '"messages": [{"role": "user", "content": "Hi"}]}\'; done',
        "",
        "# No token: 401.   Model list: allowed, never charged:",
        f"curl -si {chat} -d '{{}}' | head -1",
        f"curl -s {url}{MODEL_PATH}/models -H 'Authorization: Bearer {DEMO_KEYS['free']}'",
        "",
        "# What was charged:",
        f"curl -s http://127.0.0.1:{stack.metrics_ports[0]}/metrics | grep ^maas_tokens",
        f"curl -s 'http://127.0.0.1:{stack.usage_port}/v1/usage?group_by=model' "
        f"-H 'Authorization: Bearer {DEMO_KEYS['premium']}'",
        f"curl -s http://127.0.0.1:{stack.usage_port}/v1/usage/users "
        "-H 'Authorization: Bearer demo-admin-key'   # everyone (admin group)",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def subscription_instructions(stack: LocalStack) -> str:
    url = stack.url
    chat = f"{url}{MODEL_PATH}/chat/completions"
    body = (
        '-H \'Content-Type: application/json\' -d \'{"model": "facebook/opt-125m", '
        '"max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}\''
    )
    lines = [
        "",
        "maas-extproc local stack is up (subscription era):",
        f"  gateway (Envoy)  {url}",
        f"  layout           {stack.topology}   (demo --layout full: the STREAMED fallback)",
        f"  sidecar gRPC     127.0.0.1:{','.join(map(str, stack.sidecar_ports))}",
        *_http_ports(stack),
        f"  maas-api         {stack.maas_api_url}   (stand-in: deploy/local/subscriptions/)",
        f"  metrics          http://127.0.0.1:{stack.metrics_ports[0]}/metrics",
        f"  usage API        http://127.0.0.1:{stack.usage_port}/v1/usage",
        f"  logs             {stack.log_dir}",
        "",
        "API keys: " + ", ".join(f"{user}={key}" for user, key in SUBSCRIPTION_KEYS.items()),
        "Tokens (no subscription bound): demo-free-key (alice), demo-premium-key (bob, premium-group)",
        "",
        "# An API key runs under the subscription it is bound to (simulator-subscription: 100/min):",
        f"curl -si {chat} -H 'Authorization: Bearer {SUBSCRIPTION_KEYS['alice']}' {body}",
        "",
        "# bob's token owns two subscriptions for this model: without a choice, 403 multiple_subscriptions;",
        f"curl -si {chat} -H 'Authorization: Bearer demo-premium-key' {body} | head -1",
        "# with X-MaaS-Subscription it runs under the one named (5000/min and 100000/day):",
        f"curl -si {chat} -H 'Authorization: Bearer demo-premium-key' "
        f"-H 'X-MaaS-Subscription: premium-subscription' {body}",
        "",
        "# A client X-MaaS-Username is refused (403), as MaaS refuses it:",
        f"curl -si {chat} -H 'Authorization: Bearer demo-free-key' -H 'X-MaaS-Username: root' "
        f"{body} | head -1",
        "",
        "# Usage by subscription and key:",
        f"curl -s 'http://127.0.0.1:{stack.usage_port}/v1/usage?group_by=subscription' "
        f"-H 'Authorization: Bearer {SUBSCRIPTION_KEYS['bob']}'",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


def run_demo(
    config: str | None,
    port: int,
    workers: int,
    era: Era = "tiers",
    layout: Topology = "lean",
) -> int:
    env = {}
    if redis_url := os.environ.get("REDIS_URL"):
        env["MAAS_EXTPROC_STORE_URL"] = redis_url
    stack = LocalStack(
        config_path=Path(config) if config else None,
        workers=workers,
        env=env,
        listen_port=port,
        era=era,
        topology=layout,
    )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with stack:
        shown = instructions(stack) if era == "tiers" else subscription_instructions(stack)
        print(shown, flush=True)
        try:
            while not stopped.wait(0.5):
                for name, proc in stack.procs.items():
                    if proc.poll() is not None:
                        print(f"{name} exited ({proc.returncode}); see {stack.log_dir}/{name}.log")
                        return 1
        except KeyboardInterrupt:
            pass
        print("\nstopping...", flush=True)
    return 0
