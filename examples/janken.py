"""Rock-paper-scissors ("janken"), the original library's simulation example, explored.

Two ``Player`` entities each send their hand to a ``Game`` entity by a message. When the game has
both hands it decides, and tells each player the outcome by a message. The messages of the two
players travel independently, so they can arrive in either order, and so can the outcomes.
``pachyderm.testing.explore`` runs the game under every delivery order and collects the distinct
final worlds: whatever the order, exactly one player wins (or, with equal hands, both draw).

Run it with ``python examples/janken.py``: it prints how many schedules were run and the final
worlds they reached.
"""

from __future__ import annotations

from typing import Any

import pachyderm
from pachyderm import Update, send
from pachyderm.testing import Simulation, explore

BEATS = {"rock": "scissors", "scissors": "paper", "paper": "rock"}


class Player(pachyderm.Entity):
    """A player. State: ``{"hand": ..., "outcome": ...}``."""

    name = "janken.Player"

    def init(self) -> dict[str, Any]:
        return {"hand": None, "outcome": None}

    def activate(self, message: Any, state: dict[str, Any]) -> Any:
        match message:
            case ("play", game, hand):
                if hand not in BEATS:
                    raise pachyderm.Rejected(f"{hand!r} is not rock, paper or scissors")
                if state["hand"] is not None:
                    raise pachyderm.Rejected("this player has played already")
                state["hand"] = hand
                return Update(state, send((Game, game), ("hand", self.key, hand)))
            case ("outcome", outcome):
                state["outcome"] = outcome
                return state
        raise pachyderm.Rejected(f"unknown message {message!r}")


class Game(pachyderm.Entity):
    """A game between two players. State: ``{"hands": {player: hand}, "winner": ...}``."""

    name = "janken.Game"

    def init(self) -> dict[str, Any]:
        return {"hands": {}, "winner": None}

    def activate(self, message: Any, state: dict[str, Any]) -> Any:
        _, player, hand = message
        hands = state["hands"]
        if player in hands or len(hands) == 2:
            raise pachyderm.Rejected(f"{player!r} cannot play now")
        hands[player] = hand
        state["hands"] = hands = dict(sorted(hands.items()))  # the same bytes in every order
        if len(hands) < 2:
            return state
        (a, hand_a), (b, hand_b) = sorted(hands.items())
        if hand_a == hand_b:
            state["winner"] = "draw"
            outcomes = {a: "draw", b: "draw"}
        else:
            winner = a if BEATS[hand_a] == hand_b else b
            state["winner"] = winner
            outcomes = {p: "win" if p == winner else "lose" for p in (a, b)}
        return Update(state, *(send((Player, p), ("outcome", o)) for p, o in outcomes.items()))


def play(alice: str, bob: str) -> Any:
    """A scenario for ``explore``: alice and bob play their hands in game "g1"."""

    def setup(sim: Simulation) -> None:
        sim.submit((Player, "alice"), ("play", "g1", alice))
        sim.submit((Player, "bob"), ("play", "g1", bob))

    return setup


def main() -> None:
    for alice, bob in (("rock", "scissors"), ("paper", "paper")):
        found = explore(play(alice, bob), entities=[Player, Game])
        print(
            f"alice {alice} vs bob {bob}: {found.runs} schedules, "
            f"{len(found.worlds)} distinct final world(s), complete={found.complete}, "
            f"{found.seconds * 1000:.0f} ms"
        )
        for world in found.worlds:
            outcomes = {p: world[(Player, p)]["outcome"] for p in ("alice", "bob")}
            print(f"  winner {world[(Game, 'g1')]['winner']!r}: {outcomes}")


if __name__ == "__main__":
    main()
