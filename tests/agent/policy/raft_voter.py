"""A Raft policy-store voter in its own process, driven by JSON lines on stdin (test helper).

`python raft_voter.py DATA_DIR LISTEN VOTER,VOTER,... PASSWORD`; each stdin line is
`{"op": "status"}` or `{"op": "submit", "command": {...}}` and gets one JSON line back.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from infermesh.agent.policy.raft import RaftPolicyStore
from infermesh.core.policy import (
    NotLeaderError,
    PolicyError,
    PolicyStoreContext,
    command_from_document,
)


async def answer(store: RaftPolicyStore, request: dict[str, Any]) -> dict[str, Any]:
    if request["op"] == "submit":
        try:
            policy = await store.submit(command_from_document(request["command"]))
        except (PolicyError, NotLeaderError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"policy": policy.to_document()}
    status = await store.status()
    policy = await store.get()
    return {"role": status.role, "leader": status.leader, "policy": policy.to_document()}


async def main(data_dir: str, listen: str, voters: str, password: str) -> None:
    options = {
        "listen": listen,
        "voters": voters.split(","),
        "password": password,
        "election_timeout_s": [0.4, 1.2],
        "heartbeat_s": 0.05,
        "commit_timeout_s": 2.0,
    }
    store = RaftPolicyStore(PolicyStoreContext(node=listen, data_dir=data_dir, options=options))
    await store.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": listen}), flush=True)
    while line := await reader.readline():
        print(json.dumps(await answer(store, json.loads(line))), flush=True)
    await store.aclose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
