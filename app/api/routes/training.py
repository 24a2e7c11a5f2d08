"""Training: create_model, get_info, forward_backward, optim_step, save_*, load_weights, weights_info.

Every training request becomes an op row at (model_id, seq_id). Content that cannot run (a token
outside the vocabulary, a bad checkpoint name...) is still recorded, as an already-failed op with
category `user`: the client gets a failed future it can read, and the run does not wait forever
for a seq_id that would otherwise never exist (tinker-protocol.md §4.3: ops run in seq order).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session as DbSession
from starlette.concurrency import run_in_threadpool

from app.age_crypto import parse_recipients
from app.api.catalog import TokenizerNotReady
from app.api.decoding import gate_of
from app.api.deps import State, Tenant, body_as
from app.api.encrypted_exports import refuse_encrypted
from app.api.state import AppState
from app.api.validation import check_forward_backward
from app.db.models import Run
from app.domain.architectures import lora_refusal
from app.domain.errors import InvalidInput, NotFound
from app.domain.ids import parse_tinker_path
from app.domain.ops import LoraConfig
from app.queue import checkpoints, stability, submit
from app.queue.commit import blocked_message
from app.queue.submit import Wakeup
from app.wire import translate
from app.wire.codec import DecodedForwardBackward, DecodeLimits, decode_forward_backward_located
from app.wire.json_models import (
    CreateModelRequest,
    GetInfoRequest,
    LoadWeightsRequest,
    OptimStepRequest,
    SaveWeightsExternalRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    WeightsInfoRequest,
)

router = APIRouter()

OpBuilder = Callable[[DbSession, Run], BaseModel]


def _submit_run_op(
    state: AppState, tenant: str, model_id: str, seq: int, kind: str, build: OpBuilder, raw: bytes
) -> str:
    def work(s: DbSession) -> tuple[str, list[Wakeup]]:
        ctx = submit.run_for_submit(s, tenant, model_id)
        run = ctx.run
        op: BaseModel | None = None
        rejected: str | None = None
        category = "user"
        if run.status == "cancelled":
            rejected = f"training run {model_id} was cancelled; it accepts no new operations"
        elif run.status == "blocked":
            # Its queued ops were failed when it blocked; a new one would wait for an operator
            # with nobody told. A paused run still queues: the operator paused it on purpose.
            rejected, category = blocked_message(model_id, run.status_reason or "unknown reason"), "server"
        else:
            try:
                op = build(s, run)
            except (InvalidInput, NotFound) as exc:
                rejected = exc.message
        if rejected is not None and op is None:
            sub = submit.submit_run_op(
                s, run, seq, None, rejected=rejected, kind=kind, raw=raw, rejected_category=category, ctx=ctx
            )
        else:
            sub = submit.submit_run_op(s, run, seq, op, rejected=rejected, ctx=ctx)
        return sub.request_id, [sub.wakeup] if sub.wakeup else []

    return state.submit(work)


@router.post("/api/v1/create_model")
async def create_model(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    req = await body_as(request, CreateModelRequest)
    spec = state.catalog.get(req.base_model)
    lora = translate.create_model_to_lora_config(req)
    if lora.rank > spec.max_lora_rank:
        raise InvalidInput(f"lora rank {lora.rank} exceeds this model's maximum {spec.max_lora_rank}")
    refusal = lora_refusal(spec.model_name, state.catalog.model_type(spec.model_name), lora)
    if refusal is not None:
        raise InvalidInput(refusal)

    def work(s: DbSession) -> tuple[tuple[str, str], list[Wakeup]]:
        run = submit.create_run(
            s,
            tenant,
            session_id=req.session_id,
            model_seq_id=req.model_seq_id,
            base_model=spec.model_name,
            lora=lora,
            user_metadata=req.user_metadata or {},
        )
        return (submit.record_create_model(s, run), run.run_id), []

    request_id, model_id = await run_in_threadpool(state.submit, work)
    return {"request_id": request_id, "model_id": model_id}


@router.post("/api/v1/get_info", response_model=None)
async def get_info(request: Request, state: State, tenant: Tenant) -> dict[str, Any] | JSONResponse:
    req = await body_as(request, GetInfoRequest)

    def work() -> dict[str, Any]:
        with state.db.read() as s:
            run = submit.get_run(s, tenant, req.model_id)
            return {
                "type": "get_info",
                "model_id": run.run_id,
                "model_data": {
                    "arch": "qwen3",
                    "model_name": run.base_model,
                    "tokenizer_id": state.catalog.tokenizer_id(run.base_model),
                },
                "is_lora": True,
                "lora_rank": run.lora_config.get("rank"),
                "model_name": run.base_model,
            }

    try:
        return await run_in_threadpool(work)
    except TokenizerNotReady as exc:
        # Cold start (docs/deployment.md "Readiness"): never announce a tokenizer the client
        # cannot load yet; the SDK retries a 503 and honours Retry-After.
        message = exc.message
        body = {"error": "not_ready", "message": message, "category": "server", "detail": message}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


def _rejected(message: str) -> OpBuilder:
    def build(_s: DbSession, _run: Run) -> BaseModel:
        raise InvalidInput(message)

    return build


@router.post("/api/v1/forward_backward")
async def forward_backward(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    encoding = request.headers.get("content-encoding")
    settings = state.settings
    limits = DecodeLimits(
        max_decompressed_bytes=settings.max_decompressed_bytes,
        max_datums=settings.max_datums_per_request,
        max_tokens_per_datum=state.catalog.max_model_len(),
        max_tokens=settings.max_tokens_per_request,
    )

    def decode(body: bytes) -> tuple[DecodedForwardBackward, bytes]:
        # In a decode thread (app/api/decoding.py): inflate, parse, bound, build and check the op
        # against the run's model, all before the write transaction.
        decoded = decode_forward_backward_located(body, encoding, limits)
        if decoded.op is None:
            return decoded, body

        def read_base_model() -> str:
            with state.db.read() as s:
                return submit.get_run(s, tenant, decoded.model_id).base_model

        base_model = state.base_model_of(tenant, decoded.model_id, read_base_model)
        try:
            check_forward_backward(
                decoded.op,
                vocab=state.catalog.vocab_size(base_model),
                max_len=state.catalog.get(base_model).max_model_len,
                max_datums=settings.max_datums_per_request,
            )
        except InvalidInput as exc:
            return DecodedForwardBackward(decoded.model_id, decoded.seq_id, None, exc), body
        return decoded, body

    decoded, body = await gate_of(request).decode(request, tenant, decode)
    op = decoded.op
    # A body whose envelope parses names its (model, seq): a content error is recorded there, or
    # every later op of the run would wait forever for this seq_id.
    if op is None:
        build = _rejected(decoded.error.message if decoded.error is not None else "invalid forward_backward")
    elif decoded.provenance is not None:
        provenance = decoded.provenance

        def build(s: DbSession, run: Run) -> BaseModel:
            # stable_reinforce: the sampling records are read (and their day restarted) in the
            # transaction that records the op; a bad sequence id fails the op with category user.
            return stability.with_recorded_inputs(
                s, tenant=tenant, session_id=run.session_id, op=op, provenance=provenance
            )
    else:

        def build(_s: DbSession, _run: Run) -> BaseModel:
            return op

    request_id = await run_in_threadpool(
        _submit_run_op, state, tenant, decoded.model_id, decoded.seq_id, "forward_backward", build, body
    )
    return {"request_id": request_id, "model_id": decoded.model_id}


def _locate_json(body: bytes) -> tuple[str, int] | None:
    """(model_id, seq_id) of a JSON training request whose other fields are invalid, when both
    are themselves usable; None otherwise (the request is then a plain 400)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    model_id, seq = value.get("model_id"), value.get("seq_id")
    if not isinstance(model_id, str) or not 0 < len(model_id) <= 100 or "\x00" in model_id:
        return None
    if not model_id.isascii() or type(seq) is not int or not 0 < seq <= 2**31 - 1:
        return None
    return model_id, seq


async def _json_or_rejected(
    request: Request, state: AppState, tenant: str, model: type[Any], kind: str
) -> Any | dict[str, Any]:
    """The body as `model`; or, when it does not validate but names a usable (model_id, seq_id),
    the reply for a failed op recorded at that seq: as for forward_backward, the run must not
    wait forever for a seq whose request was refused."""
    try:
        return await body_as(request, model)
    except InvalidInput as exc:
        body = await request.body()
        located = await run_in_threadpool(_locate_json, body) if len(body) > 65536 else _locate_json(body)
        if located is None:
            raise
        model_id, seq = located
        request_id = await run_in_threadpool(
            _submit_run_op, state, tenant, model_id, seq, kind, _rejected(exc.message), body
        )
        return {"request_id": request_id, "model_id": model_id}


async def _json_run_op(
    request: Request,
    state: AppState,
    tenant: str,
    model: type[Any],
    kind: str,
    to_op: Callable[[Any], BaseModel],
) -> dict[str, Any]:
    req = await _json_or_rejected(request, state, tenant, model, kind)
    if isinstance(req, dict):
        return req
    body = await request.body()
    seq = translate.require_seq_id(req.seq_id)

    def build(_s: DbSession, _run: Run) -> BaseModel:
        return to_op(req)

    request_id = await run_in_threadpool(_submit_run_op, state, tenant, req.model_id, seq, kind, build, body)
    return {"request_id": request_id, "model_id": req.model_id}


@router.post("/api/v1/optim_step")
async def optim_step(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    return await _json_run_op(request, state, tenant, OptimStepRequest, "optim_step", translate.optim_step_to_op)


@router.post("/api/v1/save_weights")
async def save_weights(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    return await _json_run_op(request, state, tenant, SaveWeightsRequest, "save_weights", translate.save_weights_to_op)


@router.post("/api/v1/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    return await _json_run_op(
        request,
        state,
        tenant,
        SaveWeightsForSamplerRequest,
        "save_weights",
        translate.save_weights_for_sampler_to_op,
    )


@router.post("/api/v1/save_weights_external")
async def save_weights_external(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    return await _json_run_op(
        request,
        state,
        tenant,
        SaveWeightsExternalRequest,
        "save_weights",
        _external_to_op,
    )


def _external_to_op(req: SaveWeightsExternalRequest) -> BaseModel:
    """A recipient that is not an age key fails the future (category user) when it is submitted,
    not after the save has run on a worker."""
    op = translate.save_weights_external_to_op(req)
    if op.age_recipients:
        parse_recipients(op.age_recipients)
    return op


@router.post("/api/v1/load_weights")
async def load_weights(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    req = await _json_or_rejected(request, state, tenant, LoadWeightsRequest, "load_weights")
    if isinstance(req, dict):
        return req
    body = await request.body()
    if req.model_id is None and req.session_id is None:
        raise InvalidInput("load_weights needs model_id (+seq_id), or session_id and model_seq_id")
    if req.model_id is not None:
        seq = translate.require_seq_id(req.seq_id)
        model_id = req.model_id

        def build(s: DbSession, run: Run) -> BaseModel:
            op = translate.load_weights_to_op(req)
            ckpt = checkpoints.resolve(s, tenant, parse_tinker_path(op.path))
            refuse_encrypted(state, ckpt, op.path)
            if ckpt.base_model != run.base_model:
                raise InvalidInput(f"{op.path} was trained on {ckpt.base_model}, this run uses {run.base_model}")
            if ckpt.lora_config.get("rank") != run.lora_config.get("rank"):
                raise InvalidInput(
                    f"{op.path} has LoRA rank {ckpt.lora_config.get('rank')}, "
                    f"this run has {run.lora_config.get('rank')}"
                )
            if op.with_optimizer and not ckpt.with_optimizer:
                raise InvalidInput(f"{op.path} holds no optimizer state (save it with save_state)")
            return op

        request_id = await run_in_threadpool(_submit_run_op, state, tenant, model_id, seq, "load_weights", build, body)
        return {"request_id": request_id, "model_id": model_id}

    # 0.38's create_training_client_from_state: one load_weights creates the run (seq 0) from the
    # checkpoint's configuration, under the id the SDK derives itself (§0.8).
    op = translate.load_weights_to_op(req)
    assert req.session_id is not None and req.model_seq_id is not None

    def work(s: DbSession) -> tuple[tuple[str, str], list[Wakeup]]:
        ckpt = checkpoints.resolve(s, tenant, parse_tinker_path(op.path))
        refuse_encrypted(state, ckpt, op.path)
        if req.base_model and req.base_model != ckpt.base_model:
            raise InvalidInput(f"{op.path} was trained on {ckpt.base_model}, not {req.base_model}")
        if op.with_optimizer and not ckpt.with_optimizer:
            raise InvalidInput(f"{op.path} holds no optimizer state (save it with save_state)")
        run = submit.create_run(
            s,
            tenant,
            session_id=req.session_id or "",
            model_seq_id=req.model_seq_id or 0,
            base_model=ckpt.base_model,
            lora=LoraConfig(**ckpt.lora_config),
            user_metadata=req.user_metadata or {},
            first_seq=0,
        )
        sub = submit.submit_run_op(s, run, 0, op)
        return (sub.request_id, run.run_id), [sub.wakeup] if sub.wakeup else []

    request_id, model_id = await run_in_threadpool(state.submit, work)
    return {"request_id": request_id, "model_id": model_id}


@router.post("/api/v1/weights_info")
async def weights_info(request: Request, state: State, tenant: Tenant) -> dict[str, Any]:
    req = await body_as(request, WeightsInfoRequest)
    path = parse_tinker_path(req.tinker_path)

    def work() -> dict[str, Any]:
        with state.db.read() as s:
            ckpt = checkpoints.resolve(s, tenant, path)
            lora = ckpt.lora_config
            return {
                "base_model": ckpt.base_model,
                "is_lora": True,
                "lora_rank": lora.get("rank"),
                "train_unembed": lora.get("train_unembed"),
                "train_mlp": lora.get("train_mlp"),
                "train_attn": lora.get("train_attn"),
            }

    return await run_in_threadpool(work)
