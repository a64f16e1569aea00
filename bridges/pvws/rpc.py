"""``POST /api/queue/{key}``: the web client's queue control, as calls of the queue IOC's RPCs.

The bridge forwards the call over PVA to the queue IOC (``pvdb.queue`` control RPCs; the key ->
RPC table is :data:`bridges.pvws.names.QUEUE_RPCS`, also listed in ``/pvws/names.json`` under
``queueRpc``). The body is a JSON object of the RPC's arguments (strings, like ``pvcall``; numbers
are sent as their text)::

    POST /api/queue/add    {"name": "count", "args": "[['det1']]" (JSON text), "kwargs": ...}
    -> 200 {"ok": true, "rpc": "DEMO:Queue:ItemAdd", "message": "added count (...)",
            "itemUid": "..."}

Every call is made **on behalf of the logged-in web user**: the bridge adds ``onBehalfOf=USER``
and ``clientHost=`` the browser's address (a body may not set them), so the queue IOC decides
``queue_control`` for that user and an added item's ``user`` in the RE Manager (and
``Queue:Items``) is the web user. The bridge's account must be a trusted service allowed to act
for the user (policy ``trusted_services`` and ``access.on_behalf_of``: the coordination IOC's rule,
:func:`pvdb.lockmodel.resolve_caller`); otherwise the IOC refuses with ``not-allowed``.

Errors (``{"error": {"code", "message", "holder", "reason"}}``, nothing was sent to the IOC unless
the code is ``queue-refused`` or ``queue-unavailable``):

============================  ======  ==========================================================
code                          status  when
============================  ======  ==========================================================
``not-logged-in``             401     no web user on this request (login first)
``writes-disabled``           403     the bridge runs without write support
``unknown-rpc``               404     ``key`` is not in :data:`QUEUE_RPCS`
``bad-request``               400     body not a JSON object, an argument the RPC does not take
                                      (``onBehalfOf``/``clientHost`` included: the bridge sets
                                      them), or a value that is not a string, number or boolean
``queue-refused``             409     the queue IOC (or the RE Manager behind it) refused; the
                                      message is the IOC's, verbatim; ``reason`` is the IOC's
                                      code (``not-allowed``, ``bad-argument``,
                                      ``manager-refused``...) and ``holder`` the holder it names
``queue-unavailable``         502     the queue IOC did not answer within :data:`RPC_TIMEOUT`
============================  ======  ==========================================================

What it is worth: the web user is who the bridge says it is (its login or its trusted proxy);
the queue IOC believes the bridge because the policy names its account, from its host, as a
trusted service for those users. Anyone who can run code as the bridge's account on its host can
act for those users; nobody else can. The bridge logs each call with the web user, and the queue
IOC logs the user with the bridge as actor.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web
from p4p.client.asyncio import RemoteError
from p4p.nt import NTURI

from pvdb.lockmodel import parse_error_text

from .names import QUEUE_RPCS, web_args

log = logging.getLogger("bridges.pvws.rpc")

RPC_TIMEOUT = 10.0
"""Seconds a queue RPC may take before the reply is ``queue-unavailable``."""
MAX_BODY = 64 * 1024
"""Largest accepted request body in bytes."""


def _error(
    status: int, code: str, message: str, holder: str = "", reason: str = ""
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "holder": holder, "reason": reason}},
        status=status,
    )


def parse_args(key: str, body: Any) -> dict[str, str]:
    """Validate the JSON body of ``POST /api/queue/{key}``; return pvcall-style string args.

    Raises:
        ValueError: naming what is wrong (not an object, unknown argument, bad value type).
    """
    spec = QUEUE_RPCS[key]
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ValueError(f"body must be a JSON object of arguments, not {type(body).__name__}")
    own = web_args(spec)
    unknown = sorted(set(body) - set(own))
    if unknown:
        takes = ", ".join(own) or "no arguments"
        raise ValueError(f"{spec.suffix} takes {takes}; not: {', '.join(unknown)}")
    out: dict[str, str] = {}
    for name, value in body.items():
        if isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            out[name] = str(value)
        else:
            raise ValueError(
                f"argument {name!r} must be a string or number (JSON text for args/kwargs), "
                f"not {type(value).__name__}"
            )
    return out


def _reply_dict(value: Any) -> dict[str, Any]:
    try:
        d = value.todict()
    except AttributeError:
        return {"value": value}
    return {k: v for k, v in d.items() if isinstance(v, str | int | float | bool)}


def setup(app: web.Application) -> None:
    """Add ``POST /api/queue/{key}`` to the bridge's app (called by ``make_app``)."""
    from . import app as bridge

    async def queue_rpc(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        user = await bridge.web_user(request)
        if user is None:
            return _error(401, "not-logged-in", "log in to control the queue")
        if not request.app[bridge.CONFIG].writes:
            return _error(403, "writes-disabled", "this bridge runs without write support")
        if key not in QUEUE_RPCS:
            return _error(
                404, "unknown-rpc", f"no queue call {key!r}; known: {', '.join(QUEUE_RPCS)}"
            )
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _error(400, "bad-request", f"body larger than {MAX_BODY} bytes")
        text = await request.text()
        if len(text) > MAX_BODY:
            return _error(400, "bad-request", f"body larger than {MAX_BODY} bytes")
        try:
            args = parse_args(key, json.loads(text) if text.strip() else {})
        except (ValueError, RecursionError) as e:
            return _error(400, "bad-request", str(e))
        cfg = request.app[bridge.CONFIG]
        pv = QUEUE_RPCS[key].name(cfg.prefix)
        args["onBehalfOf"] = user
        args["clientHost"] = request.remote or "web"
        uri = NTURI([(k, "s") for k in args]).wrap(pv, kws=args)
        log.info("web user %s calls %s %s", user, pv, args)
        try:
            reply = await asyncio.wait_for(request.app[bridge.PVA].rpc(pv, uri), RPC_TIMEOUT)
        except RemoteError as e:
            log.info("%s refused for web user %s: %s", pv, user, e)
            parsed = parse_error_text(str(e))
            return _error(409, "queue-refused", str(e), parsed.holder,
                          parsed.code.value if parsed.code else "")
        except TimeoutError:
            return _error(502, "queue-unavailable", f"{pv} did not answer within {RPC_TIMEOUT} s")
        return web.json_response({"ok": True, "rpc": pv, **_reply_dict(reply)})

    app.router.add_post("/api/queue/{key}", queue_rpc)
