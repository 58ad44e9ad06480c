"""Watching a policy file for edits, so that ops can change a policy without a restart.

:class:`PolicyFileWatcher` answers one question, cheaply and at most every
``interval_s``: "is there a new, valid policy in the file?". The engine asks it on the call
path (``_engine.py``); most calls pay one clock read and a comparison, one call per
interval pays an ``os.stat``, and only a changed file is read and validated.

How files change under a running process, and how each is seen:

* **In-place writes** change ``st_mtime_ns``/``st_size``.
* **Editors' rename-replace** (write a temporary file, ``rename`` it over the old one)
  gives the path a new inode.
* **Kubernetes ConfigMaps** mount ``policy.yaml -> ..data/policy.yaml`` with
  ``..data -> ..2026_11_29_23_00_00.123``; an update writes a new timestamped directory and
  flips ``..data`` atomically. ``os.stat`` follows the symlinks, so the file it reports is
  the new one: a new inode (even when size and mtime are equal).

The fingerprint is (device, inode, size, mtime); when it changes, the file is read and its
SHA-256 compared with the policy in force, so a ``touch`` does not rebuild anything.

**A file still being written is never put in force.** An in-place rewrite (``cat new >
policy.yaml``, most editors' save, ``open(p, "w")``) truncates the file, then writes it: a check
in between reads an empty or half file, and half a YAML file often parses. So the periodic check
reads a changed file only once its mtime is ``_SETTLE_S`` old (nothing wrote to it for that
long), and only when its size and mtime are the same after the read as before it; otherwise it
looks again at the next check. :meth:`Resilience.reload` (an explicit "now") skips the wait but
not the before/after comparison. Whatever is read must still be a policy the engine accepts: an
empty file is not a policy, and the engine refuses a version that drops a route calls have used
(see ``_engine.py``).

A bad edit is logged once (one ERROR line with every ``file:line: field: message``) and
remembered by its hash, so the same bad content is not re-logged every interval; the last
good policy keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from ._exceptions import PolicyError
from ._policy import Policy

log = logging.getLogger("llm_resilience")

DEFAULT_RELOAD_INTERVAL_S = 2.0
_SETTLE_S = 1.0
"""A file modified more recently than this may still be being written: the periodic check waits."""

_Fingerprint = tuple[int, int, int, int]


def _fingerprint(path: Path) -> tuple[_Fingerprint, bool]:
    st = os.stat(path)  # follows symlinks: a ConfigMap's ..data flip shows as the new file
    settled = time.time() - st.st_mtime >= _SETTLE_S
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), settled


class PolicyFileWatcher:
    """Tells whether the policy file holds a new, valid policy; logs each bad version once."""

    def __init__(self, path: str | os.PathLike[str], interval_s: float, policy: Policy, text: bytes | None) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self.next_check = time.monotonic() + interval_s if interval_s > 0 else float("inf")
        self._digest = hashlib.sha256(text).hexdigest() if text is not None else None
        self._fingerprint: _Fingerprint | None = None
        self._rejected: str | None = None
        """Digest of the last content that failed validation (or the read error), logged already."""
        self._candidate: str | None = None
        """Digest of the policy :meth:`poll` returned last, until the engine accepts or refuses it."""
        try:
            fp, settled = _fingerprint(self.path)
            self._fingerprint = fp if settled else None
        except OSError:
            pass
        self.loaded_policy = policy

    def poll(self, *, force: bool = False) -> Policy | None:
        """A new valid policy if the file changed to one, else ``None``. Never raises.

        Not thread-safe: the engine calls it under its reload lock. ``force`` reads the file
        even when its fingerprint did not change.
        """
        if self.interval_s > 0:
            self.next_check = time.monotonic() + self.interval_s
        return self._poll(force)

    def _poll(self, force: bool) -> Policy | None:
        try:
            fp, settled = _fingerprint(self.path)
            if not force and fp == self._fingerprint:
                return None
            if not force and not settled:
                return None  # perhaps still being written: look again at the next check
            data = self.path.read_bytes()
            after, _ = _fingerprint(self.path)
        except OSError as e:
            self._reject(f"os:{e.errno}", f"{self.path}: cannot read policy file: {e.strerror or e}")
            return None
        if after != fp:
            return None  # written to while we read it: not a version to serve
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:  # touched, or edited back to the policy in force
            self._fingerprint = fp if settled else None
            self._rejected = None
            return None
        if digest == self._rejected:
            self._fingerprint = fp if settled else None
            return None
        try:
            policy = Policy.from_bytes(data, source=str(self.path))
        except PolicyError as e:
            self._fingerprint = fp if settled else None
            self._reject(digest, "; ".join(e.problems))
            return None
        self._fingerprint = fp if settled else None
        self._candidate = digest
        return policy

    def _reject(self, key: str, problems: str) -> None:
        if key == self._rejected:
            return
        self._rejected = key
        log.error("policy reload rejected, still serving the last good policy from %s: %s", self.path, problems)

    def accepted(self, policy: Policy) -> None:
        """The engine put ``policy`` (the last one :meth:`poll` returned) in force."""
        self.loaded_policy = policy
        self._digest, self._candidate, self._rejected = self._candidate, None, None
        log.info("policy reloaded from %s", self.path)

    def refused(self, reason: str) -> None:
        """The engine would not put the last policy :meth:`poll` returned in force: logged once per version."""
        candidate, self._candidate = self._candidate, None
        if candidate is not None:
            self._reject(candidate, reason)
