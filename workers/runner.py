"""The worker loop: wait (wake-up | poll tick | stop) -> take runs -> claim -> execute -> fenced commit.

One thread drives the engine. The Celery message (or nothing, in embedded mode) only shortens the
wait; which op runs next is decided by committed database state alone (reliability-design.md §1.6).
The engine's state for a run is a cache of "fresh adapter + replay of the run's mutating ops up to
applied_seq" (recovery.py); whenever that cache may be wrong it is dropped and rebuilt.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session as DbSession

from app.checkpoint_store import CheckpointStore
from app.config import Settings
from app.db.engine import Database
from app.db.models import Sampler
from app.domain import ids
from app.domain.errors import DomainError
from app.domain.oai import OaiCompletionOp
from app.domain.ops import ForwardBackwardOp, LoadWeightsOp, SampleOp, SaveWeightsOp, parse_op
from app.domain.results import LoadWeightsResult, result_bytes
from app.queue import checkpoints, claim, commit, handback, leases, stability
from app.queue.claim import ReadyOp
from app.queue.commit import Fenced, Outcome
from app.queue.survey import survey
from workers import sample_batch, save_op, train_batch
from workers.execute import apply_mutation
from workers.faults import fault
from workers.recovery import RunStates
from workers.residency import Residency, WorkerEngine
from workers.save_op import UserError
from workers.snapshots import SnapshotWriter
from workers.transient import is_transient

log = logging.getLogger(__name__)
T = TypeVar("T")

# Ops that change no training state: a transient error in one of them leaves the run's state good.
READ_ONLY_KINDS = frozenset({"save_weights"})


class Runner:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        engine: WorkerEngine,
        *,
        worker_id: str,
        user_errors: tuple[type[BaseException], ...] = (),
        fatal_errors: tuple[type[BaseException], ...] = (),
        oom_errors: tuple[type[BaseException], ...] = (),
        on_fatal: Callable[[], None] | None = None,
        on_commit: Callable[[], object] = lambda: None,
    ) -> None:
        """user_errors fail the op with category `user`; fatal_errors (a sticky device error) end
        the loop without committing anything, record the error in `fatal` and call `on_fatal` (the
        process then exits and the runs move to another worker); oom_errors are retried once
        after freeing memory (workers.engine.errors says which is which)."""
        self.settings = settings
        self.db = db
        self.engine = engine
        self.worker_id = worker_id
        self.checkpoint_dir = settings.resolved_checkpoint_dir()
        self.store = CheckpointStore(self.checkpoint_dir)
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.user_errors: tuple[type[BaseException], ...] = (UserError, DomainError, *user_errors)
        self.fatal_errors, self.oom_errors, self.on_fatal = fatal_errors, oom_errors, on_fatal
        self.on_commit = on_commit  # after every commit of the loop: a best-effort push (issue 11)
        self.fatal: BaseException | None = None
        self.snapshots = SnapshotWriter(settings, db, engine, worker_id)
        self.states = RunStates(settings, db, engine, self._resolve_checkpoint_dir, self.snapshots)
        self.residency = Residency(
            settings, engine, self.states, self.snapshots, worker_id=worker_id, commit=self._commit
        )
        self.handed_back = 0  # ops and samples given back after a transient error (tests, operators)
        self.oom_retries = 0
        # Monotonic time of the last successful lease renewal (set by the heartbeat thread).
        self.last_renewal = time.monotonic()
        self.fenced_commits = 0
        self.ops_batched = 0  # forward_backward ops computed in a pass shared with other runs (train_batch.py)
        # File work that may only happen once the current op's commit has landed, and what to do
        # with the op's own files if it does not land (fenced off, or the op failed).
        self._after_commit: list[Callable[[], object]] = []
        self._abandon: list[Callable[[], object]] = []

    # ---- loop ------------------------------------------------------------------------------
    def run_forever(self) -> None:
        while not self.stop.is_set():
            try:
                busy = self.step()
            except self.fatal_errors as exc:
                # The device is unusable (engine/errors.py): every later op would fail on it too.
                # Nothing was committed for the op; the process exits and its runs move on.
                log.critical("ALERT device error, this worker exits without committing: %s", exc)
                self.fatal = exc
                self.stop.set()
                if self.on_fatal is not None:
                    self.on_fatal()
                return
            except Exception as exc:
                if not (isinstance(exc, DBAPIError) or is_transient(exc)):
                    raise
                # Database restarting or unreachable: nothing was committed; try again shortly.
                log.warning("database error in worker loop (will retry): %s", exc.__class__.__name__)
                busy = False
                self.stop.wait(1.0)
            if not busy:
                self.wake.wait(self.settings.worker_poll_seconds)
                self.wake.clear()

    def step(self) -> bool:
        """Do one round of work; True if anything ran (so the loop goes again without waiting)."""
        self.states.drop_lost_runs()
        self.residency.released.clear()
        # One read says what this pass has to do; the writes run only when there is something.
        with self.db.read() as s:
            found = survey(s, self.worker_id)
        ready = found.ready
        if found.runs_to_take:
            with self.db.write() as s:
                taken = leases.acquire_runs(s, self.worker_id, self.settings.lease_ttl_seconds)
            if taken:
                with self.db.read() as s:
                    ready = claim.ready_run_ops(s, self.worker_id)
        busy = bool(ready)
        ready = train_batch.run_together(self, ready)  # several runs' forward_backward in one pass
        for op in ready:
            if self.stop.is_set():
                return True
            if op.run_id not in self.residency.released:  # evicted meanwhile: no longer ours
                self._run_op_safely(op)
        sampled = self._sample_once() if found.samples_queued and self._serves_samples() else False
        self.residency.evict_idle()
        return sampled or busy

    def _run_op_safely(self, op: ReadyOp) -> None:
        for attempt in (1, 2):
            try:
                self._run_op(op)
            except self.fatal_errors:
                raise
            except self.oom_errors as exc:
                # Out of memory rebuilding the run (before its op was claimed): free what other
                # runs and models hold and try once more; a run that cannot fit even then is blocked.
                self.states.discard(op.run_id)
                if attempt == 1:
                    log.warning("out of memory rebuilding %s (%s); freeing memory, retrying", op.run_id, exc)
                    self.oom_retries += 1
                    self.residency.free_for_oom(keep=op.run_id)
                    continue
                self._block(op, exc)
            except Exception as exc:
                if isinstance(exc, DBAPIError) or is_transient(exc):
                    raise  # an outage, not the run's fault: run_forever waits and goes on
                self._block(op, exc)
            return

    def _block(self, op: ReadyOp, exc: BaseException) -> None:
        log.error("run %s cannot continue at seq %d; blocking it", op.run_id, op.seq, exc_info=exc)
        self.states.discard(op.run_id)
        reason = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(Fenced):
            self._commit(
                lambda s: commit.block_run(s, worker_id=self.worker_id, run_id=op.run_id, epoch=op.epoch, reason=reason)
            )

    # ---- training ops ----------------------------------------------------------------------
    def _lease_is_fresh(self) -> bool:
        """Self-fencing: with no successful renewal for most of a TTL, others may already have
        taken our runs; start nothing new (correctness still rests on the fenced commit)."""
        return time.monotonic() - self.last_renewal < 0.8 * self.settings.lease_ttl_seconds

    def _fail_poison(self, op: ReadyOp) -> None:
        message = (
            f"this {op.kind} was attempted {op.attempt} times and each attempt ended its worker; "
            "it is failed so the run can go on (see docs/reliability.md)"
        )
        log.error("ALERT poison op %s (%s seq %d): %s", op.request_id, op.run_id, op.seq, message)
        self.states.discard(op.run_id)
        with self.db.write() as s:
            if not claim.claim_run_op(s, self.worker_id, op):
                return

        def _write(s: DbSession) -> None:
            commit.commit_run_op(
                s,
                worker_id=self.worker_id,
                run_id=op.run_id,
                seq=op.seq,
                epoch=op.epoch,
                request_id=op.request_id,
                outcome=Outcome(error_message=message, error_category="server"),
            )
            if self.settings.poison_policy == "block":
                commit.block_run(s, worker_id=self.worker_id, run_id=op.run_id, epoch=op.epoch, reason=message)

        with contextlib.suppress(Fenced):
            self._commit(_write)

    def _run_op(self, op: ReadyOp) -> None:
        if not self._lease_is_fresh():
            return
        if op.status != "failed" and op.attempt >= self.settings.max_op_attempts:
            self._fail_poison(op)
            return
        if op.status == "failed":
            # Rejected at submission: its future is already terminal; just move the run past it.
            self._commit(
                lambda s: commit.skip_rejected_op(
                    s, worker_id=self.worker_id, run_id=op.run_id, seq=op.seq, epoch=op.epoch
                )
            )
            self.states.advance(op.run_id, op.epoch, op.seq)
            return
        self.residency.make_room(op.run_id)
        if not self.states.ensure(op.run_id, op.epoch, op.seq - 1):
            return
        # The claim only records progress: its commit is not waited for on disk (write_relaxed).
        with self.db.write_relaxed() as s:
            if not claim.claim_run_op(s, self.worker_id, op):
                return
            fault("claim_in_transaction")  # the op's row lock held, COMMIT not yet sent
        self._finish_claimed(op, parse_op(op.payload))

    def _finish_claimed(
        self, op: ReadyOp, domain_op: object, computed: tuple[Outcome, Callable[[DbSession], None] | None] | None = None
    ) -> None:
        """Compute a claimed op (unless `computed` brings its outcome: train_batch.py) and commit
        it under the fence."""
        steps_before = self.engine.optimizer_steps(op.run_id)
        if computed is None:
            computed = self._compute(op, domain_op)
        if computed is None:
            return  # handed back: nothing committed, the op runs again
        outcome, extra = computed
        delta = self.engine.optimizer_steps(op.run_id) - steps_before if self.engine.has_run(op.run_id) else 0

        def _write(s: DbSession) -> None:
            commit.commit_run_op(
                s,
                worker_id=self.worker_id,
                run_id=op.run_id,
                seq=op.seq,
                epoch=op.epoch,
                request_id=op.request_id,
                outcome=outcome,
                optimizer_steps_delta=max(delta, 0),
            )
            if extra is not None and not outcome.failed:
                extra(s)

        try:
            self._commit(_write)
        except Fenced as exc:
            self.fenced_commits += 1
            log.warning("FENCED commit rejected: %s; dropping the run's state", exc)
            self.states.discard(op.run_id)
            self._file_actions(self._abandon)
            return
        except self.user_errors as exc:
            # Raised by `extra` (e.g. a checkpoint name taken meanwhile): record it as the outcome.
            # `_write` reads both names when called, so it now commits the failure alone.
            outcome, extra = Outcome(error_message=str(exc), error_category="user"), None
            self._commit(_write)
        fault(f"after_commit_{op.kind}")
        self._file_actions(self._abandon if outcome.failed else self._after_commit)
        if self.engine.has_run(op.run_id):
            self.states.advance(op.run_id, op.epoch, op.seq)
            if not outcome.failed:
                self.snapshots.after_commit(op.run_id, op.epoch, op.seq, op.kind)

    def _compute(self, op: ReadyOp, domain_op: object) -> tuple[Outcome, Callable[[DbSession], None] | None] | None:
        """Execute a claimed op: its outcome (and what to commit with it), or None if the op was
        handed back. An out-of-memory error is retried once, after freeing every other run and
        cached model and rebuilding this run (its state may be half-updated)."""
        for attempt in (1, 2):
            self._after_commit, self._abandon = [], []
            try:
                fault(f"before_engine_{op.kind}")
                result, extra = self._execute(op, domain_op)
                # Between computing a result and committing it: the window fencing exists for.
                fault(f"after_engine_{op.kind}")
                split = self.engine.micro_batch_tokens(op.run_id) if isinstance(domain_op, ForwardBackwardOp) else None
                return Outcome(result=result_bytes(result), micro_batch_tokens=split), extra
            except self.user_errors as exc:
                log.info("op %s (%s seq %d) failed on user input: %s", op.request_id, op.run_id, op.seq, exc)
                return Outcome(error_message=str(exc), error_category="user"), None
            except self.fatal_errors:
                raise  # run_forever ends the worker; nothing is committed for this op
            except self.oom_errors as exc:
                self.states.discard(op.run_id)  # e.g. some micro-batches' gradients accumulated
                self._file_actions(self._abandon)
                if attempt == 2 or not self._free_and_rebuild(op, exc):
                    return self._too_big(op, exc), None
            except Exception as exc:
                if is_transient(exc):
                    self._hand_back(op, exc)
                    return None
                log.exception("op %s (%s seq %d) failed", op.request_id, op.run_id, op.seq)
                # The state may be half-updated (e.g. part of the gradients accumulated): rebuild it.
                self.states.discard(op.run_id)
                return Outcome(error_message=f"{type(exc).__name__}: {exc}", error_category="server"), None
        raise AssertionError("unreachable")

    def _free_and_rebuild(self, op: ReadyOp, exc: BaseException) -> bool:
        """After an out-of-memory error: evict everything else, rebuild the run; False if even the
        rebuild does not fit."""
        log.warning(
            "op %s (%s seq %d) ran out of memory (%s); freeing memory and retrying once",
            op.request_id,
            op.run_id,
            op.seq,
            exc,
        )
        self.oom_retries += 1
        self.residency.free_for_oom(keep=op.run_id)
        try:
            return self.states.ensure(op.run_id, op.epoch, op.seq - 1)
        except self.oom_errors:
            self.states.discard(op.run_id)
            return False

    def _too_big(self, op: ReadyOp, exc: BaseException) -> Outcome:
        log.warning("op %s (%s seq %d) does not fit even with memory freed: %s", op.request_id, op.run_id, op.seq, exc)
        return Outcome(
            error_message=(
                f"out of memory: this {op.kind} does not fit on the worker's device even after every other run "
                f"and cached model was unloaded; send it in smaller pieces (fewer or shorter datums) ({exc})"
            ),
            error_category="user",
        )

    def _hand_back(self, op: ReadyOp, exc: BaseException) -> None:
        """A database or Redis outage in the middle of the op says nothing about the op: undo the
        claim, without committing an outcome, so it runs again once the service is back."""
        log.warning(
            "op %s (%s seq %d) handed back after a transient error (%s: %s); it will run again",
            op.request_id,
            op.run_id,
            op.seq,
            type(exc).__name__,
            exc,
        )
        self.handed_back += 1
        if op.kind not in READ_ONLY_KINDS:
            self.states.discard(op.run_id)  # it may be half-updated: rebuilt before the retry
        self._file_actions(self._abandon)
        self._commit(
            lambda s: handback.give_back_op(s, worker_id=self.worker_id, request_id=op.request_id, epoch=op.epoch)
        )

    def _execute(self, op: ReadyOp, domain_op: object) -> tuple[BaseModel, Callable[[DbSession], None] | None]:
        if isinstance(domain_op, SaveWeightsOp):
            return save_op.run_save(self, op, domain_op)
        result = apply_mutation(self.engine, op.run_id, domain_op, self._resolve_checkpoint_dir)
        if isinstance(domain_op, LoadWeightsOp):
            return LoadWeightsResult(path=domain_op.path, model_id=op.run_id), None
        assert isinstance(result, BaseModel)
        return result, None

    def _file_actions(self, actions: list[Callable[[], object]]) -> None:
        """Checkpoint file work after a commit's fate is known. Never fails the op (its outcome is
        already committed or fenced off): whatever is left behind, the sweeper removes later."""
        for action in actions:
            try:
                action()
            except Exception as exc:
                log.warning("checkpoint file cleanup left for the sweeper: %s", exc)

    def _resolve_checkpoint_dir(self, tinker_path: str) -> Path:
        parsed = ids.parse_tinker_path(tinker_path)
        with self.db.read() as s:
            row = checkpoints.find(s, parsed.run_id, parsed.kind, parsed.name)
            if row is None:
                raise UserError(f"checkpoint {tinker_path} not found")
            return self.store.folder(row.storage_path)

    # ---- sampling --------------------------------------------------------------------------
    def _serves_samples(self) -> bool:
        """An engine that cannot sample (a base sharded over several GPUs: engine/sharded.py) says
        so; such a worker leaves sample requests to the others instead of failing them."""
        serves = getattr(self.engine, "serves_samples", None)
        return True if serves is None else bool(serves())

    def _sample_once(self) -> bool:
        together = sample_batch.sample_together(self)  # several samples in one decode (issue 9)
        if together is not None:
            return together
        # Abandoned samples (a worker died mid-sample) are requeued by the sweeper; one that ended
        # its worker max_op_attempts times is failed instead of run (claim.fail_poison_samples).
        limit = self.settings.max_op_attempts
        with self.db.write() as s:
            poisoned = claim.fail_poison_samples(s, limit)
            claimed = claim.claim_sample(s, self.worker_id, self.settings.lease_ttl_seconds, max_attempts=limit)
        for poison in poisoned:  # logged once committed: a rolled-back transaction failed nothing
            log.error("ALERT poison sample %s (tenant %s): %s", poison.request_id, poison.tenant, poison.message)
        if claimed is None:
            return bool(poisoned)
        self._settle_sample(claimed, self._sample_outcome(claimed))
        return True

    def _settle_sample(self, claimed: claim.ClaimedSample, outcome: Outcome | None) -> None:
        """Commit a claimed sample's outcome (None: hand it back)."""
        if outcome is None:
            # An outage mid-sample: back to the queue, for us or any worker, once it is over.
            self.handed_back += 1
            self._commit(
                lambda s: handback.give_back_sample(s, worker_id=self.worker_id, request_id=claimed.request_id)
            )
            return

        def commit_with_records(s: DbSession) -> None:
            commit.commit_sample(s, worker_id=self.worker_id, request_id=claimed.request_id, outcome=outcome)
            # In the same transaction: a client that sees the result can train on it.
            stability.record_sample(
                s,
                request_id=claimed.request_id,
                sampler_id=claimed.sampler_id,
                payload=claimed.payload,
                result=None if outcome.failed else outcome.result,
            )

        try:
            self._commit(commit_with_records)
        except Fenced as exc:
            log.warning("sample result discarded: %s", exc)

    def _sample_outcome(self, claimed: claim.ClaimedSample) -> Outcome | None:
        """Run a claimed sample: its outcome, or None to hand it back (a transient error). Out of
        memory is retried once after freeing cached runs and models; device errors propagate."""
        for attempt in (1, 2):
            try:
                fault("before_engine_sample")
                return Outcome(result=result_bytes(self._sample(claimed)))
            except self.user_errors as exc:
                return Outcome(error_message=str(exc), error_category="user")
            except self.fatal_errors:
                raise  # run_forever ends the worker; the claim goes back when it releases
            except self.oom_errors as exc:
                if attempt == 2:
                    return Outcome(
                        error_message=f"out of memory: this sample does not fit on the worker's device even "
                        f"after every cached run and model was unloaded; ask for fewer or shorter samples ({exc})",
                        error_category="user",
                    )
                log.warning(
                    "sample %s ran out of memory (%s); freeing memory and retrying once", claimed.request_id, exc
                )
                self.oom_retries += 1
                self.residency.free_for_oom(keep=None)
            except Exception as exc:
                if is_transient(exc):
                    log.warning(
                        "sample %s handed back after a transient error (%s: %s)",
                        claimed.request_id,
                        type(exc).__name__,
                        exc,
                    )
                    return None
                log.exception("sample %s failed", claimed.request_id)
                return Outcome(error_message=f"{type(exc).__name__}: {exc}", error_category="server")
        raise AssertionError("unreachable")

    def _sample(self, claimed: claim.ClaimedSample) -> BaseModel:
        op = parse_op(claimed.payload)
        if isinstance(op, OaiCompletionOp):
            return self._complete_text(op)
        assert isinstance(op, SampleOp)
        with self.db.read() as s:
            sampler = s.get(Sampler, claimed.sampler_id)
            if sampler is None:
                raise UserError(f"sampler {claimed.sampler_id} not found")
            base_model, model_path = sampler.base_model, sampler.model_path
        adapter = self._resolve_checkpoint_dir(model_path) if model_path else None
        return self.engine.sample(base_model, adapter, op)

    def _complete_text(self, op: OaiCompletionOp) -> BaseModel:
        """An OpenAI-compatible completion (app/domain/oai.py): it carries its own model."""
        # Imported on first use: it brings in transformers, and the runner otherwise needs only
        # the Engine protocol.
        from workers.engine.text import complete_text

        adapter = self._resolve_checkpoint_dir(op.model_path) if op.model_path else None
        cache_dir = self.settings.resolved_data_dir() / "cache"
        return complete_text(self.engine, self.settings.models(), cache_dir, adapter, op)

    # ---- commits ---------------------------------------------------------------------------
    def _commit(self, write: Callable[[DbSession], T]) -> T:
        """Commit with retries on database errors: the result is kept and only the commit is
        retried, never the op (it may already have changed the engine state)."""
        delay = 0.2
        while True:
            try:
                with self.db.write() as s:
                    written = write(s)
                    fault("commit_in_transaction")  # row locks held, COMMIT not yet sent
                break
            except Exception as exc:
                if not (isinstance(exc, DBAPIError) or is_transient(exc)) or self.stop.is_set():
                    raise
                log.warning("commit failed (%s); retrying in %.1fs", exc.__class__.__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.on_commit()  # tells waiting long-polls where the database cannot (SQLite: no NOTIFY)
        return written
