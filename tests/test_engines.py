"""Engine health records: URLs shown in status and logs never carry a password."""

from __future__ import annotations

import logging

import pytest

import configs
from relayd.engines import Engines, redact_url


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://relayd:s3cret@db.example:5432/relayd", "postgresql://relayd@db.example:5432/relayd"),
    ("redis://:s3cret@10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
    ("rediss://user:s3cret@[::1]:6380", "rediss://user@[::1]:6380"),
    ("postgresql://db/relayd?password=s3cret", "postgresql://db/relayd"),
])
def test_redacted_url_has_no_secret(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


def test_degraded_lists_engines_down_and_logs_each_transition_once(caplog) -> None:
    engines = Engines()
    state = engines.register("state", "postgresql", "postgresql://u:pw@db/x")
    cluster = engines.register("cluster", "redis", "redis://:pw@r:6379")
    assert engines.degraded() == ["cluster", "state"]  # not yet connected
    state.report(True)
    cluster.report(True)
    assert engines.degraded() == []
    with caplog.at_level(logging.WARNING, logger="relayd.engines"):
        for _ in range(5):
            cluster.report(False, "connection refused")
    assert engines.degraded() == ["cluster"]
    assert len([r for r in caplog.records if "is down" in r.getMessage()]) == 1
    assert cluster.failures == 1
    assert "pw" not in caplog.text
    # A reload registering the same engine keeps its history.
    assert engines.register("cluster", "redis", "redis://:pw@r:6379") is cluster


def test_removing_an_unreachable_cluster_engine_by_reload_ends_degraded(relayd, port) -> None:
    """An operator takes a dead Redis out of the configuration: the node is no longer degraded."""
    import json

    from relayd.testing import free_port, get_text

    status_port, dead_redis = free_port(), free_port()  # nothing listens on dead_redis
    body = configs.config(configs.auth(open="none"), configs.listeners(relay=port, status=status_port),
                          configs.relay(), configs.status())
    daemon = relayd(body + f'[cluster]\nredis = "redis://:pw@127.0.0.1:{dead_redis}"\nnode = "n1"\n')

    def engines() -> dict:
        return json.loads(daemon.ctl("status", "--json").stdout)["engines"]

    assert engines()["cluster"]["up"] is False
    assert "pw" not in engines()["cluster"]["url"]
    assert get_text(f"http://127.0.0.1:{status_port}/healthz")[1].startswith("degraded: cluster")
    (daemon.config_dir / "relayd.toml").write_text(body)
    assert daemon.ctl("reload").returncode == 0
    assert engines() == {}
    assert get_text(f"http://127.0.0.1:{status_port}/healthz")[1] == "ok\n"
