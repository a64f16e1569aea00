"""Fuzz the queue IOC: malformed requests to every control RPC and puts to every other PV.

The queue IOC (with a real RE Manager and redis behind it, as in ``tests/test_queue_ioc.py``)
gets the same generated malformed requests as the coordination and registry IOCs
(``tests/test_durability_system.py``): missing, extra, wrongly typed and nested fields, NaN and
infinities, huge and binary strings, both as an NTURI ``query`` and as a plain structure, from
4 concurrent clients. Every request carries at least one poison (an argument the RPC does not
take, or a non-scalar value), so none of them is a valid call. Checked: every request answered
with an error carrying a known code, every put refused, the RE Manager's queue and history
unchanged (their uids), the IOC alive without a traceback, its RSS and open descriptors flat.

Counts: ``FUZZ_PER_THREAD`` per client (``PVCOORD_FAULT_SCALE=long``: the issue's full count, run by
``benchmarks/long_faults.py``).
"""

from __future__ import annotations

import random
import threading

import pytest
from p4p import Type
from p4p.client.thread import Context, RemoteError

from pvcoord.demo.queue_part import start_queue_stack
from pvcoord.procs import client_conf, loopback_env
from pvdb import names as pvn
from pvdb import queue as qn
from pvdb.lockmodel import ErrorCode

from .codes import code_of
from .test_durability_system import FUZZ_PER_THREAD, LONG, PUT_VALUES, _fuzz_value, _rss_fds
from .test_queue_ioc import P, _start_base

pytestmark = pytest.mark.system

CLIENT_TIMEOUT = 20.0
N_THREADS = 4


def _fuzz_request(rnd: random.Random, spec: pvn.PVSpec):
    """A request to ``spec`` that is never a valid call: at least one poison field.

    The poison is an argument name the RPC does not take, or one of its own arguments with a
    non-scalar value (an array or a structure); the other fields are its own argument names and
    ``onBehalfOf``/``clientHost``, with random values.
    """
    names = list(dict.fromkeys([*spec.args, "onBehalfOf", "clientHost"]))  # spec.args has both
    fields = [(n, *_fuzz_value(rnd)) for n in rnd.sample(names, rnd.randrange(0, len(names) + 1))]
    own = [a for a in spec.args if a not in {f[0] for f in fields}]
    if own and rnd.random() < 0.5:
        fields.append((rnd.choice(own), *rnd.choice([
            ("as", ["front"] * rnd.randrange(0, 5)), ("ad", [0.0, float("nan")]),
            (("S", None, [("a", "s")]), {"a": "front"})])))
    else:
        fields.append((f"bad{rnd.randrange(1000)}", *_fuzz_value(rnd)))
    vals = {n: v for n, _, v in fields}
    if rnd.random() < 0.5:
        t = Type([("query", ("S", None, [(n, c) for n, c, _ in fields]))])
        return t({"query": vals})
    return Type([(n, c) for n, c, _ in fields])(vals)


def _queue_state(stack) -> tuple[str, str, str, list[str]]:
    """What a change to the queue would move: queue and history uids, manager state, items."""
    st = stack.call("status")
    items = stack.call("queue_get").get("items") or []
    return (str(st["plan_queue_uid"]), str(st["plan_history_uid"]), str(st["manager_state"]),
            [str(i["item_uid"]) for i in items])


def test_fuzz_every_queue_rpc_and_pv_no_crash_no_change(tmp_path):
    env = loopback_env()
    procs, store, policy = _start_base(tmp_path, env)
    try:
        with start_queue_stack(P, env, tmp_path, store_url=store, policy=policy) as stack:
            ioc = stack.procs["queue-ioc"]
            stack.call("queue_item_add", item={"name": "count", "args": [["det1"]],
                                              "item_type": "plan"},
                       user="fuzz", user_group="primary")
            with Context("pva", conf=client_conf(env), useenv=False) as c:
                c.get(qn.ITEMS.name(P), timeout=CLIENT_TIMEOUT)  # the IOC serves
            before = _queue_state(stack)
            assert len(before[3]) == 1
            others = [s for s in qn.QUEUE_PVS if s.kind is not pvn.PVKind.RPC]
            base_rss, base_fds = _rss_fds(ioc.pid)
            answered = [0] * N_THREADS
            wrong: list[str] = []

            def flood(i: int) -> None:
                rnd = random.Random(300 + i)
                with Context("pva", conf=client_conf(env), useenv=False) as cc:
                    for _ in range(FUZZ_PER_THREAD):
                        spec = rnd.choice(qn.CONTROL_RPCS)
                        req = _fuzz_request(rnd, spec)
                        r = cc.rpc(spec.name(P), req, timeout=CLIENT_TIMEOUT, throw=False)
                        if not isinstance(r, RemoteError):
                            wrong.append(f"{spec.suffix} {req} -> {r!r}")
                        elif code_of(str(r)) not in set(ErrorCode):
                            wrong.append(f"{spec.suffix} {req} -> no code: {r}")
                        answered[i] += 1
                        target = rnd.choice(others)
                        try:
                            cc.put(target.name(P), PUT_VALUES.get(target.kind, "x"),
                                   timeout=CLIENT_TIMEOUT)
                            wrong.append(f"put {target.suffix} accepted")
                        except RemoteError as e:  # refused by the IOC, with a code
                            if code_of(str(e)) is not ErrorCode.BAD_ARGUMENT:
                                wrong.append(f"put {target.suffix}: {e}")

            threads = [threading.Thread(target=flood, args=(i,)) for i in range(N_THREADS)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=7200 if LONG else 100)
            assert not any(th.is_alive() for th in threads), "a client did not finish"
            assert ioc.alive(), ioc.output()[-3000:]
            assert wrong == [], wrong[:5]
            assert sum(answered) == FUZZ_PER_THREAD * N_THREADS
            assert _queue_state(stack) == before  # nothing added, removed, moved or started
            rss, fds = _rss_fds(ioc.pid)
            print(f"queue fuzz: {sum(answered)} requests + puts; RSS {base_rss} -> {rss} kB, "
                  f"fds {base_fds} -> {fds}")
            assert rss - base_rss < 30_000 and fds <= base_fds + 8
            assert "Traceback" not in ioc.output()
    finally:
        for p in reversed(procs):
            p.stop()
