"""The flywheel demonstration end to end at a small volume: traffic, store, `triage learn`, reload, curve."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

from flywheel import items, run_student  # noqa: E402

from classifiers.dataset import DEV_PATH, TRAIN_PATH  # noqa: E402


def test_fake_answers_tell_right_from_wrong_by_the_gateways_agreement() -> None:
    from router.shadow import agreement

    sample = items(TRAIN_PATH, "claude-v1") + items(TRAIN_PATH, "llama-3-8b-base")
    assert any(i.mc for i in sample) and not all(i.mc for i in sample)
    for item in sample:
        assert agreement(item.reference(), item.reference()) == 1.0
        assert agreement(item.wrong(), item.reference()) < 0.5


def test_small_run_goes_through_the_whole_loop(tmp_path: Path) -> None:
    # A high shadow rate so that a few hundred requests give labels of both kinds.
    res = run_student("claude-v1", 400, 0.5, 0.7, seed=1, work=tmp_path, checkpoints=(200, 400))
    assert res.answered == 400
    assert res.learn_status == 0, res.learn_output
    assert "held-out traffic" in res.learn_output and "wrote" in res.learn_output
    assert res.reload_applied and res.probe_scores[1] is not None
    assert [p.requests for p in res.curve] == [200, 400]
    assert res.curve[-1].labels > res.curve[0].labels > 0
    assert res.test_prompts == len(items(DEV_PATH, "claude-v1"))
    assert all(math.isfinite(v) for v in (res.before["apgr"], res.after["apgr"], res.after["auroc"]))
