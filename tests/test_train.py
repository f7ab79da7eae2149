"""Loss masks, trainer determinism, exact resume, and the base-model stage."""
from __future__ import annotations

import json

import pytest

from infra.errors import DataError
from infra.spec import ArithWorldSpec, BaseTrainingSpec, ComputeSpec, GraderSpec, ToyModelSpec
from worlds.arith import generate_world, world_texts

TINY = ToyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                    max_position=256)
FP32 = ComputeSpec(device="cpu", precision="fp32")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world():
    return generate_world(ArithWorldSpec(n_base=200, n_sft1=120, n_sft2=60, n_rl=9, n_val_per_domain=1,
                                         n_heldout=9))


@pytest.fixture(scope="module")
def tokenizer(world):
    from worlds.tokenizer import train_tokenizer

    return train_tokenizer(world_texts(world), vocab_size=400)


def _trained_text(tokenizer, ids, labels):
    return tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])


def test_loss_mask_trains_exactly_the_response_after_the_wrong_prefix(world, tokenizer):
    from sft.masks import IGNORE, loss_mask

    rows = [r for r in world["sft2"] if r["kind"] == "sft2_redirect"][:5] + world["base"][:5]
    for row in rows:
        ids, labels = loss_mask(tokenizer, row["messages"], row["wrong_prefix"], 256)
        content = row["messages"][-1]["content"]
        trained = content[len(row["wrong_prefix"] or ""):] + tokenizer.eos_token
        assert _trained_text(tokenizer, ids, labels) == trained
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert ids == tokenizer(full, add_special_tokens=False).input_ids  # one tokenisation of the full text
        n_prompt = len(tokenizer(tokenizer.apply_chat_template(row["messages"][:1], tokenize=False,
                                                               add_generation_prompt=True)).input_ids)
        assert all(lab == IGNORE for lab in labels[:n_prompt])
        assert labels[-1] == IGNORE and ids[-2] == tokenizer.eos_token_id and labels[-2] != IGNORE
        assert [lab for lab in labels if lab != IGNORE] == [t for t, lab in zip(ids, labels) if lab != IGNORE]


def test_masked_token_straddling_the_prefix_boundary():
    """A token that holds both prefix and trained characters is masked (never half-trained)."""
    from sft.masks import IGNORE, _labels

    assert _labels([1, 2, 3], [(0, 2), (2, 5), (5, 7)], 3, 7) == [IGNORE, IGNORE, 3]
    assert _labels([1, 2], [(0, 3), (3, 3)], 0, 3) == [1, IGNORE]  # empty-span tokens carry no characters


def test_bad_rows_are_named(world, tokenizer, tmp_path):
    from sft.masks import encode_rows
    from sft.train import TrainConfig, train_lm
    from worlds.model import toy_model

    good = world["sft1"][0]
    config = TrainConfig(lr=1e-3, batch_size=2, max_steps=1)
    model = toy_model(TINY, tokenizer, seed=0)
    bad_rows = [([good, good], "sft1.parquet: row 2 .*field 'id'.*unique"),
                ([{**good, "wrong_prefix": "not a prefix"}], "field 'wrong_prefix'"),
                ([{**good, "messages": good["messages"][::-1]}], "field 'messages'"),
                ([{**good, "messages": [good["messages"][0], {"role": "assistant"}]}], r"field 'messages\[1\]")]
    for rows, message in bad_rows:  # the trainer refuses them before touching the model
        with pytest.raises(DataError, match=message):
            train_lm(model, tokenizer, rows, config, tmp_path / "bad", 0, FP32, where="sft1.parquet")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(DataError, match="tokens > max_length 8"):
        encode_rows(tokenizer, [good], 8, where="sft1.parquet")


def _train(world, tokenizer, tmp_path, name, seed=0, steps=6, on_step=None, checkpoint_every=100, batch_size=8,
           n_rows=40, ranks=1):
    from sft.train import TrainConfig, train_lm
    from worlds.model import toy_model

    model = toy_model(TINY, tokenizer, seed=0)
    config = TrainConfig(lr=3e-3, batch_size=batch_size, max_steps=steps, warmup_steps=2,
                         checkpoint_every=checkpoint_every)
    rows = world["sft1"][:n_rows]
    run = train_lm(model, tokenizer, rows, config, tmp_path / name, seed, FP32, on_step=on_step, ranks=ranks)
    return model, run


def _same(a, b):
    import torch

    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_is_deterministic_and_logged(world, tokenizer, tmp_path):
    from sft.train import TrainConfig, batch_indices, lr_at

    m1, r1 = _train(world, tokenizer, tmp_path, "a")
    m2, r2 = _train(world, tokenizer, tmp_path, "b")
    m3, _ = _train(world, tokenizer, tmp_path, "c", seed=1)
    assert _same(m1, m2) and not _same(m1, m3)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(r1["history"]) == strip(r2["history"])
    config = TrainConfig(lr=3e-3, batch_size=8, max_steps=6, warmup_steps=2)
    assert [r["lr"] for r in r1["history"]] == [lr_at(s, config) for s in range(6)]
    assert lr_at(0, config) == pytest.approx(1.5e-3) and lr_at(5, config) < lr_at(2, config) == 3e-3
    assert r1["stopped"] == "max_steps" and r1["steps"] == 6 and all(r["tokens"] > 0 for r in r1["history"])
    # every row once per epoch, in a seed-dependent order
    epoch = [i for s in range(5) for i in batch_indices(s, 40, 8, 0)]
    assert sorted(epoch) == list(range(40)) and epoch != [i for s in range(5) for i in batch_indices(s, 40, 8, 1)]


def test_micro_batches_give_the_one_pass_token_mean_gradient(world, tokenizer):
    """A batch trained as length-sorted micro-batches (sft.train.MICRO_BATCH_ROWS) has the gradient and loss of
    one padded pass over the whole batch (fp32: equal up to float rounding), and pads less."""
    import torch

    from sft.masks import encode_rows
    from sft.train import _collate, lm_loss, micro_batches
    from worlds.model import toy_model

    batch = encode_rows(tokenizer, world["sft1"][:40], 256, "sft1")
    parts = micro_batches(batch, rows=16)
    assert [len(p) for p in parts] == [16, 16, 8] and sorted(map(id, batch)) == sorted(id(e) for p in parts for e in p)
    lengths = [len(ids) for p in parts for ids, _ in p]
    assert lengths == sorted(lengths) and len(set(lengths)) > 1
    assert sum(len(p) * max(len(i) for i, _ in p) for p in parts) < len(batch) * max(lengths)  # less padding
    pad = tokenizer.pad_token_id

    def grads(chunks):
        model = toy_model(TINY, tokenizer, seed=0)
        total = sum(sum(t != -100 for t in labels[1:]) for _, labels in batch)
        loss_sum = 0.0
        for chunk in chunks:
            loss, n = lm_loss(model, *_collate(chunk, pad))
            (loss * (n / total)).backward()
            loss_sum += loss.item() * n
        return torch.cat([p.grad.flatten() for p in model.parameters()]), loss_sum / total

    (g_one, l_one), (g_micro, l_micro) = grads([batch]), grads(parts)
    assert torch.allclose(g_one, g_micro, rtol=1e-4, atol=1e-6) and l_micro == pytest.approx(l_one, rel=1e-5)
    # weighting each micro-batch's mean loss equally instead (the mistake this guards) moves the gradient
    wrong = toy_model(TINY, tokenizer, seed=0)
    for chunk in parts:
        (lm_loss(wrong, *_collate(chunk, pad))[0] / len(parts)).backward()
    g_wrong = torch.cat([p.grad.flatten() for p in wrong.parameters()])
    assert not torch.allclose(g_one, g_wrong, rtol=1e-3, atol=1e-5)


def test_resume_is_identical_to_an_uninterrupted_run(world, tokenizer, tmp_path):
    straight, r_straight = _train(world, tokenizer, tmp_path, "straight", steps=8, checkpoint_every=4)

    def crash(record):
        if record["step"] == 6:  # after the step-4 checkpoint, before the next one
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(world, tokenizer, tmp_path, "resumed", steps=8, on_step=crash, checkpoint_every=4)
    resumed, r_resumed = _train(world, tokenizer, tmp_path, "resumed", steps=8, checkpoint_every=4)
    assert r_resumed["resumed_from"] == 4 and r_resumed["steps"] == 8
    assert _same(straight, resumed)
    assert [r["loss"] for r in r_resumed["history"]] == [r["loss"] for r in r_straight["history"]]
    again, r_again = _train(world, tokenizer, tmp_path, "resumed", steps=8, checkpoint_every=4)
    assert r_again["resumed_from"] == 8 and _same(again, straight)  # a finished run only reloads
    with pytest.raises(DataError, match="different training run"):
        _train(world, tokenizer, tmp_path, "resumed", steps=8, seed=3, checkpoint_every=4)


def test_micro_batches_are_dealt_snake_wise():
    from sft.ranks import deal

    assert deal(4, 2) == [[0, 3], [1, 2]]  # sorted by length: each rank gets one short and one long
    assert deal(5, 2) == [[0, 3, 4], [1, 2]]
    assert deal(7, 3) == [[0, 5, 6], [1, 4], [2, 3]]
    assert deal(1, 2) == [[0], []] and deal(0, 3) == [[], [], []]


# 40-row batches are 3 micro-batches (16, 16, 8 rows): rank 0 runs one, rank 1 two
DP = {"batch_size": 40, "n_rows": 120, "steps": 4}


def test_data_parallel_training_matches_one_process(world, tokenizer, tmp_path):
    """Two ranks (sft.ranks) give the one-process weights and losses up to fp32 summation order, and a run resumed
    on two ranks equals an uninterrupted two-rank run bit for bit."""
    import torch

    one, r_one = _train(world, tokenizer, tmp_path, "one", **DP)
    two, r_two = _train(world, tokenizer, tmp_path, "two", ranks=2, **DP)
    assert r_two["ranks"] == 2 and r_two["steps"] == 4
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    assert [r["loss"] for r in r_two["history"]] == pytest.approx([r["loss"] for r in r_one["history"]], rel=1e-5)
    assert [r["tokens"] for r in r_two["history"]] == [r["tokens"] for r in r_one["history"]]
    # without rank 1's gradients (3 micro-batches, rank 0 runs 1) the weights are far off: the check can fail
    solo, _ = _train(world, tokenizer, tmp_path, "solo", **{**DP, "steps": 1})
    assert not torch.allclose(next(solo.parameters()), next(two.parameters()), rtol=1e-3)

    def crash(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(world, tokenizer, tmp_path, "resumed", ranks=2, on_step=crash, checkpoint_every=2, **DP)
    resumed, r_resumed = _train(world, tokenizer, tmp_path, "resumed", ranks=2, checkpoint_every=2, **DP)
    assert r_resumed["resumed_from"] == 2 and _same(resumed, two)
    with pytest.raises(DataError, match="rank count"):  # checkpoints of 2 ranks never resume on 1
        _train(world, tokenizer, tmp_path, "resumed", checkpoint_every=2, **{**DP, "steps": 6})


def test_a_dead_rank_is_named(world, tokenizer, tmp_path):
    import psutil

    from infra.errors import TwinarmError

    def kill_follower(record):
        if record["step"] == 1:
            for child in psutil.Process().children(recursive=True):
                if "twinarm-ranks-" in " ".join(child.cmdline()):
                    child.kill()

    with pytest.raises(TwinarmError, match=r"data-parallel training \(2 ranks\).*rank 1 exited.*rank-1.log"):
        _train(world, tokenizer, tmp_path, "dead", ranks=2, on_step=kill_follower, **DP)
    assert not [c for c in psutil.Process().children(recursive=True) if "twinarm-ranks-" in " ".join(c.cmdline())]


def test_a_rank_that_dies_starting_is_named_at_once(tmp_path):
    """A follower that cannot build its model never reaches the rendezvous: rank 0 must not wait there (up to
    COLLECTIVE_TIMEOUT) but raise, naming the rank, its exit code and its log's last line."""
    import time

    from transformers import Qwen2ForCausalLM

    from infra.errors import TwinarmError
    from sft.ranks import Ranks

    job = {"model_class": Qwen2ForCausalLM, "model_config": None, "threads": 1, "device": "cpu"}  # no config: fails
    t0 = time.monotonic()
    with pytest.raises(TwinarmError, match=r"rank 1 exited with code 1 while starting: .*Error.*rank-1.log"):
        with Ranks(2, job, tmp_path):
            pass
    assert time.monotonic() - t0 < 60


def test_early_stop_from_callback(world, tokenizer, tmp_path):
    _, run = _train(world, tokenizer, tmp_path, "stop", steps=10, on_step=lambda r: r["step"] == 3)
    assert run["steps"] == 3 and run["stopped"] == "callback"
    ckpts = sorted((tmp_path / "stop" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-0000003"] and json.loads((ckpts[0] / "state.json").read_text())["done"]


def test_base_model_stage(world, tmp_path, monkeypatch):
    from sft.base import train_base_model
    from worlds.model import load_model
    from worlds.tokenizer import load_tokenizer

    training = BaseTrainingSpec(max_steps=4, eval_every=2, batch_size=16, warmup_steps=1,
                                target_val_accuracy=1.0)
    with pytest.raises(DataError, match="meta tags"):
        train_base_model(world["sft1"], world["val"], ["x"], TINY, training, FP32, GraderSpec(workers=1),
                         tmp_path / "bad")
    metrics = train_base_model(world["base"], world["val"], world_texts(world), TINY, training, FP32,
                               GraderSpec(workers=1), tmp_path / "base", threads=1, max_new_tokens=8)
    assert metrics["steps"] == 4 and metrics["stopped"] == "max_steps"
    assert [e["step"] for e in metrics["evals"]] == [2, 4]
    assert set(metrics["val_accuracy_by_domain"]) == {r["domain"] for r in world["val"]}
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["params"] > 0
    tok, model = load_tokenizer(metrics["model_dir"]), load_model(metrics["model_dir"])
    assert len(tok) == model.config.vocab_size
    assert train_base_model(world["base"], world["val"], [], TINY, training, FP32, GraderSpec(workers=1),
                            tmp_path / "base") == metrics  # a finished stage returns its metrics


def test_data_parallel_ranks_refuse_a_gpu(world, tokenizer, tmp_path, monkeypatch):
    import worlds.model

    from infra.errors import TwinarmError

    monkeypatch.setattr(worlds.model, "resolve_device", lambda compute: "cuda")  # device: auto on a GPU machine
    with pytest.raises(TwinarmError, match="runs on CPU only, but the device resolved to cuda"):
        _train(world, tokenizer, tmp_path, "gpu", ranks=2, **DP)
    assert not (tmp_path / "gpu").exists()
