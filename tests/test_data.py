import pytest
import torch
from tiny import tiny_tokenizer, write_jsonl

from ilora import ILoRAError
from ilora.data.encode import IGNORE_INDEX, PadCollator, encode_example, format_context
from ilora.data.formats import read_rows

TOK = tiny_tokenizer()
CHAT = tiny_tokenizer(chat_template=True)


def test_loss_is_on_response_tokens_only_and_ends_with_eos():
    example = encode_example(TOK, "Review: dull. Sentiment:", " negative", cutoff_len=64, use_chat_template=False)
    prompt_len = len(TOK("Review: dull. Sentiment:")["input_ids"])
    labels = example["labels"]
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == example["input_ids"][prompt_len:]
    assert labels[-1] == TOK.eos_token_id
    assert TOK.decode(labels[prompt_len:-1]) == " negative"


def test_chat_template_is_applied_when_present_and_can_be_turned_off():
    with_template = encode_example(CHAT, "hi", "yes", cutoff_len=64, use_chat_template=True)
    without = encode_example(CHAT, "hi", "yes", cutoff_len=64, use_chat_template=False)
    assert CHAT.decode(with_template["input_ids"]).startswith("<s>user: hi\nassistant: ")
    assert len(with_template["input_ids"]) > len(without["input_ids"])
    assert format_context(TOK, [{"role": "user", "content": "hi"}], use_chat_template=True) == "hi"  # no template


def test_truncation_cuts_the_prompt_start_and_keeps_the_response():
    prompt = " ".join(f"word{i}" for i in range(40)) + " Sentiment:"
    example = encode_example(TOK, prompt, " positive", cutoff_len=24, use_chat_template=False)
    assert len(example["input_ids"]) == 24
    kept = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert TOK.decode(kept[:-1]) == " positive"
    assert TOK.decode(example["input_ids"]).rstrip("</s>").endswith("Sentiment: positive")


def test_alpaca_keys_are_accepted(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Classify", "input": "great", "output": "positive"}])
    [row] = read_rows(path).to_list()
    assert row["prompt"] == "Classify\ngreat" and row["response"] == "positive"


def test_non_utf8_and_missing_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(ILoRAError, match="bad.jsonl: not UTF-8"):
        read_rows(bad)
    with pytest.raises(ILoRAError, match="nope.jsonl: no such file"):
        read_rows(tmp_path / "nope.jsonl")
    arr = tmp_path / "arr.jsonl"
    arr.write_text("[1, 2]\n")
    with pytest.raises(ILoRAError, match="arr.jsonl:1: expected a JSON object"):
        read_rows(arr)


def test_collator_right_pads_with_pad_id_and_ignore_labels():
    batch = PadCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["lengths"] == [3, 1] and batch["input_ids"].dtype == torch.long
