"""A zygote for crash tests: imports ovlabel (torch, open_clip) once, then runs each command it reads in a
forked child process, so that tests can SIGKILL real processes at many points without paying the
seconds-long import each time.

Protocol (one JSON object per line on stdin): ``{"argv": [...], "log": path, "fsize": bytes or null,
"env": {...} or absent}``. For each, the zygote forks a child that runs ``ovlabel.cli.main(argv)`` with its
stdout and stderr in the file ``log`` (``RLIMIT_FSIZE`` set when ``fsize`` is given, ``env`` added to its
environment — e.g. ``OVLABEL_FAULT`` to kill it at a chosen point) and prints ``pid <PID>``; once the child
has ended it prints ``exit <status>`` (negative: killed by that signal). Nothing computes in the zygote
before it forks, so no thread pool is inherited.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))
import ovlabel.pipeline.runner  # noqa: E402,F401  (pulls in torch and open_clip before forking)
import tiny_models  # noqa: E402
from ovlabel.cli import main  # noqa: E402

tiny_models.register()

for line in sys.stdin:
    cmd = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            sys.stdin.close()
            log = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.environ.update(cmd.get("env") or {})
            if cmd.get("fsize") is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, write() fails with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (cmd["fsize"], cmd["fsize"]))
            code = main(cmd["argv"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(f"pid {pid}", flush=True)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print(f"exit {code}", flush=True)
