"""Sampling: create_sampling_session and asample. Samples are unordered ops on any worker."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session as DbSession
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, Tenant, body_as
from app.api.validation import check_sample
from app.domain.errors import InvalidInput
from app.domain.ids import parse_tinker_path
from app.queue import checkpoints, submit
from app.queue.submit import Wakeup
from app.wire import translate
from app.wire.json_models import CreateSamplingSessionRequest, SampleRequest

router = APIRouter()


@router.post("/api/v1/create_sampling_session")
async def create_sampling_session(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    req = await body_as(request, CreateSamplingSessionRequest)
    translate.check_create_sampling_session(req)

    def work(s: DbSession) -> tuple[str, list[Wakeup]]:
        if req.model_path:
            ckpt = checkpoints.resolve(s, tenant, parse_tinker_path(req.model_path))
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


@router.post("/api/v1/asample")
async def asample(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    req = await body_as(request, SampleRequest)
    if not req.sampling_session_id:
        raise InvalidInput("sampling_session_id is required (create a sampling client first)")
    if req.seq_id is None or req.seq_id < 0:
        raise InvalidInput("seq_id is required and must be >= 0")
    op = translate.sample_to_op(req)

    def work(s: DbSession) -> tuple[str, list[Wakeup]]:
        sampler = submit.get_sampler(s, tenant, req.sampling_session_id or "")
        spec = state.catalog.get(sampler.base_model)
        check_sample(
            op,
            vocab=state.catalog.vocab_size(sampler.base_model),
            max_len=spec.max_model_len,
            max_samples=state.settings.max_samples_per_request,
        )
        sub = submit.submit_sample(s, sampler, req.seq_id or 0, op)
        return sub.request_id, [sub.wakeup] if sub.wakeup else []

    request_id = await run_in_threadpool(state.submit, work)
    # 0.38 asserts one id per requested sample, in order (tinker-protocol.md §3.1).
    return {
        "request_id": request_id,
        "sample_sequence_ids": [f"{request_id}:{i}" for i in range(op.num_samples)],
    }
