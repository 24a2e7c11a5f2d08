"""Sampling: create_sampling_session and asample. Samples are unordered ops on any worker."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session as DbSession
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, Tenant, body_as
from app.api.encrypted_exports import refuse_encrypted
from app.api.validation import check_sample
from app.domain.errors import InvalidInput
from app.domain.ids import parse_tinker_path
from app.queue import backpressure, checkpoints, submit
from app.queue.backpressure import SampleQueueFull, SampleQueueLimits
from app.queue.submit import Wakeup
from app.wire import translate
from app.wire.json_models import CreateSamplingSessionRequest, SampleRequest
from app.wire.sample_extras import check_target_ids

# Seconds a refused sample is told to wait. The SDK waits 1 s on any 429 from asample whatever the
# header says; other HTTP clients get a standard hint.
RETRY_AFTER_SECONDS = 1

router = APIRouter()
log = logging.getLogger("tuft.api")


@router.post("/api/v1/create_sampling_session")
async def create_sampling_session(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    req = await body_as(request, CreateSamplingSessionRequest)
    translate.check_create_sampling_session(req)

    def work(s: DbSession) -> tuple[str, list[Wakeup]]:
        if req.model_path:
            ckpt = checkpoints.resolve(s, tenant, parse_tinker_path(req.model_path))
            refuse_encrypted(state, ckpt, req.model_path)
            if req.base_model and req.base_model != ckpt.base_model:
                raise InvalidInput(f"{req.model_path} was trained on {ckpt.base_model}, not {req.base_model}")
            base_model = ckpt.base_model
        else:
            base_model = state.catalog.get(req.base_model or "").model_name
        sampler = submit.create_sampler(
            s,
            tenant,
            session_id=req.session_id,
            sampling_session_seq_id=req.sampling_session_seq_id,
            base_model=base_model,
            model_path=req.model_path,
        )
        return sampler.sampler_id, []

    sampler_id = await run_in_threadpool(state.submit, work)
    return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}


@router.post("/api/v1/asample", response_model=None)
async def asample(request: Request, state: State, tenant: Tenant) -> dict[str, Any] | JSONResponse:
    req = await body_as(request, SampleRequest)
    if not req.sampling_session_id:
        raise InvalidInput("sampling_session_id is required (create a sampling client first)")
    if req.seq_id is None or req.seq_id < 0:
        raise InvalidInput("seq_id is required and must be >= 0")
    op = translate.sample_to_op(req)
    settings = state.settings
    limits = SampleQueueLimits.of(settings)

    def work(s: DbSession) -> tuple[str, list[Wakeup]]:
        sampler = submit.get_sampler(s, tenant, req.sampling_session_id or "")
        spec = state.catalog.get(sampler.base_model)
        vocab = state.catalog.vocab_size(sampler.base_model)
        check_sample(op, vocab=vocab, max_len=spec.max_model_len, max_samples=settings.max_samples_per_request)
        check_target_ids(op, vocab)
        backpressure.admit_sample(s, sampler, req.seq_id or 0, limits)
        sub = submit.submit_sample(s, sampler, req.seq_id or 0, op)
        return sub.request_id, [sub.wakeup] if sub.wakeup else []

    try:
        request_id = await run_in_threadpool(state.submit, work)
    except SampleQueueFull as exc:
        return _queue_full(exc)
    # 0.38 asserts one id per requested sample, in order (tinker-protocol.md §3.1).
    return {
        "request_id": request_id,
        "sample_sequence_ids": [f"{request_id}:{i}" for i in range(op.num_samples)],
    }


def _queue_full(exc: SampleQueueFull) -> JSONResponse:
    """429: the SDK backs off and re-submits the same request (tinker-protocol.md §1.6)."""
    log.info("POST /api/v1/asample -> 429: %s", exc.message)
    body = {"error": "too_many_requests", "message": exc.message, "category": "server", "detail": exc.message}
    return JSONResponse(body, status_code=429, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
