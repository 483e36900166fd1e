"""Agent configuration: YAML in, validated frozen dataclasses out.

Every field carries its bounds and a one-line description (the same text that
`config/agent.example.yaml` documents). Unknown keys are errors, like Frigate's
``extra="forbid"``: a typo in a config must not silently fall back to a default.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "AdaptConfig",
    "AgentConfig",
    "AlertConfig",
    "BackendOptions",
    "BrokerConfig",
    "ConfigError",
    "FleetConfig",
    "HealthConfig",
    "HomeAssistantConfig",
    "LiveConfig",
    "LocalConfig",
    "OutboxConfig",
    "PostprocessConfig",
    "ServiceConfig",
    "StreamConfig",
    "TLSConfig",
    "UpstreamConfig",
    "is_loopback",
    "load_config",
    "parse_config",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(ValueError):
    """A config that does not validate; ``problems`` holds ``path: what is wrong`` lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _meta(
    doc: str,
    *,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
) -> dict[str, Any]:
    return {"doc": doc, "ge": ge, "le": le, "gt": gt}


def _f(default: Any, doc: str, **bounds: float) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=_meta(doc, **bounds))
    return field(default=default, metadata=_meta(doc, **bounds))


def _req(doc: str, **bounds: float) -> Any:
    return field(metadata=_meta(doc, **bounds))


@dataclass(frozen=True)
class TLSConfig:
    ca_file: str | None = _f(None, "CA bundle that signs the broker's certificate")
    cert_file: str | None = _f(None, "client certificate (mutual TLS)")
    key_file: str | None = _f(None, "client private key (mutual TLS)")
    insecure: bool = _f(False, "skip hostname verification (testing only)")


@dataclass(frozen=True)
class BrokerConfig:
    host: str = _f("localhost", "broker host name or address")
    port: int = _f(1883, "broker TCP port", ge=1, le=65535)
    username: str | None = _f(None, "user name, if the broker asks for one")
    password: str | None = _f(None, "password, if the broker asks for one")
    tls: TLSConfig | None = _f(None, "TLS settings; omit for plain TCP")
    client_id: str | None = _f(None, "MQTT client id; default edge-agent-{device_id}-{role}")
    keepalive: int = _f(30, "MQTT keepalive in seconds", ge=5, le=3600)


@dataclass(frozen=True)
class LocalConfig(BrokerConfig):
    qos: int = _f(0, "QoS of the sensor subscriptions; 1 adds a persistent session", ge=0, le=1)


@dataclass(frozen=True)
class UpstreamConfig(BrokerConfig):
    prefix: str = _f("edge", "first level of every upstream topic")
    protocol: Literal["5", "3.1.1"] = _f("5", "MQTT protocol version to the cloud broker")
    status_interval_s: float = _f(60.0, "how often the retained online status is refreshed", gt=0)
    max_inflight: int = _f(20, "QoS 1 messages handed to the client before waiting for PUBACKs",
                           ge=1, le=1000)
    replay_rate: float = _f(50.0, "most backlog messages sent per second after an outage "
                            "(live messages are not paced; max_inflight bounds them)", gt=0)
    reconnect_min_s: float = _f(1.0, "first reconnect delay; doubles per failure", gt=0, le=300)
    reconnect_max_s: float = _f(30.0, "reconnect delay cap (jittered down to half)", gt=0,
                                le=3600)
    session_expiry_s: int = _f(86400, "MQTT 5 session expiry the broker keeps for us", ge=0)


@dataclass(frozen=True)
class OutboxConfig:
    synchronous: Literal["full", "normal"] = _f(
        "full",
        "SQLite synchronous mode: full survives a power cut, normal only a crash",
    )
    max_rows: int = _f(100_000, "most messages kept while the uplink is away", ge=10)
    max_bytes: int = _f(64 * 1024 * 1024, "most payload bytes kept while the uplink is away",
                        ge=64 * 1024)
    ttl_alert_s: float = _f(30 * 86400.0, "alerts older than this are dropped (counted)", gt=0)
    ttl_summary_s: float = _f(7 * 86400.0, "summaries older than this are dropped (counted)",
                              gt=0)


@dataclass(frozen=True)
class HealthConfig:
    port: int = _f(0, "local HTTP port for /healthz and /metrics; 0 turns the endpoint off",
                   ge=0, le=65535)
    host: str = _f("127.0.0.1", "address the health endpoint binds to")
    token: str | None = _f(None, "secret for the live page and /events (a Bearer token, the "
                           "basic-auth password or ?token=); needed to serve them beyond "
                           "loopback")


@dataclass(frozen=True)
class LiveConfig:
    enabled: bool = _f(True, "serve the live page on / and server-sent events on /events from "
                       "the health endpoint")
    max_clients: int = _f(4, "most pages and watch views connected at once", ge=1, le=64)
    points: int = _f(300, "most chart points kept per stream (one per update per stream)",
                     ge=10, le=2000)
    rate_hz: float = _f(5.0, "updates per second sent to each page (coalesced)", gt=0, le=20)
    keepalive_s: float = _f(15.0, "a keep-alive comment after this long without an update",
                            gt=0, le=300)


@dataclass(frozen=True)
class ServiceConfig:
    ready_timeout_s: float = _f(
        60.0,
        "tell systemd READY this long after start even if a broker is still unreachable "
        "(alerts wait in the outbox); 0 waits for both brokers however long it takes",
        ge=0,
    )
    stall_after_s: float = _f(
        15.0,
        "the pipeline counts as wedged (no watchdog ping, /healthz 503) after this long "
        "without an inference step",
        gt=0,
    )
    cpu: Literal["auto", "none"] | int = _f(
        "auto", "the CPU the agent runs on: auto pins it to one of the CPUs it may use (the "
        "highest-numbered) unless a stream asks its backend for more than one thread; a "
        "number pins it there; none leaves it to the scheduler. Python runs one thread at a "
        "time, and threads handing that turn across cores cost it up to 1.5x the CPU")
    health: HealthConfig = _f(HealthConfig(), "local health endpoint")
    live: LiveConfig = _f(LiveConfig(), "the live page and /events on the health endpoint")


@dataclass(frozen=True)
class HomeAssistantConfig:
    enabled: bool = _f(False, "publish Home Assistant MQTT discovery configs and states on the "
                       "upstream broker")
    discovery_prefix: str = _f("homeassistant", "Home Assistant's discovery prefix (its "
                               "birth message comes on {discovery_prefix}/status)")
    score_interval_s: float = _f(5.0, "least time between two score state updates per stream "
                                 "(an episode opening or closing goes at once)", gt=0)


@dataclass(frozen=True)
class AlertConfig:
    threshold: float | Literal["auto"] = _f(
        "auto", "smoothed score above which a window counts as anomalous, or auto: learnt from "
        "the warm-up (quantile x margin)"
    )
    quantile: float = _f(1.0, "quantile of the smoothed warm-up scores (outliers dropped) used "
                         "by threshold: auto; 1 is the largest", gt=0, le=1)
    margin: float = _f(1.15, "the auto threshold is that quantile x margin", gt=0)
    consecutive: int = _f(1, "windows in a row above threshold before an episode opens (an "
                          "alert)", ge=1, le=1000)
    clear_windows: int = _f(8, "windows in a row below clear_ratio x threshold before the "
                            "episode closes (resolved)", ge=1, le=100_000)
    clear_ratio: float = _f(0.8, "an episode closes below this fraction of the threshold "
                            "(hysteresis)", gt=0, le=1)
    smoothing: float = _f(0.4, "EWMA weight of the newest window's log score before the "
                          "threshold (1: no smoothing)", gt=0, le=1)
    onset_windows: int = _f(0, "an episode opens only if the score rose from below "
                            "clear_ratio x threshold within this many windows; a slower creep "
                            "is drift the scaling follows (0: any crossing opens one)", ge=0)
    cooldown_s: float = _f(0.0, "least time between two episode openings of one stream", ge=0)


@dataclass(frozen=True)
class AdaptConfig:
    input_halflife: int = _f(
        100, "after warm-up, the centre of each level channel follows the samples of windows "
        "outside episodes with this half-life (samples); 0 keeps the warm-up's", ge=0)
    threshold_halflife: int = _f(
        500, "an auto threshold follows the level of normal scores with this half-life "
        "(windows); 0 keeps the warm-up threshold", ge=0)
    threshold_limit: float = _f(2.0, "the threshold moves at most this factor from the "
                                "warm-up's either way", ge=1)
    relearn_after_s: float = _f(
        3600.0, "an episode open this long (data time) is taken as the stream's new normal: "
        "its windows from then on are learnt from (threshold, level tracking, the detector) "
        "as normal ones are, until it closes; its resolved message says relearned. 0: never",
        ge=0)
    drift: Literal["adwin", "page_hinkley", "none"] = _f(
        "none", "drift events from a river detector on scores and channel means: adwin or "
        "page_hinkley (river.drift adds ~65 MB RSS), or none")
    drift_delta: float = _f(0.002, "drift detector sensitivity (ADWIN delta / Page-Hinkley "
                            "delta)", gt=0, le=1)
    drift_cooldown_s: float = _f(600.0, "least time between two drift events of one stream",
                                 ge=0)
    feedback: bool = _f(True, "accept labels on {prefix}/{device_id}/feedback/{stream}")
    feedback_radius: float = _f(1.5, "how close (RMS z-units) a window must be to a labelled "
                                "one to be affected", gt=0)
    feedback_weight: float = _f(1.0, "how far a label moves identical windows: 1 makes a "
                                "confirmed false alarm score like normal, a confirmed anomaly "
                                "score 2x", ge=0, le=1)
    feedback_max_labels: int = _f(64, "labels kept; the oldest is forgotten first", ge=1,
                                  le=10_000)
    detector: Literal["auto", "wgauss", "artime", "knn", "pca", "gaussian", "hst"] = _f(
        "auto", "model: none streams: auto (wgauss for one field, pca for several), wgauss "
        "(windowed Gaussian tail score), artime (fuzzy ART), knn (nearest past pattern), pca "
        "(PCA T2+Q), gaussian (EWMA level z-score), or hst (river HalfSpaceTrees, ~80 MB RSS)")
    pca_halflife: int = _f(1000, "model: none, pca: half-life (windows) of the running mean "
                           "and covariance that normal windows update (recursive PCA); 0 "
                           "keeps the warm-up's projection", ge=0)
    pca_slow: Literal["skip", "change"] = _f(
        "skip", "model: none, pca: channels the scaling treats as slow (transform diff) are "
        "left out (skip) or scored by their change within each window (change)")
    gauss_halflife: int = _f(2200, "model: none, gaussian: half-life of the long-run mean and "
                             "spread (samples)", ge=10)
    gauss_short: int = _f(10, "model: none, gaussian: samples averaged for the current level",
                          ge=1)
    hst_trees: int = _f(10, "model: none streams: HalfSpaceTrees trees", ge=1, le=100)
    hst_height: int = _f(8, "model: none streams: HalfSpaceTrees tree height", ge=1, le=20)
    hst_window: int = _f(250, "model: none streams: HalfSpaceTrees reference window (windows)",
                         ge=10)
    seed: int = _f(0, "seed of the randomised parts (HalfSpaceTrees)", ge=0)


@dataclass(frozen=True)
class PostprocessConfig:
    mode: Literal["auto", "on", "off"] = _f(
        "auto", "auto: on for single-channel model: none detectors (wgauss, artime, knn), off "
        "otherwise")
    likelihood: bool = _f(True, "score = tail probability of the recent average raw score "
                          "(log scale, in [0, 1])")
    range_rule: bool = _f(True, "a value beyond the running range (by range_frac of it) scores "
                          "1 (single-channel only)")
    range_frac: float = _f(0.1, "how far beyond the range seen so far, as a fraction of it",
                           ge=0)
    rest_windows: int = _f(120, "windows whose score is zeroed after one reaches the threshold",
                           ge=0)
    threshold: float = _f(0.45, "the alert threshold on the post-processed score when "
                          "alert.threshold is auto", gt=0, le=1)


@dataclass(frozen=True)
class BackendOptions:
    threads: int = _f(1, "CPU threads for one model call (litert num_threads, onnxruntime "
                      "intra-op threads)", ge=1, le=64)
    delegate: str = _f("", "litert: an external delegate, edgetpu or a path to a delegate "
                       ".so; empty for none")
    delegate_options: dict[str, str] = _f({}, "litert: options passed to the delegate (e.g. "
                                          "device: usb for an Edge TPU)")
    providers: list[str] = _f([], "onnxruntime: execution providers in order of preference; "
                              "empty: TensorRT and CUDA when a GPU is present, then CPU")
    precision: Literal["fp32", "fp16", "int8"] = _f(
        "fp16", "tensorrt: engine precision (int8 needs a Q/DQ-quantised ONNX model)")
    engine_cache: str = _f("", "tensorrt: directory for built engines (relative: under "
                           "state_dir); empty: <state_dir>/engines")
    workspace_mb: int = _f(256, "tensorrt: builder workspace limit in MiB", ge=16, le=65536)


@dataclass(frozen=True)
class StreamConfig:
    name: str = _req("stream name, used in upstream topics")
    topic: str = _req("MQTT topic filter to subscribe to (+ and # allowed)")
    fields: list[str] = _req("channel names in order")
    format: Literal["json", "msgpack", "csv", "float", "f32"] = _f(
        "json", "payload format: json, msgpack (the same shapes as json), csv, float (one "
        "bare number) or f32 (binary frames: README, \"Binary frames\")")
    window: int = _f(16, "samples per window", ge=2, le=65536)
    hop: int = _f(4, "samples between two windows", ge=1, le=65536)
    model: str = _f("skab-ae", "model: a shipped name, a model directory, a model.json path, "
                    "or none (river HalfSpaceTrees scores the windows)")
    warmup: int = _f(400, "samples used only to calibrate before any alert", ge=0)
    normalise: Literal["warmup", "model"] = _f(
        "warmup",
        "input scaling: warmup learns this device's channel statistics from the warm-up "
        "(model: none streams from its first half); model uses the model card's",
    )
    batch: int = _f(128, "most windows scored in one model call", ge=1, le=4096)
    max_delay_ms: float = _f(
        1.0, "longest a ready window waits for more to batch with: a full batch is scored at "
        "once on the ingest thread, anything less once its oldest window has waited this long "
        "(0: at once); windows that come this long or longer after the previous ones are "
        "scored at once, as nothing more would come in time to batch with them",
        ge=0, le=10_000)
    summary_s: float = _f(60.0, "tumbling summary period in seconds; 0 turns summaries off",
                          ge=0)
    transforms: dict[str, str] = _f(
        {}, "per field: level (scaled as is), diff (each window's own mean removed first: "
        "for slow channels such as temperatures) or auto (decided from the warm-up); "
        "unlisted fields follow the model card, or auto for model: none")
    buffer: int = _f(4096, "ring buffer length in samples (overflow drops the oldest)",
                     ge=2, le=10_000_000)
    alert: AlertConfig = _f(AlertConfig(), "alert rule")
    postprocess: PostprocessConfig = _f(PostprocessConfig(), "post-processing of raw scores "
                                        "before the threshold")
    adapt: AdaptConfig = _f(AdaptConfig(), "online adaptation: scaling, threshold, drift, "
                            "feedback")
    max_payload_bytes: int = _f(1024 * 1024, "larger payloads are dropped before decoding "
                                "(counted as oversize bad input)", ge=16, le=64 * 1024 * 1024)
    backend: Literal["auto", "litert", "onnxruntime", "tensorrt"] = _f(
        "auto", "inference backend: auto (the best one installed for the model's formats; "
        "edge-agent check-config says which and why), litert, onnxruntime or tensorrt")
    backend_options: BackendOptions = _f(BackendOptions(), "options of the inference backends "
                                         "(each reads its own)")


@dataclass(frozen=True)
class FleetConfig:
    enabled: bool = _f(False, "receive models pushed over MQTT (docs/fleet.md); needs trusted_keys")
    group: str = _f("default", "fleet group: manifests on {prefix}/fleet/{group}/model/+ apply")
    trusted_keys: dict[str, str] = _f(
        {}, "key id -> base64 Ed25519 public key (edge-agent fleet keygen prints one)"
    )
    max_model_bytes: int = _f(8 * 1024 * 1024, "largest model accepted, checked before any "
                              "allocation", ge=1, le=64 * 1024 * 1024)
    max_chunk_bytes: int = _f(256 * 1024, "largest chunk accepted", ge=64, le=16 * 1024 * 1024)
    download_timeout_s: float = _f(600.0, "a transfer still incomplete after this is refused as "
                                   "truncated", gt=0)
    resubscribe_after_s: float = _f(15.0, "with no chunk for this long, ask the broker for the "
                                    "missing ones again", gt=0)
    canary_windows: int = _f(200, "live windows the staged model scores in shadow before "
                             "promotion (0: promote at once)", ge=0)
    watch_windows: int = _f(1000, "windows after promotion during which a failed check rolls "
                            "back (0: no watch)", ge=0)
    latency_budget_ms: float = _f(50.0, "the new model's median time per model call must stay "
                                  "under this", gt=0)
    trial_timeout_s: float = _f(21600.0, "a canary or watch still undecided after this long "
                                "fails (a stream with no usable windows)", gt=0)
    max_false_alarms: float = _f(
        0.05, "of the windows the live model calls normal, the largest share the new model "
        "may flag (with its own calibrated threshold)", ge=0, le=1)
    min_agreement: float = _f(
        0.3, "least rank correlation between the new model's scores and the live model's on "
        "the same windows", ge=-1, le=1)
    max_alert_rate_increase: float = _f(
        0.05, "how much larger a fraction of windows the new model may score above the "
        "threshold than the model it replaces", ge=0, le=1,
    )


@dataclass(frozen=True)
class AgentConfig:
    device_id: str = _req("this device's id, used in topics and messages")
    streams: list[StreamConfig] = _req("sensor streams")
    state_dir: str = _f("/var/lib/edge-agent", "directory for the outbox and state")
    local: LocalConfig = _f(LocalConfig(), "local (sensor) broker")
    upstream: UpstreamConfig = _f(UpstreamConfig(), "cloud broker")
    outbox: OutboxConfig = _f(OutboxConfig(), "store-and-forward outbox")
    fleet: FleetConfig = _f(FleetConfig(), "model delivery over MQTT")
    log_level: Literal["debug", "info", "warning", "error"] = _f("info", "log level")
    checkpoint_s: float = _f(300.0, "how often adaptation state is saved under state_dir "
                             "(also on shutdown)", gt=0)
    service: ServiceConfig = _f(ServiceConfig(), "running as a system service: readiness, "
                                "watchdog, health endpoint")
    homeassistant: HomeAssistantConfig = _f(HomeAssistantConfig(), "Home Assistant MQTT "
                                            "discovery (off by default)")
    min_valid_ts: float = _f(
        1_577_836_800.0, "sample timestamps before this (epoch s; default 2020-01-01) mean "
        "the device clock is unset: the agent's receive time is used, counted as clock_unset",
        ge=0)
    base_dir: str = field(default=".", metadata={"doc": "", "internal": True})

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
    return False, tp


def _check_bounds(value: float, meta: Mapping[str, Any], path: str, problems: list[str]) -> None:
    if meta.get("ge") is not None and value < meta["ge"]:
        problems.append(f"{path}: must be >= {meta['ge']:g}, got {value!r}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        problems.append(f"{path}: must be > {meta['gt']:g}, got {value!r}")
    if meta.get("le") is not None and value > meta["le"]:
        problems.append(f"{path}: must be <= {meta['le']:g}, got {value!r}")


def _convert(value: Any, tp: Any, path: str, meta: Mapping[str, Any], problems: list[str]) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        problems.append(f"{path}: must not be empty")
        return None
    tp = inner
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)  # type: ignore[arg-type]
    if origin is Literal:
        allowed = typing.get_args(tp)
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        text = str(value) if is_number else value
        if text not in allowed:
            problems.append(f"{path}: must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return text
    if origin in (typing.Union, types.UnionType):
        # float | Literal["auto"]: try the literal first, then the number.
        for option in typing.get_args(tp):
            trial: list[str] = []
            out = _convert(value, option, path, meta, trial)
            if not trial:
                return out
        words = [a for o in typing.get_args(tp) for a in typing.get_args(o)]
        problems.append(f"{path}: must be a number or one of {words}; got {value!r}")
        return None
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            problems.append(f"{path}: must be a mapping, got {type(value).__name__}")
            return {}
        return {_convert(k, key_tp, f"{path}", {}, problems):
                _convert(v, val_tp, f"{path}.{k}", {}, problems) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{path}: must be a list, got {type(value).__name__}")
            return []
        return [_convert(v, item_tp, f"{path}[{i}]", {}, problems) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: must be an integer, got {value!r}")
            return value
        _check_bounds(value, meta, path, problems)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{path}: must be a number, got {value!r}")
            return value
        if not math.isfinite(value):
            problems.append(f"{path}: must be finite, got {value!r}")
            return value
        _check_bounds(float(value), meta, path, problems)
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            problems.append(f"{path}: must be a string, got {type(value).__name__}")
            return value
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in this module


def _build(cls: type[Any], raw: Any, path: str, problems: list[str]) -> Any:
    prefix = f"{path}." if path else ""
    if not isinstance(raw, Mapping):
        problems.append(f"{path or '(top level)'}: must be a mapping, got {type(raw).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in fields:
            close = [n for n in fields if n.replace("_", "") == str(key).replace("_", "").lower()]
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{prefix}{key}: unknown key{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], f"{prefix}{name}", f.metadata, problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{prefix}{name}: required ({f.metadata.get('doc', '')})")
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # missing required fields are already reported


def _semantic_checks(cfg: AgentConfig, problems: list[str]) -> None:
    if not _NAME_RE.match(cfg.device_id):
        problems.append("device_id: use 1-64 letters, digits, '_', '-' or '.' "
                        "(it is a topic level)")
    if not cfg.upstream.prefix or any(c in cfg.upstream.prefix for c in "+#"):
        problems.append("upstream.prefix: must be a non-empty topic without wildcards")
    seen: set[str] = set()
    for i, s in enumerate(cfg.streams):
        p = f"streams[{i}]"
        if not _NAME_RE.match(s.name):
            problems.append(f"{p}.name: use 1-64 letters, digits, '_', '-' or '.'")
        if s.name in seen:
            problems.append(f"{p}.name: duplicate stream name {s.name!r}")
        seen.add(s.name)
        if not s.fields:
            problems.append(f"{p}.fields: list at least one channel")
        if len(set(s.fields)) != len(s.fields):
            problems.append(f"{p}.fields: channel names must be unique")
        if "ts" in s.fields:
            problems.append(f"{p}.fields: 'ts' is reserved for the timestamp")
        if s.format == "float" and len(s.fields) != 1:
            problems.append(f"{p}.format: float payloads carry one channel; "
                            f"fields has {len(s.fields)}")
        if not _valid_filter(s.topic):
            problems.append(f"{p}.topic: not a valid MQTT topic filter: {s.topic!r}")
        if s.hop > s.window:
            problems.append(f"{p}.hop: must be <= window ({s.window}); samples would be skipped")
        if 0 < s.summary_s < 0.1:
            problems.append(f"{p}.summary_s: use 0 (off) or at least 0.1 s")
        if s.model == "none":
            _warmup_check(s, p, problems)
        if (s.model == "none" and detector_for(s) in UNIVARIATE and len(s.fields) != 1):
            problems.append(f"{p}.adapt.detector: {detector_for(s)} scores one channel; "
                            f"fields has {len(s.fields)} (use pca for several)")
        for f, t in s.transforms.items():
            if f not in s.fields:
                problems.append(f"{p}.transforms.{f}: not one of the stream's fields")
            if t not in ("level", "diff", "auto"):
                problems.append(f"{p}.transforms.{f}: must be level, diff or auto; got {t!r}")
        if s.model == "none" and s.normalise == "model":
            problems.append(f"{p}.normalise: model needs a model; with model: none use warmup")
        _backend_checks(s, p, problems)
        if s.buffer < s.window + s.hop:
            problems.append(f"{p}.buffer: must hold at least window + hop = "
                            f"{s.window + s.hop} samples")
    if not cfg.streams:
        problems.append("streams: configure at least one stream")
    if cfg.upstream.reconnect_max_s < cfg.upstream.reconnect_min_s:
        problems.append("upstream.reconnect_max_s: must be >= reconnect_min_s")
    _fleet_checks(cfg, problems)
    _service_checks(cfg, problems)
    tls_sections = (("local", cfg.local.tls), ("upstream", cfg.upstream.tls))
    for section, tls in tls_sections:
        if tls is None:
            continue
        for attr in ("ca_file", "cert_file", "key_file"):
            value = getattr(tls, attr)
            if value is not None and not cfg.resolve(value).is_file():
                problems.append(f"{section}.tls.{attr}: file not found: {value}")
        if (tls.cert_file is None) != (tls.key_file is None):
            problems.append(f"{section}.tls: cert_file and key_file go together")


def _backend_checks(s: StreamConfig, p: str, problems: list[str]) -> None:
    o = s.backend_options
    if s.model == "none" and s.backend != "auto":
        problems.append(f"{p}.backend: model: none streams run a detector, not a backend; "
                        f"leave it auto")
    if o.delegate and s.backend not in ("auto", "litert"):
        problems.append(f"{p}.backend_options.delegate: only litert loads delegates "
                        f"(backend is {s.backend})")
    if o.delegate_options and not o.delegate:
        problems.append(f"{p}.backend_options.delegate_options: set delegate as well")
    if o.providers and s.backend not in ("auto", "onnxruntime"):
        problems.append(f"{p}.backend_options.providers: only onnxruntime has execution "
                        f"providers (backend is {s.backend})")
    for i, prov in enumerate(o.providers):
        if not prov.endswith("ExecutionProvider"):
            problems.append(f"{p}.backend_options.providers[{i}]: {prov!r} is not an "
                            f"onnxruntime provider name (e.g. CPUExecutionProvider)")
    if len(set(o.providers)) != len(o.providers):
        problems.append(f"{p}.backend_options.providers: list each provider once")


def _fleet_checks(cfg: AgentConfig, problems: list[str]) -> None:
    fleet = cfg.fleet
    if not _NAME_RE.match(fleet.group):
        problems.append("fleet.group: use 1-64 letters, digits, '_', '-' or '.' "
                        "(it is a topic level)")
    if fleet.enabled and not fleet.trusted_keys:
        problems.append("fleet.trusted_keys: fleet.enabled needs at least one trusted key")
    for key_id, text in fleet.trusted_keys.items():
        if not _NAME_RE.match(str(key_id)):
            problems.append(f"fleet.trusted_keys.{key_id}: key ids use 1-64 letters, digits, "
                            "'_', '-' or '.'")
        try:
            raw = base64.b64decode(str(text), validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) != 32:
            problems.append(f"fleet.trusted_keys.{key_id}: not a base64 Ed25519 public key "
                            "(32 bytes)")


def is_loopback(host: str) -> bool:
    """Whether an address to bind stays on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _service_checks(cfg: AgentConfig, problems: list[str]) -> None:
    hc, live = cfg.service.health, cfg.service.live
    if isinstance(cfg.service.cpu, int) and cfg.service.cpu < 0:
        problems.append("service.cpu: a CPU number is 0 or more (or auto, or none)")
    if hc.token is not None and len(hc.token) < 16:
        problems.append("service.health.token: use at least 16 characters")
    # The page shows the device's data to whoever can reach the port.
    if hc.port and live.enabled and not is_loopback(hc.host) and not hc.token:
        problems.append(f"service.health.host: the live page would be served on {hc.host} "
                        "without auth; set service.health.token, bind to 127.0.0.1, or set "
                        "service.live.enabled: false")
    ha = cfg.homeassistant
    if not ha.discovery_prefix or any(c in ha.discovery_prefix for c in "+#"):
        problems.append("homeassistant.discovery_prefix: must be a non-empty topic without "
                        "wildcards")


def _warmup_check(s: StreamConfig, p: str, problems: list[str]) -> None:
    det = detector_for(s)
    if det == "hst":
        need, how = 2 * (s.window + s.adapt.hst_window * s.hop), \
            "2 x (window + adapt.hst_window x hop)"
        what = "its scaling, then its detector"
    elif det == "gaussian":
        # The Gaussian needs ~100 windows' worth of samples before its spread means anything.
        need, how = 2 * (s.window + 100 * s.hop), "2 x (window + 100 x hop)"
        what = "its detector"
    elif det == "pca":
        # Its covariance is fitted on the warm-up windows (and scored out of fold).
        need, how = s.window + 50 * s.hop, "window + 50 x hop"
        what = "its scaling and principal components"
    else:
        # The likelihood fits its first Gaussian after 100 windows; the range and the
        # reference statistics need about as many samples.
        need, how = s.window + 100 * s.hop, "window + 100 x hop"
        what = "its range, reference and score statistics"
    if s.warmup < need:
        problems.append(f"{p}.warmup: model: none learns {what} in warm-up; use at least "
                        f"{how} = {need} samples")


def detector_for(s: StreamConfig) -> str:
    """The detector a model: none stream runs (``auto`` resolved by its field count)."""
    if s.adapt.detector != "auto":
        return s.adapt.detector
    return "wgauss" if len(s.fields) == 1 else "pca"


def postprocess_on(s: StreamConfig) -> bool:
    """Whether a stream's raw scores go through the post-processing stage."""
    if s.postprocess.mode != "auto":
        return s.postprocess.mode == "on"
    return s.model == "none" and len(s.fields) == 1 and detector_for(s) in UNIVARIATE


# Detectors that score one channel and learn online from raw values.
UNIVARIATE = ("wgauss", "artime", "knn")


def _valid_filter(topic: str) -> bool:
    if not topic or len(topic.encode()) > 65535 or "\x00" in topic:
        return False
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def parse_config(raw: Any, base_dir: str | Path = ".") -> AgentConfig:
    """Validate an already-parsed YAML document; raise ConfigError listing every problem."""
    problems: list[str] = []
    cfg = _build(AgentConfig, raw, "", problems)
    if cfg is not None and not problems:
        cfg = dataclasses.replace(cfg, base_dir=str(base_dir))
        _semantic_checks(cfg, problems)
    if problems or cfg is None:
        raise ConfigError(problems or ["(top level): empty config"])
    return typing.cast(AgentConfig, cfg)


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"(file) {path}: {e.strerror or e}"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"(file) {path}: not UTF-8 text (byte {e.start})"]) from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError([f"(yaml) {where}: {getattr(e, 'problem', None) or e}"]) from e
    return parse_config(raw, base_dir=path.resolve().parent)
