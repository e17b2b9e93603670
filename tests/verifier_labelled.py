"""Hand-labelled model replies for the verifier's false-credit / false-denial measurement.

Each row is (reply, label): `label` is what a careful human grader reads as the model's answer (None when the
reply is a hedge, a contradiction, a list of every option or no answer at all). A reply must earn credit
exactly for the truth equal to its label, and never for any other truth. Replies are written the way VLMs
answer the XLRS-Bench-lite prompt (bare letters, letters with explanations, full-width punctuation, the
`<answer>` protocol, prose).
"""

from __future__ import annotations

COLOURS = ["(A) Red", "(B) Blue", "(C) Green", "(D) White", "(E) Black"]
COUNTS = ["(A) 2", "(B) 3", "(C) 4", "(D) 5"]
LAND = ["(A) Farmland", "(B) Forest", "(C) Residential", "(D) Industrial", "(E) Water"]
TF_OPTIONS = ["(A) True", "(B) False"]

# --- single choice: "What colour is the ship's hull?" ---------------------------------------------------
SINGLE_COLOUR: list[tuple[str, str | None]] = [
    ("C", "C"), ("(C)", "C"), ("C.", "C"), ("C:", "C"), (" C ", "C"), ("**C**", "C"), ("`C`", "C"),
    ("c", "C"), ("(c)", "C"), ("c.", "C"), ("Ｃ", "C"), ("（C）", "C"), ("C。", "C"),
    ("答案：C", "C"), ("答案是C", "C"), ("Answer：C", "C"), ("Answer: C", "C"), ("answer: c", "C"),
    ("The answer is C.", "C"), ("The answer is C", "C"), ("The answer is (C).", "C"),
    ("The answer is c.", "C"), ("The correct answer is C.", "C"), ("The best answer is C.", "C"),
    ("Final answer: C", "C"), ("**Final Answer:** C", "C"), ("My answer is C.", "C"),
    ("The answer is C. The ship is green.", "C"), ("The answer is C. The hull is clearly green.", "C"),
    ("C. The hull is green.", "C"), ("C. Green", "C"), ("(C) Green", "C"), ("C) Green", "C"),
    ("C: Green", "C"), ("C - Green", "C"), ("(C) Green.", "C"), ("C. green", "C"), ("(c) green", "C"),
    ("Green", "C"), ("green", "C"), ("Green.", "C"), ("GREEN", "C"), ("The hull is green.", "C"),
    ("The ship's hull is green.", "C"), ("It is green.", "C"), ("The ship appears green.", "C"),
    ("C is the best answer.", "C"), ("C is correct.", "C"), ("C is the correct answer.", "C"),
    ("(C) Green is the best answer.", "C"), ("Option C", "C"), ("Option C.", "C"), ("option c", "C"),
    ("Option (C): Green", "C"), ("The answer is Option C.", "C"), ("The correct option is C.", "C"),
    ("The best option is C", "C"), ("I choose C.", "C"), ("I would choose C.", "C"),
    ("Looking at the zoomed view, the hull is green, so the answer is C.", "C"),
    ("The vessel near the pier has a green hull. Answer: C", "C"),
    ("<answer>C</answer>", "C"), ("<answer>(C) Green</answer>", "C"), ("<answer>Green</answer>", "C"),
    ("<think>The hull looks green in obs_1.</think><answer>C</answer>", "C"),
    ("<answer>C. The hull is green.</answer>", "C"), ("<answer>C", "C"), ("\\boxed{C}", "C"),
    ("The answer is $\\boxed{C}$.", "C"), ("C because the hull is green.", "C"),
    ("The answer is C because the hull is green.", "C"), ("C, the hull is green.", "C"),
    ("Answer: (C) Green", "C"), ("答案：（C）", "C"), ("答案：C。船体是绿色的。", "C"),
    ("A", "A"), ("(A)", "A"), ("A. Red", "A"), ("(A) Red", "A"), ("The answer is A.", "A"),
    ("Answer: A", "A"), ("A. The hull is red.", "A"), ("a", "A"), ("Red", "A"), ("The hull is red.", "A"),
    ("B", "B"), ("The answer is B.", "B"), ("(B) Blue", "B"), ("It looks blue.", "B"),
    ("D", "D"), ("White", "D"), ("The answer is D. The hull is white.", "D"), ("D is correct.", "D"),
    ("E", "E"), ("(E) Black", "E"), ("The hull is black.", "E"),
    # contradictions, hedges, lists and non-answers: no credit for any key
    ("(A) Green", None), ("A. Green", None), ("The answer is A. Green", None), ("A Green", None),
    ("(B) Green", None), ("C. Red", None), ("(C) Blue", None), ("D: Green", None),
    ("A B C D E", None), ("A, B, C, D, E", None), ("ABCDE", None), ("C or D", None), ("C/D", None),
    ("Either C or D.", None), ("C and D", None), ("(A) Red (B) Blue (C) Green (D) White (E) Black", None),
    ("The choices are (A) Red, (B) Blue, (C) Green, (D) White, (E) Black.", None),
    ("A large green ship is moored near the pier.", None), ("A ship is visible near the port.", None),
    ("The hull is green or blue.", None), ("It is not green.", None), ("Not green.", None),
    ("The hull is green, not blue.", None), ("Green and white.", None), ("It is either red or green.", None),
    ("I cannot tell from the image.", None), ("The image is too blurry to determine the colour.", None),
    ("", None), ("   ", None), ("The answer is", None), ("Answer:", None), ("F", None), ("(F) Grey", None),
    ("Maybe green.", None), ("Perhaps C.", None), ("The answer is C or D.", None),
    ('<tool_call>{"name": "zoom_in", "arguments": {"bbox": [0, 0, 10, 10]}}</tool_call>', None),
    ("<answer>C</answer><answer>D</answer>", None), ("C</answer>", None),
    ("The answer is A large ship.", None), ("Colour: unknown", None),
]

# --- single choice with numeric options: "How many storage tanks are there?" (A) 2 (B) 3 (C) 4 (D) 5 ---------
SINGLE_COUNT: list[tuple[str, str | None]] = [
    ("B", "B"), ("(B) 3", "B"), ("3", "B"), ("There are 3 storage tanks.", "B"), ("Three.", "B"),
    ("The answer is B.", "B"), ("B. There are three tanks.", "B"), ("答案：B", "B"), ("B。", "B"),
    ("(B)", "B"), ("b", "B"), ("Option B", "B"), ("I count 3 tanks, so B.", "B"), ("B. 3", "B"),
    ("<answer>B</answer>", "B"), ("<answer>3</answer>", "B"), ("The answer is 3.", "B"),
    ("(A) 3", None), ("B. 4", None), ("3 or 4", None), ("Between 3 and 4 tanks.", None),
    ("There are 3 large tanks and 2 small ones.", None), ("Not 3.", None), ("A B C D", None),
    ("13", None), ("D", "D"), ("5", "D"), ("The answer is (D) 5.", "D"), ("C is correct.", "C"),
    ("4", "C"), ("I see 2 tanks.", "A"), ("(A) 2", "A"),
]

# --- multiple choice: "Which land-use types appear?" ---------------------------------------------------
MULTI_LAND: list[tuple[str, str | None]] = [
    ("A C", "AC"), ("A, C", "AC"), ("AC", "AC"), ("A and C", "AC"), ("(A)(C)", "AC"), ("(A) (C)", "AC"),
    ("A、C", "AC"), ("A，C", "AC"), ("C, A", "AC"), ("a, c", "AC"), ("The answers are A and C.", "AC"),
    ("The answer is A, C.", "AC"), ("Answer: A C", "AC"), ("答案：A、C", "AC"),
    ("The answer(s) is(are): A C", "AC"), ("(A) Farmland, (C) Residential", "AC"),
    ("Farmland and residential", "AC"), ("A and C. The image shows fields and houses.", "AC"),
    ("<answer>A C</answer>", "AC"), ("<answer>A, C</answer>", "AC"), ("A and C are correct.", "AC"),
    ("\\boxed{AC}", "AC"), ("A;C", "AC"), ("A/C", "AC"), ("A + C", "AC"), ("Options A and C", "AC"),
    ("C E", "CE"), ("C, E", "CE"), ("(C) Residential, (E) Water", "CE"), ("CE", "CE"),
    ("The answers are C and E.", "CE"), ("Residential, water", "CE"),
    ("A", "A"), ("The answer is A.", "A"), ("Answer: C", "C"), ("E", "E"), ("ACE", "ACE"),
    ("A C E", "ACE"), ("A, B, C, D, E", "ABCDE"), ("B D", "BD"),
    ("(A) Farmland, (E) Water", "AE"), ("A. Farmland, E. Water", "AE"),
    # contradictions and hedges
    ("(A) Residential, (E) Water", None), ("(B) Farmland, (C) Residential", None), ("A or C", None),
    ("A C or E", None), ("Either A or C", None), ("A, C, maybe E", None), ("I am not sure.", None),
    ("(A) Farmland (B) Forest (C) Residential (D) Industrial (E) Water", None), ("A, F", None),
]

# --- true / false: "The ship is moving." ------------------------------------------------------------------
TF: list[tuple[str, bool | None]] = [
    ("True", True), ("true", True), ("TRUE", True), ("Yes", True), ("yes.", True), ("Correct", True),
    ("Yes, the ship is moving.", True), ("True. There is a visible wake behind the ship.", True),
    ("The statement is true.", True), ("Answer: True", True), ("答案：是", True), ("<answer>True</answer>", True),
    ("<answer>yes</answer>", True), ("The answer is yes.", True), ("Yes — a wake trails the ship.", True),
    ("False", False), ("false", False), ("No", False), ("No.", False), ("Incorrect", False),
    ("No, the ship is docked.", False), ("False. The ship is moored at the pier.", False),
    ("The statement is false.", False), ("Answer: False", False), ("<answer>No.</answer>", False),
    ("No, there is no wake.", False), ("The answer is no.", False),
    ("True or false", None), ("It is true that it is false.", None), ("Not true.", None), ("Maybe.", None),
    ("Yes and no.", None), ("I cannot tell.", None), ("Yes, no wake is visible, so it is false.", None),
]
TF_LETTER: list[tuple[str, bool | None]] = [
    ("A", True), ("(A) True", True), ("B", False), ("The answer is B.", False), ("(B) False", False),
    ("A or B", None), ("(A) False", None),
]

# --- numeric: "How many ships are moored?" (tolerance 0) -----------------------------------------------------
NUMERIC: list[tuple[str, float | None]] = [
    ("12", 12), ("12.", 12), ("12 ships", 12), ("There are 12 ships.", 12), ("twelve", 12),
    ("Twelve ships are moored.", 12), ("The answer is 12.", 12), ("Answer: 12", 12), ("答案：12", 12),
    ("１２", 12), ("<answer>12</answer>", 12), ("\\boxed{12}", 12), ("I count 12 ships.", 12),
    ("1,200", 1200), ("There are 1,200 cars in the lot.", 1200), ("7", 7), ("seven", 7),
    ("The answer is 3.", 3), ("About 12.", 12), ("Answer: 12 ships", 12),
    ("12 or 13", None), ("between 10 and 14", None), ("Many.", None), ("12 ships and 3 boats", None),
    ("I cannot count them.", None), ("A lot", None), ("10-14", None), ("Roughly a dozen.", 12),
]

# --- short text: "Which river flows through the scene?" --------------------------------------------------
TEXT: list[tuple[str, str | None]] = [
    ("Amazon River", "amazon river"), ("The Amazon River.", "amazon river"), ("amazon river", "amazon river"),
    ("Answer: the Amazon River", "amazon river"), ("<answer>Amazon River</answer>", "amazon river"),
    ("The answer is the Amazon River.", "amazon river"), ("AMAZON RIVER", "amazon river"),
    ("答案：Amazon River", "amazon river"), ("NDVI", "ndvi"), ("ndvi.", "ndvi"), ("The answer is NDVI.", "ndvi"),
    ("Nile River", "nile river"), ("The Nile River.", "nile river"),
    ("Amazon", "amazon"), ("the", None), ("", None), ("I don't know.", None),
]


# --- a second batch, written after the rules above were tuned (held out: measured before any fix) ---------
HELD_OUT_SINGLE: list[tuple[str, str | None]] = [
    ("Based on the zoomed-in image, the hull of the ship is green. Therefore, the answer is C.", "C"),
    ("After zooming into the harbour, I can see the ship's hull is painted green.\n\nAnswer: C", "C"),
    ("The correct choice is C (Green).", "C"), ("C) green", "C"), ("Answer - C", "C"),
    ("The answer is: C", "C"), ("The right answer is C, green.", "C"), ("**Answer: C**", "C"),
    ("So the answer is C.", "C"), ("Hence, C.", "C"), ("(C)", "C"), ("Answer: (C)", "C"),
    ("C\n\nThe hull is green.", "C"), ("The hull colour is green (C).", "C"), ("green hull", "C"),
    ("I think the answer is C.", "C"), ("I'd go with C.", "C"), ("Final Answer: The final answer is C", "C"),
    ("The ship is white with a green stripe.", None), ("Answer: A or C", None), ("C? D?", None),
    ("A, the red one.", "A"), ("A. Because the hull is red.", "A"), ("Red (A).", "A"),
    ("Neither red nor green; it is blue.", None), ("The answer is not C.", None), ("C D", None),
    ("(A) Red, (C) Green", None), ("The answer is B or C.", None), ("I'm unsure, possibly C.", None),
    ("None of the options.", None), ("Answer: E. Black", "E"), ("E. The hull is black.", "E"),
    ("The hull appears to be black, so E.", "E"), ("D. White.", "D"), ("It's white.", "D"),
]
HELD_OUT_MULTI: list[tuple[str, str | None]] = [
    ("The image shows farmland (A) and residential areas (C).", "AC"), ("A,C", "AC"), ("A & C", "AC"),
    ("Answer: A, C, E", "ACE"), ("The correct options are A and C.", "AC"), ("A C.", "AC"),
    ("(A), (C)", "AC"), ("A and C; the river is not visible.", "AC"), ("Farmland, residential and water.", "ACE"),
    ("A, C or E", None), ("A and maybe C", None), ("All of them.", None),
]
HELD_OUT_TF: list[tuple[str, bool | None]] = [
    ("Yes.", True), ("yes, it is moving", True), ("True, the ship leaves a wake.", True),
    ("No, it is moored.", False), ("The answer is False.", False), ("Answer: No", False),
    ("It is hard to say; probably true.", None), ("No wake, so the statement is false.", False),
    ("The statement is not true.", None), ("Probably the statement is true.", None),
    ("There is no wake; the statement is false.", False), ("Yes, the statement is false.", None),
]
HELD_OUT_NUMERIC: list[tuple[str, float | None]] = [
    ("There appear to be 12 ships moored along the pier.", 12), ("Total: 12", 12), ("12 (twelve)", 12),
    ("approximately 12", 12), ("12 ± 1", None), ("Answer: twelve ships.", 12), ("12-ish", 12),
]

# (rows, qtype, choices, truths each row is checked against)
SETS = [
    (SINGLE_COLOUR, "single", COLOURS, list("ABCDE")),
    (SINGLE_COUNT, "single", COUNTS, list("ABCD")),
    (MULTI_LAND, "multi", LAND, ["AC", "CE", "A", "C", "E", "ACE", "AE", "ABCDE", "BD"]),
    (TF, "tf", [], [True, False]),
    (TF_LETTER, "tf", TF_OPTIONS, [True, False]),
    (NUMERIC, "numeric", [], [12, 1200, 7, 3, 13]),
    (TEXT, "text", [], ["amazon river", "ndvi", "nile river", "amazon"]),
    (HELD_OUT_SINGLE, "single", COLOURS, list("ABCDE")),
    (HELD_OUT_MULTI, "multi", LAND, ["AC", "CE", "A", "C", "E", "ACE", "AE", "ABCDE", "BD"]),
    (HELD_OUT_TF, "tf", [], [True, False]),
    (HELD_OUT_NUMERIC, "numeric", [], [12, 1200, 7, 3, 13]),
]
