"""Key rotation on fakes: the pure switch rules, the key files, the rotating node (announce, switch once the API holds
it, greet every peer, carry on after a restart, retime an unannounced switch, rotate by interval), its peers (switch
just after the node, at once when late, not at all for a stale announcement), a cloned key cleared by rotating, and
a key the API never held kept out of the tunnel until it does."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from node_hook import engine as engine_module
from node_hook import rotation
from node_hook.cli import main as wgcni_node
from node_hook.keys import KeyStore, load_or_create
from node_hook.local_api import answer
from node_hook.model import Publication, RemoteNode
from tests.hook.test_daemon import KEY_B, Harness, node_b, running_harness, tunnel_rules

LEAD = 0.4  # the tests' SWITCH_LEAD: long enough to see the announcement before the switch
KEY_C = "C" * 43 + "="


@pytest.fixture(autouse=True)
def short_lead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "SWITCH_LEAD", LEAD)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    with running_harness(tmp_path) as harness:
        yield harness


def rotating(node: RemoteNode, next_key: str, switch_at: float) -> RemoteNode:
    return replace(node, next_public_key=next_key, key_switch_at=switch_at)


def device_peers(h: Harness) -> set[str]:
    return set(h.wg.device.peers) if h.wg.device is not None else set()


# ---- the pure rules ---------------------------------------------------------------------------------------------

def test_peers_switch_just_after_the_node_and_ignore_a_stale_announcement() -> None:
    node = rotating(node_b(set()), KEY_C, 1000.0)
    assert rotation.effective_key(node, 1000.0) == KEY_B  # the node switches first
    assert rotation.effective_key(node, 1000.0 + rotation.SWITCH_DELAY) == KEY_C
    assert rotation.effective_key(node, 1000.0 + rotation.SWITCH_GRACE) == KEY_C
    assert rotation.effective_key(node, 1000.0 + rotation.SWITCH_GRACE + 1) == KEY_B  # never switched: stale
    assert rotation.effective(node_b(set()), 5.0) == node_b(set())
    assert rotation.next_change(node, 999.0) == 1000.0 + rotation.SWITCH_DELAY
    assert rotation.next_change(node, 1001.0) == 1000.0 + rotation.SWITCH_GRACE
    assert rotation.next_change(node, 1000.0 + rotation.SWITCH_GRACE) is None
    assert rotation.next_change(node_b(set()), 5.0) is None


def test_a_rotating_node_keeps_the_switch_time_the_api_holds_while_it_is_valid() -> None:
    held = Publication("written", KEY_B, next_public_key=KEY_C, key_switch_at=900.0)
    assert rotation.switch_time(held, KEY_C, planned=1005.0, now=1000.0) == 900.0
    assert rotation.switch_time(held, KEY_C, planned=2000.0, now=900.0 + rotation.SWITCH_GRACE + 1) == 2000.0
    assert rotation.switch_time(held, "other", planned=1005.0, now=1000.0) == 1005.0
    assert rotation.confirmed(held, KEY_C, 900.0) and not rotation.confirmed(held, KEY_C, 901.0)
    assert not rotation.confirmed(Publication("written", KEY_B), KEY_C, 900.0)


def test_the_next_key_file_is_private_durable_and_replaces_the_current_one_whole(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "private.key")
    current = store.current()
    assert store.pending() is None
    created = store.create_next()
    assert store.create_next() == created and KeyStore(store.path).pending() == created  # one next key, kept
    assert stat.S_IMODE(os.stat(store.next_path).st_mode) == 0o600 and created != current
    assert store.promote_next() == created
    assert load_or_create(store.path) == created and not store.next_path.exists()
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    with pytest.raises(Exception, match="no next key"):
        store.promote_next()
    store.next_path.write_text("not a key\n")
    with pytest.raises(Exception, match="not a base64"):
        store.pending()


# ---- the rotating node ------------------------------------------------------------------------------------------

def test_rotation_announces_the_next_key_then_switches_once_the_api_holds_it_and_greets_every_peer(
        harness: Harness) -> None:
    harness.source.sync(node_b({"10.240.0.70"}))
    harness.settle(lambda: device_peers(harness) == {KEY_B})
    assert harness.wg.greetings == [KEY_B]  # a new peer is greeted: the pair has a session at once
    allowed = harness.wg.device.peers[KEY_B].allowed_ips
    harness.wg.greetings.clear()
    old = harness.engine.key.public_key
    state = harness.engine.rotate_key()
    next_key, switch_at = state["nextPublicKey"], state["switchAt"]
    assert state["publicKey"] == old and next_key not in (None, old)
    assert harness.engine.rotate_key()["nextPublicKey"] == next_key  # one rotation at a time
    harness.settle(lambda: any(a.next_public_key == next_key for a in harness.source.published))
    announced = next(a for a in harness.source.published if a.next_public_key == next_key)
    assert announced.public_key == old and announced.key_switch_at == pytest.approx(switch_at)
    assert harness.wg.device.public_key == old  # not before the switch time
    harness.settle(lambda: harness.wg.device.public_key == next_key)
    assert time.time() >= switch_at
    assert harness.wg.device.peers[KEY_B].allowed_ips == allowed  # the peers stay, with their AllowedIPs
    harness.settle(lambda: harness.wg.greetings == [KEY_B])  # each peer greeted to start a session with the new key
    assert load_or_create(harness.settings.key_file).public_key == next_key
    assert KeyStore(harness.settings.key_file).pending() is None
    harness.settle(lambda: harness.source.published[-1].public_key == next_key)
    assert harness.source.published[-1].next_public_key == ""
    rotation_state = harness.view.status()["keyRotation"]
    assert rotation_state["publicKey"] == next_key and rotation_state["rotations"] == 1
    assert rotation_state["nextPublicKey"] is None
    assert harness.view.publication_status()["state"] == "confirmed"


def test_a_switch_time_the_api_never_held_is_moved_and_announced_again(harness: Harness) -> None:
    harness.source.accept_writes = False
    old = harness.engine.key.public_key
    first = harness.engine.rotate_key()
    time.sleep(LEAD * 2.5)
    assert harness.wg.device.public_key == old  # peers cannot have known: no switch
    later = harness.engine.key_state()
    assert later["switchAt"] > first["switchAt"]
    harness.settle(lambda: harness.source.published[-1].key_switch_at >= later["switchAt"] - 1e-3)
    announced = harness.source.published[-1]
    harness.source.report(Publication("written", old, next_public_key=announced.next_public_key,
                                      key_switch_at=announced.key_switch_at))
    harness.settle(lambda: harness.wg.device.public_key == first["nextPublicKey"])


def test_a_hook_restarted_in_a_rotation_carries_on_with_the_same_key_and_the_time_peers_know(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    next_key = KeyStore(harness.settings.key_file).create_next()
    harness.source.accept_writes = False
    harness.node.start()
    try:
        assert harness.engine.key_state()["nextPublicKey"] == next_key.public_key
        # The API still holds the announcement of the hook before the restart, whose time has passed: peers use the
        # next key now, so the node switches at once.
        harness.source.report(Publication("written", harness.key.public_key, next_public_key=next_key.public_key,
                                          key_switch_at=time.time() - 30))
        harness.settle(lambda: harness.wg.device is not None and harness.wg.device.public_key == next_key.public_key)
    finally:
        harness.node.stop()


def test_the_interval_rotates_a_key_old_enough(tmp_path: Path) -> None:
    harness = Harness(tmp_path, key_rotation_interval=3600.0)
    old = harness.key.public_key
    hour_ago = time.time() - 3700
    os.utime(harness.settings.key_file, (hour_ago, hour_ago))
    harness.node.start()
    try:
        harness.settle(lambda: harness.wg.device is not None and harness.wg.device.public_key != old, timeout=10)
        assert harness.engine.key_state()["rotations"] == 1
        assert time.time() - KeyStore(harness.settings.key_file).created_at() < 60  # the new key is young: no loop
    finally:
        harness.node.stop()


def test_a_hook_without_a_key_file_says_it_cannot_rotate(harness: Harness) -> None:
    harness.engine.key_store = None
    reply = answer(harness.node, {"op": "rotate-key"})
    assert reply == {"ok": False, "error": "this hook has no key file to rotate"}


def test_rotate_key_without_a_running_hook_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(f'{{"socket": "{tmp_path / "none.sock"}", "stateDir": "{tmp_path}"}}')
    result = CliRunner().invoke(wgcni_node, ["rotate-key", "--config", str(config)])
    assert result.exit_code == 1 and result.output.startswith("Error: no hook answers on ")
    assert len(result.output.strip().splitlines()) == 1


# ---- the peers of a rotating node -------------------------------------------------------------------------------

@pytest.fixture
def quiet_harness(tmp_path: Path) -> Iterator[Harness]:
    """A hook whose worker has nothing else to wake it (no record rescan for 30 s): a switch must wake it."""
    with running_harness(tmp_path, record_rescan_interval=30.0) as harness:
        yield harness


def test_a_peer_replaces_the_nodes_key_just_after_its_switch_time_and_greets_it(quiet_harness: Harness) -> None:
    harness = quiet_harness
    switch_at = time.time() + LEAD
    harness.source.sync(rotating(node_b({"10.240.0.70"}), KEY_C, switch_at))
    harness.settle(lambda: device_peers(harness) == {KEY_B})
    allowed = harness.wg.device.peers[KEY_B].allowed_ips
    harness.settle(lambda: device_peers(harness) == {KEY_C}, timeout=5)
    assert switch_at + rotation.SWITCH_DELAY <= time.time() < switch_at + rotation.SWITCH_DELAY + 0.5
    assert harness.wg.device.peers[KEY_C].allowed_ips == allowed
    assert harness.wg.greetings[-1] == KEY_C
    # The node's own write of its new key changes nothing more.
    harness.source.change(replace(node_b({"10.240.0.70"}), public_key=KEY_C))
    harness.settle(lambda: device_peers(harness) == {KEY_C})


def test_a_late_peer_switches_at_once_and_a_stale_announcement_is_ignored(harness: Harness) -> None:
    key_d = "D" * 43 + "="
    late = rotating(node_b({"10.240.0.70"}), KEY_C, time.time() - 10)
    stale = rotating(RemoteNode("d", key_d, "10.240.0.36", 51820, frozenset({"10.240.0.36"}), frozenset(), 1.0),
                     "E" * 43 + "=", time.time() - rotation.SWITCH_GRACE - 10)
    harness.source.sync(late, stale)
    harness.settle(lambda: device_peers(harness) == {KEY_C, key_d})


def test_a_cloned_key_is_cleared_by_rotating_one_of_the_nodes(harness: Harness) -> None:
    own = harness.engine.key.public_key
    clone = replace(node_b({"10.240.0.70"}), public_key=own)
    harness.source.sync(clone)
    harness.settle(lambda: any(p.kind == "key-conflict" for p in harness.engine.model.problems()))
    assert device_peers(harness) == set()  # neither is a peer while they share the key
    harness.engine.rotate_key()
    harness.settle(lambda: device_peers(harness) == {own}, timeout=5)  # b keeps the old key and is a peer now
    assert not [p for p in harness.engine.model.problems() if p.kind == "key-conflict"]


def test_new_peers_are_greeted_once_and_again_on_a_recreated_device(harness: Harness) -> None:
    harness.source.sync(node_b({"10.240.0.70"}))
    harness.settle(lambda: harness.wg.greetings == [KEY_B])
    harness.source.change(node_b({"10.240.0.70", "10.240.0.71"}))  # an update of a known peer: no greeting
    harness.settle(lambda: "10.240.0.70/31" in {str(p) for p in harness.wg.device.peers[KEY_B].allowed_ips})
    assert harness.wg.greetings == [KEY_B]
    harness.wg.device = None  # the device is gone (wireguard-go died with the hook's container): the new one's
    harness.engine.dataplane_changed("device")  # peers have no session, each is greeted again
    harness.settle(lambda: harness.wg.greetings == [KEY_B, KEY_B])


# ---- a key no peer can know yet -------------------------------------------------------------------------------------

def test_a_key_the_api_never_held_sends_nothing_into_the_tunnel_before_the_first_list(tmp_path: Path) -> None:
    """Before its first list a hook keeps the tunnel only for a key the API was seen to hold (a restart drops no mesh);
    a key made by this start (a reimage, a lost key file) sends in plaintext until the API holds it, so its first
    requests - to an API server behind a node IP among them - are not dropped by peers still on the old key."""
    def started(harness: Harness) -> Harness:
        harness.source.accept_writes = False
        harness.node.start()
        harness.settle(lambda: harness.view.status()["generation"] > 0)
        return harness

    first = started(Harness(tmp_path))
    try:
        assert tunnel_rules(first) == set() and first.view.publication_status()["tunnel"] is False
        first.source.report(Publication("written", first.key.public_key, frozenset({"10.240.0.4"})))
        first.settle(lambda: tunnel_rules(first) == {4, 6})
        assert KeyStore(first.settings.key_file).last_published() == first.key.public_key
    finally:
        first.node.stop()

    restarted = started(Harness(tmp_path))  # the same key file: held when last seen
    try:
        assert restarted.key == first.key and tunnel_rules(restarted) == {4, 6}
    finally:
        restarted.node.stop()

    first.settings.key_file.unlink()  # lost: the next start makes a new key
    lost = started(Harness(tmp_path))
    try:
        assert lost.key != first.key and tunnel_rules(lost) == set()
        stat_mode = stat.S_IMODE(os.stat(KeyStore(lost.settings.key_file).published_path).st_mode)
        assert stat_mode == 0o600 and KeyStore(lost.settings.key_file).last_published() == ""
    finally:
        lost.node.stop()


def test_a_key_file_from_before_published_markers_keeps_the_tunnel_on_upgrade(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    KeyStore(harness.settings.key_file).published_path.unlink()
    harness.source.accept_writes = False
    harness.node.start()
    try:
        harness.settle(lambda: tunnel_rules(harness) == {4, 6})
    finally:
        harness.node.stop()
