"""A test-only crash harness: the agent SIGKILLs itself at a named checkpoint.

Set ``EDGEOPS_AGENT_CRASH_AT`` to one of :data:`CHECKPOINTS` (``after_block:K`` with the
number of blocks on disk, e.g. ``after_block:3``) and the agent process kills itself with
SIGKILL when it reaches that point of an over-the-air update, exactly as a power cut or
the OOM killer would stop it there: no ``finally``, no flush, no goodbye. Unset (always,
outside tests) it costs one ``os.environ`` lookup per checkpoint.

Checkpoints, in the order an update passes them:

``after_block:K``
    the K-th block of the transfer is on disk and journaled (fsync points 1 and 2);
``staging_complete``
    every block is on disk and the whole file hashed to the announced sha256;
``slot_written``
    the install wrote, verified and self-tested the inactive slot, before the state
    switches to it (the install's commit point);
``trial``
    the new slot is active on trial, before the health check's live inferences;
``committed``
    the trial is confirmed (floor raised), before the ``ota_committed`` event is queued.

And in a trust update (:mod:`edgeops_agent.trust`), after each file it writes:

``trust_pending``
    the whole new state is in ``trust/pending.json`` (the update's commit point);
``trust_revoked``, ``trust_root``
    ``revoked.json``, then ``root.json``, were replaced from it.
"""

from __future__ import annotations

import os
import signal

__all__ = ["CHECKPOINTS", "CRASH_ENV", "crash_point"]

#: The environment variable naming the checkpoint to die at.
CRASH_ENV = "EDGEOPS_AGENT_CRASH_AT"
#: The checkpoint names (``after_block`` takes ``:K``).
CHECKPOINTS = (
    "after_block", "staging_complete", "slot_written", "trial", "committed", "trust_pending", "trust_revoked", "trust_root",
)  # fmt: skip


def crash_point(name: str, count: int | None = None) -> None:
    """SIGKILL this process if :data:`CRASH_ENV` names this checkpoint (``name`` or ``name:count``)."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    here = name if count is None else f"{name}:{count}"
    if wanted == here:
        os.kill(os.getpid(), signal.SIGKILL)
