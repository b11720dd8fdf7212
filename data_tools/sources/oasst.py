"""OpenAssistant/oasst1 (and oasst2): flat message rows (`message_id`, `parent_id`,
`message_tree_id`, `role` prompter|assistant, `text`, `rank`, `deleted`, `lang`, ...).
Rows are grouped by message tree; under each prompter message, its ranked assistant replies
(rank 0 = preferred) are one group whose prompt is the conversation from the tree's root down to
that prompter message. Deleted messages, replies without a rank and conversations with a
deleted or missing message are left out and counted; `--oasst-lang` keeps only prompts in the
given languages."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

from data_tools.sources.base import (
    Candidate,
    Drop,
    Format,
    Group,
    Item,
    RowError,
    boolean,
    check_unique_ranks,
    optional_number,
    optional_text,
    text,
)

ROLES = {"prompter": "user", "assistant": "assistant"}


class OASST(Format):
    name = "oasst"
    summary = "OpenAssistant message trees (flat rows with message_id, parent_id, role, rank)"
    yields = "ranks"
    option_names = frozenset({"oasst_lang"})
    grouped = True

    def parse(self, row: dict, where: str) -> tuple[str, Any]:
        role = text(row, "role", where)
        if role not in ROLES:
            raise RowError(where, "role", f"field 'role': expected prompter or assistant, got {role!r}", "bad_value")
        record = {
            "where": where,
            "id": text(row, "message_id", where),
            "parent": optional_text(row, "parent_id", where),
            "role": role,
            "text": text(row, "text", where),
            "rank": optional_number(row, "rank", where),
            "deleted": boolean(row, "deleted", where) if row.get("deleted") is not None else False,
            "lang": optional_text(row, "lang", where),
        }
        return text(row, "message_tree_id", where), record

    def group_items(self, records: list[Any]) -> Iterable[Item]:
        by_id = {r["id"]: r for r in records}
        children: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            if r["parent"] is not None:
                children[r["parent"]].append(r)
        langs = set(self.opts.oasst_lang or ())
        out: list[Item] = []
        for parent in records:
            if parent["role"] != "prompter":
                continue
            replies = [c for c in children.get(parent["id"], ()) if c["role"] == "assistant"]
            if not replies:
                out.append(Drop("prompt without replies"))
                continue
            if parent["deleted"]:
                out.append(Drop("conversation with a deleted message"))
                continue
            if langs and parent["lang"] not in langs:
                out.append(Drop("prompt language not selected (--oasst-lang)"))
                continue
            kept = []
            for reply in replies:
                if reply["deleted"]:
                    out.append(Drop("deleted reply"))
                elif reply["rank"] is None:
                    out.append(Drop("reply without a rank"))
                else:
                    kept.append(reply)
            conversation = self._conversation(parent, by_id)
            if isinstance(conversation, Drop):
                out.append(conversation)
                continue
            check_unique_ranks([(r["rank"], r["where"], "rank") for r in kept])
            candidates = [Candidate([{"role": "assistant", "content": r["text"]}], -r["rank"], r["id"], r["where"]) for r in kept]
            out.append(Group(conversation, candidates, id=parent["id"], where=parent["where"], scored=False))
        return out

    @staticmethod
    def _conversation(message: dict, by_id: dict[str, dict]) -> list[dict] | Drop:
        path = []
        node: dict | None = message
        while node is not None:
            if node["deleted"]:
                return Drop("conversation with a deleted message")
            path.append({"role": ROLES[node["role"]], "content": node["text"]})
            parent = node["parent"]
            if parent is not None and parent not in by_id:
                return Drop("conversation with a missing parent message")
            node = by_id.get(parent) if parent is not None else None
            if len(path) > len(by_id):
                return Drop("conversation with a missing parent message")  # a cycle: no root
        return path[::-1]
