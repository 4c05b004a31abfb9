"""Multi-pair routing evaluation on the in-repo rows (and AlpacaEval when shared/ is beside the clone)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from classifiers.cli import add_subcommands
from classifiers.dataset import DEV_PATH, MODELS, ROUTING_DEV_PATH, TRAIN_PATH, read_jsonl
from classifiers.heuristic import HeuristicScorer
from classifiers.routing_eval import (
    ALPACA_GROUP,
    DEFAULT_PAIR,
    PAIRS,
    EvalData,
    Pair,
    evaluate,
    load_alpaca,
    load_data,
    pair_results,
    report,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GPT4_MIXTRAL = Pair("gpt-4-1106-preview", "mixtral-8x7b")


@pytest.fixture(scope="module")
def data() -> EvalData:
    return load_data(shared=None)


def constant(texts: Sequence[str]) -> np.ndarray:
    return np.zeros(len(texts))


def test_train_and_dev_rows_carry_outcomes() -> None:
    for path in (TRAIN_PATH, DEV_PATH, ROUTING_DEV_PATH):
        rows = list(read_jsonl(path))
        for r in rows:
            o = r.get("outcomes", {})
            assert set(o) <= set(MODELS)
            assert all(0.0 <= q <= 1.0 for q in o.values())
            if r["source"] in ("routerbench", "arena_bench_v1", "routerdc_small7"):
                assert len(o) >= 7, r["id"]
            else:
                assert not o
        if path == ROUTING_DEV_PATH:
            for r in rows:
                if r["source"] == "routerbench":  # the default pair is gpt-4 vs mistral-7b
                    o = r["outcomes"]
                    assert (o["gpt-4-1106-preview"], o["mistral-7b"]) == (r["strong_score"], r["weak_score"])


def test_pairs_present_with_sensible_n(data: EvalData) -> None:
    results = {(r.pair, r.group): r for r in evaluate(constant, data).routing}
    for pair in PAIRS[:3] + (DEFAULT_PAIR,):
        assert results[(pair, "all")].n >= 490
        assert results[(pair, "all")].gap > 0.1
        assert results[(pair, "family=chat")].n >= 30  # arena_bench_v1
        for family in ("code", "knowledge_mc", "commonsense_mc"):  # routerbench
            assert results[(pair, f"family={family}")].n >= 60
    # Claude-v2 scores below mistral-7b on the multiple-choice rows: no PGR there.
    skipped = results[(Pair("claude-v2", "mistral-7b"), "family=knowledge_mc")]
    assert skipped.gap < 0 and skipped.apgr is None


def test_oracle_beats_random_and_constant_is_random(data: EvalData) -> None:
    rows = data.routing
    gains = [q[0] - q[1] if (q := GPT4_MIXTRAL.qualities(r)) is not None else 0.0 for r in rows]
    (oracle,) = [r for r in pair_results(gains, rows, [GPT4_MIXTRAL]) if r.group == "all"]
    assert oracle.apgr is not None and oracle.apgr > 0.8
    (flat,) = [r for r in pair_results(np.zeros(len(rows)), rows, [GPT4_MIXTRAL]) if r.group == "all"]
    assert flat.apgr == pytest.approx(0.5, abs=1e-12)
    assert flat.pgr == pytest.approx(0.3, abs=1e-12)
    assert flat.cpt50 == pytest.approx(0.5, abs=1e-12)


def test_precomputed_scores_match_the_scorer(data: EvalData) -> None:
    scorer = HeuristicScorer()
    from_fn = evaluate(scorer.score_many, data)
    from_list = evaluate(scorer.score_many(data.texts), data)
    assert from_fn == from_list
    with pytest.raises(ValueError, match="EvalData.texts"):
        evaluate([0.5, 0.5], data)


def test_report_has_a_row_per_variant_and_says_what_it_skipped(data: EvalData) -> None:
    text = report({"heuristic": HeuristicScorer().score_many, "constant": constant}, data)
    assert "### gpt-4-1106-preview vs mixtral-8x7b" in text
    assert "| constant | 0.500 / 0.300 / 50% |" in text
    assert sum(line.startswith("| heuristic |") for line in text.splitlines()) == len(PAIRS) + 1
    assert "skipped, strong model not better on average" in text
    assert "dev AUROC" in text


def test_cli_eval_prints_the_multi_pair_report(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "dev.jsonl"
    src.write_text('{"prompt": "thanks", "label": 0}\n{"prompt": "Prove it.", "label": 1}\n')
    parser = argparse.ArgumentParser(prog="triage")
    add_subcommands(parser.add_subparsers(required=True))
    args = parser.parse_args(["eval", "--data", str(src), "--model", str(model_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("all ")  # today's table comes first
    assert "### gpt-4-1106-preview vs mixtral-8x7b" in out and f"| {model_path.name} |" in out


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} absent (shared data beside the clone)")
def test_alpaca_eval_set_is_eval_only_and_outside_the_repo() -> None:
    repo_prompts = {str(r["prompt"]) for p in (TRAIN_PATH, DEV_PATH, ROUTING_DEV_PATH) for r in read_jsonl(p)}
    rows, dropped = load_alpaca(SHARED, exclude=repo_prompts)
    # 805 annotated instructions; the shared instructions.jsonl lists 804 of them.
    assert len(rows) == 804 and dropped == 0
    assert not {r["prompt"] for r in rows} & repo_prompts
    strong, weak = np.array([GPT4_MIXTRAL.qualities(r) for r in rows]).T
    np.testing.assert_allclose(strong + weak, 1.0)
    assert 0.5 < strong.mean() - weak.mean() < 0.6  # Mixtral wins about 23% against gpt-4-turbo
    data = load_data(SHARED)
    (res,) = [r for r in evaluate(constant, data).routing if r.group == ALPACA_GROUP]
    assert res.pair == GPT4_MIXTRAL and res.n == 804 and res.apgr == pytest.approx(0.5)
    assert "eval-only, CC BY-NC, not in repo" in report({"constant": constant}, data)
