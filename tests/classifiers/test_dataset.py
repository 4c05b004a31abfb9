"""The in-repo rows obey the licence and held-out rules."""

from __future__ import annotations

from classifiers.dataset import (
    DEV_PATH,
    NON_COMMERCIAL_SOURCES,
    ROUTING_DEV_PATH,
    TRAIN_PATH,
    is_held_out,
    read_jsonl,
)


def test_repo_rows_are_shippable_and_splits_disjoint() -> None:
    splits = {p.name: list(read_jsonl(p)) for p in (TRAIN_PATH, DEV_PATH, ROUTING_DEV_PATH)}
    for rows in splits.values():
        assert rows
        assert not {r["source"] for r in rows} & NON_COMMERCIAL_SOURCES
        assert not any(
            is_held_out({"source": "routerdc_small7", "source_id": r["id"].split(":", 1)[1]}) for r in rows
        )
        assert not any("mmlu" in str(r.get("bench")) for r in rows)
    train = {r["prompt"] for r in splits[TRAIN_PATH.name]}
    assert not train & {r["prompt"] for r in splits[DEV_PATH.name]}
    assert not train & {r["prompt"] for r in splits[ROUTING_DEV_PATH.name]}
    for r in splits[ROUTING_DEV_PATH.name]:
        assert 0 <= r["weak_score"] <= 1 and 0 <= r["strong_score"] <= 1
