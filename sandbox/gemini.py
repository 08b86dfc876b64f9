"""A loopback emulator of the Gemini REST API, with fault injection.

It speaks the shapes the real ``google-genai`` async client sends and parses
(``generateContent``, ``streamGenerateContent?alt=sse``, ``batchEmbedContents`` under any
API version), so the unmodified SDK can be pointed at it with
``HttpOptions(base_url=emulator.base_url)``. Faults come from a shared
:class:`~sandbox.faults.FaultPlan` whose targets are model names (or ``"*"``); a fault with a
``prompt`` parameter hits only requests whose last user turn contains that text (a poison
question). ``tokens_per_second``, when set, makes answers take as long as a model writing at
that speed would (a long answer is slow, as with the real API).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sandbox import functions, gemini_caches, responder
from sandbox.faults import Fault, FaultPlan

API_KEY_HEADER = "x-goog-api-key"
MODEL_VERSION_SUFFIX = "-sandbox"

# The models the emulator knows; any other name is answered 404 NOT_FOUND, as the real API does for
# an unknown or retired model. Configurable per emulator (``models=``, ``aliases=``).
LISTED_MODELS = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.5-flash-lite", "gemini-2.0-flash")
EMBEDDING_MODELS = ("gemini-embedding-001",)
# Auto-updated aliases, which the real API serves on v1beta only (a "-latest" name sent to v1 is
# "not found for API version v1"); the names are the ones a key's model list showed in 2026.
LATEST_ALIASES = {
    "gemini-flash-latest": "gemini-2.5-flash",
    "gemini-flash-lite-latest": "gemini-2.5-flash-lite",
    "gemini-pro-latest": "gemini-2.5-pro",
}
ALIAS_VERSIONS = frozenset({"v1beta"})
POST_ACTIONS = frozenset({
    "generateContent", "streamGenerateContent", "batchEmbedContents", "embedContent", "countTokens"})
# Faults with this target hit the embedding calls only (whatever embedding model is asked).
EMBEDDINGS_TARGET = "embeddings"
CACHED_TOKENS_KEY = "__cachedTokens"
_EMBEDDING_ACTIONS = frozenset({"batchEmbedContents", "embedContent", "countTokens"})
_GENERATION_ACTIONS = frozenset({"generateContent", "streamGenerateContent", "countTokens"})
FAULT_KINDS = (
    "429", "quota_daily", "500", "502", "503", "504", "400", "403", "hang", "latency",
    "malformed_json", "stream_error", "safety", "prompt_block", "empty", "max_tokens", "drop",
)

# Files API faults (target "files"): the upload's start answers 500; the file never leaves PROCESSING;
# the file vanishes once ACTIVE (as a file past its 48 hours does: generateContent then answers 403).
FILE_FAULT_KINDS = frozenset({"upload_500", "stuck_processing", "file_expired"})
# Uploaded files live 48 hours (https://ai.google.dev/gemini-api/docs/files: "Files are stored for
# 48 hours"); the documented endpoints are /upload/v1beta/files, /v1beta/files/{id}
# (https://ai.google.dev/api/files). Whether v1 serves them too is not documented: v1beta only here.
FILE_LIFETIME_SECONDS = 48 * 3600.0
FILES_VERSIONS = frozenset({"v1beta"})
MAX_FILES = 1000  # files remembered (their sizes and first bytes, not their content), newest kept

_STATUS_TEXT = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    500: ("INTERNAL", "An internal error has occurred. Please retry or report in "
                      "https://developers.generativeai.google/guide/troubleshooting"),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "The request timed out. Please try again."),
}

_HTML_502 = (
    "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <title>Error 502 (Server Error)!!1</title>\n"
    "  <p><b>502.</b> <ins>That's an error.</ins>\n  <p>The server encountered a temporary error and "
    "could not complete your request.<p>Please try again in 30 seconds.  <ins>That's all we know.</ins>\n"
)

_SAFETY_RATINGS = [
    {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "HIGH", "blocked": True},
    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"},
]


@dataclass
class RecordedRequest:
    """One request the emulator received, with what it did about it."""

    method: str
    path: str
    model: str | None
    api_version: str | None
    action: str | None                 # generateContent, streamGenerateContent, ..., get, list
    headers: dict[str, str]            # the API key's value is masked
    body: Any
    time: float
    outcome: str = "pending"           # ok, invalid_key, fault:<kind>, not_found, bad_request
    fault: Fault | None = field(default=None, repr=False)


def error_body(code: int, status: str, message: str, details: list[dict[str, Any]] | None = None) -> dict:
    """Build the ``{"error": {...}}`` document Google APIs return."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return {"error": error}


def invalid_key_body() -> dict:
    """The body the real API returns for a wrong or missing API key."""
    message = "API key not valid. Please pass a valid API key."
    return error_body(400, "INVALID_ARGUMENT", message, [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
         "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
        {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": message},
    ])


# What the real API puts in RetryInfo beside a per-day QuotaFailure: a short delay, not the time to
# the reset (seen: "47s" with GenerateRequestsPerDayPerProjectPerModel-FreeTier in
# https://github.com/googleapis/python-genai/issues/2044; "Please retry in 25.46s" with
# "limit: 0" in https://github.com/google-gemini/gemini-cli/issues/22486). A client that trusts
# the hint asks an exhausted model again within the minute, all day.
DAILY_RETRY_DELAY = "22s"


def quota_body(model: str, *, daily: bool, retry_delay: str | None, limit: str | None = None) -> dict:
    """A 429 RESOURCE_EXHAUSTED body with QuotaFailure (and RetryInfo when a delay is given).

    ``limit`` is the quota's value ("0" when the model has no free tier at all).
    """
    period, default_limit = ("Day", "250") if daily else ("Minute", "10")
    limit = default_limit if limit is None else limit
    metric = "generativelanguage.googleapis.com/generate_content_free_tier_requests"
    message = (
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.\n"
        f"* Quota exceeded for metric: {metric}, limit: {limit}, model: {model}"
    )
    if retry_delay:
        message += f"\nPlease retry in {retry_delay}."
    details: list[dict[str, Any]] = [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
            "quotaMetric": metric,
            "quotaId": f"GenerateRequestsPer{period}PerProjectPerModel-FreeTier",
            "quotaDimensions": {"location": "global", "model": model},
            "quotaValue": limit,
        }]},
        {"@type": "type.googleapis.com/google.rpc.Help",
         "links": [{"description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
    ]
    if retry_delay:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay})
    return error_body(429, "RESOURCE_EXHAUSTED", message, details)


@dataclass
class EmulatedFile:
    """A file uploaded through the Files API: what ``files.get`` shows, and what answers need."""

    name: str                # "files/abc123"
    mime_type: str
    size: int
    sha256: str
    head: bytes              # the first bytes (a text file's first words)
    display_name: str
    created: float           # wall clock
    expires: float           # wall clock
    gets_left: int           # files.get calls that still see PROCESSING (-1: for ever)
    vanish: bool = False     # gone as soon as it is ACTIVE (the file_expired fault)

    @property
    def state(self) -> str:
        return "ACTIVE" if self.gets_left == 0 else "PROCESSING"


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1e6):06d}Z"


def summarised(body: Any) -> Any:
    """A request body for the log: each ``inlineData``'s bytes replaced by their size and digest
    (``{"mimeType", "bytes", "sha256"}``), so a log of image requests stays small."""
    if not isinstance(body, dict) or not isinstance(body.get("contents"), list):
        return body
    contents = []
    for content in body["contents"]:
        if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
            contents.append(content)
            continue
        parts = []
        for part in content["parts"]:
            inline = part.get("inlineData") if isinstance(part, dict) else None
            if isinstance(inline, dict) and isinstance(inline.get("data"), str):
                raw = _b64(inline["data"])
                part = {"inlineData": {"mimeType": inline.get("mimeType"), "bytes": len(raw),
                                       "sha256": hashlib.sha256(raw).hexdigest()}}
            parts.append(part)
        contents.append({**content, "parts": parts})
    return {**body, "contents": contents}


def _b64(text: str) -> bytes:
    """Bytes of a JSON ``bytes`` field: google-genai sends URL-safe base64 (``_common.py``,
    ``urlsafe_b64encode``), the API documents standard base64; both are read."""
    try:
        return base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4))
    except ValueError:
        return b""


def request_parts(rec: RecordedRequest) -> list[list[dict[str, Any]]]:
    """The parts of each content of a recorded generateContent request, as a test reads them:
    ``{"text": ...}``, ``{"inline": mime, "bytes": n, "sha256": ...}``, ``{"file": uri, "mime": ...}``."""
    out: list[list[dict[str, Any]]] = []
    body = rec.body if isinstance(rec.body, dict) else {}
    for content in body.get("contents") or []:
        row: list[dict[str, Any]] = []
        for part in content.get("parts") or []:
            if "inlineData" in part:
                inline = part["inlineData"]
                row.append({"inline": inline.get("mimeType"), "bytes": inline.get("bytes"),
                            "sha256": inline.get("sha256")})
            elif "fileData" in part:
                data = part["fileData"]
                row.append({"file": data.get("fileUri"), "mime": data.get("mimeType")})
            else:
                row.append({"text": part.get("text", "")})
        out.append(row)
    return out
TOOL_TYPES = frozenset({"googleSearch", "urlContext", "codeExecution", "functionDeclarations",
                        "googleSearchRetrieval", "googleMaps", "fileSearch", "computerUse"})
THOUGHT_TOKENS = 64
IMPLICIT_CACHE_MIN_TOKENS = {"flash": 1024, "pro": 4096}
MAX_CACHED_PREFIXES = 10_000


def requested_tools(body: Any) -> set[str]:
    """The tool types a request asks for (``tools[].googleSearch``, ...)."""
    tools = body.get("tools") if isinstance(body, dict) else None
    return {key for tool in tools or [] if isinstance(tool, dict) for key in tool}


def tools_problem(body: Any) -> str | None:
    """What the real API says about a request's ``tools`` it refuses, or None.

    One ``Tool`` may set one tool type only: "The GenerateContentRequest proto is invalid: *
    tools[0].tool_type: one_of 'tool_type' has more than one initialized field: ..."
    (googleapis/js-genai#1383, googleSearch with urlContext in one Tool); a name it does not know
    gets "Invalid JSON payload received. Unknown name ... at 'tools[0]': Cannot find field."
    (AAClause/nvda-OpenAI#123).
    """
    tools = body.get("tools") if isinstance(body, dict) else None
    for n, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            return f"Invalid value at 'tools[{n}]'"
        unknown = sorted(set(tool) - TOOL_TYPES)
        if unknown:
            return (f"Invalid JSON payload received. Unknown name \"{unknown[0]}\" at 'tools[{n}]': "
                    "Cannot find field.")
        if len(tool) > 1:
            names = ", ".join(sorted(tool))
            return ("The GenerateContentRequest proto is invalid:\n  * tools[{n}].tool_type: one_of "
                    f"'tool_type' has more than one initialized field: {names}").replace("{n}", str(n))
    return None


def last_user_text(body: Any) -> str:
    """The text of the last user turn of a ``generateContent`` body ("" for anything else)."""
    if not isinstance(body, dict):
        return ""
    turns = [c for c in body.get("contents", []) if isinstance(c, dict) and c.get("role", "user") == "user"
             and not all(isinstance(p, dict) and "functionResponse" in p for p in c.get("parts") or [{}])]
    return responder.said(turns[-1]) if turns else ""


# Safety settings (https://ai.google.dev/gemini-api/docs/safety-settings; REST SafetySetting): the
# adjustable categories and the thresholds, and which probabilities each threshold blocks. Without a
# setting a category is not filtered: current models' adjustable filters are off by default.
HARM_CATEGORIES = frozenset({"HARM_CATEGORY_HARASSMENT", "HARM_CATEGORY_HATE_SPEECH",
                             "HARM_CATEGORY_SEXUALLY_EXPLICIT", "HARM_CATEGORY_DANGEROUS_CONTENT",
                             "HARM_CATEGORY_CIVIC_INTEGRITY"})
BLOCKS_AT = {
    "BLOCK_LOW_AND_ABOVE": frozenset({"LOW", "MEDIUM", "HIGH"}),
    "BLOCK_MEDIUM_AND_ABOVE": frozenset({"MEDIUM", "HIGH"}),
    "BLOCK_ONLY_HIGH": frozenset({"HIGH"}),
    "BLOCK_NONE": frozenset(),
    "OFF": frozenset(),
    "HARM_BLOCK_THRESHOLD_UNSPECIFIED": frozenset(),
}
# The emulated model's deterministic safety ratings: a question asking for an insult gets an answer
# rated MEDIUM for harassment (blocked as an answer, finishReason SAFETY), a question holding a threat
# is itself rated HIGH for dangerous content (blocked as a prompt, promptFeedback.blockReason SAFETY).
RATED_WORDS = {
    "insult": ("answer", "HARM_CATEGORY_HARASSMENT", "MEDIUM"),
    "threat": ("prompt", "HARM_CATEGORY_DANGEROUS_CONTENT", "HIGH"),
}


def generation_problem(body: Any) -> str | None:
    """What the real API says about a ``generationConfig`` or ``safetySettings`` it refuses, or None:
    a temperature outside 0.0 to 2.0, an unknown harm category or threshold (400 INVALID_ARGUMENT)."""
    config = body.get("generationConfig") if isinstance(body, dict) else None
    temperature = (config or {}).get("temperature")
    if temperature is not None and not (isinstance(temperature, int | float) and 0 <= temperature <= 2):
        return (f"* GenerateContentRequest.generation_config.temperature: temperature must be in the range "
                f"[0.0, 2.0], got {temperature}")
    for n, setting in enumerate((body.get("safetySettings") or []) if isinstance(body, dict) else []):
        if not isinstance(setting, dict) or setting.get("category") not in HARM_CATEGORIES:
            return f"Invalid value at 'safety_settings[{n}].category'"
        if setting.get("threshold") not in BLOCKS_AT:
            return f"Invalid value at 'safety_settings[{n}].threshold'"
    return None


def safety_block(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]] | None:
    """``("prompt" | "answer", safetyRatings)`` when the request's safety settings block its question
    or its answer (``RATED_WORDS``), else None."""
    thresholds = {s.get("category"): s.get("threshold") for s in body.get("safetySettings") or []
                  if isinstance(s, dict)}
    prompt = last_user_text(body).lower()
    for word, (where, category, probability) in RATED_WORDS.items():
        if word in prompt and probability in BLOCKS_AT.get(str(thresholds.get(category)), frozenset()):
            rated = sorted(HARM_CATEGORIES - {"HARM_CATEGORY_CIVIC_INTEGRITY"})
            ratings = [{"category": c, "probability": probability if c == category else "NEGLIGIBLE",
                        **({"blocked": True} if c == category else {})} for c in rated]
            return where, ratings
    return None


def parse_model_path(path: str) -> tuple[str, str | None, str] | None:
    """Split ``/{version}/models[/{model}[:{action}]]`` into (version, model, action), or None.

    The action is ``"list"`` for ``/models``, ``"get"`` for a bare model, else the part after ``:``.
    """
    parts = path.strip("/").split("/")
    if len(parts) == 2 and parts[1] == "models":
        return parts[0], None, "list"
    if len(parts) != 3 or parts[1] != "models" or not parts[2]:
        return None
    model, colon, action = parts[2].partition(":")
    return parts[0], model, action if colon else "get"


def is_embedding_model(model: str) -> bool:
    """Embedding models serve ``embedContent``/``batchEmbedContents``, not ``generateContent``."""
    return "embedding" in model


def model_info(model: str) -> dict[str, Any]:
    """A ``Model`` resource like ``GET /v1beta/models/{model}`` returns."""
    methods = ["embedContent", "batchEmbedContents"] if is_embedding_model(model) else [
        "generateContent", "countTokens"]
    return {
        "name": f"models/{model}", "version": "001", "displayName": f"{model} (sandbox)",
        "description": "A loopback stand-in for a Gemini model.",
        "inputTokenLimit": 1_048_576, "outputTokenLimit": 65_536,
        "supportedGenerationMethods": methods,
    }


def model_not_found_body(model: str, version: str, action: str) -> dict:
    """The 404 the real API answers for a model it does not serve: no ``details``, only the sentence.

    For a method call, "models/{m} is not found for API version {v}, or is not supported for
    {method}. Call ListModels ..." (e.g. https://github.com/continuedev/continue/issues/11370 for
    gemini-2.5-pro-latest on v1beta, https://github.com/babaohuang/GeminiProChat/issues/184 on v1).
    For ``GET models/{m}``, "Model is not found: models/{m} for api version {v}" (a recorded probe of
    ``GET /v1beta/models/invalid-model``, 2026).
    """
    if action == "get":
        message = f"Model is not found: models/{model} for api version {version}"
    else:
        message = (f"models/{model} is not found for API version {version}, or is not supported for "
                   f"{action}. Call ListModels to see the list of available models and their supported "
                   "methods.")
    return error_body(404, "NOT_FOUND", message)



# --- the Files API -----------------------------------------------------------------------------
#
# Modelled on google-genai 3.x (google/genai/files.py ``AsyncFiles.upload`` and
# google/genai/_api_client.py ``_async_upload_fd``) and https://ai.google.dev/api/files:
# 1. ``POST /upload/v1beta/files`` with ``X-Goog-Upload-Protocol: resumable``,
#    ``X-Goog-Upload-Command: start`` and ``X-Goog-Upload-Header-Content-Length``/``-Type``, a JSON
#    body ``{"file": {...}}``: the answer's ``X-Goog-Upload-URL`` header is where the bytes go.
# 2. ``POST <upload URL>`` with ``X-Goog-Upload-Command: upload`` (8 MiB chunks) and
#    ``upload, finalize`` for the last, ``X-Goog-Upload-Offset``: ``X-Goog-Upload-Status: active``
#    until the last chunk, then ``final`` with ``{"file": File}``. (The SDK sleeps and resends a chunk
#    whose answer has no ``X-Goog-Upload-Status``, so every answer here carries one.)
# 3. ``GET /v1beta/files/{id}``: the ``File`` with ``state`` PROCESSING, then ACTIVE; an unknown or
#    expired file is 403 PERMISSION_DENIED "You do not have permission to access the File {id} or it
#    may not exist." (google-gemini/deprecated-generative-ai-python#692,
#    google-gemini/deprecated-generative-ai-js#236), also when generateContent names it.


def _file_not_found(name: str) -> web.Response:
    file_id = name.removeprefix("files/")
    message = f"You do not have permission to access the File {file_id} or it may not exist."
    return web.json_response(error_body(403, "PERMISSION_DENIED", message), status=403)


class FilesApi:
    """The Files API half of :class:`GeminiEmulator` (its state is set up there)."""

    api_key: str
    files: OrderedDict[str, EmulatedFile]
    files_clock: Callable[[], float]
    file_lifetime: float
    processing_gets: dict[str, int]
    faults: FaultPlan
    requests: deque[RecordedRequest]
    _uploads: dict[str, dict[str, Any]]
    _clock: Callable[[], float]

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    def _file_resource(self, f: EmulatedFile) -> dict[str, Any]:
        return {
            "name": f.name, "displayName": f.display_name, "mimeType": f.mime_type,
            "sizeBytes": str(f.size), "createTime": _rfc3339(f.created), "updateTime": _rfc3339(f.created),
            "expirationTime": _rfc3339(f.expires), "sha256Hash": base64.b64encode(
                bytes.fromhex(f.sha256)).decode(),
            "uri": f"{self.base_url}/v1beta/{f.name}", "state": f.state, "source": "UPLOADED",
        }

    def _live_file(self, name: str) -> EmulatedFile | None:
        f = self.files.get(name)
        if f is None or f.expires <= self.files_clock() or (f.vanish and f.state == "ACTIVE"):
            return None
        return f

    def expire_files(self) -> None:
        """Every file uploaded so far expires now (as 48 hours later)."""
        now = self.files_clock()
        for f in self.files.values():
            f.expires = min(f.expires, now)

    async def _files(self, request: web.Request) -> web.StreamResponse:
        upload = request.path.startswith("/upload/")
        raw = await request.read()
        headers = {k: ("***" if k.lower() == API_KEY_HEADER else v) for k, v in request.headers.items()}
        parts = request.path.strip("/").split("/")
        version = parts[1] if upload and len(parts) > 1 else (parts[0] if parts else None)
        body: Any = {"bytes": len(raw)}
        if not (upload and "upload_id" in request.query):
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = {"bytes": len(raw)}
        action = ("upload" if "upload_id" in request.query else "upload_start") if upload else \
            ("files.get" if request.method == "GET" else "files.delete")
        rec = RecordedRequest(request.method, request.path, None, version, action, headers, body,
                              self._clock())
        self.requests.append(rec)
        if action == "upload":  # the upload URL is itself the credential, as Google's is
            session = self._uploads.get(request.query["upload_id"])
            if session is None:
                rec.outcome = "not_found"
                return web.Response(status=404, headers={"X-Goog-Upload-Status": "final"})
            return self._upload_chunk(request, rec, session, raw)
        key = request.headers.get(API_KEY_HEADER) or request.query.get("key")
        if key != self.api_key:
            rec.outcome = "invalid_key"
            return web.json_response(invalid_key_body(), status=400)
        if version not in FILES_VERSIONS or (upload and parts[2:] != ["files"]) or \
                (not upload and (len(parts) != 3 or parts[1] != "files")):
            rec.outcome = "not_found"
            return web.json_response(
                error_body(404, "NOT_FOUND", f"Method not found: {request.method} {request.path}"),
                status=404)
        if upload:
            return self._upload_start(request, rec, body)
        name = f"files/{parts[2]}"
        f = self._live_file(name)
        if f is None:
            rec.outcome = "file_not_found"
            return _file_not_found(name)
        if action == "files.delete":
            self.files.pop(name, None)
            rec.outcome = "ok"
            return web.json_response({})
        if f.gets_left > 0:
            f.gets_left -= 1
        rec.outcome = "ok"
        return web.json_response(self._file_resource(f))

    def _upload_start(
        self, request: web.Request, rec: RecordedRequest, body: Any
    ) -> web.Response:
        fault = self.faults.pick("files", kinds=FILE_FAULT_KINDS)
        if fault is not None and fault.kind == "upload_500":
            rec.outcome = "fault:upload_500"
            status, message = _STATUS_TEXT[500]
            return web.json_response(error_body(500, status, message), status=500)
        if request.headers.get("X-Goog-Upload-Protocol") != "resumable" or \
                request.headers.get("X-Goog-Upload-Command") != "start":
            rec.outcome = "bad_request"
            return web.json_response(error_body(400, "INVALID_ARGUMENT", "Upload protocol not supported."),
                                     status=400)
        meta = (body or {}).get("file") or {} if isinstance(body, dict) else {}
        upload_id = secrets.token_hex(12)
        self._uploads[upload_id] = {
            "size": int(request.headers.get("X-Goog-Upload-Header-Content-Length", "0")),
            "mime": request.headers.get("X-Goog-Upload-Header-Content-Type") or meta.get("mimeType") or
            "application/octet-stream",
            "display_name": meta.get("displayName") or "",
            "data": bytearray(),
            "fault": fault.kind if fault is not None else None,
        }
        while len(self._uploads) > MAX_FILES:  # abandoned sessions
            self._uploads.pop(next(iter(self._uploads)))
        rec.outcome = f"fault:{fault.kind}" if fault is not None else "ok"
        url = f"{self.base_url}{request.path}?upload_id={upload_id}&upload_protocol=resumable"
        return web.Response(status=200, text="", headers={
            "X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active",
            "X-Goog-Upload-Chunk-Granularity": str(8 * 1024 * 1024)})

    def _upload_chunk(
        self, request: web.Request, rec: RecordedRequest, session: dict[str, Any], raw: bytes
    ) -> web.Response:
        command = request.headers.get("X-Goog-Upload-Command", "")
        offset = int(request.headers.get("X-Goog-Upload-Offset", "-1"))
        if offset != len(session["data"]):
            rec.outcome = "bad_offset"
            return web.json_response(error_body(400, "INVALID_ARGUMENT", "Invalid upload offset."),
                                     status=400, headers={"X-Goog-Upload-Status": "final"})
        session["data"] += raw
        if "finalize" not in command:
            rec.outcome = "ok"
            return web.Response(status=200, text="", headers={"X-Goog-Upload-Status": "active"})
        self._uploads.pop(request.query["upload_id"], None)
        data = bytes(session["data"])
        kind = session["mime"].split("/")[0]
        gets = -1 if session["fault"] == "stuck_processing" else self.processing_gets.get(kind, 0)
        now = self.files_clock()
        name = f"files/{secrets.token_hex(6)}"
        f = EmulatedFile(name, session["mime"], len(data), hashlib.sha256(data).hexdigest(), data[:200],
                         session["display_name"], now, now + self.file_lifetime, gets,
                         vanish=session["fault"] == "file_expired")
        self.files[name] = f
        while len(self.files) > MAX_FILES:
            self.files.popitem(last=False)
        rec.outcome = "ok"
        return web.json_response({"file": self._file_resource(f)}, headers={"X-Goog-Upload-Status": "final"})

    def _check_file_parts(self, body: dict[str, Any]) -> web.Response | None:
        """A generateContent naming a file that is gone (403) or still PROCESSING (400)."""
        for content in body.get("contents") or []:
            for part in (content.get("parts") or []) if isinstance(content, dict) else []:
                data = part.get("fileData") if isinstance(part, dict) else None
                if not isinstance(data, dict):
                    continue
                uri = str(data.get("fileUri", ""))
                name = "files/" + uri.rsplit("/files/", 1)[-1]
                f = self._live_file(name)
                if f is None:
                    return _file_not_found(name)
                if f.state != "ACTIVE":
                    # The docs say to wait for ACTIVE before use; the exact refusal is an inference.
                    message = (f"The File {name.removeprefix('files/')} is not in an ACTIVE state and usage "
                               "is not allowed.")
                    return web.json_response(error_body(400, "FAILED_PRECONDITION", message), status=400)
        return None

    def _file_facts(self, uri: str) -> tuple[str, int, bytes] | None:
        """(MIME type, size, first bytes) of the file a ``fileUri`` names, for the responder."""
        f = self.files.get("files/" + uri.rsplit("/files/", 1)[-1])
        return None if f is None else (f.mime_type, f.size, f.head)


class GeminiEmulator(FilesApi):
    """An aiohttp server on loopback that answers like the Gemini API.

    ``requests`` records every request (key masked) with its outcome, the newest
    ``max_requests`` of them; ``faults`` is the live :class:`FaultPlan`, which callers may
    edit at any time. ``seed`` makes latency draws (and the default plan's probabilities)
    reproducible; ``clock`` stamps the records. ``models`` are the model names served
    (default :data:`LISTED_MODELS` and :data:`EMBEDDING_MODELS`) and ``aliases`` the names
    served on v1beta only, each standing for a served model (default :data:`LATEST_ALIASES`):
    any other name gets the real API's 404 NOT_FOUND. Both may be edited at any time.
    """

    def __init__(
        self,
        api_key: str = "sandbox-key",
        host: str = "127.0.0.1",
        port: int = 0,
        faults: FaultPlan | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        max_requests: int = 10_000,
        tokens_per_second: float | None = None,
        models: Iterable[str] | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.api_key = api_key
        self.models: set[str] = set((*LISTED_MODELS, *EMBEDDING_MODELS) if models is None else models)
        self.aliases: dict[str, str] = dict(LATEST_ALIASES if aliases is None else aliases)
        self.tokens_per_second = tokens_per_second
        self.host = host
        self.port = port
        self.faults = faults if faults is not None else FaultPlan(rng=random.Random(seed))
        # Bounded so a long chaos run cannot grow without limit; the newest are kept.
        self.requests: deque[RecordedRequest] = deque(maxlen=max_requests)
        self._rng = random.Random(seed)
        self._clock = clock
        # Request prefixes seen (implicit caching; see _spent), oldest first, bounded.
        self._prefixes: OrderedDict[str, None] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        # The Files API: uploaded files by name (bounded, newest kept) and open upload sessions.
        # ``files_clock`` is the wall clock of their expiry (a test moves it past 48 hours);
        # ``processing_gets`` is how many files.get calls a file of a kind (the MIME type's first
        # part) answers PROCESSING before ACTIVE: video takes a while, as with the real API.
        self.files: OrderedDict[str, EmulatedFile] = OrderedDict()
        self.files_clock: Callable[[], float] = time.time
        self.file_lifetime = FILE_LIFETIME_SECONDS
        self.processing_gets: dict[str, int] = {"video": 2}
        self._uploads: dict[str, dict[str, Any]] = {}
        # Explicit context caches (sandbox.gemini_caches); ``caches.clock`` is their expiry's wall clock.
        self.caches = gemini_caches.ContextCaches(time.time, lambda: self.models)

    # lifecycle

    @property
    def base_url(self) -> str:
        """``http://host:port`` once started (the SDK appends ``/{version}/models/...``)."""
        if self._runner is None:
            raise RuntimeError("GeminiEmulator is not started")
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind and start serving; the chosen port is in ``.port``."""
        if self._runner is not None:
            return
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown_timeout: hung handlers are released by _closing, not waited for.
        # handler_cancellation: a client that gives up on a hung request frees its handler at once.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handle_signals=False,
                               handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        """Release hanging requests, close connections and stop; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        await runner.cleanup()

    async def __aenter__(self) -> GeminiEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # request handling

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/upload/") or "/files" in request.path:
            return await self._files(request)
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        body = responder.normalised(body)
        if request.path.strip("/").split("/")[1:2] == ["cachedContents"]:
            return await self._cached_contents(request, body)
        parsed = parse_model_path(request.path)
        version, model, action = parsed if parsed else (None, None, None)
        headers = {k: ("***" if k.lower() == API_KEY_HEADER else v) for k, v in request.headers.items()}
        rec = RecordedRequest(request.method, request.path, model, version, action, headers,
                              summarised(body), self._clock())
        self.requests.append(rec)

        key = request.headers.get(API_KEY_HEADER) or request.query.get("key")
        if key != self.api_key:
            rec.outcome = "invalid_key"
            return web.json_response(invalid_key_body(), status=400)
        method = "GET" if action in ("list", "get") else "POST"
        if parsed is None or (method == "POST" and action not in POST_ACTIONS):
            rec.outcome = "not_found"
            return web.json_response(
                error_body(404, "NOT_FOUND", f"Method not found: {request.method} {request.path}"),
                status=404)
        if request.method != method or (method == "POST" and not isinstance(body, dict)):
            rec.outcome = "bad_request"
            return web.json_response(
                error_body(400, "INVALID_ARGUMENT", "Invalid JSON payload received."), status=400)

        assert action is not None and version is not None
        served = model if model is None else self.resolve(version, model, action)
        if model is not None and served is None:
            rec.outcome = "not_found"
            return web.json_response(model_not_found_body(model, version, action), status=404)
        problem = (
            tools_problem(body) or generation_problem(body) or functions.turn_problem(body)
        ) if action in _GENERATION_ACTIONS else None
        if problem is not None:
            rec.outcome = "bad_request"
            return web.json_response(error_body(400, "INVALID_ARGUMENT", problem), status=400)
        prompt = last_user_text(body).lower()
        embedding = served is not None and is_embedding_model(served)
        fault = self.faults.pick(
            *(model, f"models/{model}") if model else ("models",),
            *((EMBEDDINGS_TARGET,) if embedding else ()),
            accept=lambda f: f.kind not in FILE_FAULT_KINDS
            and str(f.params.get("prompt", "")).lower() in prompt,
        )
        rec.fault = fault
        rec.outcome = f"fault:{fault.kind}" if fault else "ok"
        if fault is not None and fault.kind == "latency":
            await self._wait(self._latency(fault.params))
            fault = None
        if fault is not None:
            response = await self._fault_response(request, fault, model or "", action, body)
            if response is not None:
                return response
        if action == "list":
            names = sorted(self.models) + (sorted(self.aliases) if version in ALIAS_VERSIONS else [])
            return web.json_response({"models": [model_info(m) for m in names]})
        assert model is not None and served is not None
        if action == "get":
            return web.json_response(model_info(model))
        model = served  # an alias answers as the model it stands for (its modelVersion)
        if action == "countTokens":
            return web.json_response({"totalTokens": self._usage(body, "")["promptTokenCount"]})
        if action == "batchEmbedContents":
            return web.json_response(gemini_caches.embeddings(body))
        if action == "embedContent":
            [vector] = gemini_caches.embeddings({"requests": [body]})["embeddings"]
            return web.json_response({"embedding": vector})
        refused = self._check_file_parts(body)
        if refused is not None:
            rec.outcome = f"file_refused:{refused.status}"
            return refused
        applied = self.caches.apply(model, body)
        if isinstance(applied, web.Response):
            rec.outcome = f"cache_refused:{applied.status}"
            return applied
        body, cached_tokens = applied
        if cached_tokens:
            body = {**body, CACHED_TOKENS_KEY: cached_tokens}  # read by _usage; never sent anywhere
        if action == "streamGenerateContent":
            return await self._stream(request, model, body, fault)
        answer = self._generate(model, body, fault)
        if await self._write(answer.get("usageMetadata", {}).get("candidatesTokenCount", 0)):
            return self._drop(request)
        return web.json_response(answer)

    def resolve(self, version: str, model: str, action: str) -> str | None:
        """The served model ``model`` names on API ``version`` for ``action``, or None (a 404)."""
        name = model if model in self.models else None
        if name is None and version in ALIAS_VERSIONS:
            target = self.aliases.get(model)
            name = target if target in self.models else None
        if name is None or action == "get":
            return name
        supported = _EMBEDDING_ACTIONS if is_embedding_model(name) else _GENERATION_ACTIONS
        return name if action in supported else None

    async def _write(self, tokens: int) -> bool:
        """Take as long as a model writing ``tokens`` at ``tokens_per_second``; True if stopped meanwhile."""
        if not self.tokens_per_second or tokens <= 0:
            return False
        return await self._wait(tokens / self.tokens_per_second)

    async def _wait(self, seconds: float | None) -> bool:
        """Sleep ``seconds`` (None = forever) unless the emulator stops; True if stopped."""
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _latency(self, params: dict[str, Any]) -> float:
        """Draw a delay from a fault's params: ``seconds``, or ``dist`` uniform/exponential/fixed."""
        if "seconds" in params:
            return float(params["seconds"])
        dist = params.get("dist", "fixed")
        if dist == "uniform":
            return self._rng.uniform(float(params.get("low", 0.0)), float(params.get("high", 1.0)))
        if dist == "exponential":
            return self._rng.expovariate(1.0 / float(params.get("mean", 0.5)))
        return float(params.get("value", params.get("mean", 0.5)))

    async def _fault_response(
        self, request: web.Request, fault: Fault, model: str, action: str, body: dict[str, Any]
    ) -> web.StreamResponse | None:
        """Answer as the fault dictates, or return None to let the normal path shape it."""
        kind = fault.kind
        if kind == "429":
            return web.json_response(
                quota_body(model, daily=False, retry_delay=str(fault.params.get("retry_delay", "2s"))),
                status=429)
        if kind == "quota_daily":
            # A short RetryInfo by default, like the real API; retry_delay=none leaves it out.
            delay = str(fault.params.get("retry_delay", DAILY_RETRY_DELAY))
            limit = fault.params.get("limit")
            body = quota_body(model, daily=True, retry_delay=None if delay.lower() in ("", "none") else delay,
                              limit=None if limit is None else str(limit))
            return web.json_response(body, status=429)
        if kind == "502":
            return web.Response(status=502, text=_HTML_502, content_type="text/html")
        if kind.isdigit() and int(kind) in _STATUS_TEXT:
            code = int(kind)
            status, message = _STATUS_TEXT[code]
            return web.json_response(error_body(code, status, str(fault.params.get("message", message))),
                                     status=code)
        if kind == "hang":
            await self._wait(None)
            return self._drop(request)
        if kind == "drop":
            return self._drop(request)
        if kind == "malformed_json":
            return web.Response(status=200, text='{"candidates": [{"content": {"parts": [{"text": "Hel',
                                content_type="application/json")
        return None

    def _drop(self, request: web.Request) -> web.StreamResponse:
        """Close the TCP connection without writing a response."""
        if request.transport is not None:
            request.transport.abort()
        # aiohttp cannot write to an aborted transport; raising ends the handler quietly.
        raise asyncio.CancelledError

    def _usage(self, body: dict[str, Any], text: str) -> dict[str, int]:
        """Token counts for a request body and an answer text."""
        prompt = sum(responder.count_tokens(responder.text_of(c)) for c in body.get("contents", [])
                     if isinstance(c, dict))
        prompt += responder.count_tokens(responder.text_of(body.get("systemInstruction")))
        answer = responder.count_tokens(text)
        usage = {"promptTokenCount": prompt, "totalTokenCount": prompt + answer}
        if body.get(CACHED_TOKENS_KEY):  # an explicit context cache's tokens are part of the prompt's
            usage["cachedContentTokenCount"] = int(body[CACHED_TOKENS_KEY])
        if answer:
            usage["candidatesTokenCount"] = answer
        return usage

    def _generate(self, model: str, body: dict[str, Any], fault: Fault | None) -> dict[str, Any]:
        """The non-streaming ``GenerateContentResponse`` for ``body`` under ``fault``."""
        version = model + MODEL_VERSION_SUFFIX
        kind = fault.kind if fault else None
        if kind == "prompt_block":
            # ``reason``: SAFETY (default), OTHER, BLOCKLIST, PROHIBITED_CONTENT (types.BlockedReason)
            reason = str(fault.params.get("reason", "SAFETY")) if fault else "SAFETY"
            feedback: dict[str, Any] = {"blockReason": reason}
            if reason == "SAFETY":
                feedback["safetyRatings"] = _SAFETY_RATINGS
            usage = self._usage(body, "")
            return {"promptFeedback": feedback, "usageMetadata": usage, "modelVersion": version}
        if kind == "empty":
            # ``finish``: "OTHER" gives the empty candidate Gemini ends with for some topics even with
            # its filters off; by default the candidate list is empty.
            finish = fault.params.get("finish") if fault else None
            candidates = [{"finishReason": str(finish), "index": 0}] if finish else []
            return {"candidates": candidates, "usageMetadata": self._usage(body, ""), "modelVersion": version}
        blocked = safety_block(body)
        if blocked is not None and blocked[0] == "prompt":
            return {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": blocked[1]},
                    "usageMetadata": self._usage(body, ""), "modelVersion": version}
        if blocked is not None:
            return {"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": blocked[1]}],
                    "usageMetadata": self._usage(body, ""), "modelVersion": version}
        if kind == "safety":
            return {"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": _SAFETY_RATINGS}],
                    "usageMetadata": self._usage(body, ""), "modelVersion": version}
        if kind == "max_tokens":
            # What a thinking model does when its budget runs out before the answer: no parts.
            usage = self._usage(body, "") | {"thoughtsTokenCount": 1024}
            usage["totalTokenCount"] += 1024
            return {"candidates": [{"content": {"role": "model"}, "finishReason": "MAX_TOKENS", "index": 0}],
                    "usageMetadata": usage, "modelVersion": version}
        calls = functions.plan(body)
        if calls is not None:  # function calling (sandbox.functions): the model asks, the caller runs them
            called = json.dumps(calls)
            asking = {"content": {"parts": calls, "role": "model"}, "finishReason": "STOP", "index": 0}
            return {"candidates": [asking], "usageMetadata": self._usage(body, called),
                    "modelVersion": version}
        summary = functions.summary(body)
        text = summary if summary is not None else responder.reply(body, self._file_facts, self._rng)
        finish = "STOP"
        limit = (body.get("generationConfig") or {}).get("maxOutputTokens")
        if isinstance(limit, int) and responder.count_tokens(text) > limit:
            text, finish = text[: max(0, limit) * 4], "MAX_TOKENS"
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"},
                                     "finishReason": finish, "index": 0}
        written = self._use_tools(body, candidate)
        usage = self._usage(body, written) | self._spent(model, body)
        usage["totalTokenCount"] += usage.get("thoughtsTokenCount", 0)  # thoughts are billed as output
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": version}

    def _use_tools(self, body: dict[str, Any], candidate: dict[str, Any]) -> str:
        """Apply the request's tools to an answer ``candidate`` (in place); return all it wrote.

        ``codeExecution``: a "calculate" question is answered with code, its result and text parts;
        ``googleSearch``: the answer is grounded (``groundingMetadata`` with three example sources)
        unless the prompt says "no search"; ``urlContext``: the URLs in the prompt are "read"
        (``urlContextMetadata``). Without tools the candidate is left as it is.
        """
        parts = candidate["content"]["parts"]
        tools = requested_tools(body)
        if not tools:
            return str(parts[0]["text"])
        prompt = last_user_text(body)
        if "codeExecution" in tools and responder.wants_code_execution(prompt):
            parts[:] = responder.code_execution_parts(prompt)
        written = responder.parts_text(parts)
        if "googleSearch" in tools and responder.wants_search(prompt):
            candidate["groundingMetadata"] = responder.search_grounding(prompt, written)
        context = responder.url_context(prompt) if "urlContext" in tools else None
        if context is not None:
            candidate["urlContextMetadata"] = context
        return written

    def _spent(self, model: str, body: dict[str, Any]) -> dict[str, int]:
        """Usage beyond prompt and answer: a thinking model's ``thoughtsTokenCount`` ("think step by
        step" in the prompt: 64 tokens) and implicit caching's ``cachedContentTokenCount``.

        Implicit caching (https://ai.google.dev/gemini-api/docs/caching): Gemini 2.5 and newer models
        reuse the longest prefix of the request (system instruction, then whole turns) already seen
        in an earlier request, when that prefix holds at least the model's minimum (1,024 tokens for
        Flash, 4,096 for Pro); the cached tokens are part of ``promptTokenCount``.
        """
        spent: dict[str, int] = {}
        if "think step by step" in last_user_text(body).lower():
            spent["thoughtsTokenCount"] = THOUGHT_TOKENS
        contents = [c for c in body.get("contents", []) if isinstance(c, dict)]
        system = responder.text_of(body.get("systemInstruction"))
        prefix = hashlib.sha256(f"{model}\0{system}".encode())
        tokens = responder.count_tokens(system)
        cached = 0
        for content in contents:
            prefix.update(json.dumps(content, sort_keys=True).encode())
            tokens += responder.count_tokens(responder.text_of(content))
            key = prefix.hexdigest()
            if key in self._prefixes:
                self._prefixes.move_to_end(key)
                cached = tokens
            else:
                self._prefixes[key] = None
                if len(self._prefixes) > MAX_CACHED_PREFIXES:
                    self._prefixes.popitem(last=False)
        minimum = IMPLICIT_CACHE_MIN_TOKENS["pro" if "-pro" in model else "flash"]
        if model.startswith("gemini-2.0") or cached < minimum:
            return spent
        return spent | {"cachedContentTokenCount": cached}

    async def _stream(
        self, request: web.Request, model: str, body: dict[str, Any], fault: Fault | None
    ) -> web.StreamResponse:
        """Send the answer as SSE chunks, one ``data: {json}`` event per chunk."""
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        full = self._generate(model, body, None if fault and fault.kind == "stream_error" else fault)
        candidates = full.get("candidates") or []
        parts = candidates[0].get("content", {}).get("parts", []) if candidates else []
        if not responder.parts_text(parts):
            await response.write(self._event(full))
            await response.write_eof()
            return response
        size = max(1, int(fault.params.get("chunk", 40)) if fault else 40)
        # Text in pieces of ``size`` characters; a code part or its result (code execution) in a chunk
        # of its own; the last chunk carries the finish reason, the usage and the tools' metadata.
        pieces: list[dict[str, Any]] = []
        for part in parts:
            text = part.get("text")
            if isinstance(text, str):
                pieces += [{"text": text[i:i + size]} for i in range(0, len(text), size)]
            else:
                pieces.append(part)
        cut = len(pieces) + 1
        if fault is not None and fault.kind == "stream_error":
            cut = min(int(fault.params.get("after", 1)), len(pieces))
        for n, piece in enumerate(pieces[:cut]):
            if await self._write(responder.count_tokens(responder.parts_text([piece]))):
                return self._drop(request)
            chunk: dict[str, Any] = {"candidates": [{"content": {"parts": [piece], "role": "model"},
                                                     "index": 0}], "modelVersion": full["modelVersion"]}
            if n == len(pieces) - 1:
                last = chunk["candidates"][0]
                last["finishReason"] = candidates[0]["finishReason"]
                for key in ("groundingMetadata", "urlContextMetadata"):
                    if key in candidates[0]:
                        last[key] = candidates[0][key]
                chunk["usageMetadata"] = full["usageMetadata"]
            await response.write(self._event(chunk))
        if cut <= len(pieces):
            assert fault is not None
            mode = fault.params.get("mode", "error")
            if mode == "hang":  # a stream that stalls mid-answer: only the client's timeout ends it
                await self._wait(None)
                return self._drop(request)
            if mode == "broken":
                await response.write(b'data: {"candidates": [{"content": {"parts": [{"tex\r\n\r\n')
            else:
                await response.write(self._event(error_body(500, "INTERNAL", _STATUS_TEXT[500][1])))
        await response.write_eof()
        return response

    @staticmethod
    def _event(doc: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(doc).encode() + b"\r\n\r\n"

    async def _cached_contents(self, request: web.Request, body: Any) -> web.StreamResponse:
        """The ``cachedContents`` resources (``sandbox.gemini_caches``), recorded like every request."""
        headers = {k: ("***" if k.lower() == API_KEY_HEADER else v) for k, v in request.headers.items()}
        action = {"POST": "createCachedContent", "GET": "getCachedContent", "DELETE": "deleteCachedContent"}
        version = request.path.strip("/").split("/")[0]
        verb = action.get(request.method, request.method)
        rec = RecordedRequest(request.method, request.path, None, version, verb, headers, summarised(body),
                              self._clock())
        self.requests.append(rec)
        key = request.headers.get(API_KEY_HEADER) or request.query.get("key")
        if key != self.api_key:
            rec.outcome = "invalid_key"
            return web.json_response(invalid_key_body(), status=400)
        response = await self.caches.handle(request, body)
        rec.outcome = "ok" if response.status == 200 else f"refused:{response.status}"
        return response
