"""The Redis result backend, tuned for inferq.

- Each failure's message is stored as one readable string. Celery stores ``exc_message`` as the
  exception's argument list (``["texts must ..."]``); the contract promises a plain string, which is what
  a foreign client or Flower shows best. Celery's own reader accepts both forms.
- Results are encoded with orjson: the same JSON kombu's encoder writes (any JSON reader gets the same
  values back), about 20 times faster for a result of floats (an embedding of 384 floats: 10 us against
  215 us, a fifth of a worker's per-message CPU on a small machine). A non-finite float is written as null
  (kombu writes the non-JSON ``NaN``); anything orjson cannot encode falls back to kombu's encoder.
- A store that Redis refuses (READONLY, OOM, MISCONF, or unreachable past the retries) raises
  ResultNotStored: the message must stay unacknowledged, and nothing is stored in its place (a stored
  failure would answer the caller with the store's trouble instead of the task's outcome).
- A result is stored in one atomic round trip that refuses to overwrite a stored SUCCESS. Celery does
  the same check as a GET before its SET + PUBLISH: two round trips per message, and a window in which a
  redelivered task's late answer could still overwrite the first one. A batch's results go in one script
  call.
"""

from __future__ import annotations

from typing import Any

import orjson
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from redis.exceptions import NoScriptError, RedisError

from producer.errors import InferqError
from producer.redis_clients import MasterWatch
from producer.result_backend import SentinelBackend
from workers.errors import ResultNotStored

# What a store that Redis refused (READONLY, OOM, MISCONF) or could not be reached for raises: from our
# _store_result, or from store_successes (OSError: a socket or TLS error redis-py did not wrap)
STORE_REFUSED = (ResultNotStored, RedisError, OSError)

# KEYS: result keys; ARGV[1]: seconds to keep them (0: forever); ARGV[1 + i]: the encoded meta of KEYS[i].
# Each is stored and published unless a SUCCESS is stored under its key already. One call stores a whole
# batch: a call per result cost 7 us of redis-py packing each on this CPU (and a Redis command each).
_STORE_UNLESS_SUCCEEDED = """
local expires = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  local succeeded = false
  if current then
    local ok, meta = pcall(cjson.decode, current)
    succeeded = ok and type(meta) == 'table' and meta['status'] == 'SUCCESS'
  end
  if not succeeded then
    if expires > 0 then
      redis.call('SETEX', key, expires, ARGV[i + 1])
    else
      redis.call('SET', key, ARGV[i + 1])
    end
    redis.call('PUBLISH', key, ARGV[i + 1])
  end
end
return 1
"""


class InferqRedisBackend(RedisBackend):  # type: ignore[misc]
    def prepare_exception(self, exc: BaseException, serializer: str | None = None) -> Any:
        prepared = super().prepare_exception(exc, serializer)
        if isinstance(exc, InferqError) and isinstance(prepared, dict):
            prepared["exc_message"] = exc.message
        return prepared

    def encode(self, data: Any) -> Any:
        if self.serializer == "json" and not self.compression:
            try:
                return orjson.dumps(data, option=orjson.OPT_PASSTHROUGH_DATETIME)
            except TypeError:  # a type only kombu's encoder knows (a datetime, a Decimal, ...)
                pass
        return super().encode(data)

    def _checked_size(self, value: Any) -> Any:
        if len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend")
        return value

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None,
                      **kwargs: Any) -> Any:
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = task_id.decode() if isinstance(task_id, bytes) else str(task_id)
        value = self._checked_size(self.encode(meta))
        expires = int(self.expires) if self.expires else 0
        try:
            self.ensure(self._store_all, ([(self.get_key_for_task(task_id), value)], expires))
        except (RedisError, OSError) as exc:  # OSError: a socket or TLS error redis-py did not wrap
            raise ResultNotStored(f"the result backend refused to store the {state} of task {meta['task_id']} "
                                  f"({type(exc).__name__}: {exc})") from exc
        return result

    def mark_as_failure(self, task_id: str, exc: BaseException, *args: Any, **kwargs: Any) -> Any:
        if isinstance(exc, ResultNotStored):  # Celery's tracer stores a failed store as the task's failure
            return None
        return super().mark_as_failure(task_id, exc, *args, **kwargs)

    def _store_script(self) -> Any:
        script = getattr(self, "_inferq_store_script", None)
        if script is None:
            script = self._inferq_store_script = self.client.register_script(_STORE_UNLESS_SUCCEEDED)
        return script

    def store_successes(self, results: list[tuple[str, Any]]) -> None:
        """Stores many (task id, result) SUCCESS results in one round trip, each as `_store_result` would
        (never over a stored SUCCESS); retried through a Redis outage like any store."""
        meta = self._get_result_meta(result=None, state="SUCCESS", traceback=None, request=None)
        expires = int(self.expires) if self.expires else 0
        items = [(self.get_key_for_task(task_id),
                  self._checked_size(self.encode({**meta, "result": result, "task_id": task_id})))
                 for task_id, result in results]
        self.ensure(self._store_all, (items, expires))

    def _store_all(self, items: list[tuple[Any, Any]], expires: int) -> None:
        # EVALSHA by hand: the script object would send SCRIPT EXISTS first, an extra round trip per batch. If
        # Redis lost its scripts (a restart), nothing of the batch ran: load the script and send it again.
        script = self._store_script()
        keys, values = [key for key, _ in items], [value for _, value in items]
        try:
            self.client.evalsha(script.sha, len(keys), *keys, expires, *values)
        except NoScriptError:
            self.client.script_load(_STORE_UNLESS_SUCCEEDED)
            self.client.evalsha(script.sha, len(keys), *keys, expires, *values)

class InferqSentinelBackend(InferqRedisBackend, SentinelBackend):
    """The same, on the master of a Sentinel group (Celery's SentinelBackend finds it), asking the sentinels
    now and then whether it still is: results stored on a master that Sentinel replaced are dropped with it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._master_watch = MasterWatch()

    def _store_all(self, items: list[tuple[Any, Any]], expires: int) -> None:
        self._master_watch.moved(self.client.connection_pool)  # closes idle connections to a replaced master
        super()._store_all(items, expires)


OVERRIDES = {
    "sentinel": "workers.receiving.backend:InferqSentinelBackend",
    "redis": "workers.receiving.backend:InferqRedisBackend",
    "rediss": "workers.receiving.backend:InferqRedisBackend",
}
