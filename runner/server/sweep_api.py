"""`/sweep` (the page) and `/api/sweeps` (queue, check, follow, cancel and resume a sweep) of `t2i-serve`.

A sweep is one queued item: its whole config checked first (runner/server/sweeps.py), then run by the queue's
worker into its own run dir, whose live viewer (`/runs/0/sweep-…/`) fills as the images come. Cancelling stops
it after the batch in flight; the images made stay, and the run dir is resumed (`POST …/resume`) to every image
exactly once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from omegaconf import DictConfig, OmegaConf

from ..config.validate import string_list
from .forms import FormError, allowed_models
from .jobs import Job, JobQueue
from .owner import current_owner
from .runs import Root, viewer_url
from .sweeps import Problem, Sweep, SweepError, check_sweep, starter_yaml

LORA_EXTS = (".safetensors", ".ckpt", ".pt", ".bin")


def estimate(queue: JobQueue, images: int) -> float | None:
    """Seconds for `images` at this server's measured rate (None before it has made any)."""
    rate = queue.images_per_second()
    return round(images / rate, 1) if rate else None


def sweep_json(queue: JobQueue, job: Job, roots: list[Root]) -> dict[str, Any]:
    left = max(0, job.total - job.done)
    return {
        "id": job.id, "kind": "sweep", "status": job.status, "done": job.done, "total": job.total,
        "progress": f"{job.done}/{job.total}", "queue_position": queue.position(job), "error": job.error,
        "run_dir": job.run_dir.name if job.run_dir else None, "viewer": viewer_url(roots, job.run_dir),
        "family": job.family, "estimate_s": estimate(queue, left) if not job.finished else None,
        "resumable": job.finished and job.status != "done", "url": f"/api/sweeps/{job.id}",
    }


def lora_files(cfg: DictConfig, limit: int = 200) -> list[str]:
    """The LoRA files in the folders this server allows (what the page offers)."""
    found: list[str] = []
    for d in string_list("server.allowed_lora_dirs", cfg.server.allowed_lora_dirs):
        base = Path(os.path.expanduser(d))
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if path.suffix in LORA_EXTS and not any(p.startswith(".") for p in path.relative_to(base).parts):
                found.append(str(path))
                if len(found) >= limit:
                    return found
    return found


async def read_body(request: Request) -> Any:
    """The sweep as the client sent it: JSON (a mapping) or YAML text."""
    raw = await request.body()
    if "json" in request.headers.get("content-type", ""):
        try:
            return json.loads(raw or b"null")
        except ValueError as exc:
            raise SweepError(400, [Problem("yaml", f"the JSON body does not parse: {exc}")]) from exc
    return raw


def sweeps_router(cfg: DictConfig, queue: JobQueue, roots: list[Root]) -> APIRouter:
    from .app import TEMPLATES  # one template folder for every page

    router = APIRouter()

    def find(sweep_id: str) -> Job:
        job = queue.get(sweep_id)
        if job is None or job.kind != "sweep" or job.owner != current_owner():  # another key's: not there
            raise FormError(404, f"no sweep {sweep_id!r} on this server (for this key)")
        return job

    def check(body: Any) -> Sweep:
        return check_sweep(body, cfg)

    # 1. The page: the run's YAML (or the form that writes it), checked as it is edited
    @router.get("/sweep", response_class=HTMLResponse, summary="The sweep page: a run's config, checked and queued")
    async def page(request: Request) -> Response:
        files = await run_in_threadpool(lora_files, cfg)
        s = cfg.server
        prompts = OmegaConf.to_container(cfg.prompts) if OmegaConf.is_list(cfg.prompts) else [cfg.prompts]
        ctx = {"yaml": starter_yaml(cfg, files), "models": allowed_models(cfg), "loras": files,
               "prompts": [p if isinstance(p, str) else p.get("prompt", "") for p in prompts][:2],
               "max_images": s.max_images, "max_side": s.max_side, "max_steps": s.max_steps,
               "rate": queue.images_per_second()}
        return TEMPLATES.TemplateResponse(request, "sweep.html", ctx)

    # 2. The API
    @router.post("/api/sweeps", status_code=202,
                 summary="Queue a sweep (YAML text or a JSON mapping of run-config keys); ?dry_run=1 only checks it",
                 openapi_extra={"requestBody": {"content": {"application/yaml": {"schema": {"type": "string"}},
                                                            "application/json": {"schema": {"type": "object"}}}}})
    async def create(request: Request, dry_run: bool = False) -> JSONResponse:
        body = await read_body(request)
        sweep = await run_in_threadpool(check, body)
        if dry_run:
            return JSONResponse({"ok": True, "planned": sweep.planned, "models": sweep.models,
                                 "images_per_second": queue.images_per_second(),
                                 "estimate_s": estimate(queue, sweep.planned), "errors": []}, status_code=200)
        job = await run_in_threadpool(queue.submit, sweep.spec, sweep.family, "sweep", sweep.planned, sweep.source)
        body = sweep_json(queue, job, roots)
        return JSONResponse(body, status_code=202, headers={"Location": body["url"]})

    @router.get("/api/sweeps", summary="This key's sweeps, newest first")
    async def listing() -> dict[str, Any]:
        rows = queue.store.items(owner=current_owner(), kind="sweep") if queue.store is not None else []
        jobs = [queue.get(r["id"]) for r in rows]
        return {"sweeps": [sweep_json(queue, j, roots) for j in jobs if j is not None]}

    @router.get("/api/sweeps/{sweep_id}", summary="A sweep's state, progress and viewer")
    async def get(sweep_id: str) -> dict[str, Any]:
        return sweep_json(queue, find(sweep_id), roots)

    @router.delete("/api/sweeps/{sweep_id}",
                   summary="Cancel a sweep: the batch in flight finishes, its images stay, the run dir resumes")
    async def cancel(sweep_id: str) -> dict[str, Any]:
        job = find(sweep_id)
        queue.cancel(job)
        return sweep_json(queue, job, roots)

    @router.post("/api/sweeps/{sweep_id}/resume", status_code=202,
                 summary="Queue a cancelled or failed sweep again: it makes only what its run dir lacks")
    async def resume(sweep_id: str) -> JSONResponse:
        job = find(sweep_id)
        if not job.finished or job.status == "done":
            raise FormError(409, f"sweep {sweep_id} is {job.status}; only a cancelled, interrupted or failed "
                                 "sweep is resumed")
        queue.requeue(job)
        return JSONResponse(sweep_json(queue, job, roots), status_code=202)

    return router
