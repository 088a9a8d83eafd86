import collections

import pytest
import torch

from ilora import ILoRAError, ReplayBuffer


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
    loaded = ReplayBuffer.load(tmp_path, capacity=7)
    assert loaded.num_seen == buffer.num_seen and loaded.task_ids == buffer.task_ids
    for a, b in zip(buffer.input_ids + buffer.labels, loaded.input_ids + loaded.labels):
        assert torch.equal(a, b)
    # the RNG continues identically: same future samples and same future replacements
    assert [t.tolist() for t in buffer.sample(4)[0]] == [t.tolist() for t in loaded.sample(4)[0]]
    for i in range(30, 60):
        buffer.add(*row(i))
        loaded.add(*row(i))
    assert [t.tolist() for t in buffer.input_ids] == [t.tolist() for t in loaded.input_ids]


def test_load_refuses_a_different_capacity(tmp_path):
    ReplayBuffer(capacity=4).save(tmp_path)
    with pytest.raises(ILoRAError, match="capacity"):
        ReplayBuffer.load(tmp_path, capacity=5)


def test_load_of_missing_files_names_the_file(tmp_path):
    with pytest.raises(ILoRAError, match="buffer.safetensors"):
        ReplayBuffer.load(tmp_path)
