"""What a device process sends back for one send: every outcome as it was, an encoder's rows stacked; and a
receiver refusing a device process that speaks another version of the wire."""

from __future__ import annotations

import contextlib
import pickle
import threading
from concurrent.futures import Future
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest
import torch

from producer.errors import Cancelled, InputTooLarge
from workers.device import WIRE_VERSION
from workers.device.remote import RemoteDevice, unpack_outcomes
from workers.device.server import _Outbox, pack_outcomes
from workers.errors import WorkerError


def answered(value: Any = None, error: BaseException | None = None, cancel: bool = False) -> Future[Any]:
    future: Future[Any] = Future()
    if cancel:
        future.cancel()
    elif error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
    return future


def test_outcomes_of_a_send_come_back_as_they_were_with_rows_of_one_shape_in_one_array() -> None:
    one, three, probabilities = torch.randn(1, 8), torch.randn(3, 8), torch.rand(2, 3)
    completion = {"text": "hello", "finish_reason": "stop"}
    done = [(7, answered(one)), (8, answered(probabilities)), (9, answered(error=InputTooLarge("too long"))),
            (10, answered(three)), (11, answered(completion)), (12, answered(cancel=True))]
    body = pack_outcomes(done)
    assert len(body[1]) == 2  # the embeddings' rows in one array, the probabilities in another
    received = list(unpack_outcomes(pickle.loads(ForkingPickler.dumps(body))))
    assert [(request_id, ok) for request_id, ok, _ in received] == [(7, True), (8, True), (9, False), (10, True),
                                                                    (11, True), (12, False)]
    values = {request_id: value for request_id, _, value in received}
    for request_id, sent in ((7, one), (8, probabilities), (10, three)):
        assert isinstance(values[request_id], torch.Tensor)
        assert torch.equal(values[request_id], sent)
    assert isinstance(values[9], InputTooLarge) and str(values[9]) == "too long"
    assert values[11] == completion
    assert isinstance(values[12], Cancelled)


def test_a_send_without_encoder_rows_carries_no_array() -> None:
    outcomes, arrays = pack_outcomes([(1, answered({"text": "a"}))])
    assert arrays == [] and outcomes == [(1, True, {"text": "a"}, None)]


def test_a_tensor_without_rows_comes_back_as_a_tensor_not_through_shared_memory() -> None:
    body = pack_outcomes([(1, answered(torch.tensor(0.5)))])
    assert body[1] == []
    [(request_id, ok, value)] = list(unpack_outcomes(pickle.loads(ForkingPickler.dumps(body))))
    assert (request_id, ok) == (1, True)
    assert isinstance(value, torch.Tensor) and not value.is_shared() and value.item() == 0.5


def test_a_receiver_refuses_a_device_process_of_another_wire_version(tmp_path: Path) -> None:
    address, key = str(tmp_path / "old.sock"), b"k" * 32
    with Listener(address, "AF_UNIX", authkey=key) as listener:
        def old_release() -> None:  # an earlier release's hello carries no wire version
            with listener.accept() as conn:
                conn.send(("hello", {"pid": 1, "keys": []}))
                with contextlib.suppress(EOFError, OSError):
                    conn.recv()

        server = threading.Thread(target=old_release, daemon=True)
        server.start()
        with pytest.raises(WorkerError, match=f"wire version 1, this worker {WIRE_VERSION}"):
            RemoteDevice(address, key, 10.0)
        server.join(timeout=10)


def test_an_answer_that_cannot_be_sent_hangs_up_so_the_serving_thread_and_the_receiver_both_see_it_go(
        tmp_path: Path) -> None:
    """The outbox closed the connection when an answer would not go; the thread serving it stayed blocked
    reading it, so the socket lived on and the receiver, which should exit and leave its messages to come
    back, waited for answers that would never come."""
    address = str(tmp_path / "device.sock")
    with Listener(address, "AF_UNIX", authkey=b"key") as listener:
        accepted: list[Connection] = []
        accepting = threading.Thread(target=lambda: accepted.append(listener.accept()))
        accepting.start()
        receiver = Client(address, "AF_UNIX", authkey=b"key")
        accepting.join(timeout=5)
        woke = threading.Event()

        def serve() -> None:  # as the device process's thread for this receiver: blocked reading it
            with contextlib.suppress(EOFError, OSError):
                accepted[0].recv()
            woke.set()

        threading.Thread(target=serve, daemon=True).start()
        _Outbox(accepted[0]).put(1, answered(threading.Lock()))  # an outcome that cannot be pickled
        assert woke.wait(timeout=5), "the serving thread stayed blocked on the connection"
        assert receiver.poll(5)
        with pytest.raises(EOFError):
            receiver.recv()
        receiver.close()
        accepted[0].close()
