"""The policy store of an agent that is not a Raft voter: it reads and watches the policy
through the Control API of voter agents (`[policy] voters`) and sends writes there.

The agent presents its own node certificate (`[control]` cert/key/ca) and, for a write made on
behalf of one of its Control API callers, names that caller in the `infermesh-on-behalf-of`
metadata, so the voter checks the caller's role. It keeps the last policy it read: a voter that
goes away only means the next voter is tried (with capped exponential backoff), never that the
agent stops or its scoring loses the policy. Changes arrive through `SubscribeEvents`; a voter
without that RPC is polled with `GetPolicy` every second instead.

`RemoteOptions`, `write_calls`, `write_error` and `Backoff` decide (no I/O); `RemotePolicyStore`
is the gRPC shell around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import attrs
import grpc
import grpc.aio

from infermesh.agent.api.caller import forwarding_metadata
from infermesh.agent.certs import IdentityError, identity_from_certificate
from infermesh.agent.policy.broadcast import PolicyBroadcast
from infermesh.agent.tls import CALLER, TLSFileError, read_pem
from infermesh.core.config import parse_host_port
from infermesh.core.logging import get_logger
from infermesh.core.policy import (
    DeletePolicy,
    DrainNode,
    NotLeaderError,
    PolicyCommand,
    PolicyError,
    PolicyKind,
    PolicySet,
    PolicyStoreContext,
    PolicyStoreStatus,
    UndrainNode,
    command_to_document,
)
from infermesh.core.proto import control_pb2, control_pb2_grpc

__all__ = [
    "Backoff",
    "PolicyPermissionError",
    "RemoteOptions",
    "RemotePolicyStore",
    "write_calls",
    "write_error",
]

log = get_logger("infermesh.agent.policy.remote")

POLL_INTERVAL_S = 1.0
"""How often a voter without SubscribeEvents is asked for the policy."""
CONNECT_TIMEOUT_S = 2.0
"""How long one voter may take to accept a connection before the next one is tried."""
FIRST_RETRY_S = 0.1

# Short reconnect backoff: a voter that restarts is read again within a second or two instead
# of after gRPC's default backoff (up to two minutes).
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class PolicyPermissionError(PermissionError):
    """A voter refused a forwarded write: the caller's (or this node's) role may not make it."""


# --------------------------------------------------------------------------- decisions


def _positive(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise PolicyError(f"policy.{key}: must be a number > 0, got {value!r}")
    return float(value)


@attrs.frozen
class RemoteOptions:
    """The `remote` store's options (`PolicyConfig.store_options`), checked."""

    voters: tuple[str, ...]
    """Control API `host:port` of voter agents, tried in this order."""
    cert: str
    key: str
    ca: str
    watch_retry_s: float = 5.0
    resync_s: float = 30.0
    timeout_s: float = 10.0

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> RemoteOptions:
        """Read the options; errors name the config key (`policy.voters`, `control.cert`)."""
        voters = options.get("voters")
        if not isinstance(voters, list | tuple) or not voters:
            raise PolicyError(
                f"policy.voters: must list the Control API HOST:PORT of voter agents, "
                f"got {voters!r}"
            )
        for index, voter in enumerate(voters):
            try:
                parse_host_port(voter if isinstance(voter, str) else "")
            except ValueError as exc:
                raise PolicyError(f"policy.voters[{index}]: {exc}") from None
        files = {}
        for name in ("cert", "key", "ca"):
            value = options.get(name)
            if not isinstance(value, str) or not value:
                raise PolicyError(
                    f"control.{name}: needed by [policy] voters (this agent presents its node "
                    "certificate to the voters)"
                )
            files[name] = value
        return cls(
            tuple(voters),
            watch_retry_s=_positive(options, "watch_retry_s", 5.0),
            resync_s=_positive(options, "resync_s", 30.0),
            timeout_s=_positive(options, "timeout_s", 10.0),
            **files,
        )


@attrs.define
class Backoff:
    """Waits between voter failures: 0.1 s doubling up to `cap_s`; `reset()` after a success."""

    cap_s: float
    failures: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap_s, FIRST_RETRY_S * 2.0 ** min(self.failures, 30))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


def write_calls(command: PolicyCommand) -> list[tuple[str, Any]]:
    """The Control RPCs that make `command` on a voter: (method, request), best first.

    A pin goes through PinModel/UnpinModel (an operator may pin) with SetPolicy/DeletePolicy as
    the fallback for a voter that lacks them; every other command has one RPC.
    """
    if isinstance(command, DrainNode):
        return [
            ("DrainNode", control_pb2.DrainNodeRequest(node=command.node, reason=command.reason))
        ]
    if isinstance(command, UndrainNode):
        return [("UndrainNode", control_pb2.UndrainNodeRequest(node=command.node))]
    if isinstance(command, DeletePolicy):
        delete = (
            "DeletePolicy",
            control_pb2.DeletePolicyRequest(kind=command.kind.value, name=command.name),
        )
        if command.kind is PolicyKind.PINS:
            return [("UnpinModel", control_pb2.UnpinModelRequest(model=command.name)), delete]
        return [delete]
    value = command_to_document(command)["value"]
    generic = (
        "SetPolicy",
        control_pb2.SetPolicyRequest(
            kind=command.kind.value, name=command.name, value_json=json.dumps(value, sort_keys=True)
        ),
    )
    if command.kind is PolicyKind.PINS:
        pin = control_pb2.PinModelRequest(
            model=command.name,
            nodes=list(value.get("nodes", [])),
            min_replicas=int(value.get("min_replicas", 0)),
        )
        return [("PinModel", pin), generic]
    return [generic]


def write_error(endpoint: str, method: str, code: grpc.StatusCode, details: str) -> Exception:
    """The store error for a voter's refusal of a write, keeping the voter's own words.

    A refused value is a PolicyError (the caller fixes it); a refused role is a
    PolicyPermissionError; anything else means the write was not committed (NotLeaderError).
    """
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        return PolicyError(details)
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return PolicyPermissionError(f"the policy voter at {endpoint} refused {method}: {details}")
    return NotLeaderError(
        f"the policy voter at {endpoint} did not commit {method} ({code.name}: {details})"
    )


def _is_news(event: Any, revision: int) -> bool:
    """Whether an event may announce a policy newer than `revision` (replayed ones do not)."""
    text = event.attributes.get("revision", "")
    return not text.isdigit() or int(text) > revision


def _read_identity(options: RemoteOptions) -> grpc.ChannelCredentials:
    """Client credentials from the node certificate; PolicyError naming the `control.` key."""
    pems = {}
    for name, what in (("cert", "certificate"), ("key", "key"), ("ca", "CA certificate")):
        try:
            pems[name] = read_pem(getattr(options, name), what)
        except TLSFileError as exc:
            raise PolicyError(f"control.{name}: {exc} (needed by [policy] voters)") from None
    try:
        identity = identity_from_certificate(pems["cert"])
    except IdentityError as exc:
        raise PolicyError(f"control.cert: {options.cert}: {exc}") from None
    if identity.role != "node":
        raise PolicyError(
            f"control.cert: {options.cert} is a {identity.role} certificate ({identity.uri}); "
            "[policy] voters need a node certificate (infermesh certs issue NAME --role node)"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=pems["ca"], private_key=pems["key"], certificate_chain=pems["cert"]
    )


# --------------------------------------------------------------------------- the store


class RemotePolicyStore:
    """`PolicyStore` of a non-voter: the voters' policy, read and watched over the Control API."""

    def __init__(self, context: PolicyStoreContext) -> None:
        self.options = RemoteOptions.from_mapping(context.options)
        self._broadcast = PolicyBroadcast()
        self._credentials: grpc.ChannelCredentials | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._index = 0
        self._reading_from: str | None = None
        self._backoff = Backoff(self.options.watch_retry_s)
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ PolicyStore

    async def start(self) -> None:
        """Read the node certificate, read the policy from the first voter that answers, and
        follow it in the background; no reachable voter is a warning, not an error."""
        self._credentials = await asyncio.to_thread(_read_identity, self.options)
        if not await self._read_from_any():
            log.warning(
                "no policy voter reachable yet; keeping the empty policy and retrying",
                voters=list(self.options.voters),
            )
        self._task = asyncio.create_task(self._follow(), name="infermesh remote policy watch")

    async def get(self) -> PolicySet:
        return self._broadcast.policy

    async def submit(self, command: PolicyCommand) -> PolicySet:
        """Make `command` on a voter (the first that accepts a connection, the one read from
        first); the policy it answers with, once this store holds it too."""
        if self._credentials is None:
            raise NotLeaderError("the remote policy store is not started")
        metadata = forwarding_metadata(CALLER.get(None))
        for endpoint in self._voter_order():
            stub = await self._ready_stub(endpoint)
            if stub is None:
                continue
            reply = await self._write(endpoint, stub, command, metadata)
            policy = _parse(reply)
            self._broadcast.publish(policy)
            return policy
        raise NotLeaderError(
            f"no policy voter is reachable (policy.voters: {', '.join(self.options.voters)})"
        )

    def watch(self) -> AsyncIterator[PolicySet]:
        return self._broadcast.watch()

    async def status(self) -> PolicyStoreStatus:
        return PolicyStoreStatus(
            "reader", self._reading_from, self.options.voters, self._broadcast.policy.revision
        )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
        self._credentials = None  # a later submit() is refused as "not started"
        self._reading_from = None
        self._broadcast.close()

    # ------------------------------------------------------------------ reading

    def _stub(self, endpoint: str) -> control_pb2_grpc.ControlStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            assert self._credentials is not None
            channel = grpc.aio.secure_channel(endpoint, self._credentials, options=_CHANNEL_OPTIONS)
            self._channels[endpoint] = channel
        return control_pb2_grpc.ControlStub(channel)

    def _voter_order(self) -> list[str]:
        voters = self.options.voters
        return [voters[(self._index + i) % len(voters)] for i in range(len(voters))]

    async def _refresh(self, endpoint: str, timeout_s: float | None = None) -> None:
        """GetPolicy from `endpoint` into the broadcast; an unreadable document is logged and
        the last good policy kept. gRPC errors propagate (the caller rotates voters)."""
        reply = await self._stub(endpoint).GetPolicy(
            control_pb2.GetPolicyRequest(), timeout=timeout_s or self.options.timeout_s
        )
        try:
            policy = _parse(reply)
        except PolicyError as exc:
            log.warning(
                "unreadable policy from voter; keeping the last one", voter=endpoint, error=str(exc)
            )
            return
        self._broadcast.publish(policy)

    async def _read_from_any(self) -> bool:
        """One GetPolicy round over the voters; True (and that voter current) when one answered."""
        for offset, endpoint in enumerate(self._voter_order()):
            try:
                await self._refresh(endpoint, CONNECT_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                log.debug("policy voter did not answer", voter=endpoint, code=exc.code().name)
                continue
            self._index = (self._index + offset) % len(self.options.voters)
            self._now_reading(endpoint)
            return True
        return False

    def _now_reading(self, endpoint: str) -> None:
        if self._reading_from != endpoint:
            log.info(
                "reading policy from voter",
                voter=endpoint,
                revision=self._broadcast.policy.revision,
            )
        self._reading_from = endpoint

    async def _follow(self) -> None:
        """Follow one voter at a time, forever; after a failure wait, then try the next."""
        while True:
            endpoint = self.options.voters[self._index]
            try:
                await self._follow_voter(endpoint)
                log.info("policy voter closed the event stream", voter=endpoint)
            except grpc.aio.AioRpcError as exc:
                # Loud once per outage; the retries of a long one would flood the log.
                report = log.warning if self._backoff.failures == 0 else log.debug
                report(
                    "policy voter unavailable; trying the next",
                    voter=endpoint,
                    code=exc.code().name,
                    details=exc.details(),
                )
            except Exception as exc:  # a bug must not end the watch: scoring keeps the last policy
                log.warning(
                    "policy watch failed; trying the next voter", voter=endpoint, error=repr(exc)
                )
            self._reading_from = None
            self._index = (self._index + 1) % len(self.options.voters)
            await asyncio.sleep(self._backoff.next_delay())

    async def _follow_voter(self, endpoint: str) -> None:
        """Read `endpoint`'s policy, then re-read it on each policy or drain event (and every
        `resync_s`) until the stream fails or ends; a voter without SubscribeEvents is polled."""
        await self._refresh(endpoint)
        self._now_reading(endpoint)
        self._backoff.reset()
        call = self._stub(endpoint).SubscribeEvents(
            control_pb2.SubscribeEventsRequest(follow=True, kinds=["policy", "drain"])
        )
        resync = asyncio.create_task(self._resync_every(endpoint, self.options.resync_s))
        try:
            try:
                async for event in call:
                    if _is_news(event, self._broadcast.policy.revision):
                        await self._refresh(endpoint)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info("policy voter has no SubscribeEvents; polling it", voter=endpoint)
                while True:
                    await asyncio.sleep(POLL_INTERVAL_S)
                    await self._refresh(endpoint)
        finally:
            call.cancel()
            resync.cancel()
            await asyncio.gather(resync, return_exceptions=True)

    async def _resync_every(self, endpoint: str, interval_s: float) -> None:
        """Anti-entropy: re-read the whole policy now and then (a lost event cannot stick)."""
        while True:
            await asyncio.sleep(interval_s)
            with contextlib.suppress(grpc.aio.AioRpcError):  # the event stream decides
                await self._refresh(endpoint)

    # ------------------------------------------------------------------ writing

    async def _ready_stub(self, endpoint: str) -> control_pb2_grpc.ControlStub | None:
        """The stub for `endpoint` once its channel is connected; None when it cannot connect
        within CONNECT_TIMEOUT_S (the next voter is tried)."""
        stub = self._stub(endpoint)
        channel = self._channels[endpoint]
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            log.info("policy voter unreachable for a write", voter=endpoint)
            return None
        return stub

    async def _write(
        self,
        endpoint: str,
        stub: control_pb2_grpc.ControlStub,
        command: PolicyCommand,
        metadata: Sequence[tuple[str, str]],
    ) -> control_pb2.PolicyDocument:
        """Send `command` to `endpoint`, falling back to the next RPC only when the voter does
        not implement one; a refusal becomes a store error (`write_error`)."""
        calls = write_calls(command)
        for position, (method, request) in enumerate(calls):
            try:
                reply: control_pb2.PolicyDocument = await getattr(stub, method)(
                    request, timeout=self.options.timeout_s, metadata=metadata
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNIMPLEMENTED and position + 1 < len(calls):
                    continue
                raise write_error(endpoint, method, code, exc.details() or "") from None
            return reply
        raise AssertionError("unreachable: write_calls returns at least one call")


def _parse(reply: control_pb2.PolicyDocument) -> PolicySet:
    try:
        document = json.loads(reply.json)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"the voter's policy document is not JSON ({exc})") from None
    return PolicySet.from_document(document)
