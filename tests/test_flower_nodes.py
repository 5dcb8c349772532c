"""crfl.flower.nodes without a SuperLink: who is asked when, error replies, keys and arguments.

The host over a real SuperLink (TLS, registered keys, an unregistered one refused, the
model equal to ``crfl train``) is ``test_deployment_tls_authenticated_supernodes[hosted]``
in tests/test_flower.py.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

from crfl.flower import nodes  # noqa: E402
from crfl.flower.testing import server_identity  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_host(n: int, inbox: dict[int, list[str]], monkeypatch, sweep_interval: float = 1.0):
    """A NodeHost over n fake nodes: node k's receive() pops inbox[k]; handle() records (node, message)."""
    asked: list[int] = []
    handled: list[tuple[int, str]] = []

    def receive_for(k: int):
        def receive():
            asked.append(k)
            return (inbox[k].pop(0), None) if inbox.get(k) else None
        return receive

    host = nodes.NodeHost("127.0.0.1:1", [None] * n, poll_interval=0.01, sweep_interval=sweep_interval)
    for k in range(n):
        host.nodes.append(nodes.HostedNode(f"node {k}", 100 + k, receive_for(k), *[None] * 6))
    monkeypatch.setattr(host, "handle", lambda node, msg, tree: handled.append((node.node_id - 100, msg)))
    clock = Clock()
    monkeypatch.setattr(nodes.time, "monotonic", clock)
    return host, asked, handled, clock


def test_idle_ticks_ask_one_node_in_turn(monkeypatch):
    host, asked, handled, clock = fake_host(5, {}, monkeypatch)
    clock.now = 0.5  # the first tick after a sweep is due at 1.0
    host._last_sweep = 0.0
    for _ in range(7):
        assert host.poll_once() == 0
    assert asked == [0, 1, 2, 3, 4, 0, 1]  # one pull per tick, whatever the number of nodes
    assert handled == []


def test_a_message_makes_the_host_ask_every_node_until_a_pass_finds_none(monkeypatch):
    # a round's messages for nodes 0, 2 and 3; node 3's arrives during the first full pass (a second message later)
    inbox = {2: ["m2"], 0: ["m0"], 3: ["m3", "m3b"]}
    host, asked, handled, clock = fake_host(4, inbox, monkeypatch)
    clock.now = 0.5
    host._last_sweep = 0.0
    host._turn = 1  # node 1 has nothing: an idle tick
    assert host.poll_once() == 0
    assert asked == [1]
    asked.clear()
    assert host.poll_once() == 4  # node 2 in turn has one: then full passes until one finds nothing
    assert asked == [2, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]
    assert [m for _, m in handled] == ["m2", "m0", "m3", "m3b"]


def test_every_node_is_asked_at_least_every_sweep_interval(monkeypatch):
    host, asked, handled, clock = fake_host(6, {4: ["late"]}, monkeypatch, sweep_interval=1.0)
    host._last_sweep = 0.0
    clock.now = 0.2
    host.poll_once()  # node 0: nothing
    assert asked == [0] and handled == []
    asked.clear()
    clock.now = 1.0  # a sweep is due: all six are asked, node 4's message is handled, then one more full pass
    assert host.poll_once() == 1
    assert asked == [0, 1, 2, 3, 4, 5] * 2
    assert handled == [(4, "late")]
    asked.clear()
    clock.now = 1.5  # the sweep reset the clock
    host.poll_once()
    assert len(asked) == 1


@pytest.mark.parametrize("fault", ["run stopped", "pull failed"])
def test_a_message_that_fails_is_dropped_and_the_host_goes_on(monkeypatch, caplog, fault):
    from flwr.supercore.run import RunNotRunningException

    host, asked, handled, clock = fake_host(2, {0: ["m"], 1: ["n"]}, monkeypatch)
    served = []

    def handle(node, msg, tree):
        if msg == "m":
            raise RunNotRunningException("stopped") if fault == "run stopped" else TimeoutError("object 3f2a not available")
        served.append(msg)

    monkeypatch.setattr(host, "handle", handle)
    host._last_sweep, clock.now = 0.0, 0.1
    with caplog.at_level("INFO", logger="crfl.flower"):
        assert host.poll_once() == 2  # node 0's message was taken and dropped; node 1's served
    assert served == ["n"]
    expected = "no longer running" if fault == "run stopped" else "node 0 (id 100): message dropped: TimeoutError: object 3f2a"
    assert any(expected in r.getMessage() for r in caplog.records)


def test_a_superlink_that_stays_unreachable_ends_the_host(monkeypatch):
    """As a SuperNode does: once Flower's retries of the message pull give up, the error leaves the loop."""
    host, asked, handled, clock = fake_host(2, {}, monkeypatch)

    def gone():
        raise ConnectionError("SuperLink unreachable after 3 tries")

    host.nodes[1].receive = gone
    host._last_sweep, clock.now = 0.0, 0.1
    host.poll_once()  # node 0: nothing
    with pytest.raises(ConnectionError, match="unreachable"):
        host.poll_once()


def _train_message() -> Message:
    with server_identity():
        return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), 123, "train", group_id="1")


def test_a_clientapp_that_raises_answers_with_flowers_error_reply():
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        raise ValueError("shard 3 is empty")

    msg = _train_message()
    reply, ok = nodes.call_client_app(lambda: app, msg, None)
    assert not ok
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "shard 3 is empty" in reply.error.reason
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id


def test_an_app_that_cannot_be_loaded_answers_with_the_load_error():
    from flwr.clientapp.client_app import LoadClientAppError

    def load():
        raise LoadClientAppError("no module named crfl_missing")

    reply, ok = nodes.call_client_app(load, _train_message(), None)
    assert not ok and reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION


def test_keys_are_read_as_flower_supernode_reads_them(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tmp_path / "ec")], check=True)
    private, public = nodes.load_key(tmp_path / "ec")
    assert private.public_key().public_numbers() == public.public_numbers()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "ed")], check=True)
    with pytest.raises(ValueError, match="'auth-supernode-private-key' file .*ed.* holds a .*Ed25519.*ECDSA"):
        nodes.load_key(tmp_path / "ed")
    (tmp_path / "junk").write_bytes(np.arange(40, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="'auth-supernode-private-key' file .*junk.* cannot be read as an OpenSSH private key"):
        nodes.load_key(tmp_path / "junk")
    with pytest.raises(ValueError, match="cannot be read"):
        nodes.load_key(tmp_path / "missing")


@pytest.mark.parametrize("argv, message", [
    (["--count", "0"], "The 'count' parameter must be an integer in [1, 1000]. Got 0 instead."),
    (["--count", "2", "--poll-interval", "0"], "The 'poll-interval' parameter must be a float in (0, 60]. Got 0.0 instead."),
    (["--count", "2", "--poll-interval", "nan"], "The 'poll-interval' parameter must be a float in (0, 60]. Got nan instead."),
    (["--count", "2", "--sweep-interval", "0.001"], "The 'sweep-interval' parameter must be a float in [poll-interval, 3600]. Got 0.001 instead."),
    (["--count", "2", "--max-retries", "-1"], "The 'max-retries' parameter must be an integer >= 0. Got -1 instead."),
    (["--count", "2", "--max-wait-time", "inf"], "The 'max-wait-time' parameter must be a float in (0, inf). Got inf instead."),
    (["--auth-supernode-private-key", "k0"], "The 'auth-supernode-private-key' parameter needs TLS (--root-certificates); got --insecure."),
])
def test_bad_arguments_name_the_parameter(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        nodes._parse_args(["--superlink", "127.0.0.1:9300", "--insecure", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_count_and_keys_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        nodes._parse_args(["--superlink", "x:1", "--root-certificates", "ca.crt", "--count", "2", "--auth-supernode-private-key", "k"])
    assert "not allowed with argument" in capsys.readouterr().err
