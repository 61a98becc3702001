"""A multiple-choice question pasted into a chat: read out of the message (zephyr/chat_mcq.py), answered as /mcq
answers it, and the chat's answer opened with that option (service/tutor.py open_answer), over the stub engine."""

import json

import pytest

from zephyr.chat_mcq import answer_opening, find_question, find_questions, other_conclusions, sure_line

CHAT = "/v1/chat/completions"
PASTED = "Which gas do plants absorb from the air?\nA) Oxygen\nB) Carbon dioxide\nC) Helium\nD) Neon"


@pytest.mark.parametrize(("text", "stem", "options"), [
    ("Question: Which gas do plants absorb? A) Oxygen B) Carbon dioxide C) Nitrogen D) Helium",
     "Which gas do plants absorb?", ("Oxygen", "Carbon dioxide", "Nitrogen", "Helium")),
    ("Which gas do plants absorb?\nA. Oxygen\nB. Carbon dioxide\nC. Nitrogen\n\nPlease explain why.",
     "Which gas do plants absorb?", ("Oxygen", "Carbon dioxide", "Nitrogen")),
    ("Which gas do plants absorb?\nOptions:\n(a) Oxygen\n(b) Carbon dioxide", "Which gas do plants absorb?",
     ("Oxygen", "Carbon dioxide")),
    ("Is the Earth flat?\n(A) yes\n(B) no", "Is the Earth flat?", ("yes", "no")),
    ("Question 2. Which is a metal?\nA) copper\nB) glass", "Which is a metal?", ("copper", "glass")),
    ("What is 2 + 2? a) 3 b) 4 c) 5", "What is 2 + 2?", ("3", "4", "5")),
    ("Which is a mammal? A: whale B: shark C: trout", "Which is a mammal?", ("whale", "shark", "trout")),
    # The student's instruction after options on one line is not the last option's text.
    ("Which gas do plants absorb? A) Oxygen B) Carbon dioxide C) Nitrogen D) Helium. Please explain why.",
     "Which gas do plants absorb?", ("Oxygen", "Carbon dioxide", "Nitrogen", "Helium")),
    ("Which causes disease? A) sunlight B) E. coli C) water", "Which causes disease?",
     ("sunlight", "E. coli", "water")),
    # ...but an abbreviation's dot ends no option
    ("Who flew a kite in a storm? A) Newton B) Curie C) Dr. Benjamin Franklin", "Who flew a kite in a storm?",
     ("Newton", "Curie", "Dr. Benjamin Franklin")),
    ("Which city is on the Mississippi? A) Denver B) Boston C) St. Louis", "Which city is on the Mississippi?",
     ("Denver", "Boston", "St. Louis")),
    ("Who runs ships? A) farmers B) bakers C) the U.S. Navy", "Who runs ships?",
     ("farmers", "bakers", "the U.S. Navy")),
    ("Who found radium? A) Newton B) Darwin C) Mrs. Marie Curie", "Who found radium?",
     ("Newton", "Darwin", "Mrs. Marie Curie")),
    # ...and an instruction of one word, or after a number or a unit, is the student's
    ("How fast is it? A) 1 m/s B) 2 m/s C) 3.5 m/s. Why?", "How fast is it?", ("1 m/s", "2 m/s", "3.5 m/s")),
    ("Which is a noble gas? A) Iron B) Salt C) Neon. Explain.", "Which is a noble gas?", ("Iron", "Salt", "Neon")),
    # One-line options lose what separates them ("," / ", or"): cloze scored it on every option but the last
    ("Which gas do plants absorb? A) Oxygen, B) Carbon dioxide, C) Nitrogen, or D) Helium",
     "Which gas do plants absorb?", ("Oxygen", "Carbon dioxide", "Nitrogen", "Helium")),
    ("Which is a metal? A) glass; B) copper; C) wood", "Which is a metal?", ("glass", "copper", "wood")),
    ("The unit of force is ___ A) newton B) joule C) watt", "The unit of force is ___", ("newton", "joule", "watt")),
    # a stem ending in "choices" keeps the word; only a line of its own introducing the options goes
    ("Which of these are healthy food choices:\nA) chips\nB) apples", "Which of these are healthy food choices:",
     ("chips", "apples")),
    # a task verb that may ask for a choice, and a follow-up "why?" after the list
    ("Identify the noble gas:\nA) Neon\nB) Iron", "Identify the noble gas:", ("Neon", "Iron")),
    ("Which gas?\nA) Oxygen\nB) Helium\nCan you explain why?", "Which gas?", ("Oxygen", "Helium")),
    # whatever the student adds after a stem that asks (found by a review of the first version of these rules)
    (PASTED + "\nWhat's the answer?", "Which gas do plants absorb from the air?",
     ("Oxygen", "Carbon dioxide", "Helium", "Neon")),
    (PASTED + "\nI think it's A, am I right?", "Which gas do plants absorb from the air?",
     ("Oxygen", "Carbon dioxide", "Helium", "Neon")),
    ("The charge of an electron is A) positive B) negative C) neutral. Which one?", "The charge of an electron is",
     ("positive", "negative", "neutral")),
    # a capital "A" is no article, a unit after a number no prose, an article alone an option
    ("Which vitamin? A) Vitamin A B) Vitamin B12 C) Vitamin C", "Which vitamin?",
     ("Vitamin A", "Vitamin B12", "Vitamin C")),
    ("Convert 5 km to m A) 50 m B) 500 m C) 5000 m", "Convert 5 km to m", ("50 m", "500 m", "5000 m")),
    ("Choose the correct article: A) a B) an C) the", "Choose the correct article:", ("a", "an", "the")),
    ("Water is a A) solid B) liquid C) gas", "Water is a", ("solid", "liquid", "gas")),
    ("Describe the function of the mitochondria.\nA) energy\nB) storage",
     "Describe the function of the mitochondria.", ("energy", "storage")),
    # blanks before the labels: non-breaking spaces (a web page's paste) ended in an IndexError, a 500
    ("Which is a gas?" + "\u00a0" * 70 + "A) neon B) iron C) salt", "Which is a gas?", ("neon", "iron", "salt")),
    ("Which is a gas?" + " " * 70 + "A) neon" + " " * 70 + "B) iron" + " " * 70 + "C) salt", "Which is a gas?",
     ("neon", "iron", "salt")),
    # two pasted questions: the first is answered
    ("1. Which is a gas?\nA) ice\nB) steam\n2. Which is a solid?\nA) ice\nB) steam", "1. Which is a gas?",
     ("ice", "steam")),
    # A label inside an option of another style is the option's text, not a new option.
    ("Which vitamin does sunlight help make?\nA) vitamin D. Or C.\nB) iron", "Which vitamin does sunlight help make?",
     ("vitamin D. Or C.", "iron")),
    # a last option of one character or "No" ends with its sentence too: "7. Why?" is option 7 and a follow-up
    ("What is 2+3? A) 4 B) 5 C) 6 D) 7. Why?", "What is 2+3?", ("4", "5", "6", "7")),
    ("Is a virus alive? A) Yes B) Maybe C) No. Why?", "Is a virus alive?", ("Yes", "Maybe", "No")),
    ("Who found DNA's shape? A) J. Watson B) R. Franklin C) L. Pauling", "Who found DNA's shape?",
     ("J. Watson", "R. Franklin", "L. Pauling")),
    # A stem's own "point A." and an option's last word "Vitamin A." are no labels: the stem went into option A
    ("A ball is released from rest at point A. Which statement about its energy at point B is correct?\n"
     "A. Its kinetic energy is zero\nB. Its potential energy is zero\nC. Both are zero\nD. Neither",
     "A ball is released from rest at point A. Which statement about its energy at point B is correct?",
     ("Its kinetic energy is zero", "Its potential energy is zero", "Both are zero", "Neither")),
    ("Which vitamin do we make in sunlight?\nA. Vitamin D.\nB. Vitamin C.\nC. Vitamin A.\nD. Vitamin K.",
     "Which vitamin do we make in sunlight?", ("Vitamin D.", "Vitamin C.", "Vitamin A.", "Vitamin K.")),
    ("Which? A) 2 B) 4\nC) 6 D) 8", "Which?", ("2", "4", "6", "8")),  # two options a line
    # the first option on the question's line, the others below (a common way to type one)
    ("Which gas do plants absorb? A) Oxygen\nB) Carbon dioxide\nC) Nitrogen\nD) Helium", "Which gas do plants absorb?",
     ("Oxygen", "Carbon dioxide", "Nitrogen", "Helium")),
    ("What is the powerhouse of the cell? a) nucleus\nb) mitochondria\nc) ribosome", "What is the powerhouse of "
     "the cell?", ("nucleus", "mitochondria", "ribosome")),
    # the student's next sentence in small letters is no part of the last option (found by a review)
    ("Which is a noble gas? A) Iron B) Salt C) Helium. my answer is B, is that right?", "Which is a noble gas?",
     ("Iron", "Salt", "Helium")),
    ("Which causes it? A) sunlight B) E. coli C) water. why?", "Which causes it?", ("sunlight", "E. coli", "water")),
    # the stop that ends the student's sentence is not the last option's (cloze scored it), unless every option has
    # one, or it is an abbreviation's (found by a review, 2026-12-07)
    ("Which is a compound? A) H2 B) O2 C) NaCl D) H2O.", "Which is a compound?", ("H2", "O2", "NaCl", "H2O")),
    ("Is it a metal? A) iron B) glass C) salt?", "Is it a metal?", ("iron", "glass", "salt")),
    ("Which country? A) France B) Spain C) the U.S.", "Which country?", ("France", "Spain", "the U.S.")),
    ("Pick one: A) Run. B) Walk. C) Stop.", "Pick one:", ("Run.", "Walk.", "Stop.")),
    # a "which" question after the options is the question, where the stem before them asks none (it was dropped,
    # and /mcq scored the options after "Consider:")
    ("Consider:\nA) water\nB) ethanol\nC) acetone\nWhich has the highest boiling point?",
     "Consider:\nWhich has the highest boiling point?", ("water", "ethanol", "acetone")),
    ("I have three beakers: A) water, B) ethanol, C) acetone. Which evaporates fastest and why?",
     "I have three beakers:\nWhich evaporates fastest and why?", ("water", "ethanol", "acetone")),
    ("Consider:\nA) water\nB) ethanol\nWhich one is it?", "Consider:", ("water", "ethanol")),
    # orders to choose from, a choice of one, a task whose items are the answers
    ("Order the pairs from least to most favourable:\nA) (2,2), (3,2)\nB) (3,2), (2,2)",
     "Order the pairs from least to most favourable:", ("(2,2), (3,2)", "(3,2), (2,2)")),
    ("Which element has more than one isotope?\nA) Neon\nB) Iron", "Which element has more than one isotope?",
     ("Neon", "Iron")),
    ("Write 5.875 as a fraction.\nA) 47/8\nB) 5/8", "Write 5.875 as a fraction.", ("47/8", "5/8")),
    # ...and questions a first version of those rules dropped (found by a review): a noun "order" or "rank", a
    # choice the stem describes, a definition or a reaction of the stem's own, and "choose the correct answer"
    ("Order of the reaction 2A -> B is?\nA) 0\nB) 1", "Order of the reaction 2A -> B is?", ("0", "1")),
    ("Rank of the matrix [[1,2],[2,4]] is:\nA) 1\nB) 2", "Rank of the matrix [[1,2],[2,4]] is:", ("1", "2")),
    ("Arrange in increasing order:\nA) 2-1-3\nB) 1-2-3", "Arrange in increasing order:", ("2-1-3", "1-2-3")),
    ("If you select two cards, what is the chance both are aces? A) 1/221 B) 1/169 C) 1/13",
     "If you select two cards, what is the chance both are aces?", ("1/221", "1/169", "1/13")),
    ("Define f(x) = 2x. Find f(2).\nA) 2\nB) 4", "Define f(x) = 2x. Find f(2).", ("2", "4")),
    ("Match List I with List II and choose the correct answer using the codes:\nA) 1-a, 2-b\nB) 1-b, 2-a",
     "Match List I with List II and choose the correct answer using the codes:", ("1-a, 2-b", "1-b, 2-a")),
    ("Classify the reaction 2H2 + O2 -> 2H2O:\nA) combination\nB) decomposition",
     "Classify the reaction 2H2 + O2 -> 2H2O:", ("combination", "decomposition")),
    # (a second review's): "put" asks no order, a line that asks, "two-dimensional", a cloze stem's "is that right?"
    ("Put the block on a 30 degree incline. What is its acceleration?\nA) 4.9 m/s2\nB) 9.8 m/s2",
     "Put the block on a 30 degree incline. What is its acceleration?", ("4.9 m/s2", "9.8 m/s2")),
    ("Arrange the resistors in parallel. What is the total resistance?\nA) 2 ohm\nB) 4 ohm",
     "Arrange the resistors in parallel. What is the total resistance?", ("2 ohm", "4 ohm")),
    ("Which two-dimensional shape has 3 sides?\nA) square\nB) triangle", "Which two-dimensional shape has 3 sides?",
     ("square", "triangle")),
    ("The unit of force is A) joule B) watt C) newton. is that right?", "The unit of force is",
     ("joule", "watt", "newton")),
    ("Which is prime? A) 4 B) 6 C) 7. i.e. only 1 and itself", "Which is prime?",
     ("4", "6", "7. i.e. only 1 and itself")),
    ("Which two objects conduct? A) tin and steel B) rubber and wood C) glass and air", "Which two objects conduct?",
     ("tin and steel", "rubber and wood", "glass and air")),  # its options are pairs: one letter answers it
    # options written below their labels, the last one as the others
    ("Plants take in the gas\nA)\nOxygen\nB)\nCarbon dioxide\nC)\nNitrogen\nThanks!", "Plants take in the gas",
     ("Oxygen", "Carbon dioxide", "Nitrogen")),
])
def test_a_pasted_question_is_read_with_its_options(text, stem, options):
    question = find_question(text)
    assert question is not None and (question.question, question.options) == (stem, options)


@pytest.mark.parametrize("label", ["- A)", "* A.", "+ (a)", "\u2022 A:", "**A)**", "__A.__", "*A)*", "- **A.**"])
def test_options_pasted_as_a_list_or_with_bold_labels_are_read(label):
    """Copied from a web page or a chat model's answer, options come as a list ("- A) water") or with bold labels
    ("**A)** water"), which were read as no question (found by a review). Pasted so, the validation splits are read
    as often as plainly (ARC-Easy 563 of 570, MMLU 1,523 of 1,531)."""
    lines = [label.replace("A", letter).replace("a", letter.lower()) for letter in "ABCD"]
    options = ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"]
    pasted = "\n".join(f"{line} {option}" for line, option in zip(lines, options, strict=True))
    found = find_question("Which gas do plants absorb?\n" + pasted)
    assert found is not None and found.question == "Which gas do plants absorb?" and list(found.options) == options


@pytest.mark.parametrize("text", [
    "Solve the following:\n- a) 2x + 3 = 7\n- b) 3x - 5 = 10\n- c) x/2 = 4",
    "Solve:\nA) 2x = 4\nB) 3x = 9\nC) x + 1 = 2",
    "Simplify each expression:\na) 2(x+1)\nb) 3(x-2)\nc) 4(x+3)",
])
def test_a_worksheets_parts_to_solve_are_no_options(text):
    """Lettered parts under "Solve the following:" are each to be worked, not one to choose: the answer opened with
    "The answer is A) 2x + 3 = 7" (found by a review, with bullets; plainly lettered it was read so before)."""
    assert find_question(text) is None


@pytest.mark.parametrize("text", ["Solve for x: 2x = 4\nA) 1\nB) 2\nC) 3",
                                  "Evaluate the following: 3+4\nA) 6\nB) 7\nC) 8"])
def test_a_problem_to_solve_with_its_options_is_still_a_question(text):
    assert find_question(text) is not None


def test_a_bulleted_list_without_labels_is_still_no_question():
    assert find_question("Bring to the lab:\n- goggles\n- gloves\n* A lab coat\n* B sharp pencils") is None


@pytest.mark.parametrize("text", [
    "Why is the sky blue?",
    "We could try plan A. Then plan B. Then go home.",  # two labels on one line read as prose
    "A) first\nB) second",  # no question before the options
    "Pick one:\nA) same\nB) same",  # options /mcq refuses (duplicates): answered as any chat
    "Which one?\nA) only one option",
    "Compare these:\nA) salt\nC) sugar",  # not A, B, ... in order
    # A problem's parts: tasks or questions of their own, not options to choose from.
    "Question 3: a car speeds up from rest at 2 m/s^2.\na) Find its speed after 5 s.\nb) How far has it gone?",
    "A ball is thrown up at 10 m/s. a) Calculate the time to the top. b) Explain why. c) Draw the graph.",
    # Prose that names things A, B, C on one line: its answer opened with "B) 4 ohms, resistor" (found by a review)
    "In the circuit, resistor A: 2 ohms, resistor B: 4 ohms, resistor C: 6 ohms are in series. What is the total?",
    "A triangle has vertices A: (0, 0), B: (4, 0), C: (0, 3). Find its area.",
    "I got an A. My friend got a B. Then we both got a C. What should I do?",
    # A list the student asks about, or a task over its items, is no question to choose for
    "Quick question about my notes:\nA. Cells are the basic unit of life\nB. All cells come from cells\n"
    "Is this the full cell theory?",
    "Compare:\nA) mitosis\nB) meiosis",
    "Compare organisms (a) bacteria (b) fungi (c) plants",
    "Solution A: pH 3. Solution B: pH 7. Solution C: pH 11. Which is most acidic?",
    "Vitamin A: carrots, Vitamin B: grains, Vitamin C: oranges",
    "Explain the difference between these:\n(a) speed\n(b) velocity",
    # A blank last option (the student's next line is no option): the next line was read as one, or as what
    # follows the options, so the two readings disagreed on where the options end.
    "The sky is blue due to\nA) scattering\nB) reflection\nC)\nDescribe the ocean\nthanks",
    "The sky is blue due to\nA) scattering\nB) reflection\nC) \nExplain how a rainbow forms.",
    # Items to order, sort, match, define or tell about, each to judge true or false, and questions with several
    # right options: no one letter answers them, yet the answer opened with one (found by a review, 2026-12-07)
    "Rank these from smallest to largest:\nA) atom\nB) cell\nC) molecule\nD) organ",
    "Put these in order of size:\nA) atom\nB) cell\nC) organ",
    "Sort into metals and nonmetals:\nA) iron\nB) oxygen\nC) copper",
    "Match each term with its definition:\nA) atom\nB) cell",
    "Define each:\nA) atom\nB) cell",
    "Can you tell me about:\nA) volcanoes\nB) earthquakes",
    "True or false for each of these:\nA) The sun is a star\nB) The moon is a planet",
    "Which of these are noble gases? Select all that apply.\nA) Neon\nB) Iron\nC) Argon",
    "Which are mammals? More than one answer is right.\nA) whale\nB) shark\nC) bat",
    "Choose two of these renewable sources:\nA) wind\nB) coal\nC) solar",
    # (a second review's) the number alone, in brackets, in the question, or after the options; an object the first
    # version of the narrowed rules did not know
    "Which of the following are metals? Choose two.\nA) Fe\nB) O\nC) Cu",
    "Which are metals? (choose 2)\nA) Fe\nB) O\nC) Cu",
    "Which are metals?\nA) Fe\nB) O\nC) Cu\nChoose two.",
    "Match column I with column II:\nA) atom\nB) cell",
    "Classify as metal or nonmetal:\nA) iron\nB) oxygen",
    "True or false for each, correct the false ones:\nA) The sun is a star\nB) The moon is a planet",
])
def test_text_that_is_not_a_multiple_choice_question_is_left_alone(text):
    assert find_question(text) is None


BLANKS = " \t" * 50_000


@pytest.mark.parametrize(("text", "stem"), [
    (f"Which{BLANKS}gas?\nA) Oxygen\nB) Helium", f"Which{BLANKS}gas?"),
    (f"Which gas? answer options{BLANKS}x\nA) Oxygen\nB) Helium", f"Which gas? answer options{BLANKS}x"),
    (f"Question{BLANKS}x\nA) Oxygen\nB) Helium", f"Question{BLANKS}x"),
    (f"Which{BLANKS}gas?\nAnswer options{BLANKS}:{BLANKS}\nA) Oxygen\nB) Helium", f"Which{BLANKS}gas?"),
    ("Pick one: " + "(a) " * 30_000 + "\nA) Oxygen\nB) Helium", "Pick one:" + " (a)" * 30_000),
])
def test_long_runs_of_blanks_or_labels_are_read_as_short_ones(text, stem):
    # Each took time quadratic in its length (minutes here): the stem's patterns scanned a run of blanks once per
    # blank, and every label searched back to its line's start and read every later label again.
    question = find_question(text)
    assert question is not None and (question.question, question.options) == (stem, ("Oxygen", "Helium"))


def test_a_long_line_of_labels_is_no_question():
    assert find_question("A) " * 50_000) is None
    assert find_question("Which? " + "A) x B) y " * 20_000) is None  # two in order, never three


def test_every_question_a_message_holds_is_found_in_order():
    text = "1. Which is a gas?\nA) ice\nB) steam\n2. Which is a solid?\nA) ice\nB) steam"
    first, second = find_questions(text)
    assert first.question == "1. Which is a gas?" and second.question.endswith("2. Which is a solid?")
    assert find_questions(text, limit=1) == [first] and find_questions("Why is the sky blue?") == []


def test_the_opening_says_as_much_as_the_confidence_allows():
    assert answer_opening("B", "Carbon dioxide", 0.8, 0.5) == "The answer is B) Carbon dioxide. This is because"
    assert answer_opening("B", "Carbon dioxide", 0.3, 0.5) == (
        "I'm not sure, but I think the answer is B) Carbon dioxide. This is because")
    assert answer_opening("C", "Do algae make food?", 0.9, 0.5) == (
        "The answer is C) Do algae make food? This is because")
    assert answer_opening(None, None, 0.2, 0.5).startswith("I'm not sure which of these options is right")
    # the setting is read for four options: two need as much of the way from chance to certainty (a tie is no sure
    # answer; every two-option answer was said plainly at 0.5), five or more never less than the setting
    assert answer_opening("A", "True", 0.5, 0.5, options=2).startswith("I'm not sure, but")
    assert answer_opening("A", "True", 0.66, 0.5, options=2).startswith("I'm not sure, but")
    assert answer_opening("A", "True", 0.67, 0.5, options=2).startswith("The answer is")
    assert sure_line(0.5, 4) == 0.5 and sure_line(0.5, 5) == 0.5 and round(sure_line(0.5, 3), 4) == 0.5556
    assert sure_line(0.9, 2) > 0.9 and sure_line(0.0, 2) == 0.0


def test_an_answer_may_not_conclude_with_any_option_but_its_own():
    banned = other_conclusions("B", "Carbon dioxide", 4)
    assert "answer is D" in banned and "answer is: A" in banned and "Answer: D" in banned
    assert not [phrase for phrase in banned if phrase.endswith(("B", "C"))]  # nor the letter its text starts with
    assert {phrase[-1] for phrase in other_conclusions("A", "oxygen", 6)} == set("BCDEF")
    assert {phrase[-1] for phrase in other_conclusions("B", "A chemical change", 4)} == set("CD")
    # With the tokenizer: the letter is kept only where the option's first token is that letter's
    tokens = {" Carbon dioxide": [14488, 7600], " C": [340], " H2O": [407, 34], " H": [407]}.__getitem__
    assert "answer is C" in other_conclusions("B", "Carbon dioxide", 4, tokens)
    assert "answer is H" not in other_conclusions("A", "H2O", 8, tokens)
    # vLLM refuses more than 128 banned token sequences (each phrase counts twice: with and without a space)
    assert 2 * len(other_conclusions("A", "x", 10)) <= 128


def messages(text=PASTED):
    return [{"role": "user", "content": text}]


async def test_a_pasted_question_is_answered_as_mcq_would_and_the_model_goes_on_from_it(served):
    mcq = await served.client.post("/mcq", json={"question": "Which gas do plants absorb from the air?",
                                                 "options": ["Oxygen", "Carbon dioxide", "Helium", "Neon"]})
    assert mcq.json()["answer"] == "B"  # the stub scores options holding "Carbon" highest
    r = await served.client.post(CHAT, json={"messages": messages(), "max_tokens": 40})
    assert r.status_code == 200, r.text
    body = r.json()
    opening = "The answer is B) Carbon dioxide. This is because"
    content = body["choices"][0]["message"]["content"]
    assert content.startswith(opening) and content != opening  # the model's own words follow
    prompt, params = served.engine.calls[-1]
    tokenizer = served.engine.tokenizer
    opening_ids = tokenizer.encode(opening, add_special_tokens=False)
    assert prompt[-len(opening_ids):] == opening_ids  # the engine continues the opening
    assert params.max_tokens == 40 - len(opening_ids)  # the answer, opening included, keeps the client's limit
    # nor conclude with another option: " Carbon" is one token, not " C", so "answer is C" is banned too
    assert params.bad_words == other_conclusions("B", "Carbon dioxide", 4, lambda t: tokenizer.encode(
        t, add_special_tokens=False))
    assert "answer is C" in params.bad_words and "answer is B" not in params.bad_words
    assert body["usage"]["prompt_tokens"] == len(prompt) - len(opening_ids)
    generated = len(tokenizer.encode(served.engine.reply, add_special_tokens=False)[:params.max_tokens])
    assert body["usage"]["completion_tokens"] == len(opening_ids) + generated
    log = await served.flushed_log()
    chat = await log.get(body["id"])
    assert chat["response"][0]["content"].startswith(opening)  # the log keeps the answer as sent (redacted)
    assert chat["params"]["max_tokens"] == 40
    assert chat["params"]["mcq"]["answer"] == "B" and chat["params"]["mcq"]["id"] == f"{body['id']}-mcq"
    assert chat["params"]["mcq"]["keep_answer"] is True and "bad_words" not in chat["params"]  # implied by it
    scored = await log.get(f"{body['id']}-mcq")
    assert scored["route"] == "mcq" and scored["response"][0]["answer"] == "B"


async def test_the_stream_opens_with_the_same_words(served):
    whole = (await served.client.post(CHAT, json={"messages": messages(), "max_tokens": 30, "seed": 1})).json()
    async with served.client.stream("POST", CHAT, json={"messages": messages(), "max_tokens": 30, "seed": 1,
                                                        "stream": True}) as r:
        events = [json.loads(line[6:]) async for line in r.aiter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert deltas[0] == "" and deltas[1] == "The answer is B) Carbon dioxide. This is because"
    assert "".join(d or "" for d in deltas) == whole["choices"][0]["message"]["content"]


async def test_the_opening_is_left_out_where_it_cannot_serve(app_factory):
    async with app_factory(chat_mcq=False) as served:  # the operator turned it off
        before = len(served.engine.calls)  # the warm-up's
        r = await served.client.post(CHAT, json={"messages": messages(), "max_tokens": 20})
        assert not r.json()["choices"][0]["message"]["content"].startswith("The answer is")
        assert len(served.engine.calls) == before + 1  # the chat alone: nothing was scored
    async with app_factory() as served:
        plain = served.engine.reply
        asks = [
            {"messages": messages(), "max_tokens": 20, "logprobs": True},  # the opening was not sampled
            {"messages": [*messages(), {"role": "assistant", "content": "B"}, {"role": "user", "content": "Why?"}],
             "max_tokens": 20},  # the question is not what the student asks now
            {"messages": messages(), "max_tokens": 5},  # no room for the opening and an answer
            # a stop string the opening holds: vLLM would not see it in the prompt, and the text would run past it
            {"messages": messages(), "max_tokens": 20, "stop": [". This"]},
            # several samples: one opening for all would make them copies of one answer (self-consistency, pass@k)
            {"messages": messages(), "max_tokens": 20, "n": 2, "temperature": 1.0},
        ]
        for ask in asks:
            r = await served.client.post(CHAT, json=ask)
            assert r.status_code == 200, r.text
            assert all(plain.startswith(c["message"]["content"]) for c in r.json()["choices"]), ask


async def test_no_option_is_held_to_when_the_opening_names_none_or_the_operator_says_so(app_factory):
    async with app_factory(mcq_min_confidence=0.99) as served:  # /mcq abstains: the opening names no option
        r = await served.client.post(CHAT, json={"messages": messages(), "max_tokens": 40})
        assert r.json()["choices"][0]["message"]["content"].startswith("I'm not sure which of these options")
        assert served.engine.calls[-1][1].bad_words == []
    async with app_factory(chat_mcq_keep_answer=False) as served:
        r = await served.client.post(CHAT, json={"messages": messages(), "max_tokens": 40})
        assert r.json()["choices"][0]["message"]["content"].startswith("The answer is B)")
        assert served.engine.calls[-1][1].bad_words == []
    # Two pasted questions: the first is answered, and the second's right letter may still be written
    async with app_factory() as served:
        two = PASTED + "\n2. Which gas do we breathe out?\nA) Oxygen\nB) Carbon dioxide\nC) Helium\nD) Neon"
        r = await served.client.post(CHAT, json={"messages": [{"role": "user", "content": two}], "max_tokens": 40})
        assert r.json()["choices"][0]["message"]["content"].startswith("The answer is B)")
        assert served.engine.calls[-1][1].bad_words == []
        r = await served.client.post(CHAT, json={"messages": messages(), "max_tokens": 40})
        assert served.engine.calls[-1][1].bad_words  # one question: held to its option


async def test_a_fault_while_scoring_still_answers_and_logs_the_chat(served, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("scoring broke")

    monkeypatch.setattr(served.app.state.tutor, "answer_mcq", broken)
    r = await served.client.post(CHAT, json={"messages": messages(), "max_tokens": 20})
    assert r.status_code == 200 and served.engine.reply.startswith(r.json()["choices"][0]["message"]["content"])
    row = await (await served.flushed_log()).get(r.json()["id"])
    assert row["status"] == "ok" and "mcq" not in row["params"]


async def test_a_review_candidate_goes_on_from_the_same_opening(app_factory):
    async with app_factory(review_share=1.0, review_candidate_temperature=0.7) as served:
        r = await served.client.post(CHAT, json={"messages": messages(), "max_tokens": 30})
        await served.app.state.tutor.candidates.idle()
        log = await served.flushed_log()
        from sqlalchemy import select

        from service.store.models import Generation

        async with log.engine.connect() as conn:
            candidate = (await conn.execute(select(Generation).where(Generation.parent_id == r.json()["id"]))
                         ).mappings().one()
        assert candidate["response"][0]["content"].startswith("The answer is B) Carbon dioxide. This is because")
        assert candidate["params"]["max_tokens"] == 30  # the student's limit, the opening counted in it


# Found by a review of the /mcq paths (2026-12-07, late) ----------------------------------------------------------

@pytest.mark.parametrize("text", ["Which is it? A) x B) y C) ,", "Which is it? A) x B) y C) ;",
                                  "Which is it? A) x, B) y, C) , or"])
def test_a_last_option_of_separators_alone_is_no_question_not_a_crash(text):
    """Its separator taken off, the last option was empty, and reading its closing stop raised IndexError: every
    such chat was a 500."""
    assert find_questions(text) == []


async def test_a_chat_whose_last_option_is_a_separator_is_answered(served):
    r = await served.client.post(CHAT, json={"messages": messages("Which is it? A) x B) y C) ,"), "max_tokens": 8})
    assert r.status_code == 200, r.text


def test_a_second_pasted_question_lends_the_first_none_of_its_options():
    """A two-option question followed by a four-option one was read as one question, True / False / Jupiter /
    Earth: the tutor answered "C) Jupiter" and was banned from concluding with the true/false letters."""
    text = ("1. True or false: the Sun is a star.\nA) True\nB) False\n\n2. Which planet is largest?\nA) Mars\n"
            "B) Venus\nC) Jupiter\nD) Earth")
    first, second = find_questions(text)
    assert (first.question, first.options) == ("1. True or false: the Sun is a star.", ("True", "False"))
    assert second.options == ("Mars", "Venus", "Jupiter", "Earth")


@pytest.mark.parametrize(("text", "options"), [
    ("Which is a mammal?\nA) Shark\nB) Whale\nI saw this in part C) of my worksheet.", ("Shark", "Whale")),
    ("Is the Sun a star?\nA) Yes\nB) No\n\nAlso, which is bigger, C) the Moon or D) the Earth?", ("Yes", "No")),
])
def test_a_later_label_in_the_students_prose_is_no_option_of_a_question_written_a_line_each(text, options):
    """A "C)" later in the student's words joined the run, and the question was read again as options on one line:
    "Whale I saw this in part" and "of my worksheet"."""
    assert find_question(text).options == options


@pytest.mark.parametrize("text", ["Which is a noble gas?\nA) Oxygen\nB) Helium\nD) Nitrogen",
                                  "Which is a noble gas? A) Oxygen B) Helium D) Neon E) Argon"])
def test_a_question_that_skips_a_letter_is_no_question(text):
    """Read as A and B alone, D never scored: the tutor chose between two of the options it was given."""
    assert find_questions(text) == []


async def test_a_fault_of_the_readers_rules_answers_the_chat_as_any_chat(served, monkeypatch):
    from zephyr import chat_mcq

    def broken(*_args, **_kwargs):
        raise IndexError("string index out of range")

    monkeypatch.setattr(chat_mcq, "find_questions", broken)
    r = await served.client.post(CHAT, json={"messages": messages(), "max_tokens": 8})
    assert r.status_code == 200 and not r.json()["choices"][0]["message"]["content"].startswith("The answer is")


@pytest.mark.parametrize(("text", "options"), [
    # an option that quotes a label: no end of the question (the first fix read three options of four)
    ("Which of the following are greenhouse gases?\n(a) Carbon dioxide\n(b) Methane\n(c) Both (a) and (b)\n"
     "(d) None of these", ("Carbon dioxide", "Methane", "Both (a) and (b)", "None of these")),
    ("Which is right?\nA) x\nB) y\nC) Both A) and B) are correct\nD) None", ("x", "y", "Both A) and B) are correct",
                                                                           "None")),
    ("Assertion: X.\nReason: Y.\n(A) Both (A) and (R) are true\n(B) A is true, R false\n(C) A false\n(D) both false",
     ("Both (A) and (R) are true", "A is true, R false", "A false", "both false")),
    ("Which? (a) CO2 (b) CH4 (c) both (a) and (b) (d) none of these", ("CO2", "CH4", "both (a) and (b)",
                                                                      "none of these")),
    # two options on the last line, as a PDF pastes them
    ("Which is the smallest?\nA) 1\nB) 2\nC) 3   D) 4", ("1", "2", "3", "4")),
    ("Which is a compound?\nA) Sand\nB) Sugar\nC) Salt, D) Water", ("Sand", "Sugar", "Salt", "Water")),
])
def test_labels_an_option_quotes_or_that_share_a_line_keep_the_question_whole(text, options):
    """Found by a review of the first fix (the next "A" ended every run; a label off a line's start ended a run of
    lines even on the last option's own line)."""
    assert find_question(text).options == options
