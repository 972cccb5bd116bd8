"""Reading the links of the API-format prompt a node runs in (its hidden ``prompt`` input)."""

from __future__ import annotations


def consumers(prompt, node_id, output: int) -> list[dict]:
    """The nodes of ``prompt`` with an input linked to output ``output`` of node ``node_id``."""
    if not isinstance(prompt, dict):
        return []
    found = []
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        values = inputs.values() if isinstance(inputs, dict) else ()
        links = [v for v in values if isinstance(v, list) and len(v) == 2]
        if any(str(source) == str(node_id) and index == output for source, index in links):
            found.append(node)
    return found


def consumed(node_cls, output: int) -> bool:
    """Whether an executing V3 node's output ``output`` is linked to any node; True outside ComfyUI's
    executor (no hidden inputs), where the caller may use every output."""
    hidden = node_cls.hidden
    if hidden is None or hidden.prompt is None:
        return True
    return bool(consumers(hidden.prompt, hidden.unique_id, output))
