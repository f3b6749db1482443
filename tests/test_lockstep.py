"""`Lockstep`'s pairing rule, simulated for one rank against scripted peers (no process group): the smallest
announced kind runs, a rank joins other kinds with an empty batch, and finishes only when every rank is done."""
from __future__ import annotations

from dsv4_ascend.lockstep import Lockstep


class _Sim(Lockstep):
    """This rank's Lockstep with the peers' announcements scripted per round."""

    def __init__(self, peers: list[tuple | None]) -> None:  # noqa: super().__init__ needs a process group
        self.peers, self.log, self._inside, self.rounds, self.idle_calls, self.ep = list(peers), [], False, 0, 0, None

    def _agree(self, kind):
        self.rounds += 1
        live = [k for k in (kind, self.peers.pop(0)) if k is not None]
        return min(live) if live else None

    def _idle(self, kind):
        self.idle_calls += 1
        self.log.append(("idle", kind))


MAIN_STATIC, MAIN_EXACT, MTP0_STATIC = (0, 0, True, True), (0, 0, False, True), (1, 0, True, True)


def test_smaller_kind_first_then_mine():
    sim = _Sim([MAIN_EXACT, None])  # the peer prefills (exact) while this rank wants a static decode
    out = sim.run(MAIN_STATIC, lambda: sim.log.append(("run", MAIN_STATIC)) or "logits")
    assert out == "logits"
    assert sim.log == [("idle", MAIN_EXACT), ("run", MAIN_STATIC)]


def test_same_kind_pairs_in_one_round():
    sim = _Sim([MAIN_STATIC])
    sim.run(MAIN_STATIC, lambda: sim.log.append("run"))
    assert sim.log == ["run"] and sim.rounds == 1


def test_finish_joins_until_every_rank_is_done():
    sim = _Sim([MAIN_STATIC, MTP0_STATIC, None])
    sim.finish()
    assert sim.log == [("idle", MAIN_STATIC), ("idle", MTP0_STATIC)] and sim.rounds == 3


def test_a_call_inside_a_paired_call_is_not_announced():
    sim = _Sim([MAIN_STATIC])
    assert sim.run(MAIN_STATIC, lambda: sim.run(MAIN_STATIC, lambda: 7)) == 7
    assert sim.rounds == 1
