import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_llama, tiny_tokenizer

from ilora import ILoRAError
from ilora.evaluation.scoring import (
    build_test_set,
    evaluate,
    length_grouped_batches,
    normalise,
    predict_choices,
    score_choices,
    score_choices_naive,
)

TOK = tiny_tokenizer()
CHOICES = ["positive", "negative", "neutral", "great film"]


def rows(n=9):
    words = ["great", "dull", "superb"]
    return [
        {
            "prompt": f"Review {i}: the film was {words[i % 3]}" + " really" * (i % 4) + ". Sentiment:",
            "response": CHOICES[i % 3],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def model():
    return tiny_llama().eval()


def direct_log_likelihood(model, prompt_ids, answer_ids):
    ids = torch.tensor([prompt_ids + answer_ids])
    logp = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(answer_ids))


def test_choice_scores_equal_a_direct_computation(model):
    test = build_test_set("t", rows(), TOK, "choice", CHOICES, cutoff_len=64, use_chat_template=False)
    fast = score_choices(model, test, TOK.pad_token_id, batch_size=4)
    naive = score_choices_naive(model, test, TOK.pad_token_id, batch_size=5)
    for r in range(len(test)):
        for c in range(len(CHOICES)):
            direct = direct_log_likelihood(model, test.prompts[r], test.choice_ids[r][c])
            assert fast[r][c] == pytest.approx(direct, abs=1e-4)
            assert naive[r][c] == pytest.approx(direct, abs=1e-4)
    assert predict_choices(fast) == predict_choices(naive)


def test_per_row_choices_override_the_tasks(model):
    data = rows(4)
    data[0]["choices"] = ["positive", "negative"]
    test = build_test_set("t", data, TOK, "choice", CHOICES, cutoff_len=64, use_chat_template=False)
    scores = score_choices(model, test, TOK.pad_token_id, batch_size=3)
    assert [len(s) for s in scores] == [2, 4, 4, 4]


def test_accuracy_counts_correct_picks(model):
    test = build_test_set("t", rows(), TOK, "choice", CHOICES, cutoff_len=64, use_chat_template=False)
    result = evaluate(model, TOK, test, batch_size=4)
    picks = predict_choices(score_choices_naive(model, test, TOK.pad_token_id))
    expected = sum(CHOICES[p] == row["response"] for p, row in zip(picks, rows())) / len(test)
    assert result["accuracy"] == pytest.approx(expected)
    assert result["predictions"] == [CHOICES[p] for p in picks]


def test_exact_match_generates_and_normalises(model):
    test = build_test_set("t", rows(3), TOK, "exact_match", None, cutoff_len=64, use_chat_template=False)
    result = evaluate(model, TOK, test, batch_size=2, max_new_tokens=3)
    assert len(result["predictions"]) == 3 and result["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert normalise("  Positive!! ") == "positive" and normalise("great, film") == "great film"


def test_answer_outside_the_choices_is_an_error_naming_file_and_line():
    data = rows(3)
    data[1]["response"] = "maybe"
    with pytest.raises(ILoRAError, match=r"test.jsonl:2: answer 'maybe' is not among"):
        build_test_set("t", data, TOK, "choice", CHOICES, 64, False, source="test.jsonl")


def test_length_grouped_batches_cover_every_row_once_in_length_order():
    lengths = [5, 1, 9, 3, 7, 2]
    batches = length_grouped_batches(lengths, 4)
    assert sorted(i for b in batches for i in b) == list(range(6))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
