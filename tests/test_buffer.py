import collections
import json

import pytest
import torch

from ilora import ILoRAError, ReplayBuffer
from ilora.core.buffer import POLICIES, BufferSpec


def row(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(i % 5 + 1) + i
    return ids, torch.where(ids % 2 == 0, ids, torch.full_like(ids, -100))


def test_capacity_is_respected_and_all_seen_are_counted():
    buffer = ReplayBuffer(capacity=10, seed=0)
    for i in range(100):
        buffer.add(*row(i))
        assert len(buffer) == min(i + 1, 10)
    assert buffer.num_seen == 100


def test_zero_capacity_stores_nothing():
    buffer = ReplayBuffer(capacity=0)
    buffer.add(*row(1))
    assert len(buffer) == 0 and buffer.num_seen == 1


def test_reservoir_keeps_each_example_with_probability_capacity_over_seen():
    capacity, seen, trials = 5, 20, 4000
    kept = collections.Counter()
    for trial in range(trials):
        buffer = ReplayBuffer(capacity, seed=trial)
        for i in range(seen):
            buffer.add(torch.tensor([i]), torch.tensor([i]))
        kept.update(int(t[0]) for t in buffer.input_ids)
    expected = trials * capacity / seen  # 1000 per example
    sd = (trials * (capacity / seen) * (1 - capacity / seen)) ** 0.5
    for i in range(seen):
        assert abs(kept[i] - expected) < 4.5 * sd, (i, kept[i], expected)
    # early and late examples are kept equally often (not a FIFO, not "first come")
    first, last = sum(kept[i] for i in range(5)), sum(kept[i] for i in range(15, 20))
    assert abs(first - last) < 0.1 * first


def test_sample_is_without_replacement_and_bounded_by_size():
    buffer = ReplayBuffer(capacity=8, seed=1)
    for i in range(8):
        buffer.add(torch.tensor([i]), torch.tensor([i]))
    ids, labels, _ = buffer.sample(5)
    values = [int(t[0]) for t in ids]
    assert len(values) == 5 and len(set(values)) == 5
    assert len(buffer.sample(50)[0]) == 8


def test_save_load_round_trip_is_exact_including_rng(tmp_path):
    buffer = ReplayBuffer(capacity=7, seed=3)
    for i in range(30):
        buffer.add(*row(i), task_id=f"t{i % 3}")
    buffer.save(tmp_path)
    loaded = ReplayBuffer.load(tmp_path, BufferSpec(7))
    assert loaded.num_seen == buffer.num_seen and loaded.task_ids == buffer.task_ids
    for a, b in zip(buffer.input_ids + buffer.labels, loaded.input_ids + loaded.labels):
        assert torch.equal(a, b)
    # the RNG continues identically: same future samples and same future replacements
    assert [t.tolist() for t in buffer.sample(4)[0]] == [t.tolist() for t in loaded.sample(4)[0]]
    for i in range(30, 60):
        buffer.add(*row(i))
        loaded.add(*row(i))
    assert [t.tolist() for t in buffer.input_ids] == [t.tolist() for t in loaded.input_ids]


@pytest.mark.parametrize(
    "other",
    [BufferSpec(5), BufferSpec(4, "balanced"), BufferSpec(4, unit="tokens")],
    ids=["capacity", "policy", "unit"],
)
def test_load_refuses_a_different_budget_unit_or_policy(tmp_path, other):
    ReplayBuffer(capacity=4).save(tmp_path)
    with pytest.raises(
        ILoRAError, match=r"this task's replay buffer \(.*\) differs from the previous task's \(reservoir, 4 rows"
    ):
        ReplayBuffer.load(tmp_path, other)


# ------------------------------------------------------------ policies and token budgets
def fill(buffer: ReplayBuffer, tasks: dict[str, int], surprise=None) -> None:
    """Offer `tasks[name]` rows of each task in turn (row i of the stream: tokens [i] * (1 + i % 3))."""
    i = 0
    for task, count in tasks.items():
        for _ in range(count):
            ids = torch.full((1 + i % 3,), i)
            buffer.add(ids, ids.clone(), task, surprise=None if surprise is None else surprise(i))
            i += 1


def test_a_token_budget_holds_at_most_that_many_tokens_and_a_row_larger_than_it_is_not_kept():
    buffer = ReplayBuffer(10, seed=0, unit="tokens")
    fill(buffer, {"a": 40})
    assert buffer.used() == sum(len(t) for t in buffer.input_ids) <= 10 and len(buffer) >= 10 // 3
    buffer.add(torch.arange(11), torch.arange(11), "a")
    assert all(len(t) < 11 for t in buffer.input_ids) and buffer.num_seen == 41


def test_reservoir_in_tokens_keeps_early_and_late_rows_alike():
    kept = collections.Counter()
    for seed in range(600):
        buffer = ReplayBuffer(12, seed=seed, unit="tokens")
        fill(buffer, {"a": 30})
        kept.update(int(t[0]) for t in buffer.input_ids)
    first, last = sum(kept[i] for i in range(15)), sum(kept[i] for i in range(15, 30))
    assert abs(first - last) < 0.1 * first, (first, last)


@pytest.mark.parametrize("unit, capacity", [("rows", 9), ("tokens", 20)])
def test_balanced_gives_every_task_an_equal_share_the_remainder_to_the_earlier(unit, capacity):
    buffer = ReplayBuffer(capacity, seed=1, policy="balanced", unit=unit)
    fill(buffer, {"a": 60, "b": 60, "c": 60})
    assert buffer.shares() == {
        "a": capacity // 3 + (capacity % 3 > 0),
        "b": capacity // 3 + (capacity % 3 > 1),
        "c": capacity // 3,
    }
    usage = collections.Counter()
    for ids, task in zip(buffer.input_ids, buffer.task_ids):
        usage[task] += 1 if unit == "rows" else len(ids)
    # rows: exactly the shares; tokens: each task within one row (at most 3 tokens) of its share
    slack = 0 if unit == "rows" else 2
    assert all(abs(usage[t] - share) <= slack for t, share in buffer.shares().items()), (usage, buffer.shares())


def test_balanced_shrinks_earlier_tasks_only_as_a_new_task_needs_room():
    buffer = ReplayBuffer(6, seed=2, policy="balanced")
    fill(buffer, {"a": 20, "b": 1})
    assert collections.Counter(buffer.task_ids) == {"a": 5, "b": 1}


def test_surprise_keeps_the_highest_losses_and_on_a_tie_the_earlier_row():
    buffer = ReplayBuffer(4, policy="surprise")
    losses = [0.5, 3.0, 1.0, 3.0, 2.0, 0.1, 3.0, 2.5]  # rows 1, 3, 6 (3.0) and 7 (2.5) are kept
    fill(buffer, {"a": len(losses)}, surprise=lambda i: losses[i])
    assert sorted(int(t[0]) for t in buffer.input_ids) == [1, 3, 6, 7]
    buffer.add(torch.tensor([9]), torch.tensor([9]), "a", surprise=2.5)  # ties the lowest kept: the later goes
    assert sorted(int(t[0]) for t in buffer.input_ids) == [1, 3, 6, 7]
    with pytest.raises(ILoRAError, match="surprise replay policy needs each row's loss"):
        buffer.add(torch.tensor([9]), torch.tensor([9]), "a")


@pytest.mark.parametrize("policy, unit", [("balanced", "rows"), ("reservoir", "tokens"), ("surprise", "tokens")])
def test_a_policys_state_round_trips_so_a_continued_buffer_keeps_what_the_uninterrupted_one_keeps(
    tmp_path, policy, unit
):
    def loss(i):
        return float((i * 7) % 11)

    buffer = ReplayBuffer(8, seed=4, policy=policy, unit=unit)
    fill(buffer, {"a": 15, "b": 10}, surprise=loss)
    buffer.save(tmp_path)
    loaded = ReplayBuffer.load(tmp_path, BufferSpec(8, policy, unit))
    assert (loaded.priorities, loaded.arrivals, loaded.tasks_seen) == (
        buffer.priorities,
        buffer.arrivals,
        buffer.tasks_seen,
    )
    for b in (buffer, loaded):
        for i in range(25, 45):
            ids = torch.full((1 + i % 3,), i)
            b.add(ids, ids.clone(), "c", surprise=loss(i))
    assert [t.tolist() for t in buffer.input_ids] == [t.tolist() for t in loaded.input_ids]
    assert buffer.sample(3)[0][0].tolist() == loaded.sample(3)[0][0].tolist()


def test_a_damaged_policy_state_is_one_line(tmp_path):
    buffer = ReplayBuffer(4, policy="surprise")
    fill(buffer, {"a": 6}, surprise=float)
    buffer.save(tmp_path)
    state = json.loads((tmp_path / "buffer.json").read_text())
    state["priorities"][0] = "high"
    (tmp_path / "buffer.json").write_text(json.dumps(state))
    with pytest.raises(ILoRAError, match="'priorities' in buffer.json holds 'high'"):
        ReplayBuffer.load(tmp_path)


def test_the_settings_and_the_buffer_know_the_same_policies():
    from ilora.config.arguments import REPLAY_POLICIES

    assert REPLAY_POLICIES == POLICIES


def test_load_of_missing_files_names_the_file(tmp_path):
    with pytest.raises(ILoRAError, match="buffer.safetensors"):
        ReplayBuffer.load(tmp_path)
