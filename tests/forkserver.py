"""A process that imports torch once, then forks one child per `python script.py ...` a test runs.

On 2 cores a fresh interpreter spends about 2 s importing torch, and the suite runs its scripts some
150 times. A child forked from here starts with torch (and numpy) imported and nothing else: it
takes the request's working folder, environment and argv, sends stdout and stderr to the request's
files, and runs the script as __main__, so it exits as `python script.py` would (an exception's
traceback and status 1, sys.exit's code, death by a signal), less the interpreter's teardown. conftest.run_cli is the one user; it
starts a fresh interpreter instead where the environment differs in what is read at start-up.

Protocol, one line each way over stdin/stdout: a JSON request {"args", "cwd", "env", "out", "err"}
-> the child's pid, then its exit status as subprocess reports it (minus the signal on a kill).
"""
import atexit
import json
import os
import runpy
import signal
import sys

import numpy  # noqa: F401  (imported once here: what every child would spend its first 2 s on)
import torch  # noqa: F401


def serve():
    """Answer requests until stdin closes; in each child, return its request instead."""
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return req
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
    sys.exit(0)


req = serve()
devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(devnull, 0)  # the protocol's pipes are 0 and 1: the child keeps neither
for fd, path in ((1, req["out"]), (2, req["err"])):
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(f, fd)
    os.close(f)
os.close(devnull)
os.chdir(req["cwd"])
os.environ.clear()
os.environ.update(req["env"])
script = os.path.abspath(req["args"][0])
sys.argv = [script] + req["args"][1:]
sys.path[0] = os.path.dirname(script)
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:  # sys.exit's code, as the interpreter reads it
    if isinstance(e.code, int) or e.code is None:
        code = e.code or 0
    else:
        print(e.code, file=sys.stderr)
        code = 1
except BaseException as e:  # the traceback from the script's own frame on, as `python script.py` prints it
    tb = e.__traceback__
    while tb and tb.tb_frame.f_code.co_filename != script:
        tb = tb.tb_next
    sys.excepthook(type(e), e.with_traceback(tb or e.__traceback__), tb or e.__traceback__)
    code = 1
    if isinstance(e, KeyboardInterrupt):  # the interpreter dies of the SIGINT it did not handle
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)  # not the interpreter's teardown of torch: 0.6 s a child, and nothing to save
