"""Text shown on a node in ComfyUI's UI (its progress text), next to the console log."""

from __future__ import annotations

import sys


def show(node_id: str | None, text: str) -> None:
    """Show ``text`` on node ``node_id``. Nothing happens without a running server (scripts, tests that
    sample without one): the server module is only looked up, never imported."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if node_id is not None and instance is not None:
        instance.send_progress_text(text, str(node_id))
