"""A small real aiohttp app standing in for the web bridge behind nginx (tests/test_deploy_nginx).

``python tests/web_standin.py --port N --static DIR --user-header X-Remote-User``: serves
``DIR/index.html`` at ``/``, ``GET /pvws/whoami`` (JSON: the user header it received, the peer, how
many requests it saw) and the PVWS websocket ``/pvws/pv`` answering ``echo`` with the exact text
(as PVWS does) and ``{"type": "whoami"}`` with the user header of the upgrade request. Binds
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aiohttp import WSMsgType, web

SEEN = web.AppKey("seen", list)
OPTS = web.AppKey("opts", argparse.Namespace)


@web.middleware
async def count(request: web.Request, handler):
    request.app[SEEN].append(request.path)
    return await handler(request)


def who(request: web.Request) -> dict[str, object]:
    return {"user": request.headers.get(request.app[OPTS].user_header),
            "peer": request.remote, "requests": len(request.app[SEEN])}


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(Path(request.app[OPTS].static) / "index.html")


async def whoami(request: web.Request) -> web.Response:
    return web.json_response(who(request))


async def pv_socket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type != WSMsgType.TEXT:
            continue
        try:
            data = json.loads(msg.data)
        except ValueError:
            continue  # PVWS: malformed messages get no reply
        if data.get("type") == "echo":
            await ws.send_str(msg.data)
        elif data.get("type") == "whoami":
            await ws.send_str(json.dumps(who(request)))
    return ws


def make_app(opts: argparse.Namespace) -> web.Application:
    app = web.Application(middlewares=[count])
    app[SEEN] = []
    app[OPTS] = opts
    app.add_routes([web.get("/", index), web.get("/pvws/whoami", whoami),
                    web.get("/pvws/pv", pv_socket)])
    return app


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--static", required=True)
    p.add_argument("--user-header", default="X-Remote-User")
    a = p.parse_args()
    web.run_app(make_app(a), host="127.0.0.1", port=a.port, print=lambda *_: print("serving",
                                                                                   flush=True))
