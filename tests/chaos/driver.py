"""The client side of every scenario: one fixed, deterministic training script driven through the
real tinker SDK, with its submissions pipelined the way real training loops do (submit everything,
then collect the futures), run in a thread so the test can inject faults meanwhile."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import tinker
from tinker import types

from tests.chaos.harness import API_KEY
from tests.e2e.test_training import memorise_datum

BASE_MODEL = "tuft/tiny-qwen3"
RANK = 4
SEED = 7
LEARNING_RATE = 1e-2
CHECKPOINT_NAME = "final"
RESULT_TIMEOUT = 180.0


@dataclass
class Outcome:
    """What the client saw for one future: its value, or the exception it raised."""

    kind: str
    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(eq=False)
class Driver(threading.Thread):
    """`iterations` x (forward_backward + optim_step), then save_state, all pipelined.

    With `hold_last`, save_state is submitted only once `release()` is called: a test that kills
    a worker "somewhere in the stream" then still has an op left for the survivor to run, even
    when the kill lands after the last training op (a fast machine finishes the stream quickly)."""

    url: str
    iterations: int
    outcomes: list[Outcome] = field(default_factory=list)
    model_id: str | None = None
    failure: BaseException | None = None
    created: threading.Event = field(default_factory=threading.Event)
    submitted: threading.Event = field(default_factory=threading.Event)
    hold_last: bool = False
    released: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, name="chaos-driver", daemon=True)

    @property
    def expected_ops(self) -> int:
        return 2 * self.iterations + 1

    def run(self) -> None:
        try:
            self._script()
        except BaseException as exc:
            self.failure = exc

    def _script(self) -> None:
        client = tinker.ServiceClient(base_url=self.url, api_key=API_KEY)
        training = client.create_lora_training_client(base_model=BASE_MODEL, rank=RANK, seed=SEED).result(
            timeout=RESULT_TIMEOUT
        )
        self.model_id = training.model_id
        self.created.set()
        datum = memorise_datum()  # the e2e suite's: one sequence, weight on its last 4 tokens
        futures: list[tuple[str, Any]] = []
        for _ in range(self.iterations):
            futures.append(("forward_backward", training.forward_backward([datum], "cross_entropy")))
            futures.append(("optim_step", training.optim_step(types.AdamParams(learning_rate=LEARNING_RATE))))
        if self.hold_last and not self.released.wait(RESULT_TIMEOUT):
            raise TimeoutError("the test never released the final save_state")
        futures.append(("save_weights", training.save_state(CHECKPOINT_NAME)))
        self.submitted.set()
        start = time.monotonic()
        for kind, future in futures:
            try:
                value = future.result(timeout=RESULT_TIMEOUT)
                self.outcomes.append(Outcome(kind, value=value, seconds=time.monotonic() - start))
            except BaseException as exc:  # recorded; the checker decides
                self.outcomes.append(Outcome(kind, error=exc, seconds=time.monotonic() - start))
        # Finish the session: stops the SDK's heartbeat thread, which would otherwise keep
        # calling a server that the test is about to tear down.
        with contextlib.suppress(Exception):
            client.close("success").result(timeout=30)

    def release(self) -> None:
        self.released.set()

    # ---- what the client saw ----
    def finish(self, timeout: float = 400) -> Driver:
        self.join(timeout)
        assert not self.is_alive(), "the training script did not finish"
        if self.failure is not None:
            raise AssertionError(f"the training script failed: {self.failure!r}") from self.failure
        return self

    def wait_created(self, timeout: float = 120) -> str:
        assert self.created.wait(timeout), f"create_model never answered (driver failure: {self.failure!r})"
        assert self.model_id is not None
        return self.model_id

    def losses(self) -> list[float | None]:
        return [o.value.metrics["loss:sum"] if o.ok else None for o in self.outcomes if o.kind == "forward_backward"]

    def optim_metrics(self) -> list[dict[str, float] | None]:
        return [dict(o.value.metrics or {}) if o.ok else None for o in self.outcomes if o.kind == "optim_step"]

    def failed(self) -> list[tuple[int, Outcome]]:
        """(seq, outcome) of every future that raised; seq counts from 1 like the SDK's seq_id."""
        return [(i + 1, o) for i, o in enumerate(self.outcomes) if not o.ok]
