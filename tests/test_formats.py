"""Data in: each format on small files, the loss mask of multi-turn rows checked token by token, and
LLaMA-Factory dataset_info.json directories."""

import json
import os
import re

import datasets
import pytest
from tiny import sentiment_rows, tiny_tokenizer, two_task_config, write_jsonl

from ilora import ILoRAError
from ilora.cli import main
from ilora.data.encode import IGNORE_INDEX, encode_messages
from ilora.data.formats import read_data, read_rows

TOK = tiny_tokenizer()
CHAT = tiny_tokenizer(chat_template=True)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Review: great"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "Review: dull"},
    {"role": "assistant", "content": "negative"},
]


def spans(example):
    """Runs of trained and untrained tokens, as (trained, ids)."""
    runs = []
    for token, label in zip(example["input_ids"], example["labels"]):
        trained = label != IGNORE_INDEX
        assert not trained or label == token
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return runs


def test_multi_turn_loss_is_on_every_assistant_turn_and_nothing_else_token_by_token():
    example = encode_messages(TOK, CONVERSATION, cutoff_len=256, use_chat_template=False)
    ids = lambda text, special=False: TOK(text, add_special_tokens=special)["input_ids"]  # noqa: E731
    eos = [TOK.eos_token_id]
    expected = [
        (False, ids("Be brief.\nReview: great", special=True)),
        (True, ids("positive") + eos),
        (False, ids("\nReview: dull")),
        (True, ids("negative") + eos),
    ]
    assert spans(example) == expected


def test_multi_turn_with_a_chat_template_trains_only_the_answers():
    example = encode_messages(CHAT, CONVERSATION, cutoff_len=256, use_chat_template=True)
    runs = spans(example)
    assert [CHAT.decode(r[1]) for r in runs if r[0]] == ["positive</s>", "negative</s>"]
    context = "".join(CHAT.decode(r[1]) for r in runs if not r[0])
    assert "system: Be brief." in context and "user: Review: great" in context and "user: Review: dull" in context
    assert "positive" not in context and "negative" not in context
    # the context of the last answer is the template's own generation prompt
    assert CHAT.decode(example["input_ids"]).endswith("<s>user: Review: dull\nassistant: negative</s>")


def test_alpaca_with_system_and_history_becomes_the_same_conversation(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {
                "system": "Be brief.",
                "history": [["Review: great", "positive"]],
                "instruction": "Review:",
                "input": "dull",
                "output": "negative",
            }
        ],
    )
    [row] = read_rows(path).to_list()
    assert row["messages"] == CONVERSATION[:3] + [{"role": "user", "content": "Review:\ndull"}, CONVERSATION[4]]
    assert row["prompt"] == "Review:\ndull" and row["response"] == "negative"


@pytest.mark.parametrize("style", ["sharegpt", "openai"])
def test_sharegpt_turns_in_both_key_styles(style, tmp_path):
    if style == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        row = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CONVERSATION]}
    else:
        row = {"messages": CONVERSATION}
    [got] = read_rows(write_jsonl(tmp_path / "c.jsonl", [row])).to_list()
    assert got["messages"] == CONVERSATION


@pytest.mark.parametrize("kind", ["json", "csv", "parquet", "save_to_disk"])
def test_each_file_kind_reads_the_same_rows(kind, tmp_path):
    rows = sentiment_rows(5)
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / f"rows.{kind}"
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        table.to_csv(str(path))
    elif kind == "parquet":
        table.to_parquet(str(path))
    else:
        table.save_to_disk(str(path))
    got = read_rows(path)
    assert isinstance(got, datasets.Dataset)
    assert [(r["prompt"], r["response"]) for r in got] == [(r["prompt"], r["response"]) for r in rows]


def dataset_dir(tmp_path):
    """A LLaMA-Factory data directory: an alpaca file with renamed columns, a sharegpt file with tags."""
    directory = tmp_path / "data"
    write_jsonl(directory / "reviews.jsonl", [{"q": r["prompt"], "a": r["response"]} for r in sentiment_rows(4)])
    chats = [
        {"dialog": [{"speaker": "me", "text": r["prompt"]}, {"speaker": "bot", "text": r["response"]}]}
        for r in sentiment_rows(3, offset=10)
    ]
    (directory / "chats.json").write_text(json.dumps(chats))
    info = {
        "reviews": {"file_name": "reviews.jsonl", "columns": {"prompt": "q", "response": "a"}},
        "chats": {
            "file_name": "chats.json",
            "formatting": "sharegpt",
            "columns": {"messages": "dialog"},
            "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"},
        },
        "remote": {"hf_hub_url": "someone/something"},
    }
    (directory / "dataset_info.json").write_text(json.dumps(info))
    return directory


def test_dataset_info_maps_columns_and_tags_and_concatenates(tmp_path):
    directory = dataset_dir(tmp_path)
    rows = read_data("reviews,chats", directory)
    assert len(rows) == 7
    expected = sentiment_rows(4) + sentiment_rows(3, offset=10)
    assert [(r["prompt"], r["response"]) for r in rows] == [(r["prompt"], r["response"]) for r in expected]


def with_entry(tmp_path, **entry):
    """The data directory with one more dataset: reviews.jsonl under `entry`'s keys."""
    directory = dataset_dir(tmp_path)
    info = json.loads((directory / "dataset_info.json").read_text())
    info["more"] = {"file_name": "reviews.jsonl", "columns": {"prompt": "q", "response": "a"}, **entry}
    (directory / "dataset_info.json").write_text(json.dumps(info))
    return directory


@pytest.mark.parametrize("num_samples", [2, 4, 11])
def test_num_samples_draws_as_llama_factory_does_every_row_before_any_twice(num_samples, tmp_path):
    rows = read_data("more", with_entry(tmp_path, num_samples=num_samples))
    prompts = [r["prompt"] for r in rows]
    assert len(prompts) == num_samples
    every = [r["prompt"] for r in sentiment_rows(4)]
    assert len(set(prompts)) == min(num_samples, 4) and set(prompts) <= set(every)
    assert prompts == [r["prompt"] for r in read_data("more", with_entry(tmp_path / "again", num_samples=num_samples))]


@pytest.mark.parametrize(
    "names, entry, message",
    [
        ("reveiws", {}, "dataset 'reveiws' is not in"),
        ("remote", {}, "'hf_hub_url' needs a download"),
        ("more", {"formating": "alpaca"}, "unknown key 'formating' (did you mean 'formatting'?)"),
        ("more", {"num_sample": 3}, "unknown key 'num_sample' (did you mean 'num_samples'?)"),
        ("more", {"num_samples": 0}, "num_samples must be a whole number >= 1"),
        ("more", {"num_samples": "4"}, "num_samples must be a whole number >= 1"),
        ("more", {"split": "test"}, "a local file has one split"),
        ("more", {"subset": "en"}, "'subset' selects part of a hub dataset"),
        ("more", {"formatting": "sharegtp"}, "(did you mean 'sharegpt'?)"),
    ],
)
def test_dataset_info_refusals_name_the_culprit(names, entry, message, tmp_path):
    with pytest.raises(ILoRAError, match=re.escape(message)):
        read_data(names, with_entry(tmp_path, **entry))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"conversations": [{"from": "gpt", "value": "hi"}]}, "must alternate user and assistant"),
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "f()"}]}, "tool turn"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]},
            r"messages\[2\].content' must be a string",
        ),
        ({"instruction": "x", "output": "y", "history": [["only one"]]}, "'history' entry 1 must be a"),
    ],
)
def test_malformed_rows_are_one_line_errors_naming_file_line_and_field(row, message, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [sentiment_rows(1)[0], row])
    with pytest.raises(ILoRAError, match=rf"bad.jsonl:2: .*{message}"):
        read_rows(path)


def test_train_and_run_read_a_dataset_dir(tiny_model_dir, tmp_path):
    directory = dataset_dir(tmp_path)
    common = [
        "--lora_target",
        "q_proj,v_proj",
        "--lora_rank",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--use_cpu",
        "true",
        "--max_steps",
        "1",
        "--ilora_buffer_size",
        "4",
    ]
    argv = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        "reviews,chats",
        "--dataset_dir",
        str(directory),
        "--output_dir",
        str(tmp_path / "t1"),
        *common,
    ]
    assert main(argv) == 0
    assert json.loads((tmp_path / "t1" / "ilora_task.json").read_text())["buffer"]["num_seen"] == 4
    config = two_task_config(tmp_path, tiny_model_dir, max_steps=1, output_dir=str(tmp_path / "out"))
    config["tasks"] = [
        {
            "name": "r",
            "train": "reviews",
            "test": "reviews",
            "dataset_dir": "data",
            "choices": ["positive", "negative"],
        },
        {"name": "c", "train": "chats", "test": "chats", "dataset_dir": "data", "choices": ["positive", "negative"]},
    ]
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml")]) == 0
    summary = json.loads((tmp_path / "out" / "ilora" / "metrics.json").read_text())
    assert summary["test_rows"] == {"r": 4, "c": 3}


def test_a_file_replaced_under_the_same_time_reads_its_new_rows(tmp_path):
    # cp -p, rsync -t and tar keep modification times: what is read must follow the bytes
    path = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(4))
    stamp = path.stat().st_mtime_ns
    assert [r["prompt"] for r in read_rows(path)] == [r["prompt"] for r in sentiment_rows(4)]
    write_jsonl(path, sentiment_rows(4, offset=20))
    os.utime(path, ns=(stamp, stamp))
    assert [r["prompt"] for r in read_rows(path)] == [r["prompt"] for r in sentiment_rows(4, offset=20)]
