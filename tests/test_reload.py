"""Reloads under load: no connection dropped, broken configs rejected, live connections kept."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from polling import wait_for
from relayd.testing import free_port


@dataclass
class Ports:
    keep: int = field(default_factory=free_port)
    web: int = field(default_factory=free_port)
    extra: int = field(default_factory=free_port)


def config_text(ports: Ports, *, second: bool, auth: bool, extra_listener: bool = True) -> str:
    text = f"""
        drain_timeout = "5s"
        [listeners.keep]
        bind = "127.0.0.1:{ports.keep}"
        [listeners.web]
        bind = "127.0.0.1:{ports.web}"
        [listeners.extra]
        bind = "127.0.0.1:{ports.extra}"
        [auth.open]
        method = "none"
        [components.keeper]
        kind = "status"
        listener = "keep"
        [components.first]
        kind = "status"
        listener = "web"
    """
    if not extra_listener:
        text = text.replace(f'[listeners.extra]\n        bind = "127.0.0.1:{ports.extra}"\n', "")
    if auth:
        text += '    auth = "open"\n'
    if second:
        text += """
        [components.second]
        kind = "status"
        listener = "extra"
        """
    return text


BROKEN = {
    # name: (conf.d fragment, expected line, key, message start)
    "syntax": ("[components.first\nkind = 'status'\n", 1, None, "TOML syntax error: Expected ']'"),
    "unknown-key": ("[components.first]\nkind = 'status'\nlistner = 'web'\n", 3, "components.first.listner",
                    "unknown key (did you mean 'listener'?)"),
    "dangling": ("[components.first]\nkind = 'status'\nauth = 'nobody'\n", 3, "components.first.auth",
                 "refers to auth.nobody, which is not defined (auth: open)"),
}


class Holder(threading.Thread):
    """One keep-alive HTTP connection, used over and over; any error or reconnect is a failure."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.requests = 0
        self.errors: list[str] = []
        self.local_ports: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.conn.request("GET", "/healthz")
                response = self.conn.getresponse()
                body = response.read()
                if response.status != 200 or body != b"ok\n" or response.will_close:
                    self.errors.append(f"{response.status} {body!r} close={response.will_close}")
                self.local_ports.add(self.conn.sock.getsockname()[1])
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(repr(exc))
                self.conn.close()
            self.requests += 1
        self.conn.close()


class Looper(threading.Thread):
    """A new connection per request, as fast as it goes."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.requests = 0
        self.errors: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    reply = b""
                    while chunk := s.recv(4096):
                        reply += chunk
                if not reply.startswith(b"HTTP/1.1 200 OK") or not reply.endswith(b"ok\n"):
                    self.errors.append(repr(reply[:200]))
            except OSError as exc:
                self.errors.append(repr(exc))
            self.requests += 1


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    wait_for(predicate, what, timeout, interval=0.005)  # a short interval: the client threads run between polls


def status(daemon) -> dict:
    result = daemon.ctl("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_twenty_reloads_under_load(relayd):
    ports = Ports()
    daemon = relayd(config_text(ports, second=False, auth=False))
    main = daemon.config_dir / "relayd.toml"
    broken_file = daemon.config_dir / "conf.d" / "50-broken.toml"
    broken_file.parent.mkdir(exist_ok=True)

    holder, looper = Holder(ports.keep), Looper(ports.web)
    holder.start()
    looper.start()
    wait_until(lambda: holder.requests > 3 and looper.requests > 3, "the clients to start")

    # (what to do, how to reload): alternate relayctl and SIGHUP; every kind of change and breakage.
    plan = [
        "add-second", "auth-on", "syntax", "remove-second", "unknown-key", "auth-off", "dangling",
        "add-second", "noop", "syntax", "auth-on", "remove-second", "unknown-key", "add-second",
        "auth-off", "dangling", "remove-second", "auth-on", "syntax", "add-second",
    ]
    assert len(plan) == 20
    state = {"second": False, "auth": False}
    generation = 1
    for index, step in enumerate(plan):
        via_signal = index % 2 == 1
        if step in BROKEN:
            broken_file.write_text(BROKEN[step][0])
        else:
            broken_file.unlink(missing_ok=True)
            if step != "noop":
                key, value = {"add-second": ("second", True), "remove-second": ("second", False),
                              "auth-on": ("auth", True), "auth-off": ("auth", False)}[step]
                state[key] = value
            main.write_text(config_text(ports, **state))

        before = (holder.requests, looper.requests)
        if via_signal:
            daemon.manager.drain()  # notifications of the previous (relayctl) reload
            daemon.process.send_signal(signal.SIGHUP)
            daemon.manager.wait_for("RELOADING", "1")
            ready = daemon.manager.wait_for("READY", "1")
            result_text = ready.fields["STATUS"]
        else:
            result = daemon.ctl("reload")
            result_text = result.stderr

        if step in BROKEN:
            _, line, key, message = BROKEN[step]
            location = f"{broken_file}:{line}: " + (f"{key}: " if key else "")
            if via_signal:
                assert result_text.startswith(f"reload rejected: {location}{message}"), result_text
            else:
                assert result.returncode == 1
                assert result.stderr.startswith(
                    f"relayctl: reload rejected: configuration rejected; still serving generation {generation}\n"
                )
                assert f"  {location}{message}" in result.stderr, result.stderr
            now = status(daemon)
            assert now["generation"] == generation  # the old generation keeps serving
            assert now["last_reload"]["ok"] is False
            assert now["last_reload"]["errors"][0].startswith(location + message)
            text = daemon.ctl("status").stdout
            assert "last reload: REJECTED at " in text and f"{location}{message}" in text
        else:
            generation += 1
            if not via_signal:
                assert result.returncode == 0, result.stderr
                assert result.stdout.startswith(f"reloaded: generation {generation} (")
            else:
                assert result_text.startswith(f"generation {generation}: ")
            now = status(daemon)
            assert now["generation"] == generation
            assert now["last_reload"]["ok"] is True
            assert sorted(now["components"]) == sorted(["keeper", "first"] + (["second"] if state["second"] else []))
            if state["second"]:
                assert http_get(ports.extra, "/healthz") == (200, b"ok\n")
        # Both clients make progress after every reload.
        wait_until(lambda before=before: holder.requests > before[0] + 2 and looper.requests > before[1] + 2,
                   f"clients to progress after reload {index} ({step})")

    holder.done.set()
    looper.done.set()
    holder.join(10)
    looper.join(10)
    assert holder.errors == [] and looper.errors == [], (holder.errors[:5], looper.errors[:5])
    # The keeper never changed, so its one connection lived through all 20 reloads.
    assert len(holder.local_ports) == 1
    assert holder.requests > 20 and looper.requests > 20
    counts = status(daemon)["reloads"]
    assert counts == {"ok": 13, "rejected": 7}


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_reload_reuses_unchanged_components_and_rebuilds_changed_ones(relayd):
    ports = Ports()
    daemon = relayd(config_text(ports, second=True, auth=False))
    holder_first = http.client.HTTPConnection("127.0.0.1", ports.web, timeout=10)
    holder_second = http.client.HTTPConnection("127.0.0.1", ports.extra, timeout=10)
    for conn in (holder_first, holder_second):
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"

    (daemon.config_dir / "relayd.toml").write_text(config_text(ports, second=True, auth=True))
    result = daemon.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reloaded: generation 2 (components.first)"

    # second is the very same object: its connection is still open and served.
    holder_second.request("GET", "/healthz")
    response = holder_second.getresponse()
    assert (response.status, response.read()) == (200, b"ok\n")
    # first was replaced and drained: its idle keep-alive connection was closed by relayd.
    holder_first.request("GET", "/healthz")
    try:
        response = holder_first.getresponse()
        raise AssertionError(f"the replaced component still answered: {response.status}")
    except (http.client.RemoteDisconnected, ConnectionResetError):
        pass
    finally:
        holder_first.close()
        holder_second.close()
    # ...and the new first serves new connections.
    assert http_get(ports.web, "/healthz") == (200, b"ok\n")


def test_reload_with_nothing_changed_keeps_everything(relayd):
    ports = Ports()
    daemon = relayd(config_text(ports, second=False, auth=True))
    result = daemon.ctl("reload")
    assert result.stdout.strip() == "reloaded: generation 2 (no changes)"


def test_reload_removing_a_component_reports_it(relayd):
    ports = Ports()
    daemon = relayd(config_text(ports, second=True, auth=False))
    assert port_open(ports.extra)
    text = config_text(ports, second=False, auth=False, extra_listener=False)
    assert "listeners.extra" not in text
    (daemon.config_dir / "relayd.toml").write_text(text)
    result = daemon.ctl("reload")
    assert result.stdout.strip() == "reloaded: generation 2 (components.second (removed))"
    # Its listener is gone from the configuration: relayd closed it once second had drained.
    wait_until(lambda: not port_open(ports.extra), "the unused listener to close")


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_rejected_reload_via_relayctl_json(relayd):
    ports = Ports()
    daemon = relayd(config_text(ports, second=False, auth=False))
    fragment = Path(daemon.config_dir) / "conf.d" / "90-typo.toml"
    fragment.parent.mkdir(exist_ok=True)
    fragment.write_text("[logging]\nlevle = 'debug'\n")
    result = daemon.ctl("reload", "--json")
    assert result.returncode == 1
    body = json.loads(result.stdout)
    assert body["ok"] is False and body["generation"] == 1
    assert body["errors"] == [f"{fragment}:2: logging.levle: unknown key (did you mean 'level'?)"]


def test_tls_certificate_rotation_by_reload_and_a_broken_key_rejected(relayd, tmp_path):
    import ssl

    import trustme

    first_ca, second_ca = trustme.CA(), trustme.CA()
    first_ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "one.pem"))
    second_ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "two.pem"))
    port = free_port()

    def config(pem: str, key: str | None = None) -> str:
        return f"""
            [listeners.web]
            bind = "127.0.0.1:{port}"
            tls = {{ cert = "{tmp_path / pem}", key = "{tmp_path / (key or pem)}" }}
            [components.health]
            kind = "status"
            listener = "web"
        """

    def https_get(ca) -> bytes:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().read()
        finally:
            conn.close()

    daemon = relayd(config("one.pem"))
    assert https_get(first_ca) == b"ok\n"
    main = daemon.config_dir / "relayd.toml"

    main.write_text(config("two.pem"))
    result = daemon.ctl("reload")
    assert result.stdout.strip() == "reloaded: generation 2 (components.health)"
    assert https_get(second_ca) == b"ok\n"
    try:
        https_get(first_ca)
        raise AssertionError("the old certificate is still served")
    except ssl.SSLCertVerificationError:
        pass

    main.write_text(config("two.pem", key="missing.pem"))
    result = daemon.ctl("reload")
    assert result.returncode == 1
    line = next(n for n, text in enumerate(main.read_text().splitlines(), 1) if "[listeners.web]" in text)
    assert (f"  {main}:{line}: listeners.web: cannot load TLS certificate/key: [Errno 2] No such file "
            "or directory") in result.stderr.splitlines()
    assert https_get(second_ca) == b"ok\n"  # the old generation, and its certificate, serve on
    assert status(daemon)["generation"] == 2


def test_relayctl_check_validates_the_files_without_reloading(relayd):
    ports = Ports()
    daemon = relayd(config_text(ports, second=False, auth=False))
    assert daemon.ctl("check").stdout.strip() == "configuration on disk is valid"
    fragment = daemon.config_dir / "conf.d" / "10-bad.toml"
    fragment.parent.mkdir(exist_ok=True)
    fragment.write_text("[listeners.web]\nbacklog = 0\n")
    result = daemon.ctl("check")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{fragment}:2: listeners.web.backlog: Input should be greater than or equal to 1 (got 0)")
    assert status(daemon)["generation"] == 1 and status(daemon)["last_reload"]["message"] == "started"


def test_control_socket_mode_and_peer_credentials_in_the_log(relayd):
    import os
    import re
    import stat

    ports = Ports()
    daemon = relayd(config_text(ports, second=False, auth=False), env={"RELAYD_CONTROL__MODE": "0600"})
    assert stat.S_IMODE(os.stat(daemon.control_socket).st_mode) == 0o600
    assert daemon.ctl("reload").returncode == 0
    assert re.search(rf"control POST /v1/reload from pid=\d+ uid={os.getuid()} gid={os.getgid()}", daemon.log)
    daemon.stop()
    assert not os.path.exists(daemon.control_socket)  # relayd bound it, relayd removes it


def test_a_listener_that_cannot_bind_rejects_the_reload(relayd):
    ports = Ports()
    daemon = relayd(config_text(ports, second=False, auth=False, extra_listener=False))
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    try:
        main = daemon.config_dir / "relayd.toml"
        main.write_text(main.read_text() + f'\n[listeners.more]\nbind = "127.0.0.1:{taken}"\n')
        result = daemon.ctl("reload")
        assert result.returncode == 1
        line = len(main.read_text().splitlines()) - 1
        assert (f"  {main}:{line}: listeners.more: cannot listen on 127.0.0.1:{taken}: Address already in use"
                in result.stderr.splitlines())
        now = status(daemon)
        assert now["generation"] == 1 and "more" not in now["listeners"]
        assert http_get(ports.web, "/healthz") == (200, b"ok\n")
    finally:
        squatter.close()
