"""The SDK clients against a fake broker: a ROUTER on ipc answering from a thread."""

from __future__ import annotations

import asyncio
import inspect
import json
import pickle
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from uro_recs.core import protocol
from uro_recs.core.protocol import RETRYABLE_CODES, ErrorCode, Request
from uro_recs.sdk import (
    AsyncClient,
    BadRequest,
    Client,
    ClientState,
    DeadlineExceeded,
    ModelInfo,
    Overloaded,
    Prediction,
    Recommendation,
    RequestRejected,
    RetryPolicy,
    ServerError,
    SimilarItems,
    TryAgainLater,
    Unavailable,
    UnknownModel,
    Unsupported,
    UroRecsError,
    WorkerLost,
    error_from_reply,
)
from uro_recs.sdk import results as parse
from uro_recs.sdk.client import nobody_listening

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[Request], list[bytes]]  # reply bodies to send back for one request
FAST_RETRY = RetryPolicy(attempts=3, backoff=0.001, max_backoff=0.002)


class FakeBroker:
    """A ROUTER that records each request and answers with what the handler returns."""

    def __init__(self, endpoint: str, handler: Handler) -> None:
        self.requests: list[Request] = []
        self.handler = handler
        self.failure: BaseException | None = None
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._socket.poll(10):
                    continue
                identity, *frames = self._socket.recv_multipart()
                request = protocol.decode_request(protocol.client_body(frames), 1 << 20)
                self.requests.append(request)
                for body in self.handler(request):
                    self._socket.send_multipart([identity, b"", body])
        except BaseException as exc:  # surfaced by close(), so a broken request fails the test
            self.failure = exc

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()
        if self.failure is not None:
            raise self.failure


def recommendation(request: Request) -> dict[str, Any]:
    args = request.args
    assert isinstance(args, protocol.RecommendArgs)
    user = args.users[0]
    return {"user": user, "items": [f"{user}-{k}" for k in range(args.n)], "cold_start": False}


def answer(request: Request) -> list[bytes]:
    return [protocol.encode_ok(request.id, recommendation(request))]


def never_answer(request: Request) -> list[bytes]:
    return []


def scripted(*codes: ErrorCode) -> Handler:
    """Answer the k-th request with an error of codes[k], and later ones with a result."""
    script = iter(codes)

    def handle(request: Request) -> list[bytes]:
        code = next(script, None)
        if code is None:
            return answer(request)
        return [protocol.encode_error(request.id, code, "boom")]

    return handle


@pytest.fixture
def endpoint() -> Iterator[str]:
    # Not tmp_path: ipc paths are limited to ~107 bytes and pytest's can be longer.
    with tempfile.TemporaryDirectory(prefix="ur-") as root:
        yield f"ipc://{root}/broker.sock"


@pytest.fixture
def serve(endpoint: str) -> Iterator[Callable[[Handler], FakeBroker]]:
    brokers: list[FakeBroker] = []

    def start(handler: Handler) -> FakeBroker:
        brokers.append(FakeBroker(endpoint, handler))
        return brokers[-1]

    yield start
    for broker in brokers:
        broker.close()


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def use_client(flavour: str, endpoint: str, call: Callable[[Any], Any], **options: Any) -> Any:
    """Run `call(client)` on a Client or, awaiting it, on an AsyncClient."""
    options = {"model": "als", "retry": FAST_RETRY, **options}
    if flavour == "sync":
        with Client(endpoint, **options) as client:
            return call(client)

    async def main() -> Any:
        async with AsyncClient(endpoint, **options) as client:
            result = call(client)
            return await result if inspect.isawaitable(result) else result

    return asyncio.run(main())


# --- retries ------------------------------------------------------------------------------


def test_overloaded_reply_is_retried_until_success(
    serve: Callable[[Handler], FakeBroker], endpoint: str, flavour: str
) -> None:
    broker = serve(scripted(ErrorCode.OVERLOADED, ErrorCode.OVERLOADED))
    rec = use_client(flavour, endpoint, lambda c: c.recommend(7, n=2))
    assert rec == Recommendation(user=7, items=("7-0", "7-1"), cold_start=False)
    assert len(broker.requests) == 3
    assert len({r.id for r in broker.requests}) == 3  # each attempt has its own id


def test_unavailable_and_worker_lost_replies_are_retried(
    serve: Callable[[Handler], FakeBroker], endpoint: str, flavour: str
) -> None:
    broker = serve(scripted(ErrorCode.UNAVAILABLE, ErrorCode.WORKER_LOST))
    assert use_client(flavour, endpoint, lambda c: c.recommend(1)).user == 1
    assert len(broker.requests) == 3


def test_retryable_error_is_raised_when_attempts_run_out(
    serve: Callable[[Handler], FakeBroker], endpoint: str, flavour: str
) -> None:
    broker = serve(scripted(*[ErrorCode.OVERLOADED] * 5))
    with pytest.raises(Overloaded):
        use_client(flavour, endpoint, lambda c: c.recommend(1))
    assert len(broker.requests) == FAST_RETRY.attempts


def test_bad_request_reply_is_not_retried(
    serve: Callable[[Handler], FakeBroker], endpoint: str, flavour: str
) -> None:
    broker = serve(scripted(ErrorCode.BAD_REQUEST))
    with pytest.raises(BadRequest):
        use_client(flavour, endpoint, lambda c: c.recommend(1))
    assert len(broker.requests) == 1


def test_retry_whose_backoff_would_pass_the_deadline_is_not_made(
    serve: Callable[[Handler], FakeBroker], endpoint: str, flavour: str
) -> None:
    broker = serve(scripted(ErrorCode.UNAVAILABLE))
    slow = RetryPolicy(attempts=5, backoff=1.0, max_backoff=1.0)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        use_client(flavour, endpoint, lambda c: c.recommend(1), retry=slow, timeout=0.3)
    assert time.monotonic() - started < 0.25
    assert len(broker.requests) == 1


def test_each_attempt_sends_the_remaining_budget_as_timeout_ms(
    serve: Callable[[Handler], FakeBroker], endpoint: str, flavour: str
) -> None:
    broker = serve(scripted(ErrorCode.OVERLOADED))
    retry = RetryPolicy(attempts=2, backoff=0.04, max_backoff=0.04)
    use_client(flavour, endpoint, lambda c: c.recommend(1, timeout=0.5), retry=retry)
    first, second = (r.timeout_ms for r in broker.requests)
    assert first is not None and second is not None
    assert 400 < first <= 500
    assert second <= first - 20  # the backoff sleep was at least 20 ms


# --- deadlines ----------------------------------------------------------------------------


def test_unanswered_call_raises_deadline_exceeded_after_its_timeout(
    serve: Callable[[Handler], FakeBroker], endpoint: str, flavour: str
) -> None:
    broker = serve(never_answer)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as raised:
        use_client(flavour, endpoint, lambda c: c.recommend(1), timeout=0.2)
    assert 0.19 <= time.monotonic() - started < 0.6
    assert isinstance(raised.value, TimeoutError)
    assert raised.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert raised.value.request_id == broker.requests[0].id


def test_a_call_with_no_broker_listening_is_unavailable_without_waiting(
    endpoint: str, flavour: str
) -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable, match="no broker is listening at ipc://"):
        use_client(flavour, endpoint, lambda c: c.info(timeout=5.0))
    assert time.monotonic() - started < 4.0  # not the 5 s budget waited out


def test_nobody_listening_tells_missing_refused_and_listening(tmp_path: Path) -> None:
    missing = f"ipc://{tmp_path / 'none.sock'}"
    assert "no such socket file" in (nobody_listening(missing) or "")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(stale))  # bound, never listening: what a dead broker leaves behind
        assert "connection refused" in (nobody_listening(f"ipc://{stale}") or "")
    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(live))
        listener.listen()
        assert nobody_listening(f"ipc://{live}") is None
    with socket.socket() as port:
        port.bind(("127.0.0.1", 0))
        closed = port.getsockname()[1]
    assert "connection refused" in (nobody_listening(f"tcp://127.0.0.1:{closed}") or "")


def test_late_reply_of_a_timed_out_call_is_ignored_by_the_next_call(
    serve: Callable[[Handler], FakeBroker], endpoint: str
) -> None:
    unanswered: list[Request] = []

    def answer_late(request: Request) -> list[bytes]:
        if not unanswered:
            unanswered.append(request)
            return []
        late = {"user": "late", "items": [], "cold_start": True}
        return [protocol.encode_ok(unanswered[0].id, late), *answer(request)]

    serve(answer_late)
    with Client(endpoint, model="als") as client:
        with pytest.raises(DeadlineExceeded):
            client.recommend("first", timeout=0.1)
        assert client.recommend("second", n=1).items == ("second-0",)
        assert client.dropped_replies == 1


def test_async_late_reply_is_dropped_and_its_call_leaves_nothing_pending(
    serve: Callable[[Handler], FakeBroker], endpoint: str
) -> None:
    first: list[Request] = []

    def answer_late(request: Request) -> list[bytes]:
        if not first:
            first.append(request)
            return []
        late = {"user": "late", "items": [], "cold_start": True}
        return [protocol.encode_ok(first[0].id, late), *answer(request)]

    serve(answer_late)

    async def main() -> None:
        async with AsyncClient(endpoint, model="als") as client:
            with pytest.raises(DeadlineExceeded):
                await client.recommend("first", timeout=0.1)
            assert client.in_flight == 0
            assert (await client.recommend("second", n=1)).items == ("second-0",)
            assert client.dropped_replies == 1

    asyncio.run(main())


# --- concurrency --------------------------------------------------------------------------


def test_500_concurrent_calls_on_one_async_client_get_their_own_answers(
    serve: Callable[[Handler], FakeBroker], endpoint: str
) -> None:
    held: list[Request] = []

    def answer_all_at_once_shuffled(request: Request) -> list[bytes]:
        held.append(request)
        if len(held) < 500:
            return []
        random.shuffle(held)
        return [body for r in held for body in answer(r)]

    serve(answer_all_at_once_shuffled)

    async def main() -> list[Recommendation]:
        async with AsyncClient(endpoint, model="als", timeout=10) as client:
            results = await asyncio.gather(*(client.recommend(u, n=2) for u in range(500)))
            assert client.in_flight == 0
            assert client.dropped_replies == 0
            return results

    results = asyncio.run(main())
    assert [r.user for r in results] == list(range(500))
    assert all(r.items == (f"{r.user}-0", f"{r.user}-1") for r in results)


def test_sync_client_shared_by_8_threads_gives_each_call_its_own_answer(
    serve: Callable[[Handler], FakeBroker], endpoint: str
) -> None:
    broker = serve(answer)

    with Client(endpoint, model="als", timeout=5) as client:

        def worker(thread: int) -> list[bool]:
            users = [f"t{thread}-{k}" for k in range(25)]
            return [client.recommend(u, n=1).items == (f"{u}-0",) for u in users]

        with ThreadPoolExecutor(8) as pool:
            outcomes = [ok for oks in pool.map(worker, range(8)) for ok in oks]
    assert outcomes == [True] * 200
    assert len(broker.requests) == 200


def test_cancelled_async_call_leaves_no_pending_future(
    serve: Callable[[Handler], FakeBroker], endpoint: str
) -> None:
    broker = serve(never_answer)

    async def main() -> None:
        async with AsyncClient(endpoint, model="als") as client:
            call = asyncio.create_task(client.recommend(1, timeout=5))
            while not broker.requests:
                await asyncio.sleep(0.005)
            assert client.in_flight == 1
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert client.in_flight == 0

    asyncio.run(main())


def test_closing_an_async_client_fails_the_calls_still_waiting(
    serve: Callable[[Handler], FakeBroker], endpoint: str
) -> None:
    broker = serve(never_answer)

    async def main() -> None:
        client = AsyncClient(endpoint, model="als")
        call = asyncio.create_task(client.recommend(1, timeout=5))
        while not broker.requests:
            await asyncio.sleep(0.005)
        await client.aclose()
        with pytest.raises(RuntimeError):
            await call

    asyncio.run(main())


# --- results ------------------------------------------------------------------------------


MODEL = {
    "name": "als",
    "version": "2024-06-01",
    "workers": 2,
    "class": "ALS",
    "n_users": 10,
    "n_items": 20,
    "ops": ["recommend", "predict", "similar_items"],
}
STATS = {
    "uptime_s": 1.5,
    "draining": False,
    "models": {"als": {"workers": 2, "slots": 4, "in_flight": 0, "queued": 0}},
    "counters": {"requests": 3},
}


def answer_every_op(request: Request) -> list[bytes]:
    args = request.args
    result: dict[str, Any]
    if isinstance(args, protocol.RecommendArgs) and args.many:
        result = {"results": [{"user": u, "items": [], "cold_start": True} for u in args.users]}
    elif isinstance(args, protocol.RecommendArgs):
        assert args.exclude == frozenset({"x"}) and not args.filter_consumed
        result = recommendation(request)
    elif isinstance(args, protocol.PredictArgs):
        result = {"user": args.user, "scores": [0.5, None, 2], "cold_start": False}
    elif isinstance(args, protocol.SimilarItemsArgs):
        result = {"item": args.item, "items": ["b", "c"], "scores": [0.9, 0.8], "cold_start": False}
    elif request.op is protocol.Op.INFO:
        result = {"models": [MODEL]}
    else:
        result = STATS
    return [protocol.encode_ok(request.id, result)]


def test_results_are_parsed_into_dataclasses(
    serve: Callable[[Handler], FakeBroker], endpoint: str, flavour: str
) -> None:
    broker = serve(answer_every_op)
    calls: list[Callable[[Any], Any]] = [
        lambda c: c.recommend("u", n=1, filter_consumed=False, exclude=["x"]),
        lambda c: c.recommend_many(["u", 2], n=3),
        lambda c: c.predict("u", ["a", "b", "c"], model="bpr"),
        lambda c: c.similar_items("a", n=2),
        lambda c: c.info(),
        lambda c: c.stats(),
    ]
    results = [use_client(flavour, endpoint, call) for call in calls]
    assert results == [
        Recommendation(user="u", items=("u-0",), cold_start=False),
        [
            Recommendation(user="u", items=(), cold_start=True),
            Recommendation(user=2, items=(), cold_start=True),
        ],
        Prediction(user="u", scores=(0.5, None, 2.0), cold_start=False),
        SimilarItems(item="a", items=("b", "c"), scores=(0.9, 0.8)),
        [
            ModelInfo(
                "als", "2024-06-01", 2, "ALS", 10, 20, ("recommend", "predict", "similar_items")
            )
        ],
        STATS,
    ]
    assert [r.model for r in broker.requests] == ["als", "als", "bpr", "als", None, None]


@pytest.mark.parametrize(
    "result",
    [
        {"user": 1, "cold_start": False},  # no items
        {"user": 1, "items": "abc", "cold_start": False},
        {"user": 1, "items": [1.5], "cold_start": False},
        {"user": True, "items": [], "cold_start": False},
        {"user": 1, "items": [], "cold_start": "no"},
    ],
)
def test_malformed_result_raises_server_error_naming_the_request(
    serve: Callable[[Handler], FakeBroker], endpoint: str, result: dict[str, Any]
) -> None:
    broker = serve(lambda request: [protocol.encode_ok(request.id, result)])
    with pytest.raises(ServerError) as raised:
        use_client("sync", endpoint, lambda c: c.recommend(1))
    assert raised.value.request_id == broker.requests[0].id


def test_result_counts_that_differ_from_the_request_raise_server_error(
    serve: Callable[[Handler], FakeBroker], endpoint: str
) -> None:
    def one_answer_only(request: Request) -> list[bytes]:
        if isinstance(request.args, protocol.PredictArgs):
            result = {"user": 1, "scores": [0.5], "cold_start": False}
        else:
            result = {"results": [{"user": 1, "items": [], "cold_start": False}]}
        return [protocol.encode_ok(request.id, result)]

    serve(one_answer_only)
    with pytest.raises(ServerError):
        use_client("sync", endpoint, lambda c: c.predict(1, ["a", "b"]))
    with pytest.raises(ServerError):
        use_client("sync", endpoint, lambda c: c.recommend_many([1, 2]))


def test_reply_that_breaks_the_contract_raises_server_error(
    serve: Callable[[Handler], FakeBroker], endpoint: str, flavour: str
) -> None:
    serve(lambda request: [msgpack.packb({"v": 1, "id": request.id, "ok": True})])
    with pytest.raises(ServerError):
        use_client(flavour, endpoint, lambda c: c.stats())


# --- errors -------------------------------------------------------------------------------

EXPECTED_EXCEPTION = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.TOO_LARGE: BadRequest,
    ErrorCode.UNSUPPORTED_VERSION: BadRequest,
    ErrorCode.UNKNOWN_OP: BadRequest,
    ErrorCode.UNKNOWN_MODEL: UnknownModel,
    ErrorCode.UNSUPPORTED: Unsupported,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorCode.OVERLOADED: Overloaded,
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.WORKER_LOST: WorkerLost,
    ErrorCode.INTERNAL: ServerError,
}


VECTORS = Path(__file__).parents[1] / "docs" / "vectors" / "v1.json"
PARSERS: dict[str, Callable[[dict[str, Any]], object]] = {
    "recommend_ok": parse.parse_recommendation,
    "recommend_many_ok": parse.parse_recommendations,
    "predict_ok": parse.parse_prediction,
    "similar_items_ok": parse.parse_similar_items,
    "ingest_ok": parse.parse_accepted,
}


def _recommendation(result: dict[str, Any]) -> Recommendation:
    return Recommendation(result["user"], tuple(result["items"]), result["cold_start"])


# What each result map of the vectors must parse into, built from the map field by field.
EXPECTED_RESULT: dict[str, Callable[[dict[str, Any]], object]] = {
    "recommend_ok": _recommendation,
    "recommend_many_ok": lambda r: [_recommendation(each) for each in r["results"]],
    "predict_ok": lambda r: Prediction(r["user"], tuple(r["scores"]), r["cold_start"]),
    "similar_items_ok": lambda r: SimilarItems(
        r["item"], tuple(r["items"]), tuple(r["scores"]), r["cold_start"]
    ),
    "ingest_ok": lambda r: r["accepted"],
}


@pytest.mark.parametrize(
    "vector", [pytest.param(v, id=v["name"]) for v in json.loads(VECTORS.read_text())["replies"]]
)
def test_reply_vectors_of_the_protocol_parse_into_results_or_exceptions(
    vector: dict[str, Any],
) -> None:
    value = vector["value"]
    reply = protocol.decode_reply(bytes.fromhex(vector["body_hex"]))
    if value["ok"]:
        assert reply.result is not None
        parsed = PARSERS[vector["name"]](reply.result)
        assert parsed == EXPECTED_RESULT[vector["name"]](value["result"])
    else:
        assert reply.error is not None
        error = error_from_reply(reply.error, reply.id)
        assert type(error) is EXPECTED_EXCEPTION[ErrorCode(value["error"]["code"])]
        assert (error.code, error.message, error.request_id) == (
            value["error"]["code"],
            value["error"]["message"],
            value["id"],
        )


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_raises_the_exception_that_says_what_to_do(
    serve: Callable[[Handler], FakeBroker], endpoint: str, flavour: str, code: ErrorCode
) -> None:
    broker = serve(scripted(code))
    with pytest.raises(UroRecsError) as raised:
        use_client(flavour, endpoint, lambda c: c.recommend(1), retry=RetryPolicy(attempts=1))
    error = raised.value
    assert type(error) is EXPECTED_EXCEPTION[code]
    assert (error.code, error.message, error.request_id) == (code, "boom", broker.requests[0].id)
    assert isinstance(error, TryAgainLater) == (code in RETRYABLE_CODES)
    if isinstance(error, BadRequest | UnknownModel | Unsupported):
        assert isinstance(error, RequestRejected)


def test_errors_survive_pickling() -> None:
    error = pickle.loads(pickle.dumps(WorkerLost(ErrorCode.WORKER_LOST, "gone", 3)))
    assert (type(error), error.code, error.message, error.request_id) == (
        WorkerLost,
        ErrorCode.WORKER_LOST,
        "gone",
        3,
    )


# --- usage errors and lifecycle -------------------------------------------------------------


def test_closed_client_refuses_calls_and_cannot_be_reopened(endpoint: str) -> None:
    client = Client(endpoint, model="als")
    states = [client.state]
    with client:
        states.append(client.state)
    states.append(client.state)
    assert states == [ClientState.UNOPENED, ClientState.OPEN, ClientState.CLOSED]
    with pytest.raises(RuntimeError):
        client.recommend(1)
    with pytest.raises(RuntimeError), client:
        pass

    async def main() -> None:
        async_client = AsyncClient(endpoint, model="als")
        async with async_client:
            states = [async_client.state]
        states.append(async_client.state)
        assert states == [ClientState.OPEN, ClientState.CLOSED]
        with pytest.raises(RuntimeError):
            await async_client.recommend(1)

    asyncio.run(main())


def test_usage_mistakes_raise_before_anything_is_sent(endpoint: str) -> None:
    with Client(endpoint) as client:
        with pytest.raises(ValueError, match="model"):
            client.recommend(1)
        with pytest.raises(ValueError, match="timeout"):
            client.info(timeout=0)
        with pytest.raises(TypeError):
            client.predict(1, "abc", model="als")
    with pytest.raises(ValueError):
        Client(endpoint, timeout=7200)
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
