"""Workers die with their launcher.

A worker started by torchrun (or by xtune's own launcher) runs in its own session: when its parent is
killed with SIGKILL (`kill -9`, the OOM killer) nothing tells it, and it would keep training and writing
into the run directory, racing a resumed run and holding the GPUs. A daemon thread polls the parent pid;
when the process is re-parented (its parent died), it SIGKILLs itself at once, so it writes nothing more.
A thread rather than prctl(PR_SET_PDEATHSIG): that signal fires on the death of the parent *thread* that
forked the process, which in torchrun's agent need not live as long as the agent.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_started = False


def die_with_parent(interval_s: float = 0.5) -> None:
    """Start (once per process) the thread that kills this process when its parent is gone."""
    global _started
    if _started or not sys.platform.startswith(("linux", "darwin")):
        return
    _started = True
    parent = os.getppid()
    if parent == 1:  # already orphaned (or started by init): nothing to watch
        return

    def watch() -> None:
        event = threading.Event()
        while not event.wait(interval_s):
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="xtune-parent-watchdog", daemon=True).start()
