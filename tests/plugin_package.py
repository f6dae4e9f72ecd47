"""A tiny third-party relayd plugin, written and pip-installed by the tests.

``build_plugin_site`` (behind conftest's session fixture ``plugin_site``) builds three distributions in a temporary directory and
installs them with ``pip install --no-deps --no-build-isolation --target SITE``; a relayd
started with ``PYTHONPATH=SITE`` sees them through its entry points exactly as it would see
a package installed from PyPI:

* ``relayd-tinyplugin`` (module ``tinyplugin``):
  - component ``echo``: HTTP on a listener. ``GET /`` answers ``<greeting> from <name>``;
    ``GET /secret`` answers the sha256 of its ``api_key`` secret (proof that it was read,
    without printing it); ``POST /hold`` answers ``started`` at once, then reads the whole
    request body and echoes it: a request that stays in flight as long as the client wants;
    with ``auth = "NAME"`` every path needs that auth method's approval; ``fail = "init"`` or
    ``"start"`` makes it raise there; ``start_gate = PATH`` makes start() create
    ``PATH.started`` and wait until PATH exists.
  - auth method ``token``: ``Authorization: Bearer <token>`` where ``token`` is a Secret.
  - component ``dupe`` (also registered by the rival distribution).
  - component ``broken``, whose module fails to import.
  - ``relayctl tiny-hello [NAME]`` (entry point group ``relayd.cli``): prints a greeting
    without a daemon; ``relayctl tiny-plugins`` asks the running relayd how many plugins it has
    (a command that uses the control client, like the built-ins).
* ``relayd-tinyplugin-rival`` (module ``tinyrival``): component ``dupe`` again.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

TINYPLUGIN = '''
"""A third-party relayd plugin used by relayd's tests."""

import asyncio
import hashlib
import hmac
from pathlib import Path
from typing import Literal

from aiohttp import web
from pydantic import Field

from relayd.auth.base import AuthConfig, AuthError, AuthFailure, AuthMethod, Identity
from relayd.component import Component, ComponentConfig
from relayd.config.types import AuthRef, ListenerRef, Secret
from relayd.httpserve import HttpService


class EchoConfig(ComponentConfig):
    kind: Literal["echo"]
    listener: ListenerRef = Field(description="listener to serve on")
    greeting: str = Field("hello", description="first word of every answer")
    api_key: Secret | None = Field(None, description="a secret, to test secret handling")
    passphrase: Secret | None = Field(None, description="a secret whose name does not say so")
    auth: AuthRef | None = Field(None, description="auth method guarding every path")
    fail: Literal["init", "start"] | None = Field(None, description="raise in __init__ or start()")
    start_gate: str | None = Field(None, description="start() creates PATH.started, then waits for PATH")


class EchoComponent(Component):
    Config = EchoConfig

    def __init__(self, name, config, context):
        super().__init__(name, config, context)
        if config.fail == "init":
            raise ValueError("told to fail in __init__")

    async def start(self):
        if self.config.start_gate:  # a slow start-up the test controls
            gate = Path(self.config.start_gate)
            Path(f"{gate}.started").touch()
            while not gate.exists():
                await asyncio.sleep(0.01)
        if self.config.fail == "start":
            raise OSError(98, "Address already in use (told to fail in start)")
        self.http = HttpService(self.handle)
        await self.http.serve(self.context.listener(self.config.listener))
        self.state = "serving"

    async def stop(self, drain_timeout):
        await self.http.stop(drain_timeout)

    def status(self):
        return {"connections": self.http.connections}

    async def handle(self, request):
        if self.config.auth:
            try:
                await self.context.auth_method(self.config.auth).authenticate(
                    request.headers.get("Authorization"))
            except AuthError as exc:
                return web.Response(status=401, text=exc.message)
        if request.path == "/secret":
            secret = self.config.api_key.get_secret_value() if self.config.api_key else ""
            return web.Response(text=hashlib.sha256(secret.encode()).hexdigest())
        if request.path == "/hold" and request.method == "POST":
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"started\\n")
            body = await request.read()
            await response.write(b"got " + body + b"\\n")
            await response.write_eof()
            return response
        return web.Response(text=f"{self.config.greeting} from {self.name}\\n")


class TokenConfig(AuthConfig):
    method: Literal["token"]
    token: Secret = Field(description="the bearer token clients must present")


class TokenAuth(AuthMethod):
    Config = TokenConfig

    async def authenticate(self, authorization):
        if not authorization:
            raise AuthError(AuthFailure.MISSING, "no credentials")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError(AuthFailure.MALFORMED, "expected a bearer token")
        if not hmac.compare_digest(token.encode(), self.config.token.get_secret_value().encode()):
            raise AuthError(AuthFailure.INVALID, "wrong token")
        return Identity(sub="token-holder", method=self.name)


class DupeConfig(ComponentConfig):
    kind: Literal["dupe"]


class DupeComponent(Component):
    Config = DupeConfig


def register_commands(sub):
    """relayctl commands of this plugin (entry point group relayd.cli), as built-ins add theirs."""
    p = sub.add_parser("tiny-hello", help="greet from the tiny plugin (needs no daemon)")
    p.add_argument("name", nargs="?", default="operator")
    p.set_defaults(func=_hello, no_daemon=True)
    p = sub.add_parser("tiny-plugins", help="count the plugins the running relayd has")
    p.set_defaults(func=_count_plugins)


def _hello(args, client):
    print(f"hello, {args.name}, from tinyplugin")
    return 0


def _count_plugins(args, client):
    status, body = client.request("GET", "/v1/plugins")
    print(f"{len(body['plugins'])} plugins")
    return 0 if status == 200 else 1
'''

TINYRIVAL = '''
from typing import Literal

from relayd.component import Component, ComponentConfig


class DupeConfig(ComponentConfig):
    kind: Literal["dupe"]


class DupeComponent(Component):
    Config = DupeConfig
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "{version}"

[tool.setuptools]
py-modules = [{modules}]

[project.entry-points."relayd.components"]
{components}

[project.entry-points."relayd.auth"]
{auth}

[project.entry-points."relayd.cli"]
{cli}
'''


def write_distribution(root: Path, name: str, version: str, modules: dict[str, str],
                       components: dict[str, str], auth: dict[str, str],
                       cli: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    (root / "pyproject.toml").write_text(PYPROJECT.format(
        name=name, version=version, modules=", ".join(f'"{m}"' for m in modules),
        components="\n".join(f'{k} = "{v}"' for k, v in components.items()),
        auth="\n".join(f'{k} = "{v}"' for k, v in auth.items()),
        cli="\n".join(f'{k} = "{v}"' for k, v in (cli or {}).items()),
    ))
    return root


def build_plugin_site(root: Path) -> Path:
    """Build and install the test plugins under ``root``; returns the directory to put on
    PYTHONPATH (conftest's session fixture ``plugin_site`` calls this once)."""
    tiny = write_distribution(
        root / "src-tiny", "relayd-tinyplugin", "0.1.0",
        {"tinyplugin": TINYPLUGIN,
         "tinyplugin_broken": "import relayd_no_such_dependency  # not installed, on purpose\n"},
        {"echo": "tinyplugin:EchoComponent", "dupe": "tinyplugin:DupeComponent",
         "broken": "tinyplugin_broken:Component"},
        {"token": "tinyplugin:TokenAuth"},
        {"tiny": "tinyplugin:register_commands"},
    )
    rival = write_distribution(
        root / "src-rival", "relayd-tinyplugin-rival", "2.0.0", {"tinyrival": TINYRIVAL},
        {"dupe": "tinyrival:DupeComponent"}, {},
    )
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--target", str(site), str(tiny), str(rival)],
        check=True, capture_output=True, text=True,
    )
    return site
