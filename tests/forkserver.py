"""A process that imports torch once, then forks one child per `python script.py ...` a test runs.

On 2 cores a fresh interpreter spends about 2 s importing torch and tearing it down, and the suite
runs its scripts some 150 times. A child forked from here starts with torch (and numpy) imported and
nothing else: it takes the request's working folder, environment and argv, sends stdout and stderr to
the request's files, runs the script as __main__ and exits as `python script.py` would (an
exception's traceback and status 1, sys.exit's code, death by a signal, threads joined and atexit
handlers run first), less the interpreter's teardown. What stays shared is the hash seed: a script
whose output depends on set order would print the same order in every child. conftest.run_cli is the
one user; it starts a fresh interpreter where the environment differs in what is read at start-up.

Protocol, one line each way over stdin/stdout: a JSON request {"args", "cwd", "env", "out", "err",
"timeout"} -> "<exit status as subprocess reports it> <1 if the child was killed at the timeout, else 0>".
"""
import atexit
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import types

import numpy  # noqa: F401  (imported once here: what every child would spend its first 2 s on)
import torch


def serve():
    """Answer requests until stdin closes; in each child, return its request instead. Only this process
    reaps a child, so a kill at the timeout can never reach another process that took its pid."""
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return req
        deadline, done, status = time.monotonic() + req["timeout"], 0, 0
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.005)
        if not done:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), int(not done), flush=True)
    sys.exit(0)


def run(script):
    """Run the script as __main__ -> (its exit status, whether a KeyboardInterrupt ended it), after printing
    what the interpreter would."""
    try:
        with open(script, "rb") as f:
            code = compile(f.read(), script, "exec")
    except SyntaxError as e:  # printed without a traceback, as the interpreter does
        sys.excepthook(type(e), e.with_traceback(None), None)
        return 1, False
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = script, __builtins__
    sys.modules["__main__"] = main
    sys.modules.pop("__mp_main__", None)
    try:
        exec(code, main.__dict__)
    except SystemExit as e:  # sys.exit's code, as the interpreter reads it
        if isinstance(e.code, int) or e.code is None:
            return e.code or 0, False
        print(e.code, file=sys.stderr)
        return 1, False
    except BaseException as e:  # the traceback from the script's own frame on
        tb = e.__traceback__.tb_next or e.__traceback__
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        return 1, isinstance(e, KeyboardInterrupt)
    return 0, False


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
tempfile.tempdir = None  # found again from this environment's TMPDIR
torch.seed()  # a fresh interpreter's generator starts from a random seed, not the server's
sys.argv = list(req["args"])
script = os.path.abspath(sys.argv[0])
sys.path[0] = os.path.dirname(script)
status, interrupted = run(script)
threading._shutdown()  # what the interpreter does at exit: join the threads, then the atexit handlers
atexit._run_exitfuncs()
for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(ValueError, OSError):
        stream.flush()
if interrupted:  # the interpreter dies of the SIGINT it did not handle
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
os._exit(status & 0xFF)  # not the interpreter's teardown of torch: 0.6 s a child, and nothing to save
