"""The LitServe APIs: one per endpoint, each holding the served policies of its kind in its worker process.

LitServe batches requests per endpoint (`max_batch_size`, `batch_timeout`); a batch may mix models, so predict
groups it by model (and `unnorm_key`) and runs each group as one batched `Policy.predict`. A request refused in the
worker (an unknown session) is answered in-band as a 4xx response, so one bad request never fails the batch it
shares. The request gate (server.py) has already checked every field before a request reaches a worker.
"""

from __future__ import annotations

import importlib
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import litserve as ls
import numpy as np
from fastapi.responses import JSONResponse

from affordvla.policies.base import Observation, Policy
from affordvla.serve.protocol import (
    ACT_PATH,
    KEYPOINTS_PATH,
    ActRequest,
    KeypointsRequest,
    Limits,
    RequestError,
    parse_act,
    parse_keypoints,
)
from affordvla.serve.sessions import SessionStore

DEFAULT_LOADER = "affordvla.policies.loading:load_policy"


def import_loader(path: str) -> Callable[..., Policy]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def resolve_model(requested: str | None, kinds: dict[str, str], kind: str) -> str:
    """The model a request names (or the only model of `kind` when it names none), checked against the kinds
    served; the gate and the workers share this rule."""
    endpoint = KEYPOINTS_PATH if kind == "keypoints" else ACT_PATH
    of_kind = sorted(name for name, k in kinds.items() if k == kind)
    if requested is None:
        if len(of_kind) == 1:
            return of_kind[0]
        if not of_kind:
            raise RequestError(400, "model", f"this server serves no {kind} policy for {endpoint}; it serves "
                               f"{sorted(kinds)}")
        raise RequestError(400, "model", f"missing: this server serves several {kind} policies, name one of "
                           f"{of_kind}")
    if requested not in kinds:
        raise RequestError(404, "model", f"unknown model {requested!r}; this server serves {sorted(kinds)}")
    if kinds[requested] != kind:
        other = KEYPOINTS_PATH if kinds[requested] == "keypoints" else ACT_PATH
        raise RequestError(400, "model", f"{requested!r} is a policy of kind {kinds[requested]}: POST it to "
                           f"{other}, not {endpoint}")
    return requested


def _error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(status_code=error.status, content=error.body())


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class PolicyAPI(ls.LitAPI):
    """Shared by both endpoints: load the served policies of one kind in `setup`, decode in-band, group batches
    by model."""

    kind = ""
    # the endpoint's request checks: the parsed request (naming its model), or a RequestError raised
    parse: Callable[[Any, Limits], Any]

    def __init__(self, models: dict[str, str], kinds: dict[str, str], limits: Limits, *, max_batch_size: int = 1,
                 batch_timeout: float = 0.0, api_path: str, loader: str = DEFAULT_LOADER):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=api_path)
        self.models, self.kinds, self.limits, self.loader = dict(models), dict(kinds), limits, loader
        self.policies: dict[str, Policy] = {}

    def setup(self, device):
        load = import_loader(self.loader)
        for name, source in self.models.items():
            if self.kinds[name] == self.kind:
                self.policies[name] = load(source, device=device)

    def decode_request(self, request, **kwargs):
        # a bad request travels through the batch as its error, so it is answered without failing the batch
        try:
            parsed = self.parse(request, self.limits)
            parsed.model = resolve_model(parsed.model, self.kinds, self.kind)
            return parsed
        except RequestError as exc:
            return exc

    def batched(self, x) -> list:
        return list(x) if self.max_batch_size > 1 else [x]

    def unbatched(self, outputs: list):
        return outputs if self.max_batch_size > 1 else outputs[0]

    def encode_response(self, output):
        if isinstance(output, RequestError):
            return _error_response(output)
        return output

    def run_groups(self, items: list, outputs: list, key: Callable[[Any], tuple],
                   run: Callable[[str, list, tuple], list]) -> None:
        """Fill `outputs` at the positions of the valid `items`, one batched call per key (model, options)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            if outputs[i] is None:
                groups[key(item)].append(i)
        for group_key, indices in groups.items():
            started = time.perf_counter()
            try:
                results = run(group_key[0], [items[i] for i in indices], group_key)
            except ValueError as exc:  # the policy refused the observation (a camera, an unnorm_key)
                results = [RequestError(422, "observation", str(exc))] * len(indices)
            elapsed = _ms(time.perf_counter() - started)
            for i, result in zip(indices, results):
                if isinstance(result, dict):
                    result["timings"] = {"predict_ms": elapsed, "batch_size": len(indices)}
                outputs[i] = result


class KeypointsAPI(PolicyAPI):
    """POST /v1/keypoints: named points of an image for an instruction."""

    kind = "keypoints"
    parse = staticmethod(parse_keypoints)

    def __init__(self, models, kinds, limits, **kwargs):
        super().__init__(models, kinds, limits, api_path=KEYPOINTS_PATH, **kwargs)

    def predict(self, x, **kwargs):
        items = self.batched(x)
        outputs: list[Any] = [item if isinstance(item, RequestError) else None for item in items]
        self.run_groups(items, outputs, lambda item: (item.model,), self._predict)
        return self.unbatched(outputs)

    def _predict(self, model: str, requests: list[KeypointsRequest], _key: tuple) -> list[dict]:
        observations = [Observation(instruction=r.instruction, images={"": r.image}, task=r.task,
                                    objects=r.objects) for r in requests]
        predictions = self.policies[model].predict(observations)
        answers = []
        for request, prediction in zip(requests, predictions):
            height, width = request.image.shape[:2]
            answers.append({"model": model, **prediction.to_dict(width, height), "names": list(prediction.names),
                            "width": width, "height": height})
        return answers


class ActAPI(PolicyAPI):
    """POST /act: an action chunk in dataset units; with `session_id`, a step of that session's episode (begun by
    POST /v1/sessions/{id}/reset, which the gate turns into an /act request with `reset`)."""

    kind = "actions"
    parse = staticmethod(parse_act)

    def __init__(self, models, kinds, limits, *, max_sessions: int = 64, session_idle_seconds: float = 600.0,
                 **kwargs):
        super().__init__(models, kinds, limits, api_path=ACT_PATH, **kwargs)
        self.max_sessions, self.session_idle_seconds = max_sessions, session_idle_seconds

    def setup(self, device):
        super().setup(device)
        self.sessions = SessionStore(self.max_sessions, self.session_idle_seconds)

    def predict(self, x, **kwargs):
        items = self.batched(x)
        outputs: list[Any] = [item if isinstance(item, RequestError) else None for item in items]
        # session steps run one by one in arrival order: each depends on the step before
        for i, item in enumerate(items):
            if outputs[i] is None and item.session_id is not None:
                started = time.perf_counter()
                outputs[i] = self._session_step(item)
                if isinstance(outputs[i], dict):
                    outputs[i]["timings"] = {"predict_ms": _ms(time.perf_counter() - started), "batch_size": 1}
        self.run_groups(items, outputs, lambda item: (item.model, item.unnorm_key), self._predict)
        return self.unbatched(outputs)

    @staticmethod
    def _options(unnorm_key: str | None) -> dict[str, Any]:
        return {} if unnorm_key is None else {"unnorm_key": unnorm_key}

    def _session_step(self, request: ActRequest) -> dict | RequestError:
        policy = self.policies[request.model]
        if request.reset:
            options = self._options(request.unnorm_key)
            if request.execution is not None:
                options["execution"] = request.execution
            try:
                session = policy.session(**options)
            except ValueError as exc:  # an unknown execution or unnorm_key
                return RequestError(422, "execution" if "execution" in str(exc) else "unnorm_key", str(exc))
            self.sessions.start(request.session_id, request.model, session)
            return {"model": request.model, "session_id": request.session_id, "reset": True}
        live = self.sessions.get(request.session_id)
        if live is None:
            return RequestError(404, "session_id", f"unknown session {request.session_id!r} (never begun, or dropped "
                                f"after {self.session_idle_seconds:g} s idle or for newer sessions): POST "
                                f"/v1/sessions/{request.session_id}/reset to begin it")
        model, session = live
        if model != request.model:
            return RequestError(400, "model", f"session {request.session_id!r} belongs to model {model!r}, not "
                                f"{request.model!r}")
        try:
            prediction = session.act(self._observation(request))
        except ValueError as exc:
            return RequestError(422, "observation", str(exc))
        return self._answer(request.model, prediction) | {"session_id": request.session_id}

    @staticmethod
    def _observation(request: ActRequest) -> Observation:
        return Observation(instruction=request.instruction, images={"": request.image}, state=request.state)

    @staticmethod
    def _answer(model: str, prediction) -> dict[str, Any]:
        actions = np.asarray(prediction.actions, dtype=np.float32)
        return {"model": model, **prediction.to_dict(), "shape": list(actions.shape)}

    def _predict(self, model: str, requests: list[ActRequest], key: tuple) -> list[dict]:
        predictions = self.policies[model].predict([self._observation(r) for r in requests], **self._options(key[1]))
        return [self._answer(model, p) for p in predictions]
