"""Check registry and result reporting shared by the Python driver scripts.

A script registers its checks with `@checks.check`, runs each one its own way
(threads for psycopg, asyncio for asyncpg) and reports the outcome with
`Results.record`; `run.sh` reads the final `RESULT` line.
"""
import os
import sys
import time
import traceback

CHECKS = []
CHECK_TIMEOUT = 60  # seconds; a hung check is reported and the run goes on


def check(fn=None, *, known_bug=None):
    """Registers a check. `known_bug`: a proxy bug the check is known to hit
    (see tests/drivers/KNOWN_BUGS.md); its failure is reported as XFAIL and
    not counted, unless DRIVERS_STRICT=1."""
    def register(fn):
        fn.known_bug = known_bug
        CHECKS.append(fn)
        return fn
    return register(fn) if fn is not None else register


class Results:
    def __init__(self, driver):
        self.driver = driver
        self.strict = os.environ.get("DRIVERS_STRICT") == "1"
        self.passed = self.failed = self.xfailed = 0

    def record(self, fn, started, error=None):
        """Prints and counts one check's outcome; call it inside the `except`
        block that caught `error`, so its traceback is printed."""
        took = time.monotonic() - started
        if error is None:
            self.passed += 1
            note = f" (XPASS: known bug {fn.known_bug} did not show; fixed?)" if fn.known_bug else ""
            print(f"ok   {self.driver} {fn.__name__} ({took:.1f}s){note}", flush=True)
            return
        if fn.known_bug and not self.strict:
            self.xfailed += 1
            print(f"XFAIL {self.driver} {fn.__name__} ({took:.1f}s): known proxy bug {fn.known_bug}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL {self.driver} {fn.__name__} ({took:.1f}s)", flush=True)
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()

    def finish(self):
        """Prints the RESULT line and exits without waiting for threads a
        hung check may have left holding connections."""
        print(f"RESULT {self.driver} passed={self.passed} failed={self.failed} xfailed={self.xfailed}", flush=True)
        os._exit(1 if self.failed else 0)
