"""Open routes: liveness, readiness and Prometheus metrics."""

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.errors import error_body
from service.jsonbody import UnambiguousJSONRoute

router = APIRouter(tags=["operations"], route_class=UnambiguousJSONRoute)


@router.get("/healthz")
async def healthz() -> dict:
    """The process is alive (the engine may still be loading)."""
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready once the engine answered its warm-up request, and only while it stays healthy."""
    state = request.app.state
    engine = state.engine
    if engine.errored:
        return JSONResponse(error_body(503, "engine has stopped", code="engine_dead"), 503)
    if state.engine_stalled:
        return JSONResponse(error_body(503, "engine stalled: it gave no output while requests waited on it",
                                       code="engine_stalled"), 503)
    if state.guard_stalled:
        return JSONResponse(error_body(503, "the safety guard's encoder stopped answering", code="guard_stalled"),
                            503)
    if not state.ready.is_set():
        return JSONResponse(error_body(503, "engine is warming up", code="not_ready"), 503)
    if state.tutor.admission.draining:
        return JSONResponse(error_body(503, "shutting down", code="shutting_down"), 503)
    return JSONResponse({"status": "ready", "model": engine.model_name})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
