"""The synthetic knowledge world (data_pipeline/world.py) and the answer spans the fact stream marks."""
import json
from pathlib import Path

import pytest

from data_pipeline import Tokenizer, load_source
from data_pipeline.facts import FactStream, answer_token_span, eval_prompt, fact_statements
from data_pipeline.world import RELATIONS, WorldSpec, build_world, check_single_tokens, write_world

REPO = Path(__file__).resolve().parents[2]
SMALL = WorldSpec(seed=3, num_known_people=10, num_background_people=4, num_new_people=5, num_new_streams=2)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(REPO / "data_pipeline" / "tokenizers" / "tiny_bpe.model")


def test_world_is_deterministic_and_its_groups_are_disjoint_people(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_world(a, SMALL)
    write_world(b, SMALL)
    for name in ("facts.jsonl", "paraphrases.jsonl", "world.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    other, _ = build_world(WorldSpec(**{**SMALL.__dict__, "seed": 4}))
    assert other != build_world(SMALL)[0]
    facts, paraphrases = build_world(SMALL)
    r = len(RELATIONS)
    assert len(facts) == (10 + 4 + 5 * 2) * r
    people = {}
    for f in facts:
        group = f["question_id"].split("-")[1]
        people.setdefault(group, set()).add(f["question_id"].rsplit("-", 1)[0])
    assert [len(people[g]) for g in ("known", "background", "new0", "new1")] == [10, 4, 5, 5]
    meta = json.loads((a / "world.json").read_text())
    ids = [f["question_id"] for f in facts]
    assert ids[meta["background_offset"]].startswith("world-background-0-")
    assert ids[meta["new_offset_stream1"]].startswith("world-new1-0-")
    # names never repeat across people, so a new person is never a known one
    names = [f["question"] for f in facts if f["question_id"].endswith(RELATIONS[0].name)]
    assert len(set(names)) == len(names)


def test_world_facts_load_as_triviaqa_and_statements_end_with_the_answer(tmp_path: Path, tok: Tokenizer) -> None:
    write_world(tmp_path, SMALL)
    records = load_source("triviaqa", tmp_path / "facts.jsonl")
    paraphrases = {json.loads(l)["id"]: json.loads(l)["paraphrases"] for l in (tmp_path / "paraphrases.jsonl").open()}
    for rec in records:
        forms = paraphrases[rec.id]
        assert forms[0] == eval_prompt(rec) + " " + rec.answers[0]           # the QA form is the eval format
        assert len(forms) == 4 and all(f.endswith(" " + rec.answers[0]) for f in forms)
        assert len(tok.encode(" " + rec.answers[0], bos=False)) >= 1
    check_single_tokens(tok)


def test_world_refuses_more_people_than_names() -> None:
    with pytest.raises(ValueError, match="distinct names"):
        build_world(WorldSpec(num_known_people=10_000))
    with pytest.raises(ValueError, match="num_new_people"):
        build_world(WorldSpec(num_new_people=-1))


def test_answer_mask_marks_exactly_the_answer_tokens(tmp_path: Path, tok: Tokenizer) -> None:
    """FactStream's answer_mask holds the label positions of the answer: decoding those labels gives the
    answer in every row, for the world's statements and for every TriviaQA template (answer anywhere)."""
    write_world(tmp_path, SMALL)
    world = load_source("triviaqa", tmp_path / "facts.jsonl")[:3]
    stream = FactStream(world, tok, num_paraphrases=8, seq_len=32, paraphrase_file=tmp_path / "paraphrases.jsonl")
    for rec in world:
        batch = next(stream)
        for i in range(8):
            assert tok.decode(batch.labels[i][batch.answer_mask[i]].tolist()) == rec.answers[0]
            assert int(batch.answer_mask[i].sum()) == 1                         # one-token answers
    trivia = load_source("triviaqa", REPO / "data_pipeline" / "samples" / "triviaqa_validation_sample.jsonl")[:5]
    stream = FactStream(trivia, tok, num_paraphrases=12, seq_len=96)
    for rec in trivia:
        batch = next(stream)
        for i in range(12):
            assert tok.decode(batch.labels[i][batch.answer_mask[i]].tolist()).strip() == rec.answers[0].strip()
    assert answer_token_span(tok, "no answer here", "Paris", tok.encode("no answer here", bos=True)) is None
    assert len(fact_statements(trivia[0])) == 12
