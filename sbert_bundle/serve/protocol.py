"""Request parsing for the OpenAI and TEI routes: every field checked before any inference.

A refusal is an `ApiError` with one line naming the field (and index) and what was expected;
the app writes it in the route's own error shape (OpenAI's `{"error": {...}}`, TEI's
`{"error", "error_type"}`).
"""

from __future__ import annotations

from dataclasses import dataclass


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


@dataclass
class EmbedRequest:
    texts: list[str] | None       # text inputs, or
    ids: list[list[int]] | None   # token id inputs (the model's whole input, special tokens included)
    dimensions: int | None = None
    encoding_format: str = "float"
    prompt_name: str | None = None
    truncate: bool = True
    normalize: bool = False

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.ids)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _kind(x) -> str:
    """A JSON value's type as the client wrote it."""
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(x), type(x).__name__)


def _bool(body: dict, key: str, default: bool, status: int) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(status, f"'{key}' must be true or false, got {_kind(value)}", key)
    return value


def parse_inputs(value, field: str, limits, status: int) -> tuple[list[str] | None, list[list[int]] | None]:
    """A string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(value, str):
        return [value], None
    if not isinstance(value, list):
        raise ApiError(status, f"'{field}' must be a string, a list of strings, a list of token ids or a list of "
                               f"such lists; got {_kind(value)}", field)
    if not value:
        raise ApiError(status, f"'{field}' is empty", field)
    if all(_is_int(x) for x in value):  # one input given as token ids
        value = [value]
    if len(value) > limits.max_inputs:
        raise ApiError(status, f"'{field}' has {len(value)} inputs; at most {limits.max_inputs} per request",
                       field, "too_many_inputs")
    if not isinstance(value[0], (str, list)):
        raise ApiError(status, f"'{field}[0]' is {_kind(value[0])}; inputs are strings or lists of token ids",
                       f"{field}[0]")
    if isinstance(value[0], str):
        for i, s in enumerate(value):
            if not isinstance(s, str):
                raise ApiError(status, f"'{field}[{i}]' is {_kind(s)}; this request's inputs are strings",
                               f"{field}[{i}]")
        return value, None
    vocab = limits.vocab_size
    for i, ids in enumerate(value):
        if not isinstance(ids, list) or not ids:
            raise ApiError(status, f"'{field}[{i}]' must be a non-empty list of token ids, got "
                                   f"{'an empty list' if ids == [] else _kind(ids)}", f"{field}[{i}]")
        for j, t in enumerate(ids):
            if not _is_int(t) or not 0 <= t < vocab:
                raise ApiError(status, f"'{field}[{i}][{j}]' is {t!r:.40}; token ids are integers in 0..{vocab - 1}",
                               f"{field}[{i}]")
        if len(ids) > limits.max_input_tokens:
            raise ApiError(status, f"'{field}[{i}]' has {len(ids)} token ids; at most {limits.max_input_tokens}",
                           f"{field}[{i}]", "context_length_exceeded")
    return None, value


def _dimensions(body: dict, limits, status: int) -> int | None:
    d = body.get("dimensions")
    if d is None:
        return None
    if not _is_int(d) or not 1 <= d <= limits.dimension:
        raise ApiError(status, f"'dimensions' is {d!r:.40}; this model's embeddings have 1 to {limits.dimension}",
                       "dimensions")
    return d


def _prompt_name(body: dict, limits, status: int, ids) -> str | None:
    name = body.get("prompt_name")
    if name is None:
        return None
    if not isinstance(name, str) or name not in limits.prompts:
        known = ", ".join(sorted(limits.prompts)) or "none"
        raise ApiError(status, f"'prompt_name' is {name!r:.60}; this model's prompts: {known}", "prompt_name")
    if ids is not None:
        raise ApiError(status, "'prompt_name' applies to text inputs; token ids are used as given", "prompt_name")
    return name


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_kind(body)}")
    return body


def parse_openai(body, limits) -> EmbedRequest:
    """POST /v1/embeddings: input, model, encoding_format, dimensions, user (ignored); our extras
    (the SDK's extra_body): prompt_name, truncate."""
    body = _object(body)
    if "input" not in body:
        raise ApiError(400, "'input' is required", "input")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required: a string (GET /v1/models lists it)", "model")
    if model not in limits.model_names:
        raise ApiError(404, f"model {model!r:.80} is not served here; this server serves "
                            f"{', '.join(limits.model_names)}", "model", "model_not_found")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' is {fmt!r:.40}; expected 'float' or 'base64'", "encoding_format")
    texts, ids = parse_inputs(body["input"], "input", limits, 400)
    return EmbedRequest(texts, ids, _dimensions(body, limits, 400), fmt, _prompt_name(body, limits, 400, ids),
                        _bool(body, "truncate", limits.truncate, 400))


def parse_tei(body, limits, status: int = 422) -> EmbedRequest:
    """POST /embed: inputs, normalize, truncate, prompt_name, dimensions (TEI's fields)."""
    body = _object(body)
    if "inputs" not in body:
        raise ApiError(status, "'inputs' is required", "inputs")
    texts, ids = parse_inputs(body["inputs"], "inputs", limits, status)
    return EmbedRequest(texts, ids, _dimensions(body, limits, status), "float",
                        _prompt_name(body, limits, status, ids), _bool(body, "truncate", limits.truncate, status),
                        _bool(body, "normalize", True, status))
