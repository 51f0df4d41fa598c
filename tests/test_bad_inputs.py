"""Invalid calls of every ``torch.ops.slab`` op raise a clear error; valid calls write nothing
they should not (SPEC section 0).

The cases live in bad_inputs/cases.py: per op, valid calls (every input the schema does not mark
as written comes back bit for bit) and invalid calls (wrong rank, shape, dtype, device mix,
non-finite hyperparameters, overflowing sizes, None, overlapping in-place arguments), each of
which must raise a RuntimeError or ValueError naming the argument and leave its tensors as they
were. The op list comes from the dispatcher, so an op without table entries fails here.

The calls run in a worker process (bad_inputs/worker.py), all in one process for speed; a case
that kills it (segfault, abort) or hangs is recorded as crashed and a new worker continues with
the next case. Each case is its own test, reading its outcome from that one run.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading

import pytest
import torch

import slab
from bad_inputs import cases

CASES = cases.all_cases()
BY_ID = {c.id: c for c in CASES}

STARTUP_TIMEOUT = 180  # importing torch on a loaded CI machine
CASE_TIMEOUT = 20  # every case is a few small tensors: more means it hangs

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


# ---- the table covers the library -----------------------------------------------------------------


def test_every_op_has_cases():
    ops = set(cases.registered_ops())
    assert ops, "no op registered under torch.ops.slab: is the op library loaded?"
    missing = sorted(ops - set(cases.TABLE) - set(cases.EXCLUDED))
    assert not missing, (
        f"ops without entries in tests/bad_inputs/cases.py: {missing} (add a valid call and "
        "invalid calls, or, for a private helper, an entry in EXCLUDED)"
    )


def test_table_names_only_registered_ops():
    ops = set(cases.registered_ops())
    unknown = sorted(set(cases.TABLE) - ops)
    stale = sorted(set(cases.EXCLUDED) - ops)
    assert not unknown and not stale, f"not registered under slab::  table: {unknown}, EXCLUDED: {stale}"
    assert all(name.startswith("_") for name in cases.EXCLUDED), "only private helpers may be excluded"
    assert not set(cases.EXCLUDED) & set(cases.TABLE)


def test_every_op_has_one_overload():
    # the table calls <op>.default; a second overload needs its own entries
    extra = {op: getattr(torch.ops.slab, op).overloads() for op in cases.TABLE if op in cases.registered_ops()}
    extra = {op: o for op, o in extra.items() if o != ["default"]}
    assert not extra, f"overloads the table does not cover: {extra}"


def test_every_op_has_invalid_cases():
    few = {op: len(e.bad) for op, e in cases.TABLE.items() if len(e.bad) < 3}
    assert not few, f"ops with fewer than 3 hand-written invalid calls: {few}"


# ---- running the cases -----------------------------------------------------------------------------


def _worker_env() -> dict:
    env = dict(os.environ)
    # the worker imports this very slab (whatever put it on our path) and bad_inputs from tests/
    slab_root = os.path.dirname(os.path.dirname(os.path.abspath(slab.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, slab_root, env.get("PYTHONPATH")) if p)
    return env


def _death(rc) -> str:
    if rc is None:
        return "killed after no answer"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with status {rc}"


def _tail(f, n=4000) -> str:
    f.flush()
    f.seek(0)
    text = f.read().decode(errors="replace")
    return text[-n:]


def _run_one_worker(ids: list, results: dict) -> bool:
    """Runs ``ids`` in one worker until it finishes or dies; returns False if it never started."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bad_inputs.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=_worker_env(),
        )
        lines: queue.Queue = queue.Queue()

        def read():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            proc.stdin.write((json.dumps(ids) + "\n").encode())
            proc.stdin.close()
        except BrokenPipeError:  # died while starting: reported below with its stderr
            pass
        ready, current, hung = False, None, False
        while True:
            try:
                line = lines.get(timeout=CASE_TIMEOUT if ready else STARTUP_TIMEOUT)
            except queue.Empty:
                hung = True
                proc.kill()
                break
            if line is None:
                break
            msg = json.loads(line)
            if msg["event"] == "ready":
                ready = True
            elif msg["event"] == "start":
                current = msg["id"]
            elif msg["event"] == "done":
                results[msg["id"]] = msg
                current = None
        rc = proc.wait()
        if not ready:
            for cid in ids:
                results.setdefault(
                    cid, {"crash": f"the worker did not start ({_death(None if hung else rc)})", "stderr": _tail(err)}
                )
            return False
        if current is not None:
            how = f"no answer within {CASE_TIMEOUT} s, killed" if hung else _death(rc)
            results[current] = {"crash": how, "stderr": _tail(err)}
    return True


def run_cases(ids: list) -> dict:
    results: dict = {}
    pending = list(ids)
    while pending:
        if not _run_one_worker(pending, results):
            break
        left = [cid for cid in pending if cid not in results]
        if len(left) == len(pending):  # exited without running anything: give up, not loop
            for cid in left:
                results[cid] = {"crash": "the worker exited without running the case"}
            break
        pending = left
    return results


@pytest.fixture(scope="module")
def outcomes(request):
    # only the cases this session selected (e.g. with -k), in one worker run
    selected = [
        item.callspec.params["case"].id
        for item in request.session.items
        if getattr(item, "callspec", None) is not None and isinstance(item.callspec.params.get("case"), cases.Case)
    ]
    return run_cases(selected)


# ---- judging one outcome -------------------------------------------------------------------------------


def problems(case: cases.Case, r: dict) -> list:
    if "crash" in r:
        return [f"the call crashed the worker process ({r['crash']}); its stderr ended with:\n{r.get('stderr', '')}"]
    if "build_error" in r:
        return [f"the case itself failed to build its arguments (a bug in the case table?):\n{r['build_error']}"]
    found = []
    if case.valid:
        if r["raised"]:
            found.append(f"the valid call raised {r['type']}: {r['message']}")
        if r["changed"]:
            found.append(f"the call wrote into {r['changed']}, which the schema does not mark as written")
        if r["check"]:
            found.append(r["check"])
        return found
    accepted = cases.ACCEPTED + (("TypeError",) if case.type_error else ())
    if r["raised"] is None:
        found.append(f"the invalid call returned without an error (expected one matching /{case.match}/)")
    elif r["raised"] not in accepted:
        found.append(f"raised {r['type']} (expected one of {', '.join(accepted)}): {r['message']}")
    elif not re.search(case.match, r["message"], re.S):
        found.append(f"the error does not name what is wrong (expected /{case.match}/): {r['type']}: {r['message']}")
    if r["changed"]:
        found.append(f"the {'failed ' if r['raised'] else ''}call modified {r['changed']}")
    return found


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case, outcomes):
    found = problems(case, outcomes.get(case.id, {"crash": "no outcome was recorded for this case"}))
    if found:  # the message says it all; the test's own traceback would only add the outcome table
        pytest.fail(f"slab::{case.id}: " + "\n".join(found), pytrace=False)
