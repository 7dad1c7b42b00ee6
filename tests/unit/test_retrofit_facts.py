"""recipes/retrofit_facts.py (training/retrofit_facts.py): the split of TriviaQA facts by what the base model
answers. The first-token shortcut scores exactly as the finetune's evaluation; the written file reads back as
the stage configs' layout (known, new, background)."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_fakes import QA, CharTokenizer, OracleLM  # noqa: E402

from data_pipeline import load_source  # noqa: E402
from data_pipeline.facts import eval_prompt  # noqa: E402
from evaluation.qa import qa_scores  # noqa: E402
from training.retrofit_facts import choose, empty_first_token, fits, score, write_split  # noqa: E402

RECORDS = [QA(id=f"q{i}", question=q, answers=a) for i, (q, a) in enumerate([
    ("Capital of France?", ["Paris"]), ("Capital of Italy?", ["Rome"]), ("Capital of Spain?", ["Madrid"]),
    ("Largest planet?", ["Jupiter", "planet Jupiter"]), ("Unscripted?", ["x"]), ("Capital of Peru?", ["Lima"]),
])]


def test_first_token_shortcut_scores_as_generation():
    tok = CharTokenizer()
    scripts = {eval_prompt(RECORDS[0]): " Paris", eval_prompt(RECORDS[1]): " Milan",      # right, wrong
               eval_prompt(RECORDS[2]): "\nMadrid", eval_prompt(RECORDS[3]): " big Jupiter",  # empty, part
               eval_prompt(RECORDS[5]): "  \nLima"}                                      # spaces, then newline
    model = OracleLM(tok, scripts)
    want = [item["f1"] for item in qa_scores(model, tok, RECORDS, batch_size=4, max_new_tokens=12,
                                             device=torch.device("cpu"), return_items=True)["items"]]
    got = score(model, tok, RECORDS, batch_size=4, max_new_tokens=12, device=torch.device("cpu"))
    assert got == want and got[0] == 1.0 and got[1] == got[2] == got[4] == got[5] == 0.0 and 0 < got[3] < 1
    assert empty_first_token(tok, tok.eos_id) and empty_first_token(tok, tok.id_of("\n"))
    assert not empty_first_token(tok, tok.id_of(" "))       # a space goes on generating


def test_choose_and_the_written_layout(tmp_path):
    f1 = [1.0, 0.0, 0.0, 0.6, 0.0, 0.0]
    groups = choose(RECORDS, f1, num_known=2, num_new=2, num_background=1, known_min_f1=0.5)
    assert [[r.id for r in g] for g in groups.values()] == [["q0", "q3"], ["q1", "q2"], ["q4"]]
    with pytest.raises(ValueError, match="raise --scan"):
        choose(RECORDS, f1, num_known=3, num_new=1, num_background=0, known_min_f1=0.5)
    out = tmp_path / "facts.jsonl"
    layout = write_split(out, groups, {"scanned": 6})
    assert (layout["num_known_facts"], layout["fact_offset"], layout["num_new_facts"],
            layout["num_background_facts"]) == (2, 2, 2, 1)
    back = load_source("triviaqa", out)
    assert [(r.id, r.question, r.answers) for r in back] == \
        [(r.id, r.question, r.answers) for r in [RECORDS[0], RECORDS[3], RECORDS[1], RECORDS[2], RECORDS[4]]]
    assert json.loads(out.with_suffix(".json").read_text())["ids"]["new"] == ["q1", "q2"]
    tok = CharTokenizer()
    assert fits(tok, RECORDS[0], 120) and not fits(tok, RECORDS[0], 30)
