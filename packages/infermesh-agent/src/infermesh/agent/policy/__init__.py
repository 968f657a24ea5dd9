"""Policy-store backends of the agent: where the operator policy lives on this node.

`local.LocalPolicyStore` keeps a one-node store in a JSON document; `raft.RaftPolicyStore`
replicates it with PySyncObj. Both hand out `infermesh.core.policy.PolicySet` values and share
`broadcast.PolicyBroadcast` for `watch()`. Nothing here is imported until a store is built.
"""

from __future__ import annotations
