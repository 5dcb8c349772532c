"""crfl.flower.deploy.nodes without a SuperLink: who is asked when, error replies, keys and arguments.

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

from crfl.flower.deploy import nodes  # noqa: E402
from tests.support.grid import server_identity  # noqa: E402


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
    assert asked == [2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]  # each pass starts where the rotation stands
    assert [m for _, m in handled] == ["m2", "m3", "m0", "m3b"]


def test_every_node_is_asked_at_least_every_sweep_interval(monkeypatch):
    host, asked, handled, clock = fake_host(6, {4: ["late"]}, monkeypatch, sweep_interval=1.0)
    host._last_sweep = 0.0
    clock.now = 0.2
    host.poll_once()  # node 0: nothing
    assert asked == [0] and handled == []
    asked.clear()
    clock.now = 1.0  # a sweep is due: all six are asked, node 4's message is handled, then one more full pass
    assert host.poll_once() == 1
    assert asked == [1, 2, 3, 4, 5, 0] * 2
    assert handled == [(4, "late")]
    asked.clear()
    clock.now = 1.5  # the sweep reset the clock
    host.poll_once()
    assert len(asked) == 1
    asked.clear()
    clock.now = 2.0  # a full pass counts from its end: the next sweep is due at 2.0, not earlier
    host.poll_once()
    assert len(asked) == 6


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


def test_a_node_whose_pulls_fail_leaves_the_host_and_the_last_one_ends_it(monkeypatch, caplog):
    host, asked, handled, clock = fake_host(3, {2: ["m"]}, monkeypatch)

    def gone():
        raise ConnectionError("SuperLink unreachable after 3 tries")

    host.nodes[1].receive = gone
    host._last_sweep, clock.now = 0.0, 0.1
    host.poll_once()  # node 0: nothing
    with caplog.at_level("ERROR", logger="crfl.flower"):
        assert host.poll_once() == 0  # node 1 fails and leaves
    assert host.nodes[1].failed
    assert any("node 1 (id 101) leaves the host: pulling its messages failed: ConnectionError" in r.getMessage() for r in caplog.records)
    asked.clear()
    clock.now = 2.0  # a sweep: only the live nodes are asked, node 2's message is served
    assert host.poll_once() == 1
    assert handled == [(2, "m")] and set(asked) == {0, 2}
    host.nodes[0].receive = host.nodes[2].receive = gone
    host.poll_once(), host.poll_once()  # one tick each: both leave
    assert all(n.failed for n in host.nodes)
    with pytest.raises(RuntimeError, match="none of the 3 hosted nodes can pull its messages"):
        host.poll_once()


def test_a_run_that_stopped_before_its_message_was_pulled_is_not_a_hit(monkeypatch):
    from flwr.supercore.run import RunNotRunningException

    host, asked, handled, clock = fake_host(3, {}, monkeypatch)

    def stopped():
        raise RunNotRunningException("stopped")

    host.nodes[0].receive = stopped
    host._last_sweep, clock.now = 0.0, 0.1
    assert host.poll_once() == 0 and asked == []  # no full pass follows (a hit would start one)


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
    reply, ok = nodes.call_client_app(lambda: app, msg, lambda: None)
    assert not ok
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "shard 3 is empty" in reply.error.reason
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id


def test_an_app_that_cannot_be_loaded_answers_with_the_load_error():
    from flwr.clientapp.client_app import LoadClientAppError

    def load():
        raise LoadClientAppError("no module named crfl_missing in /home/op/.flwr/apps")

    reply, ok = nodes.call_client_app(load, _train_message(), lambda: None)
    assert not ok and reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert reply.error.reason == "An exception was raised when attempting to load `ClientApp`"  # flwr-clientapp's words, no paths


def test_a_context_that_cannot_be_built_is_answered_not_left_waiting():
    def context():
        raise ValueError("run config 'round-timeout' is not a number")

    reply, ok = nodes.call_client_app(lambda: None, _train_message(), context)
    assert not ok and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "'round-timeout' is not a number" in reply.error.reason


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


def test_a_key_listed_twice_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        nodes._parse_args(["--superlink", "x:1", "--root-certificates", "ca.crt", "--auth-supernode-private-key",
                           str(tmp_path / "k0"), str(tmp_path / "k1"), str(tmp_path / "." / "k0")])
    assert f"lists {str(tmp_path / 'k0')!r} twice; every hosted node needs its own key" in capsys.readouterr().err


def test_count_and_keys_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        nodes._parse_args(["--superlink", "x:1", "--root-certificates", "ca.crt", "--count", "2", "--auth-supernode-private-key", "k"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_handle_does_what_supernode_and_flwr_clientapp_do_together(monkeypatch):
    """One message through a fake Fleet connection: content pulled by object id, receipt confirmed with the
    message's id, the ClientApp called with the node's context (state kept across messages and into the next
    run of the series), the reply sent with its object tree and only the objects the SuperLink asks for pushed."""
    import types

    from flwr.app import Array, ArrayRecord
    from flwr.clientapp import ClientApp
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree, no_object_id_recompute

    with server_identity():
        msg = Message(RecordDict({"config": ConfigRecord({"server-round": 3}),
                                  "arrays": ArrayRecord({"w": Array(np.arange(5, dtype=np.float32))})}), 7, "train", group_id="3")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    with no_object_id_recompute():
        tree = get_object_tree(msg)
        store = {k: v.deflate() for k, v in get_all_nested_objects(msg).items()}
    pulled, confirmed, sent, pushed = [], [], [], []

    def pull(run_id, oid):
        pulled.append(oid)
        return store[oid]

    def send(reply, reply_tree, runtime):
        sent.append((reply, reply_tree, runtime))
        return {reply_tree.object_id}, "session-1"  # the SuperLink asks for the head object only

    runs = {5: types.SimpleNamespace(run_id=5, series_id=9, fab_id="crfl/app", fab_version="1", fab_hash="h", override_config={}),
            6: types.SimpleNamespace(run_id=6, series_id=9, fab_id="crfl/app", fab_version="1", fab_hash="h", override_config={})}
    app = ClientApp()

    @app.train()
    def train(m, ctx):
        count = ctx.state["seen"]["n"] + 1 if "seen" in ctx.state else 1
        ctx.state["seen"] = ConfigRecord({"n": count})
        w = m.content["arrays"]["w"].numpy()
        return Message(RecordDict({"r": ConfigRecord({"n": count, "sum": float(w.sum()), "run": ctx.run_id,
                                                      "node": ctx.node_id, "cfg": ctx.run_config["preset"]})}), reply_to=m)

    host = nodes.NodeHost("127.0.0.1:1", [None])
    host._apps = lambda run, fab: app
    monkeypatch.setattr(nodes, "get_fused_config_from_fab", lambda content, run: {"preset": f"demo-{run.run_id}"})
    node = nodes.HostedNode("node 0", 7, None, send, lambda rid: runs[rid], lambda h, rid: types.SimpleNamespace(hash_str=h, content=b""),
                            pull, lambda rid, sid, oid, b: pushed.append((rid, sid, oid)), lambda rid, oid: confirmed.append((rid, oid)))
    for run_id, expected_n in [(5, 1), (5, 2), (6, 3)]:
        msg.metadata.__dict__["_run_id"] = run_id
        host.handle(node, msg, tree)
        reply, reply_tree, runtime = sent[-1]
        assert confirmed[-1] == (run_id, tree.object_id)  # receipt confirmed once, with the message's id
        assert reply.metadata.reply_to_message_id == tree.object_id
        assert (reply.metadata.src_node_id, reply.metadata.dst_node_id) == (7, msg.metadata.src_node_id)
        assert reply.metadata.message_id == reply_tree.object_id and runtime >= 0
        assert pushed[-1] == (run_id, "session-1", reply_tree.object_id)  # only what the SuperLink asked for
        r = reply.content["r"]
        assert (r["n"], r["sum"], r["run"], r["node"], r["cfg"]) == (expected_n, 10.0, run_id, 7, f"demo-{run_id}")
    assert len(confirmed) == len(sent) == len(pushed) == 3 and set(pulled) == set(store)
    assert list(node.contexts) == [9] and node.contexts[9].run_id == 6  # one context per series: the latest run's
    assert node.handled == 3


@pytest.mark.parametrize("name", ["nodes", "supernode", "worker"])
def test_old_module_paths_are_deprecated_aliases(name, monkeypatch):
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, f"crfl.flower.{name}", raising=False)
    with pytest.warns(DeprecationWarning, match=f"use crfl.flower.deploy.{name}"):
        old = importlib.import_module(f"crfl.flower.{name}")
    assert old is importlib.import_module(f"crfl.flower.deploy.{name}")
    if name == "nodes":  # python -m at the old path runs the new module
        done = subprocess.run([sys.executable, "-m", "crfl.flower.nodes", "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "usage: python -m crfl.flower.deploy.nodes" in done.stdout
        assert "DeprecationWarning: crfl.flower.nodes is deprecated" in done.stderr
