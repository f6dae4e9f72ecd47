"""relayd under a real systemd 252 as PID 1, booted in systemd-nspawn (issue 12).

The host install is exactly ``scripts/install --system``, run on this machine in a private mount
namespace whose /usr and /etc are overlays (the host's trees below, upper directories under
tmp_path above), so the host is left untouched and the script has the network pip may need.
The container then boots on the host's root (``--volatile=yes``: a fresh tmpfs root, the host's
/usr read-only) with the install's /usr upper layer overlaid on /usr and its /etc/relayd bound
writable, in its own network namespace (only loopback traffic, the host's ports stay free).
Recipe and pitfalls: daemon-conventions.md §1.6b. Everything is skipped, with the reason, where
systemd-nspawn is missing or a container cannot boot here; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MACHINE = f"relayd-test-{os.getpid()}"
BOOT_DEADLINE = 60.0
STATUS_URL = "http://127.0.0.1:9100/metrics"

pytestmark = [pytest.mark.timeout(1500)]  # two installs, each compiling the request path (mypyc)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, mount namespaces)"
    for tool in ("systemd-nspawn", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: systemd-container / util-linux; scripts/install --test)"
    if not Path("/usr/bin/python3").exists():
        return "/usr/bin/python3 (Debian's python3) is missing"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "this kernel has no overlay filesystem"
    # apt-get inside the overlay namespace would put files in the overlay and their record in the
    # host's dpkg database: the python3-venv the install needs must already be there.
    if subprocess.run(["/usr/bin/python3", "-c", "import ensurepip, venv"], capture_output=True).returncode:
        return "Debian's python3-venv is not installed (scripts/install installs it)"
    return None


WHY_NOT = _why_not()


class Container:
    def __init__(self, proc: subprocess.Popen, pid1: int, conf: Path, log: Path) -> None:
        self.proc, self.pid1, self.conf, self.log = proc, pid1, conf, log

    def run(self, *cmd: str, timeout: float = 30.0, check: bool = False) -> subprocess.CompletedProcess:
        result = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *cmd], capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def prop(self, unit: str, name: str) -> str:
        return self.run("systemctl", "show", "-P", name, unit, check=True).stdout.strip()

    def main_pid(self) -> int:
        return int(self.prop("relayd.service", "MainPID"))

    def http_status(self, url: str = STATUS_URL) -> int:
        code = ("import sys, urllib.request\n"
                f"print(urllib.request.urlopen({url!r}, timeout=20).status)\n")
        result = self.run("/usr/lib/relayd/bin/python", "-c", code, timeout=30)
        if result.returncode != 0:
            print(f"GET {url}: {result.stderr.strip().splitlines()[-1:]}")
        return int(result.stdout.strip()) if result.returncode == 0 else -1

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", "relayd.service", *args).stdout

    def wait_for(self, what: str, predicate, deadline: float) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.3)
        raise AssertionError(f"timed out after {deadline:.0f}s waiting for {what}\n"
                             + self.run("systemctl", "status", "--no-pager", "relayd.service").stdout
                             + self.journal("-n", "30"))

    def wait_active_new_pid(self, old_pid: int, deadline: float) -> int:
        def restarted() -> bool:
            pid = self.main_pid()
            return pid not in (0, old_pid) and self.prop("relayd.service", "ActiveState") == "active"
        self.wait_for(f"relayd to run again with a pid other than {old_pid}", restarted, deadline)
        return self.main_pid()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _install(tmp: Path) -> Path:
    """Run scripts/install --system with /usr and /etc as overlays; returns the upper root."""
    upper = tmp / "upper"
    for d in ("usr", "etc", "work-usr", "work-etc"):
        (upper / d).mkdir(parents=True)
    script = (
        "set -e\n"
        f"mount -t overlay overlay -o lowerdir=/usr,upperdir={upper}/usr,workdir={upper}/work-usr /usr\n"
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper}/etc,workdir={upper}/work-etc /etc\n"
        # Where the host runs systemd, its daemon-reload is none of this install's business.
        "if [ -d /run/systemd ]; then mount -t tmpfs tmpfs /run/systemd; fi\n"
        # A first install, even where this host has one (hidden in the overlays only).
        "rm -rf /etc/relayd /usr/lib/relayd /usr/bin/relayd /usr/bin/relayctl\n"
        # A root with a strict umask (the dynamic user must still read everything installed).
        f"umask 077; sh {ROOT}/scripts/install --system\n"
        # An operator edits a file and deletes another; installing again (an upgrade) keeps the
        # edit and does not bring the deleted file back.
        "echo '# edited by the operator' >> /etc/relayd/relayd.toml\n"
        "rm /etc/relayd/conf.d/60-relay.toml\n"
        "echo '=== second run ==='\n"
        f"exec sh {ROOT}/scripts/install --system\n")
    started = time.monotonic()
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=1200)
    (tmp / "install.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0 and "scripts/install:" not in result.stdout:
        # It failed before the install began: the overlays could not be mounted here.
        pytest.skip(f"cannot mount overlays in a private mount namespace here: {result.stderr[-300:]}")
    assert result.returncode == 0, f"scripts/install --system failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    # No silent minute: it says what it is doing at every step.
    assert result.stdout.count("scripts/install:") >= 6, result.stdout
    second = result.stdout.split("=== second run ===")[1]
    assert "/etc/relayd/relayd.toml: kept yours" in second, second
    assert not re.search(r"/etc/relayd/\S+: installed$", second, re.M), second
    toml = upper / "etc" / "relayd" / "relayd.toml"
    assert toml.read_text().endswith("# edited by the operator\n")
    assert (ROOT / "etc" / "relayd" / "relayd.toml").read_bytes() == toml.with_name("relayd.toml.dist").read_bytes()
    assert "/etc/relayd/conf.d/60-relay.toml: not in your /etc/relayd" in second, second
    relay = upper / "etc" / "relayd" / "conf.d" / "60-relay.toml"
    assert not relay.exists() and relay.with_name("60-relay.toml.dist").exists()
    print(f"scripts/install --system: {time.monotonic() - started:.1f}s")
    return upper


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory):
    if WHY_NOT:
        pytest.skip(WHY_NOT)
    tmp = tmp_path_factory.mktemp("nspawn")
    upper = _install(tmp)
    conf = tmp / "etc-relayd"
    shutil.copytree(upper / "etc" / "relayd", conf)
    preset = tmp / "00-test.preset"
    # A fresh /etc means a first boot, which would enable every preset unit of the host's /usr
    # (web servers, ...): enable nothing; the test enables relayd as README says.
    preset.write_text("disable *\n")

    # nspawn refuses to clean its propagation directory unless /run/systemd/nspawn is a tmpfs.
    nspawn_dir = Path("/run/systemd/nspawn")
    mounted_here = False
    nspawn_dir.mkdir(parents=True, exist_ok=True)
    run_fs = subprocess.run(["stat", "-f", "-c", "%T", "/run"], capture_output=True, text=True).stdout.strip()
    if run_fs != "tmpfs" and subprocess.run(["mountpoint", "-q", str(nspawn_dir)]).returncode != 0:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(nspawn_dir)], check=True)
        mounted_here = True

    log = tmp / "nspawn.log"
    cmd = ["systemd-nspawn", "-D", "/", "--volatile=yes", "--register=no", "--keep-unit",
           "--private-network", f"--machine={MACHINE}",
           # This machine's processes get a hard open-files limit below relayd's LimitNOFILE=65536,
           # which PID 1 of the container could then not grant.
           "--rlimit=RLIMIT_NOFILE=524288",
           f"--overlay-ro=/usr:{upper}/usr:/usr", f"--bind={conf}:/etc/relayd",
           f"--bind-ro={preset}:/etc/systemd/system-preset/00-test.preset",
           # The private network has only lo: wait-online would hold network-online.target
           # (After= of relayd.service) for its 2 minute timeout.
           "--bind-ro=/dev/null:/etc/systemd/system/systemd-networkd-wait-online.service",
           "--boot", "--", "systemd.firstboot=off"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    box = None
    try:
        end = time.monotonic() + BOOT_DEADLINE
        pid1 = None
        while time.monotonic() < end and pid1 is None:
            if proc.poll() is not None:
                pytest.skip(f"systemd-nspawn cannot boot a container here (exit {proc.returncode}): "
                            + log.read_text(errors="replace")[-500:])
            for child in _children(proc.pid):
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    pid1 = child
            time.sleep(0.2)
        if pid1 is None:
            pytest.skip("systemd did not start in the container within "
                        f"{BOOT_DEADLINE:.0f}s: " + log.read_text(errors="replace")[-500:])
        box = Container(proc, pid1, conf, log)
        state = ""
        while time.monotonic() < end:
            state = box.run("systemctl", "is-system-running", timeout=10).stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.5)
        else:
            jobs = box.run("systemctl", "list-jobs", "--no-pager").stdout
            pytest.skip(f"the container did not finish booting in {BOOT_DEADLINE:.0f}s ({state}):\n{jobs}")
        print(f"container booted: {state}")
        yield box
    finally:
        if box is not None and proc.poll() is None:
            try:
                box.run("systemctl", "poweroff", "--no-block", timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if mounted_here:
            subprocess.run(["umount", str(nspawn_dir)])


# -- without a container: what the host install generates and the operator runs first -----------

@pytest.mark.parametrize("prog, module", [("relayctl", "relayd.cli.ctl"), ("relayd", "relayd.cli.daemon")])
def test_version_needs_no_arguments_nor_daemon(prog: str, module: str) -> None:
    from relayd import __version__

    result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "RELAYD_CONTROL__SOCKET": "/nonexistent/relayd.sock"})
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{prog} {__version__}\n", "")


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_from_the_argparse_trees(shell: str) -> None:
    shtab = pytest.importorskip("shtab")
    from relayd.cli.ctl import build_parser
    from relayd.cli.daemon import parser

    ctl = shtab.complete(build_parser(), shell=shell)
    # Core commands, and command groups registered by the component modules.
    for word in ("reload", "status", "users", "stream", "--version", "--socket"):
        assert word in ctl, word
    assert "--check" in shtab.complete(parser(), shell=shell)
    if shell == "bash" and shutil.which("bash"):
        script = ctl + "\ncomplete -p relayctl\n"
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and result.stdout.strip().endswith(" relayctl"), result.stderr


# -- under systemd in the container ---------------------------------------------------------------

@pytest.mark.slow
def test_host_install_layout(container: Container) -> None:
    c = container
    assert c.run("relayd", "--version", check=True).stdout.strip().startswith("relayd ")
    assert c.run("relayctl", "--version", check=True).stdout.strip().startswith("relayctl ")
    assert c.run("readlink", "-f", "/usr/bin/relayd", check=True).stdout.strip() == "/usr/lib/relayd/bin/relayd"
    for path in ("/usr/lib/systemd/system/relayd.service", "/usr/lib/systemd/system/relayd.socket",
                 "/usr/lib/systemd/system/relayd-control.socket", "/usr/share/man/man8/relayd.8",
                 "/usr/share/man/man1/relayctl.1", "/usr/share/man/man5/relayd.toml.5",
                 "/usr/share/bash-completion/completions/relayctl",
                 "/usr/share/bash-completion/completions/relayd",
                 "/usr/share/zsh/vendor-completions/_relayctl",
                 "/etc/relayd/relayd.toml", "/etc/relayd/relayd.schema.json",
                 "/etc/relayd/relayd.fragment.schema.json"):
        c.run("test", "-s", path, check=True)
    completion = c.run("cat", "/usr/share/bash-completion/completions/relayctl", check=True).stdout
    assert "reload" in completion and "status" in completion
    for prog in ("relayctl", "relayd"):
        loaded = c.run("bash", "-c", f". /usr/share/bash-completion/completions/{prog} && complete -p {prog}",
                       check=True).stdout
        assert loaded.strip().endswith(f" {prog}"), loaded
    assert c.run("relayd", "--check", check=True).returncode == 0


@pytest.mark.slow
def test_socket_activation(container: Container) -> None:
    c = container
    c.run("systemctl", "start", "relayd.socket", "relayd-control.socket", check=True)
    assert c.prop("relayd.service", "ActiveState") == "inactive"
    # The first connection to the status listener starts the service (Type=notify: the
    # request waits in the backlog until relayd is ready).
    assert c.http_status() == 200
    assert c.prop("relayd.service", "ActiveState") == "active"
    # README's command, on an installed host.
    c.run("systemctl", "enable", "--now", "relayd", check=True)
    assert c.prop("relayd.service", "UnitFileState") == "enabled"
    status = c.run("relayctl", "status", check=True).stdout
    assert "(socket-activated)" in status, status


@pytest.mark.slow
def test_dynamic_user_and_limits(container: Container) -> None:
    c = container
    pid = c.main_pid()
    proc_status = c.run("cat", f"/proc/{pid}/status", check=True).stdout
    uid = int(re.search(r"^Uid:\s+(\d+)", proc_status, re.M).group(1))
    # systemd's DynamicUser= range (61184-65519), never root or a static system user.
    assert 61184 <= uid <= 65519, uid
    assert c.prop("relayd.service", "LimitNOFILE") == "65536"
    # systemd can grant no more than its own hard limit: where this machine's processes are
    # capped lower (a sandbox without CAP_SYS_RESOURCE, which --rlimit cannot lift), the
    # daemon gets that ceiling, soft = hard.
    ceiling = _nofile(c.run("cat", "/proc/1/limits", check=True).stdout)[1]
    assert _nofile(c.run("cat", f"/proc/{pid}/limits", check=True).stdout) == (min(65536, ceiling),) * 2


def _nofile(limits: str) -> tuple[int, int]:
    soft, hard = re.search(r"^Max open files\s+(\d+)\s+(\d+)\s", limits, re.M).groups()
    return int(soft), int(hard)


@pytest.mark.slow
def test_security_online(container: Container) -> None:
    result = container.run("systemd-analyze", "security", "--no-pager", "--threshold=20", "relayd.service",
                           timeout=60)
    match = re.search(r"Overall exposure level for relayd.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0 and result.returncode == 0, result.stdout[-2000:]


def _generation(c: Container) -> int:
    return int(re.search(r"generation (\d+)", c.run("relayctl", "status", check=True).stdout).group(1))


@pytest.mark.slow
def test_reload_ok_and_rejected(container: Container) -> None:
    c = container
    pid, before = c.main_pid(), _generation(c)
    c.run("systemctl", "reload", "relayd", check=True)
    assert _generation(c) == before + 1
    broken = c.conf / "conf.d" / "99-broken.toml"
    broken.write_text('[logging]\nlevel = "loud"\n')
    try:
        result = c.run("systemctl", "reload", "relayd", timeout=60)
        assert result.returncode != 0, "a broken configuration must fail systemctl reload"
        assert c.main_pid() == pid and c.prop("relayd.service", "ActiveState") == "active"
        assert _generation(c) == before + 1          # the old generation keeps serving
        assert c.http_status() == 200
        c.wait_for("the rejection in the journal, with file:line",
                   lambda: "/etc/relayd/conf.d/99-broken.toml:2" in c.journal(), 10)
    finally:
        broken.unlink()
    c.run("systemctl", "reload", "relayd", check=True)
    assert _generation(c) == before + 2


@pytest.mark.slow
def test_journal_priority_of_rejected_reload(container: Container) -> None:
    # relayd prefixes its lines with <N> under journald (JOURNAL_STREAM), so the rejection is
    # an error in the journal and info lines are not.
    errors = container.journal("-p", "err")
    assert "99-broken.toml:2" in errors, errors
    assert "reloaded: generation" not in errors


PROXY_FRAGMENT = """
[listeners.web]
bind = "127.0.0.1:18081"

[components.web]
kind = "http_proxy"
auth = "anyone"
extra_listeners = ["web"]

[components.web.services.metrics]
listeners = ["web"]
from = "/s"
to = "http://127.0.0.1:9100"

[components.web.services.slow]
listeners = ["web"]
from = "/slow"
to = "http://127.0.0.1:18090"
"""

# An upstream that answers after 3 seconds, for a request in flight while relayd stops.
SLOW_UPSTREAM = """
import http.server, time
class Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(3)
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"slow\\n")
http.server.HTTPServer(("127.0.0.1", 18090), Slow).serve_forever()
"""


def _usage(c: Container) -> dict:
    body = json.loads(c.run("relayctl", "stats", "--json", check=True).stdout)
    return {key: body[key] for key in ("requests", "bytesOut", "statuses", "rejected")}


@pytest.mark.slow
def test_restart_on_failure_after_sigkill(container: Container) -> None:
    c = container
    # An http_proxy in front of the status listener, so there are usage counters to lose.
    (c.conf / "conf.d" / "70-proxy.toml").write_text(PROXY_FRAGMENT)
    c.run("systemctl", "reload", "relayd", check=True)
    for _ in range(3):
        assert c.http_status("http://127.0.0.1:18081/s/metrics") == 200
    time.sleep(2.5)                                     # counters are flushed every second
    before = _usage(c)
    assert before["requests"] == 3 and before["statuses"]["2xx"] == 3, before
    pid = c.main_pid()
    restarts = int(c.prop("relayd.service", "NRestarts"))
    c.run("kill", "-KILL", str(pid), check=True)
    c.wait_active_new_pid(pid, 20)
    assert int(c.prop("relayd.service", "NRestarts")) == restarts + 1
    assert c.http_status() == 200
    assert _usage(c) == before


@pytest.mark.slow
def test_watchdog_restarts_a_stopped_daemon(container: Container) -> None:
    c = container
    # The shipped WatchdogSec=30s is shortened by a drop-in, the way an operator would, so the
    # test stays short; the daemon pings every WatchdogSec/2.
    dropin = Path("/etc/systemd/system/relayd.service.d")
    c.run("mkdir", "-p", str(dropin), check=True)
    c.run("sh", "-c", f"printf '[Service]\\nWatchdogSec=2s\\n' > {dropin}/50-test-watchdog.conf", check=True)
    try:
        c.run("systemctl", "daemon-reload", check=True)
        c.run("systemctl", "restart", "relayd", check=True)
        pid = c.main_pid()
        time.sleep(3)                                   # pings keep it alive past one period
        assert c.main_pid() == pid
        c.run("kill", "-STOP", str(pid), check=True)
        c.wait_active_new_pid(pid, 30)
        assert "watchdog" in c.journal("-n", "200", "-o", "short").lower() or \
            c.prop("relayd.service", "Result") == "watchdog"
        assert c.http_status() == 200
    finally:
        c.run("rm", "-rf", str(dropin))
        c.run("systemctl", "daemon-reload")
        c.run("systemctl", "restart", "relayd")


@pytest.mark.slow
def test_stop_drains(container: Container) -> None:
    c = container
    c.run("systemd-run", "--unit=slow-upstream", "/usr/bin/python3", "-c", SLOW_UPSTREAM, check=True)
    c.wait_for("the slow upstream to listen",
               lambda: c.run("bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/18090").returncode == 0, 10)
    code = ("import urllib.request\n"
            "r = urllib.request.urlopen('http://127.0.0.1:18081/slow/x', timeout=30)\n"
            "print(r.status, r.read().decode().strip())\n")
    in_flight = subprocess.Popen(["nsenter", "-t", str(c.pid1), "-a", "/usr/lib/relayd/bin/python", "-c", code],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)                                 # the request is waiting for the upstream
        started = time.monotonic()
        c.run("systemctl", "stop", "relayd", check=True, timeout=60)
        took = time.monotonic() - started
        out, err = in_flight.communicate(timeout=30)
    finally:
        if in_flight.poll() is None:
            in_flight.kill()
            in_flight.wait()
        c.run("systemctl", "stop", "slow-upstream")
    # The request in flight was answered before relayd exited, which waited for it.
    assert out.strip() == "200 slow", (out, err)
    assert 1.0 <= took < 15, f"stop took {took:.1f}s"
    assert c.prop("relayd.service", "ActiveState") == "inactive"
    assert c.prop("relayd.service", "Result") == "success"
    assert "stopping: draining" in c.journal("-n", "50")
    # The sockets stay with systemd: the next connection starts relayd again.
    assert c.prop("relayd.socket", "ActiveState") == "active"
    c.wait_for("a connection to start relayd again", lambda: c.http_status() == 200, 20)
