"""The yardstick: a Starlette hello-world served like Bilten (uvicorn, uvloop, httptools)."""

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def hello(request):
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/", hello)])
