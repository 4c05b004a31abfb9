"""The gateway's configuration: one pydantic tree loaded from `config.yaml` and validated at start.

Every section forbids unknown keys, so a typo in YAML is an error rather than a
silently ignored setting. Secrets never live in the file: a model names the
environment variable that holds its key (`api_key_env`), and `load_config`
checks that the variable is set.
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "API_NAMES",
    "CAPABILITIES",
    "AdminConfig",
    "ApiName",
    "Capabilities",
    "Capability",
    "AuthConfig",
    "CaptureConfig",
    "CascadeConfig",
    "ClassifierConfig",
    "Config",
    "ConfigError",
    "Limits",
    "ModelConfig",
    "Price",
    "QualityChecks",
    "RoutingConfig",
    "ServeConfig",
    "ServerConfig",
    "StoreConfig",
    "StateConfig",
    "format_validation_error",
    "load_config",
]

# A model name is what clients send as `model` and what metrics label by, so it
# is kept to a safe, bounded alphabet.
ModelName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.:/-]*$")]

# The wire formats the gateway speaks (one module each under `router/endpoints/`), which
# are also what a model's `api` lists, and the capabilities a request may need.
ApiName = Literal["chat", "completions", "responses", "messages", "embeddings"]
API_NAMES: tuple[ApiName, ...] = ("chat", "completions", "responses", "messages", "embeddings")
Capability = Literal["vision", "tools", "json_schema"]
CAPABILITIES: tuple[Capability, ...] = ("vision", "tools", "json_schema")
# Shorthands for `api:` (a model may also list the formats it speaks).
API_SHORTHANDS: dict[str, tuple[ApiName, ...]] = {
    "openai": ("chat", "completions", "embeddings"),
    "anthropic": ("messages",),
    "vllm": API_NAMES,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    """Where the gateway listens and how much it accepts."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Request bodies larger than this get 413.")
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="A request head (request line and all headers) larger than this gets 431.",
    )
    max_header_line_bytes: int = Field(
        16 * 1024, ge=256, description="One header (name and value) larger than this gets 431."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection must deliver a whole request head within this long of opening "
        "(or of its previous response); otherwise it is closed.",
    )
    max_json_containers: int = Field(
        100_000,
        ge=100,
        description="Most JSON objects and arrays in one request body (counted as `{` and `[` "
        "bytes, strings included); more gets 400. Bounds the CPU and memory of parsing.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A request body must arrive in full within this long of its head; otherwise 408.",
    )
    write_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A stream whose client takes longer than this to accept one write is closed, "
        "so a client that stops reading frees its upstream connection.",
    )
    max_connections: int | None = Field(
        None,
        gt=0,
        description="Open client connections; past it the oldest idle one is closed, or the new one "
        "refused. Default: what the process's open-file limit leaves after upstream pools.",
    )
    max_inflight_requests: int = Field(
        1024,
        gt=0,
        description="Completion requests admitted at once; more get 503 `overloaded` with Retry-After.",
    )
    log_format: Literal["plain", "json"] = Field(
        "plain", description="Request and event log lines: plain text or one JSON object a line."
    )
    access_log: bool = Field(True, description="Log one line per completion request.")


class Price(_Strict):
    """USD per million tokens."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)


class QualityChecks(_Strict):
    """Which checks a student's answer must pass before it is served (students only)."""

    empty: bool = Field(True, description="Escalate an answer with no text and no tool call.")
    length_min_chars: int = Field(
        40, ge=0, description="Escalate finish_reason=length answers shorter than this; 0 = off."
    )
    refusal: bool = Field(True, description="Escalate refusals and 'I don't know' answers.")
    refusal_patterns: list[str] | None = Field(
        None, description="Case-insensitive regexes replacing the built-in refusal patterns."
    )
    json_format: bool = Field(
        True, description="Escalate invalid JSON when response_format asks for JSON or a schema."
    )
    tool_calls: bool = Field(True, description="Escalate tool calls with no name or non-JSON arguments.")
    min_mean_logprob: float | None = Field(
        None,
        le=0,
        description="Escalate when the mean token logprob is below this; asks students for logprobs.",
    )
    repetition_ngram: int = Field(4, ge=2, le=32)
    repetition_max_ratio: float | None = Field(
        0.5, gt=0, lt=1, description="Escalate when this share of word n-grams are repeats; null = off."
    )

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns_compile(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"refusal pattern {pattern!r} is not a valid regex: {exc}") from None
        return value


class ServeConfig(_Strict):
    """How to run a model on vLLM; `triage render compose|k8s` turns it into deploy files."""

    hf_model: str | None = Field(None, description="Weights to load (default: upstream_model).")
    image: str = "vllm/vllm-openai:v0.31.0"
    gpus: int = Field(1, ge=1, description="GPUs per replica.")
    tensor_parallel_size: int | None = Field(None, ge=1, description="Default: gpus.")
    max_model_len: int | None = Field(None, gt=0, description="Default: the model's context_window.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enable_prefix_caching: bool = True
    reasoning_parser: str | None = Field(None, description="e.g. deepseek_r1 for R1 distills.")
    extra_args: list[str] = Field(default_factory=list)
    replicas: int = Field(1, ge=1, description="Kubernetes replicas behind each endpoint's Service.")
    memory: str = Field("32Gi", description="Kubernetes memory request.")


class Capabilities(_Strict):
    """What a model can take; routing never sends a student a request it cannot serve."""

    vision: bool = Field(False, description="Accepts image inputs.")
    tools: bool = Field(True, description="Accepts tool (function) definitions and calls them.")
    json_schema: bool = Field(True, description="Honours `response_format: json_schema`.")


class ModelConfig(_Strict):
    """One model: a student or the teacher (routed), or an embedding model, on one or more endpoints."""

    name: ModelName
    role: Literal["student", "teacher", "embedding"]
    api: list[ApiName] | None = Field(
        None,
        description="Wire formats the model's server speaks natively: a list of "
        f"{', '.join(API_NAMES)}, or one of {', '.join(API_SHORTHANDS)}. Requests in a format it does "
        "not speak are translated to chat completions. Default: chat and completions "
        "(embeddings for an embedding model).",
    )
    capabilities: Capabilities = Capabilities()
    endpoints: list[HttpUrl] = Field(min_length=1)
    upstream_model: str = Field(min_length=1)
    max_score: float | None = Field(None, gt=0, le=1)
    context_window: int | None = Field(None, gt=0)
    price: Price = Price()
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    connect_timeout_s: float = Field(2.0, gt=0)
    read_timeout_s: float = Field(120.0, gt=0)
    max_connections: int = Field(
        200, gt=0, description="Pooled connections to this model (requests beyond it wait for one)."
    )
    pool_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest wait for a free pooled connection; then 503 `overloaded`. Waiting is "
        "not an upstream failure: it never opens a breaker or causes a fallback.",
    )
    max_response_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Largest upstream answer accepted (after decompression); more is an upstream error.",
    )
    keepalive_timeout_s: float = Field(30.0, gt=0, description="Idle time before a pooled connection closes.")
    checks: QualityChecks = QualityChecks()
    serve: ServeConfig | None = None

    @field_validator("api", mode="before")
    @classmethod
    def _api_shorthand(cls, value: object) -> object:
        if isinstance(value, str):
            if value in API_SHORTHANDS:
                return list(API_SHORTHANDS[value])
            return [value]
        return value

    @cached_property
    def apis(self) -> frozenset[ApiName]:
        """The wire formats this model speaks natively."""
        if self.api is not None:
            return frozenset(self.api)
        return frozenset(("embeddings",) if self.role == "embedding" else ("chat", "completions"))

    @model_validator(mode="after")
    def _max_score_for_students_only(self) -> ModelConfig:
        if self.role == "student" and self.max_score is None:
            raise ValueError(
                f"model {self.name!r}: a student needs max_score (take requests scoring below it)"
            )
        if self.role != "student" and self.max_score is not None:
            raise ValueError(
                f"model {self.name!r}: max_score applies to students only; remove it from the {self.role}"
            )
        if self.role == "teacher" and "chat" not in self.apis:
            # Every format can be translated to chat completions, none from it: a teacher
            # without chat could not take the requests every student falls back with.
            raise ValueError(f"model {self.name!r}: the teacher's api must include chat")
        if self.role == "embedding" and "embeddings" not in self.apis:
            raise ValueError(f"model {self.name!r}: an embedding model's api must include embeddings")
        return self


class ClassifierConfig(_Strict):
    """Which complexity scorer to load: a learned artifact (`path`) or `kind: heuristic`."""

    kind: Literal["learned", "heuristic"] = "learned"
    path: Path | None = None

    @model_validator(mode="after")
    def _path_for_learned(self) -> ClassifierConfig:
        if self.kind == "learned" and self.path is None:
            raise ValueError("a learned classifier needs `path` (or set `kind: heuristic`)")
        return self


class CascadeConfig(_Strict):
    """Escalation of student answers that fail a quality check."""

    enabled: bool = True
    hold_back_tokens: int = Field(
        8, ge=1, description="Stream events held and checked before the client sees any."
    )
    hold_back_ms: float = Field(
        300.0, ge=0, description="Stop holding once this long has passed since the first event."
    )
    max_escalation_usd: float | None = Field(
        None,
        gt=0,
        description="Skip quality escalation when the teacher call would cost more (estimate).",
    )


class RoutingConfig(_Strict):
    """How `model: <alias>` requests are routed and what happens on upstream failure."""

    alias: str = Field("auto", min_length=1)
    allow_override_header: bool = Field(
        True, description="Honour the `x-triage-route: <model>` request header."
    )
    pinnable_models: list[ModelName] | None = Field(
        None,
        description="Models a client may name directly (`model: <name>` or the override header); "
        "null = every model, [] = only the routing alias. auth.pinning overrides it per key.",
    )
    fallback_to_teacher: bool = Field(
        True, description="When a student fails before answering, retry the request on the teacher."
    )
    retries_per_model: int = Field(
        1, ge=0, le=5, description="Retries on another endpoint of the same model."
    )
    endpoint_cooldown_s: float = Field(
        5.0, ge=0, description="How long an open circuit keeps an endpoint out before a probe."
    )
    breaker_failures: int = Field(
        3, ge=1, description="Consecutive failures that open an endpoint's circuit."
    )
    request_deadline_s: float = Field(
        300.0,
        gt=0,
        description="Overall limit for a request across retries and fallback (to the first byte "
        "of a stream).",
    )
    retry_budget_ratio: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Retries and fallbacks allowed per request on average, so they cannot amplify an outage.",
    )
    retry_budget_burst: int = Field(20, ge=0, description="Retries allowed in a burst.")
    chars_per_token: float = Field(
        4.0, gt=0, description="Prompt-size estimate used for context-window checks."
    )
    image_tokens: int = Field(
        1000,
        ge=0,
        description="Tokens one image input counts as in the prompt-size estimate (its bytes never count).",
    )
    policy: Literal["threshold"] = Field(
        "threshold",
        description="The routing policy (router/policy.py registry): `threshold` sends a request to the "
        "first student whose max_score is above its score and that can take it, else the teacher.",
    )
    cascade: CascadeConfig = CascadeConfig()
    target_student_share: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Move student thresholds so this share of classifier-routed traffic goes to students.",
    )
    min_score_threshold: float = Field(0.05, gt=0, lt=1)
    max_score_threshold: float = Field(0.95, gt=0, le=1)
    share_window: int = Field(2000, ge=50, description="Recent scores the share controller looks at.")
    share_update_every: int = Field(25, ge=1, description="Requests between controller updates.")
    shadow_rate: float = Field(
        0.0, ge=0, le=1, description="Share of student-served requests also sent to the teacher."
    )
    explore_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of teacher-served, classifier-routed requests also sent to the student next in "
        "line (the highest-threshold student able to take them) and compared like a shadow sample, so "
        "`triage learn` gets labels above the threshold too. Shares shadow_max_concurrency.",
    )
    shadow_max_concurrency: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _threshold_bounds(self) -> RoutingConfig:
        if self.min_score_threshold >= self.max_score_threshold:
            raise ValueError("routing.min_score_threshold must be below routing.max_score_threshold")
        return self


class Limits(_Strict):
    """Per-key limits; each is off when null."""

    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    budget_usd: float | None = Field(
        None,
        gt=0,
        description="Spend allowed per key: since the process started, or in all time with `state:` "
        "(the spend is kept in Redis).",
    )


class AuthConfig(_Strict):
    """Client API keys and limits; with no keys configured the gateway is open."""

    keys_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Env var with comma-separated `name:key` pairs (or bare keys).",
    )
    keys_file: Path | None = Field(
        None, description="File of `name sha256-hex-of-key` lines; keys are never stored in clear."
    )
    metrics_token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    admin_token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    limits: Limits = Limits()
    pinning: dict[str, list[ModelName]] = Field(
        default_factory=dict,
        description="Per key name: the models that key may pin, replacing routing.pinnable_models.",
    )


class StateConfig(_Strict):
    """Shared state in Redis: per-key limits, spend and the share controller, one for every replica.

    Without this section each process keeps its own (the embedded default).
    """

    redis_url_env: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Env var holding the Redis URL (redis://[user:password@]host:port/db or rediss://); "
        "it may carry a password, so it never lives in the file.",
    )
    key_prefix: str = Field(
        "triage:", min_length=1, max_length=64, description="Prefix of every Redis key the gateway writes."
    )
    timeout_s: float = Field(
        0.1,
        gt=0,
        le=5,
        description="Longest a request waits on Redis (connect or answer); past it, `on_failure` decides.",
    )
    on_failure: Literal["fail_open", "fail_closed"] = Field(
        "fail_open",
        description="When Redis is slow or down: fail_open serves the request unchecked (and counts it), "
        "fail_closed answers 429 `shared_state_unavailable`.",
    )
    retry_s: float = Field(
        1.0,
        gt=0,
        description="After a failure, how long requests skip Redis (answered by `on_failure` at once) "
        "before the next one tries it again.",
    )
    max_connections: int = Field(
        16,
        gt=0,
        description="Redis connections per process for the limits' batches, and as many again for "
        "the other calls (the share controller, the last charges at shutdown).",
    )
    share_controller: bool = Field(
        True, description="Share the student-share controller's window and factor across replicas."
    )
    lease_fraction: float = Field(
        0.01,
        ge=0,
        le=0.25,
        description="Share of a key's requests-per-minute limit that a process reserves in Redis at a "
        "time and admits from without a round trip (router/limits.py). 0: every admission asks Redis. "
        "A key whose lease would hold fewer than 2 requests always asks Redis.",
    )
    lease_s: float = Field(
        0.05,
        gt=0,
        le=5,
        description="How long a lease, and the key's token and budget state read with it, is trusted "
        "before the next admission asks Redis again; unused requests then go back.",
    )


class AdminConfig(_Strict):
    """Operational endpoints."""

    reload_endpoint: bool = Field(False, description="Enable POST /admin/reload.")


class StoreConfig(_Strict):
    """Where every request's record is kept (`router/store/`); without this section nothing is."""

    kind: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="sqlite: one file in data_dir, nothing to install; postgres: for replicas."
    )
    data_dir: Path = Field(
        Path("triage-data"),
        description="SQLite: the folder holding traffic.db (relative to the config file's folder).",
    )
    dsn_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="PostgreSQL: env var holding the connection string (postgresql://user@host/db).",
    )
    batch_size: int = Field(500, ge=1, le=100_000, description="Records written per transaction.")
    flush_interval_s: float = Field(
        1.0, gt=0, le=60, description="Longest a record waits in memory before it is written."
    )
    max_queue: int = Field(
        50_000,
        ge=1,
        description="Records waiting to be written, at most; past it (a slow or dead store) new "
        "records are dropped and counted in triage_store_dropped_records_total.",
    )
    retention_days: float | None = Field(
        None, gt=0, description="Delete records older than this; null keeps them."
    )
    maintenance_interval_s: float = Field(
        300.0, gt=0, description="How often retention and the capture limits are enforced."
    )
    close_timeout_s: float = Field(
        10.0, ge=0, description="At shutdown, how long to keep trying to write what is left."
    )

    @model_validator(mode="after")
    def _dsn_for_postgres(self) -> StoreConfig:
        if self.kind == "postgres" and self.dsn_env is None:
            raise ValueError("store.kind postgres needs dsn_env (the env var holding the connection string)")
        return self


class CaptureConfig(_Strict):
    """Keeping prompts and answers in the traffic store: off unless turned on, redacted, bounded."""

    enabled: bool = Field(False, description="Store the prompt and answer of sampled requests.")
    sample_rate: float = Field(1.0, ge=0, le=1, description="Share of requests captured when enabled.")
    labelled: bool = Field(
        False,
        description="When enabled, also keep the prompt of every request a shadow comparison or a failed "
        "quality check labels, whatever sample_rate draws (what `triage learn` learns from).",
    )
    redact_emails: bool = Field(True, description="Replace email addresses with [EMAIL].")
    redact_keys: bool = Field(
        True, description="Replace API-key-like strings (sk-..., AKIA..., bearer tokens, JWTs) with [KEY]."
    )
    redact_patterns: list[str] = Field(
        default_factory=list,
        description="More regexes to replace with [REDACTED] (account numbers, names you choose).",
    )
    retention_days: float | None = Field(
        30.0, gt=0, description="Clear captured text older than this (the outcome row stays); null keeps it."
    )
    max_mb: float | None = Field(
        1024.0, gt=0, description="Most captured text kept, in MB; past it the oldest text is cleared."
    )

    @field_validator("redact_patterns")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redact pattern {pattern!r} is not a valid regex: {exc}") from None
        return value


class Config(_Strict):
    """The whole gateway configuration."""

    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    admin: AdminConfig = AdminConfig()
    models: list[ModelConfig] = Field(min_length=1)
    classifier: ClassifierConfig
    routing: RoutingConfig = RoutingConfig()
    store: StoreConfig | None = Field(None, description="The traffic store; null stores nothing.")
    capture: CaptureConfig = CaptureConfig()
    state: StateConfig | None = Field(
        None, description="Shared state in Redis; null keeps limits and the controller per process."
    )

    @model_validator(mode="after")
    def _one_teacher_unique_names(self) -> Config:
        teachers = [m.name for m in self.models if m.role == "teacher"]
        if len(teachers) != 1:
            raise ValueError(f"exactly one model must have role: teacher (found {len(teachers)})")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        if self.routing.alias in names:
            raise ValueError(f"routing.alias {self.routing.alias!r} is also a model name; pick another alias")
        pinnable = [("routing.pinnable_models", self.routing.pinnable_models or [])]
        pinnable += [(f"auth.pinning.{k}", v) for k, v in self.auth.pinning.items()]
        for where, listed in pinnable:
            unknown = sorted(set(listed) - set(names))
            if unknown:
                raise ValueError(f"{where} names unknown model(s): {', '.join(unknown)}")
        return self

    @property
    def teacher(self) -> ModelConfig:
        """The one model with role teacher."""
        return next(m for m in self.models if m.role == "teacher")

    @property
    def students(self) -> list[ModelConfig]:
        """Students in config order (cheapest first)."""
        return [m for m in self.models if m.role == "student"]

    def model(self, name: str) -> ModelConfig | None:
        """The model with this name, if configured."""
        for m in self.models:
            if m.name == name:
                return m
        return None


class ConfigError(Exception):
    """A config file that cannot be used; the message lists every problem."""


def format_validation_error(exc: ValidationError) -> str:
    """One line per error: the YAML path, then what is wrong."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}  {err['msg']}")
    return "\n".join(lines)


def load_config(
    path: Path, environ: dict[str, str] | None = None, *, missing_secrets: list[str] | None = None
) -> Config:
    """Read, validate and resolve a config file; raise `ConfigError` listing every problem.

    A relative `classifier.path` is resolved against the config file's folder. An unset
    secret variable is an error, unless the caller passes `missing_secrets`: commands that
    never call an upstream (`check-config`, `route`) collect them there as warnings.
    """
    env = os.environ if environ is None else environ
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config {path}: not UTF-8 text (byte {exc.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            f"{path} has {exc.error_count()} error(s):\n" + format_validation_error(exc)
        ) from None
    problems: list[str] = []
    secrets = problems if missing_secrets is None else missing_secrets
    for i, m in enumerate(config.models):
        if m.api_key_env and not env.get(m.api_key_env):
            secrets.append(f"  models.{i}.api_key_env  environment variable {m.api_key_env} is not set")
    store = config.store
    if store is not None and store.dsn_env and not env.get(store.dsn_env):
        secrets.append(f"  store.dsn_env  environment variable {store.dsn_env} is not set")
    if store is not None and not store.data_dir.is_absolute():
        store = store.model_copy(update={"data_dir": (path.parent / store.data_dir).resolve()})
        config = config.model_copy(update={"store": store})
    for field in ("keys_env", "metrics_token_env", "admin_token_env"):
        var = getattr(config.auth, field)
        if var and not env.get(var):
            secrets.append(f"  auth.{field}  environment variable {var} is not set")
    if config.state is not None:
        var = config.state.redis_url_env
        url = env.get(var)
        if not url:
            secrets.append(f"  state.redis_url_env  environment variable {var} is not set")
        elif not url.startswith(("redis://", "rediss://", "unix://")):
            # Not echoed: the URL may hold a password.
            problems.append(f"  state.redis_url_env  {var} must hold a redis://, rediss:// or unix:// URL")
    kpath = config.auth.keys_file
    if kpath is not None and not kpath.is_absolute():
        kpath = (path.parent / kpath).resolve()
        config = config.model_copy(update={"auth": config.auth.model_copy(update={"keys_file": kpath})})
    if kpath is not None and not kpath.is_file():
        problems.append(f"  auth.keys_file  file not found: {kpath}")
    cpath = config.classifier.path
    if cpath is not None and not cpath.is_absolute():
        cpath = _resolve_model_path(path.parent, cpath)
        config = config.model_copy(
            update={"classifier": config.classifier.model_copy(update={"path": cpath})}
        )
    if cpath is not None and not cpath.exists():
        problems.append(f"  classifier.path  file not found: {cpath}")
    if problems:
        raise ConfigError(f"{path} has {len(problems)} error(s):\n" + "\n".join(problems))
    return config


def _resolve_model_path(config_dir: Path, relative: Path) -> Path:
    """A relative classifier path: next to the config file, else inside the installed package.

    The second form lets `classifiers/models/complexity.joblib` name the shipped model from
    any config file, wherever it lives (a container's /etc/triage, a k8s ConfigMap).
    """
    beside = (config_dir / relative).resolve()
    if beside.exists():
        return beside
    import classifiers

    packaged = (Path(classifiers.__file__).resolve().parent.parent / relative).resolve()
    return packaged if packaged.exists() else beside


def config_hash(path: Path) -> str:
    """A short hash of the config file's bytes, for the build-info metric."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def resolve_api_key(model: ModelConfig, environ: dict[str, str] | None = None) -> str | None:
    """The model's upstream API key from its environment variable, if it names one."""
    env = os.environ if environ is None else environ
    return env.get(model.api_key_env) if model.api_key_env else None
