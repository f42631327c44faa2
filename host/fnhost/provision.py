"""Create or update the streams, consumers, KV buckets and object stores fn.yaml declares.

Idempotent: what exists with the declared config is left alone, what differs
in an updatable setting is updated, and a setting JetStream cannot change in
place (storage, retention, a consumer's deliver policy) is an error that says
what to do. Nothing is ever deleted.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from fnhost.errors import ConfigError
from fnhost.manifest import FunctionSpec, KVSpec, Manifest, ObjectStoreSpec, StreamSpec

log = logging.getLogger("fnhost.provision")

_FIXED_STREAM_FIELDS = ("storage", "retention")
_UPDATABLE_STREAM_FIELDS = (
    "subjects",
    "num_replicas",
    "max_age",
    "max_msgs",
    "max_bytes",
    "duplicate_window",
    "discard",
)
_FIXED_CONSUMER_FIELDS = ("deliver_policy", "opt_start_seq", "opt_start_time")
_UPDATABLE_CONSUMER_FIELDS = ("ack_wait", "max_deliver", "max_ack_pending")


async def provision(js: JetStreamContext, manifest: Manifest) -> None:
    """Provision everything the manifest declares (streams first: consumers need them)."""
    for name, stream in manifest.streams.items():
        await ensure_stream(js, stream_config(name, stream))
    for bucket, kv in manifest.kv.items():
        await ensure_kv(js, kv_config(bucket, kv))
    for store, spec in manifest.object_stores.items():
        await ensure_object_store(js, object_store_config(store, spec))
    for function in manifest.functions.values():
        if function.trigger.kind == "stream":
            await ensure_consumer(js, function)


def stream_config(name: str, spec: StreamSpec) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=list(spec.subjects),
        storage=StorageType(spec.storage),
        retention=RetentionPolicy(spec.retention),
        discard=DiscardPolicy(spec.discard),
        num_replicas=spec.replicas,
        max_age=spec.max_age or 0,
        max_msgs=spec.max_msgs if spec.max_msgs is not None else -1,
        max_bytes=spec.max_bytes if spec.max_bytes is not None else -1,
        duplicate_window=spec.duplicate_window,
    )


def consumer_config(function: FunctionSpec) -> ConsumerConfig:
    """The durable pull consumer of a stream function.

    ``backoff`` is left unset on purpose: JetStream would use its steps as the
    ack wait of each delivery, redelivering a handler slower than the first
    step while it runs. Retry delays are naks with a delay instead.
    """
    trigger = function.trigger
    durable = trigger.durable_name
    return ConsumerConfig(
        name=durable,
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=trigger.ack_wait,
        max_deliver=function.retry.max_deliver,
        max_ack_pending=trigger.effective_max_ack_pending(function.concurrency),
        filter_subjects=list(trigger.subjects) or None,
        deliver_policy=DeliverPolicy(trigger.deliver),
        opt_start_seq=trigger.start_sequence,
        opt_start_time=trigger.start_time,
    )


def kv_config(bucket: str, spec: KVSpec) -> KeyValueConfig:
    return KeyValueConfig(bucket=bucket, ttl=spec.ttl, history=spec.history, replicas=spec.replicas)


def object_store_config(name: str, spec: ObjectStoreSpec) -> ObjectStoreConfig:
    return ObjectStoreConfig(bucket=name, replicas=spec.replicas)


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("created stream %s %s", config.name, config.subjects)
        return
    current = info.config
    _refuse_fixed_changes(f"stream {config.name}", current, config, _FIXED_STREAM_FIELDS)
    changed = _changed(current, config, _UPDATABLE_STREAM_FIELDS)
    if changed:
        await js.update_stream(dataclasses.replace(current, **changed))
        log.info("updated stream %s: %s", config.name, ", ".join(sorted(changed)))


async def ensure_consumer(js: JetStreamContext, function: FunctionSpec) -> None:
    """Create the function's durable consumer, or update it when its config changed."""
    stream = function.trigger.stream
    assert stream is not None
    config = consumer_config(function)
    assert config.durable_name is not None
    try:
        info = await js.consumer_info(stream, config.durable_name)
    except NotFoundError:
        await js.add_consumer(stream, config)
        log.info("created consumer %s on stream %s", config.durable_name, stream)
        return
    current = info.config
    if current.deliver_subject:
        raise ConfigError(
            f"consumer {config.durable_name} on stream {stream} is a push consumer; "
            "fnhost needs a pull consumer: delete it or pick another durable"
        )
    _refuse_fixed_changes(
        f"consumer {config.durable_name} on stream {stream}",
        current,
        config,
        _FIXED_CONSUMER_FIELDS,
    )
    changed = _changed(current, config, _UPDATABLE_CONSUMER_FIELDS)
    if _filters(current) != _filters(config):
        # The server may keep a single filter as filter_subject: compare the effective set.
        changed.update(filter_subject=None, filter_subjects=config.filter_subjects)
    if changed:
        await js.add_consumer(stream, dataclasses.replace(current, **changed))
        log.info("updated consumer %s: %s", config.durable_name, ", ".join(sorted(changed)))


async def ensure_kv(js: JetStreamContext, config: KeyValueConfig) -> None:
    await _ensure_backing_stream(
        js,
        f"KV_{config.bucket}",
        {
            "max_age": config.ttl or 0,
            "max_msgs_per_subject": config.history,
            "num_replicas": config.replicas,
        },
        lambda: js.create_key_value(config),
    )


async def ensure_object_store(js: JetStreamContext, config: ObjectStoreConfig) -> None:
    bucket = config.bucket
    assert bucket is not None
    await _ensure_backing_stream(
        js,
        f"OBJ_{bucket}",
        {"num_replicas": config.replicas},
        # nats-py overwrites config.bucket with its bucket argument: pass both.
        lambda: js.create_object_store(bucket, config=config),
    )


async def _ensure_backing_stream(
    js: JetStreamContext, stream: str, wanted: dict[str, Any], create: Any
) -> None:
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        await create()
        log.info("created %s", stream)
        return
    changed = {
        key: value
        for key, value in wanted.items()
        if _norm(getattr(info.config, key)) != _norm(value)
    }
    if changed:
        await js.update_stream(dataclasses.replace(info.config, **changed))
        log.info("updated %s: %s", stream, ", ".join(sorted(changed)))


def _filters(config: ConsumerConfig) -> set[str]:
    return set(config.filter_subjects or ()) | (
        {config.filter_subject} if config.filter_subject else set()
    )


def _changed(current: Any, wanted: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    return {
        field: getattr(wanted, field)
        for field in fields
        if _norm(getattr(current, field)) != _norm(getattr(wanted, field))
    }


def _refuse_fixed_changes(what: str, current: Any, wanted: Any, fields: tuple[str, ...]) -> None:
    for field in fields:
        have, want = _norm(getattr(current, field)), _norm(getattr(wanted, field))
        if want is not None and have != want:
            raise ConfigError(
                f"{what}: {field} is {have!r} on the server but {want!r} in fn.yaml; JetStream "
                f"cannot change it in place (delete and re-create it, or keep {have!r})"
            )


def _norm(value: Any) -> Any:
    """Compare server and manifest values alike: enums by value, unset limits as None."""
    if hasattr(value, "value"):
        value = value.value
    if isinstance(value, list):
        return sorted(value) or None
    if value in (-1, 0, None, ""):
        return None
    if isinstance(value, float):
        return round(value, 3)
    return value
