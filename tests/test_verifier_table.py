"""Table tests of the strict verifier on adversarial strings that public harnesses get wrong."""

from __future__ import annotations

import pytest

from pipeline.core.records import TextQA, VQASample
from rl.verifier import (
    MAX_ANSWER_CHARS,
    extract_answer,
    normalize_text,
    parse_choices,
    verify,
    verify_sample,
)

FIVE = ["(A) Red", "(B) Blue", "(C) Green", "(D) White", "(E) Black"]
FOUR = FIVE[:4]

# (reply, truth, qtype, choices, expected correct, expected prediction, expected parse_failure)
TABLE = [
    # known harness bugs
    ("Answer: C", "C", "single", FIVE, True, "C", False),
    ("Answer: C", "ACE", "multi", FIVE, False, "C", False),  # lmms-eval reads {A, C, E}
    ("The best option is B", "B", "single", FIVE, True, "B", False),
    ("The best option is B", "BE", "multi", FIVE, False, "B", False),  # read as {B, E} elsewhere
    ("A B C D", "A", "single", FOUR, False, None, True),  # credited as A elsewhere
    ("A or B", "A", "single", FOUR, False, None, True),
    ("A or B", "AB", "multi", FOUR, False, None, True),
    ("A large white ship is moored near the port.", "A", "single", FOUR, False, None, True),
    ("A large building", "A", "single", ["(A) Building", "(B) Road"], False, None, True),
    ("", "A", "single", FOUR, False, None, True),
    ("   ", "A", "single", FOUR, False, None, True),
    ("<answer></answer>", "A", "single", FOUR, False, None, True),
    ("(A) Red (B) Blue (C) Green (D) White", "A", "single", FOUR, False, None, True),
    ("<answer>(A) Red (B) Blue (C) Green (D) White</answer>", "C", "single", FOUR, False, None, True),
    ("A, B, C, D", "B", "single", FOUR, False, None, True),
    ("ABCD", "B", "single", FOUR, False, None, True),
    # well-formed single choice
    ("<answer>C</answer>", "C", "single", FOUR, True, "C", False),
    ("<answer>(C)</answer>", "C", "single", FOUR, True, "C", False),
    ("<answer> C. </answer>", "C", "single", FOUR, True, "C", False),
    ("<answer>(C) Green</answer>", "C", "single", FOUR, True, "C", False),
    ("<answer>C. green</answer>", "C", "single", FOUR, True, "C", False),
    ("<answer>Green</answer>", "C", "single", FOUR, True, "C", False),
    ("<answer>(C) Blue</answer>", "C", "single", FOUR, False, None, True),  # letter and text disagree
    ("<answer>B</answer>", "C", "single", FOUR, False, "B", False),
    ("<answer>E</answer>", "C", "single", FOUR, False, None, True),  # not an option
    ("<think>Maybe A or B.</think><answer>D</answer>", "D", "single", FOUR, True, "D", False),
    ("The answer is C.", "C", "single", FOUR, True, "C", False),
    ("The correct answer is (D).", "D", "single", FOUR, True, "D", False),
    ("Final answer: B", "B", "single", FOUR, True, "B", False),
    ("\\boxed{B}", "B", "single", FOUR, True, "B", False),
    ("C", "C", "single", FOUR, True, "C", False),  # the official no-tool protocol: bare letter
    ("c", "C", "single", FOUR, True, "C", False),
    ("<answer>A</answer> <answer>B</answer>", "A", "single", FOUR, False, None, True),  # disagreeing tags
    ("<answer>C", "C", "single", FOUR, True, "C", False),  # stopped before the closing tag
    ("C</answer>", "C", "single", FOUR, False, None, True),  # unbalanced
    ('<tool_call>{"name": "zoom_in"}</tool_call>', "C", "single", FOUR, False, None, True),
    # multiple choice: exact set
    ("<answer>A C</answer>", "AC", "multi", FOUR, True, "AC", False),
    ("<answer>C, A</answer>", "AC", "multi", FOUR, True, "AC", False),
    ("<answer>A and C</answer>", "AC", "multi", FOUR, True, "AC", False),
    ("<answer>AC</answer>", "A,C", "multi", FOUR, True, "AC", False),
    ("<answer>(A) Red, (C) Green</answer>", "AC", "multi", FOUR, True, "AC", False),
    ("<answer>A</answer>", "AC", "multi", FOUR, False, "A", False),  # subset is wrong
    ("<answer>A B C D</answer>", "AC", "multi", FOUR, False, "ABCD", False),  # every option: wrong
    ("<answer>A B C D</answer>", "ABCD", "multi", FOUR, True, "ABCD", False),  # unless it is the truth
    ("<answer>A C E</answer>", "AC", "multi", FOUR, False, None, True),
    # true / false
    ("<answer>True</answer>", "true", "tf", [], True, "true", False),
    ("<answer>yes</answer>", "true", "tf", [], True, "true", False),
    ("<answer>No.</answer>", "false", "tf", [], True, "false", False),
    ("<answer>true or false</answer>", "true", "tf", [], False, None, True),
    ("<answer>It is true that it is false</answer>", "true", "tf", [], False, None, True),
    ("<answer>B</answer>", "false", "tf", ["(A) True", "(B) False"], True, "false", False),
    # numeric with a stated tolerance
    ("<answer>12</answer>", "12", "numeric", [], True, "12", False),
    ("<answer>12 ships</answer>", "12", "numeric", [], True, "12", False),
    ("<answer>twelve</answer>", "12", "numeric", [], True, "12", False),
    ("<answer>1,200</answer>", "1200", "numeric", [], True, "1200", False),
    ("<answer>13</answer>", "12", "numeric", [], False, "13", False),
    ("<answer>between 10 and 14</answer>", "12", "numeric", [], False, None, True),
    ("<answer>many</answer>", "12", "numeric", [], False, None, True),
    # short text, normalised
    ("<answer>The Amazon River.</answer>", "amazon river", "text", [], True, "amazon river", False),
    ("<answer>NDVI</answer>", "ndvi", "fill", [], True, "ndvi", False),
    ("<answer>3.0</answer>", "3", "free", [], True, "3.0", False),
    ("<answer>Amazon</answer>", "amazon river", "text", [], False, "amazon", False),
    ("<answer>the</answer>", "amazon river", "text", [], False, None, True),
    # TextQA mcq is single choice
    ("<answer>B</answer>", "B", "mcq", ["(A) NDVI", "(B) NDWI"], True, "B", False),
]


@pytest.mark.parametrize("reply,truth,qtype,choices,correct,pred,pfail", TABLE)
def test_table(reply, truth, qtype, choices, correct, pred, pfail):
    r = verify(reply, truth, qtype, choices, tolerance=0.0)
    assert (r.correct, r.prediction, r.parse_failure) == (correct, pred, pfail), r.reason


def test_numeric_tolerance():
    assert verify("<answer>12.4</answer>", "12", "numeric", tolerance=0.5).correct
    assert not verify("<answer>12.6</answer>", "12", "numeric", tolerance=0.5).correct
    assert not verify("<answer>12.4</answer>", "12", "numeric", tolerance=0.0).correct


def test_long_answers_get_no_credit():
    long_right = "<answer>C " + "because green " * 100 + "</answer>"
    assert len(extract_answer(long_right)) >= MAX_ANSWER_CHARS
    r = verify(long_right, "C", "single", FOUR)
    assert not r.correct and "max_chars" in r.reason
    # the limit is a parameter: a tighter one refuses a shorter answer too
    assert not verify("<answer>Green</answer>", "C", "single", FOUR, max_chars=3).correct
    assert verify("<answer>Green</answer>", "C", "single", FOUR, max_chars=6).correct
    # long bare prose with no tag and no marker is not an answer at all
    assert verify("x " * 700, "C", "single", FOUR).parse_failure


def test_every_option_repeated_many_times_never_scores():
    spam = "<answer>" + " ".join("A B C D" for _ in range(50)) + "</answer>"
    for truth in "ABCD":
        assert not verify(spam, truth, "single", FOUR).correct


def test_allow_bare_off_requires_tags_or_marker():
    assert verify("C", "C", "single", FOUR, allow_bare=False).parse_failure
    assert verify("The answer is C", "C", "single", FOUR, allow_bare=False).correct


def test_unknown_qtype_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown qtype"):
        verify("<answer>A</answer>", "A", "essay")


def test_parse_choices_labels_and_unlabelled():
    assert parse_choices(["(A) Red", "(B) Blue"]) == {"A": "Red", "B": "Blue"}
    assert parse_choices(["A. Red", "B. Blue"]) == {"A": "Red", "B": "Blue"}
    assert parse_choices(["Red", "Blue"]) == {"A": "Red", "B": "Blue"}


def test_normalize_text():
    assert normalize_text("  The Amazon, River! ") == "amazon river"
    assert normalize_text("-3.5 km") == "-3.5 km"


def test_verify_sample_on_records():
    s = VQASample(id="1", images=["x"], question="q", answer="AC", qtype="multi", choices=FOUR)
    assert verify_sample("<answer>C A</answer>", s).correct
    t = TextQA(id="t", question="q", qtype="tf", answer="false")
    assert verify_sample("<answer>false</answer>", t).correct
    n = VQASample(id="2", images=["x"], question="q", answer="7", qtype="numeric", tolerance=1.0)
    assert verify_sample("<answer>8</answer>", n).correct


# ------------------------------------------------------------------------------ labelled realistic replies
def _truth_text(truth: object) -> str:
    if isinstance(truth, bool):
        return "true" if truth else "false"
    return str(truth)


def measure_labelled() -> dict:
    """Check every labelled reply against every truth of its question: credit must be given exactly when the
    truth is the human label. Returns the counts and the failing cases."""
    from verifier_labelled import SETS

    rows = clear = checks = 0
    false_credits: list[tuple] = []
    false_denials: list[tuple] = []
    for table, qtype, choices, truths in SETS:
        for reply, label in table:
            rows += 1
            clear += label is not None
            for truth in truths:
                checks += 1
                got = verify(reply, _truth_text(truth), qtype, choices).correct
                want = label is not None and (label == truth if qtype != "multi" else set(label) == set(truth))
                if got and not want:
                    false_credits.append((qtype, reply, truth, label))
                elif want and not got:
                    false_denials.append((qtype, reply, truth, verify(reply, _truth_text(truth), qtype,
                                                                         choices).reason))
    return {"rows": rows, "clear": clear, "checks": checks, "false_credits": false_credits,
            "false_denials": false_denials}


def test_labelled_replies_false_credit_and_denial(capsys):
    m = measure_labelled()
    rate = len(m["false_denials"]) / max(m["clear"], 1)
    with capsys.disabled():
        print(f"\nverifier on {m['rows']} labelled replies ({m['clear']} clear answers, {m['checks']} checks): "
              f"false credits {len(m['false_credits'])}, false denials {len(m['false_denials'])} "
              f"({100 * rate:.1f}% of clear answers)")
        for fc in m["false_credits"]:
            print("  FALSE CREDIT", fc)
        for fd in m["false_denials"]:
            print("  false denial", fd)
    assert m["rows"] >= 250
    assert m["false_credits"] == []
    assert rate <= 0.05


def test_issue_false_credits_fixed():
    five = ["(A) Red", "(B) Blue", "(C) Green", "(D) White", "(E) Black"]
    for reply in ("(A) Green", "A. Green", "The answer is A. Green", "<answer>(A) Green</answer>"):
        assert not verify(reply, "C", "single", five).correct, reply
        assert not verify(reply, "A", "single", five).correct, reply
    land = ["(A) Residential", "(B) Forest", "(C) Farmland", "(D) Industrial", "(E) Water"]
    assert not verify("(A) Farmland, (E) Water", "CE", "multi", land).correct
    assert not verify("(A) Farmland, (E) Water", "AE", "multi", land).correct
    assert verify("(C) Farmland, (E) Water", "CE", "multi", land).correct
