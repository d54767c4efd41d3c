"""`t2i-serve`: the original design's form (`GET /`, `POST /submit`) and a JSON job API over `runner.run.run`.

Every request becomes a job on one bounded queue served by one worker thread (runner.server.jobs); handlers
only validate, queue and wait, so generation never runs in the event loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from collections.abc import Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from fastapi_offline import FastAPIOffline
from omegaconf import DictConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..common.errors import ConfigError, first_line, task_wrapper
from ..config import lora_name, validate
from ..config.hires import UPSCALERS
from ..config.schedulers import SCHEDULERS
from ..eval.store import METRICS
from ..eval.summary import METRICS_JS, image_scores
from ..outputs.viewer import DATA_JS, STATUS_JS, VIEWER_HTML, data_js, page_html, status_js
from . import a1111, openai_api
from .auth import ApiKeyMiddleware, api_keys, check_bind
from .forms import FormError, JobRequest, SubmitForm, allowed_models, error_line, model_dict, parse_form, to_spec
from .jobs import Job, JobQueue, KeyLimit, QueueFull, wait_for
from .owner import current_owner, visible
from .runs import Root, find_runs, kind_of, resolve, run_roots, viewer_url
from .store import DB_NAME, Store
from .sweep_api import sweeps_router
from .sweeps import SweepError

HERE = Path(__file__).resolve().parent
log = logging.getLogger("runner.server")
_IMAGE = re.compile(r"^(\d{1,6})\.png$")


def compose_config(overrides: list[str]) -> DictConfig:
    """The run config from conf/ plus Hydra overrides, via Hydra's compose API (no run dir, no logging)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ..config import register_configs
    from ..config.overrides import CONF_DIR, check_override

    register_configs()
    for text in overrides:
        check_override(text)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    except Exception as exc:  # noqa: BLE001 - Hydra's composition errors are user errors here
        raise ConfigError(first_line(exc)) from exc


def server_dir(cfg: DictConfig) -> Path:
    """This server run's output dir: server.output_dir, else outputs/server/<date>/<time>."""
    if cfg.server.output_dir:
        return Path(os.path.expanduser(cfg.server.output_dir))
    return Path("outputs") / "server" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def job_loras(job: Job) -> list[dict[str, Any]]:
    """The LoRAs a job uses: name, scale, source and file name (what the gallery shows)."""
    (loras,) = job.spec.lora_sets[:1]
    tags = [lo for p in job.spec.prompts for lo in p.loras]  # the prompt's <lora:…> tags
    return [{"name": lora_name(lo), "scale": lo.scale, "source": lo.source, "weight_name": lo.weight_name}
            for lo in (*loras, *tags)]


def model_choice(mid: str, model: dict) -> dict[str, Any]:
    """One model the form offers: its family, its default settings and the fields it does not use (with hints)."""
    from ..config import ModelConfig
    from ..config.validate import SETTING_KEYS
    from ..models.families import pipeline_defaults, unused_keys
    from ..models.info import model_info

    try:
        info = model_info(ModelConfig(**model))
    except ConfigError as exc:  # e.g. a hub model not in the cache: offered, but it will fail with this line
        return {"id": mid, "family": None, "label": "unknown", "unused": {}, "defaults": {}, "error": str(exc)}
    settings = model.get("settings") or {}
    defaults = {**pipeline_defaults(info.pipeline), **{k: v for k, v in settings.items() if k in SETTING_KEYS}}
    return {"id": mid, "family": info.family.name, "label": info.family.label, "pipeline": info.pipeline,
            "unused": unused_keys(info.traits), "defaults": defaults}


def model_choices(cfg: DictConfig) -> list[dict[str, Any]]:
    """The default model and the server's allowed models (group names or ids), as the form offers them."""
    return [model_choice(mid, model_dict(mid, cfg)) for mid in allowed_models(cfg)]


VIEWER_FILES = (VIEWER_HTML, DATA_JS, STATUS_JS)


def viewer_file(folder: Path, name: str) -> Response:
    """A viewer file built on request, for a run dir written before viewers existed."""
    if name == VIEWER_HTML:
        return HTMLResponse(page_html())
    body = data_js(folder) if name == DATA_JS else status_js(folder)
    return Response(body, media_type="text/javascript", headers={"Cache-Control": "no-store"})


def job_json(queue: JobQueue, job: Job, roots: list[Root] | None = None) -> dict[str, Any]:
    total = len(job.files)
    viewer = viewer_url(roots or [], job.run_dir) if job.finished or job.done else None
    return {
        "id": job.id, "status": job.status, "done": job.done, "total": total, "model": job.spec.model.id,
        "family": job.family,
        "progress": f"{job.done}/{total}",
        "queue_position": queue.position(job), "error": job.error,
        "images": [f"/api/jobs/{job.id}/images/{k}.png" for k, f in enumerate(job.files) if f is not None],
        "seeds": list(job.spec.seeds), "prompt": job.spec.prompts[0].template or job.spec.prompts[0].prompt,
        "prompts": [p.prompt for p in job.spec.prompts], "gallery": f"/jobs/{job.id}",
        "loras": job_loras(job),
        "viewer": viewer,
        "scores": job_scores(job),
    }


def job_scores(job: Job) -> list[dict[str, float] | None] | None:
    """Each image's metric values (eval.metrics in the server's config; runner/eval), or None when unscored."""
    if job.run_dir is None or not (job.run_dir / METRICS).is_file():
        return None
    return image_scores(job.run_dir, [f.name if f is not None else None for f in job.files])


TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))


def make_queue(cfg: DictConfig, out: Path, keys: tuple[str, ...]) -> JobQueue:
    """The job queue, kept in SQLite in the server's own output folder (one for every start, so a restart finds
    what the last one left), with the keys' priorities and the per-key limit of queued images."""
    from .owner import owner_of
    from .runs import own_root

    s = cfg.server
    prio = s.get("priorities") or {}
    if not isinstance(prio, Mapping) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                for v in prio.values()):
        raise ConfigError("server.priorities is not valid; give {KEY: INT, ...} for keys of server.api_keys "
                          "(higher runs first; default 0)")
    if any(k not in keys for k in prio):
        raise ConfigError("server.priorities names a key that is not in server.api_keys; give each key of "
                          "server.api_keys a priority (higher runs first; default 0)")
    limit = int(s.get("max_queued_images") or 0)
    if limit < 1:
        raise ConfigError(f"server.max_queued_images={limit} would refuse every job; valid: 1 or more")
    store = Store(own_root(cfg) / DB_NAME)
    return JobQueue(out, int(s.queue_size), int(s.merge_max_images), store,
                    {owner_of(k): int(v) for k, v in prio.items()}, limit)


# server.KEY: the smallest value that lets a request through (0 would refuse every request: "valid: 1 to 0")
_LIMITS = {"max_steps": 1, "max_images": 1, "max_side": 8, "queue_size": 1, "merge_max_images": 1,
           "image_url_ttl": 1}


def check_limits(cfg: DictConfig) -> None:
    """Each server limit is a whole number a request can meet; one ConfigError line at start otherwise."""
    for key, low in _LIMITS.items():
        value = cfg.server.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"server.{key}={value!r} is out of range; valid: {low} or more (a smaller value would "
                              "refuse every request)")


def create_app(cfg: DictConfig) -> FastAPI:
    """The FastAPI app for a composed run config (its `server` section sets limits and the output dir)."""
    from ..models.loading import load_model

    # 1. Check everything the config names now, not on the first request: the run config, server.run_dirs, the
    #    API keys, and the model (a model that does not load fails with the one line `t2i` prints).
    base = validate(cfg)
    check_limits(cfg)
    roots = run_roots(cfg)
    keys = api_keys(cfg)
    loaded = load_model(base.model, base.device)
    out = server_dir(cfg)
    queue = make_queue(cfg, out, keys)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        queue.start()
        yield
        await run_in_threadpool(queue.stop)
        if queue.store is not None:
            queue.store.close()

    # 2. The app. FastAPIOffline serves Swagger UI from packaged files: /docs works without the internet. No
    #    /redoc: ReDoc's bundle fetches its logo from a CDN.
    app = FastAPIOffline(title="t2i-runner server", lifespan=lifespan, redoc_url=None,
                  description="Text-to-image with LoRA adapters. `POST /submit` is the original form's "
                              "endpoint; `/api/jobs` queues a job and reports its progress. `strength` is "
                              "accepted and ignored (text-to-image).")
    app.state.queue, app.state.cfg, app.state.output_dir, app.state.roots = queue, cfg, out, roots
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    if keys:
        app.add_middleware(ApiKeyMiddleware, keys=keys)

    # 3. Errors: one handler per kind, each answered in the caller's format (error_response).
    add_error_handlers(app)

    # 4. The routes: the form and job API, the run dirs and their viewers, A1111's and OpenAI's APIs.
    app.include_router(jobs_router(cfg, base.model.id, queue, out, roots))
    app.include_router(sweeps_router(cfg, queue, roots))
    app.include_router(runs_router(roots, queue if keys else None))
    app.include_router(a1111.a1111_router(cfg, queue, loaded.sha256))
    app.include_router(openai_api.openai_router(cfg, queue, out, started=datetime.now().timestamp()))
    return app


def error_response(request: Request, status: int, message: str, headers: dict | None = None,
                   exc: Exception | None = None) -> Response:
    """An HTML page for a browser (it accepts text/html) outside the APIs, OpenAI's error body on its routes,
    else one JSON line (`{"detail": …}`, also A1111's shape)."""
    path = request.url.path
    if path.startswith(openai_api.OPENAI_PREFIX):
        return openai_api.error_for(status, message, headers, exc)
    if "text/html" in request.headers.get("accept", "") and not path.startswith(("/api/", a1111.PREFIX)):
        page = TEMPLATES.TemplateResponse(request, "error.html", {"status": status, "message": message},
                                          status_code=status)
        page.headers.update(headers or {})
        return page
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Form errors, a full queue (503 + Retry-After), invalid requests (422 in one line), 404/405 and crashes."""

    @app.exception_handler(FormError)
    async def _form_error(request: Request, exc: FormError) -> Response:
        return error_response(request, exc.status, exc.message, exc=exc)

    @app.exception_handler(KeyLimit)
    async def _key_limit(request: Request, exc: KeyLimit) -> Response:
        return error_response(request, 429, str(exc))

    @app.exception_handler(SweepError)
    async def _sweep_error(request: Request, exc: SweepError) -> Response:
        return JSONResponse(exc.as_json(), status_code=exc.status)

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, exc: QueueFull) -> Response:
        return error_response(request, 503, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request, 422, error_line(list(exc.errors())), exc=exc)

    @app.exception_handler(StarletteHTTPException)  # 404, 405 (a reloaded /submit is a GET): pages too
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(request, exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(request, 500, f"the server failed: {type(exc).__name__}: {first_line(exc, 300)}")


def jobs_router(cfg: DictConfig, model_id: str, queue: JobQueue, out: Path, roots: list[Root]) -> APIRouter:
    """The original design's form (`GET /`, `POST /submit`, gallery pages) and the JSON job API."""
    router = APIRouter()
    choices = model_choices(cfg)

    # 1. A request becomes a job on the shared queue; jobs are found by id.
    def enqueue(req: JobRequest) -> Job:
        spec = to_spec(req, cfg)
        from ..models.info import model_info

        return queue.submit(spec, family=model_info(spec.model).family.name)

    def find(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None or job.kind != "job" or job.owner != current_owner():  # another key's: not there for this one
            raise FormError(404, f"no job {job_id!r} on this server")
        return job

    # 2. The original design's form, its submit (one PNG, or a gallery page) and gallery pages.
    @router.get("/", response_class=HTMLResponse, summary="The generation form (the original design's fields)")
    async def index(request: Request) -> Response:
        s = cfg.server
        first = choices[0]
        steps = min(int(first["defaults"].get("steps") or 30), int(s.max_steps))
        ctx = {"model_id": model_id, "models": choices, "first": first, "steps": steps,
               "guidance": first["defaults"].get("guidance_scale"), "true_cfg": first["defaults"].get("true_cfg_scale"),
               "max_steps": s.max_steps, "max_images": s.max_images, "max_side": s.max_side,
               "hires_upscalers": UPSCALERS, "hires_schedulers": SCHEDULERS}
        return TEMPLATES.TemplateResponse(request, "index.html", ctx)

    @router.post("/submit", response_class=FileResponse, summary="Generate: 1 image = the PNG, N = a gallery",
                 responses={200: {"content": {"image/png": {}, "text/html": {}}}})
    async def submit(request: Request, form: Annotated[SubmitForm, Form()]) -> Response:
        req = parse_form(form)
        job = await run_in_threadpool(enqueue, req)
        await wait_for(queue, job)
        if job.status != "done":
            return error_response(request, job.error_status, job.error or "generation failed")
        if len(job.files) == 1:
            return FileResponse(job.files[0], media_type="image/png", headers={"X-Job-Id": job.id})
        return gallery_page(request, job)

    def gallery_page(request: Request, job: Job) -> Response:
        items = [{"url": f"/api/jobs/{job.id}/images/{k}.png", "seed": s, "prompt": p}
                 for k, (p, _, s) in enumerate(job.wanted) if job.files[k] is not None]
        ctx = {"job": job_json(queue, job, roots), "items": items, "negative": job.spec.prompts[0].negative_prompt,
               "loras": job_loras(job)}
        return TEMPLATES.TemplateResponse(request, "gallery.html", ctx)

    @router.get("/jobs/{job_id}", response_class=HTMLResponse, summary="A job's gallery page")
    async def gallery(request: Request, job_id: str) -> Response:
        return gallery_page(request, find(job_id))

    # 3. The JSON job API: queue, status, images; health and the models offered.
    @router.post("/api/jobs", status_code=202, summary="Queue a job (the form's fields as JSON, plus `loras`)")
    async def create_job(req: Annotated[JobRequest, Body()]) -> JSONResponse:
        job = await run_in_threadpool(enqueue, req)
        headers = {"Location": f"/api/jobs/{job.id}"}
        return JSONResponse(job_json(queue, job, roots), status_code=202, headers=headers)

    @router.get("/api/jobs/{job_id}", summary="A job's status, progress i/N, image URLs and its run's viewer")
    async def get_job(job_id: str) -> dict[str, Any]:
        return job_json(queue, find(job_id), roots)

    @router.delete("/api/jobs/{job_id}", summary="Cancel a job (a running one after its batch in flight)")
    async def cancel_job(job_id: str) -> dict[str, Any]:
        job = find(job_id)
        queue.cancel(job)
        return job_json(queue, job, roots)

    @router.get("/api/jobs/{job_id}/images/{name}", response_class=FileResponse, summary="Image k of a job",
                responses={200: {"content": {"image/png": {}}}})
    async def get_image(job_id: str, name: str) -> Response:
        job, m = find(job_id), _IMAGE.match(name)
        k = int(m.group(1)) if m else -1
        path = job.files[k] if 0 <= k < len(job.files) else None
        root = os.path.realpath(out)
        if path is None or not os.path.realpath(path).startswith(root + os.sep) or not path.is_file():
            raise FormError(404, f"no image {name!r} in job {job_id} (yet)")
        return FileResponse(path, media_type="image/png")

    @router.get("/api/health", summary="Liveness and queue length")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": queue.pending(), "model": model_id, "family": choices[0]["family"],
                "output_dir": str(out)}

    @router.get("/api/models", summary="The models this server offers: family, defaults and unused fields")
    async def models() -> list[dict[str, Any]]:
        return choices

    return router


def runs_router(roots: list[Root], queue: JobQueue | None = None) -> APIRouter:
    """`/runs`: the run dirs this server may show (server.run_dirs and its own outputs), their files and viewers;
    nothing outside those folders. With a `queue` (server.api_keys set) a key sees its own runs and the shared
    server.run_dirs only (owner.visible)."""
    router = APIRouter()

    def shown(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if queue is None or queue.store is None:
            return runs
        dirs, owner = queue.store.all_run_dirs(), current_owner()
        return [r for r in runs if visible(roots[r["root"]].path / r["path"], roots, dirs, owner)]

    @router.get("/runs", response_class=HTMLResponse,
                summary="The run dirs this server may show, each with its viewer")
    async def runs_page(request: Request) -> Response:
        runs = shown(await run_in_threadpool(find_runs, roots))
        return TEMPLATES.TemplateResponse(request, "runs.html", {"runs": runs, "roots": roots})

    @router.get("/api/runs", summary="The run dirs this server may show (JSON)")
    async def runs_json() -> dict[str, Any]:
        runs = shown(await run_in_threadpool(find_runs, roots))
        return {"roots": [{"index": r.index, "path": r.label} for r in roots], "runs": runs}

    @router.get("/runs/{root}", include_in_schema=False)
    async def run_root(root: str) -> Response:
        return RedirectResponse(f"/runs/{root}/")

    @router.get("/runs/{root}/{rel:path}", summary="A file of a run dir (its viewer at .../index.html)",
                responses={200: {"content": {"text/html": {}, "image/png": {}, "text/javascript": {}}}})
    async def run_file(request: Request, root: str, rel: str) -> Response:
        return await run_in_threadpool(serve_run_file, request, root, rel)

    def serve_run_file(request: Request, root: str, rel: str) -> Response:
        try:
            return run_file_response(request, root, rel)
        except OSError:  # a name too long, a folder we may not read: not there, as far as the client knows
            return error_response(request, 404, f"no file {rel!r} in the run dirs this server shows (see /runs)")

    def run_file_response(request: Request, root: str, rel: str) -> Response:
        path = resolve(roots, root, rel)
        if path is not None and queue is not None and queue.store is not None and \
                not visible(path, roots, queue.store.all_run_dirs(), current_owner()):
            path = None  # another key's run: not there, as far as this key knows
        if path is not None and path.is_dir():
            if not request.url.path.endswith("/"):
                return RedirectResponse(request.url.path + "/")
            if kind_of(path) is None:
                return error_response(request, 404, f"{rel or 'this folder'} is not a run dir (see /runs)")
            path = path / VIEWER_HTML
        if path is not None and path.is_file():
            return FileResponse(path, headers={"Cache-Control": "no-store"} if path.name in VIEWER_FILES else None)
        if path is not None and path.name in VIEWER_FILES and kind_of(path.parent):
            return viewer_file(path.parent, path.name)  # an older run dir: built now, nothing written
        if path is not None and path.name == METRICS_JS and kind_of(path.parent):  # a run without scores
            return Response(b"window.T2I_VIEWER_METRICS = null;\n", media_type="text/javascript")
        return error_response(request, 404, f"no file {rel!r} in the run dirs this server shows (see /runs)")

    return router


@task_wrapper("t2i-serve", exits=True)
def main(argv: list[str] | None = None) -> int:
    """Console entry: `t2i-serve [hydra overrides…] [--host H] [--port P]`."""
    parser = argparse.ArgumentParser(prog="t2i-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="bind address (default: server.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: server.port, 8000)")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an unexpected error")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny server.max_images=4")
    args = parser.parse_intermixed_args(argv)
    cfg = compose_config(args.overrides)
    host = args.host or cfg.server.host
    port = args.port if args.port is not None else int(cfg.server.port)
    if not 1 <= port <= 65535:
        raise ConfigError(f"{'--port' if args.port is not None else 'server.port'}={port} is out of range; "
                          "valid: 1 to 65535")
    check_bind(host, api_keys(cfg))
    app = create_app(cfg)
    import uvicorn

    sock = listen(host, port)  # here, not in uvicorn: a port in use is one line, not a log and exit 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("model %s, images -> %s", cfg.model.id, app.state.output_dir)
    bound = sock.getsockname()
    # uvicorn names the address only when it binds the socket itself; the URL is what the user opens
    log.info("serving on http://%s:%d (Ctrl-C to stop)", f"[{bound[0]}]" if ":" in bound[0] else bound[0], bound[1])
    uvicorn.Server(uvicorn.Config(app, host=host, port=port)).run(sockets=[sock])
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for the server (one ConfigError line when the address is taken or wrong)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); give another --port "
                          "(or stop what uses it)") from exc
    return sock


if __name__ == "__main__":
    sys.exit(main())
