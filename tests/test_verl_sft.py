"""SFT through verl's SFT trainer on CPU: our dataset class built by verl's own create_sft_dataset returns exactly the
local trainer's loss masks (sft.masks) on the same rows; the SFT stage's translation composes with verl's shipped
sft_trainer_engine config and validates through verl's config dataclasses."""
from __future__ import annotations

import pytest

from infra.errors import DataError
from infra.spec import ArithWorldSpec, SFTSpec, VerlSpec
from meta.grammar import CALC_CLOSE, CALC_OPEN, META_CLOSE, META_OPEN
from worlds.arith import generate_world, world_texts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model directory with our locally trained tokenizer (the one the local trainer masks with)."""
    from transformers import Qwen2Config

    from worlds.tokenizer import save_tokenizer, train_tokenizer

    world = generate_world(ArithWorldSpec(n_base=200, n_sft1=60, n_sft2=30, n_rl=9, n_val_per_domain=1,
                                          n_heldout=9))
    path = tmp_path_factory.mktemp("verl-sft-model")
    tokenizer = train_tokenizer(world_texts(world), vocab_size=400)
    save_tokenizer(tokenizer, path)
    # a model directory has a config: next to it verl's AutoTokenizer loads another tokenizer class than ours
    Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64).save_pretrained(path)
    return path, world


def rows_of(world):
    rows = [{"id": r["id"], "messages": r["messages"], "wrong_prefix": r.get("wrong_prefix")}
            for r in world["sft1"] + world["sft2"]]
    # the kinds the rule masks: a wrong prefix, a meta block, environment output (a tool's value), a second turn
    q = [{"role": "user", "content": "What is 12+30?"}]
    rows += [
        {"id": "wp", "messages": q + [{"role": "assistant", "content": "12+30=41 wait, 12+30=42. \\boxed{42}"}],
         "wrong_prefix": "12+30=41"},
        {"id": "meta", "messages": q + [{"role": "assistant", "content":
                                         f"{META_OPEN}check 12+30{META_CLOSE} 42 \\boxed{{42}}"}],
         "wrong_prefix": None},
        {"id": "tool", "messages": q + [{"role": "assistant", "content":
                                         f"{META_OPEN}12+30 {CALC_OPEN}42{CALC_CLOSE}{META_CLOSE} \\boxed{{42}}"}],
         "wrong_prefix": None},
        {"id": "two-turns", "messages": q + [{"role": "assistant", "content": "41"}, {"role": "user", "content":
                                             "Sure?"}, {"role": "assistant", "content": "42 \\boxed{42}"}],
         "wrong_prefix": "4"},
    ]
    return rows


def data_config(tmp_path, files, max_length=256, extra=()):
    from rl.verl_config import render
    from rl.verl_sft import compose_sft, sft_overrides

    overrides = sft_overrides(SFTSpec(max_length=max_length), VerlSpec(), "bf16", 0, train_files=str(files),
                              model="/m", checkpoints=str(tmp_path / "ck"), ablation="a", arm="x")
    return compose_sft(render(overrides, list(extra))).data


def test_verls_sft_dataset_returns_the_local_trainers_masks(model_dir, tmp_path):
    import torch
    from verl.trainer.sft_trainer import create_sft_dataset
    from verl.utils import hf_tokenizer

    from rl.verl_sft import TwinarmSFTDataset, write_sft_parquet
    from sft.masks import IGNORE, encode_rows
    from worlds.tokenizer import load_tokenizer

    path, world = model_dir
    rows = rows_of(world)
    files = tmp_path / "sft.parquet"
    write_sft_parquet(rows, files)
    # verl's own path: its tokenizer loader, its dataset factory with the composed config's data section
    verl_tok = hf_tokenizer(str(path))
    ds = create_sft_dataset([str(files)], data_config(tmp_path, files), verl_tok, None)
    assert isinstance(ds, TwinarmSFTDataset) and len(ds) == len(rows)

    local = encode_rows(load_tokenizer(path), rows, 256)
    trained = 0
    for i, (ids, labels) in enumerate(local):
        item = ds[i]
        assert set(item) == {"input_ids", "position_ids", "loss_mask"}
        assert item["input_ids"].tolist() == ids
        assert item["loss_mask"].tolist() == [int(t != IGNORE) for t in labels], rows[i]["id"]
        assert item["position_ids"].tolist() == list(range(len(ids)))
        assert item["loss_mask"][0] == 0  # verl rolls the flat mask left: a row's first token must be untrained
        trained += int(item["loss_mask"].sum())
    # the masks are not trivial: the wrong prefix and the tool's value are masked inside the assistant turn
    tok = load_tokenizer(path)
    by_id = {r["id"]: i for i, r in enumerate(rows)}
    wp = ds[by_id["wp"]]
    assert "41" not in tok.decode(wp["input_ids"][wp["loss_mask"].bool()]).split("wait")[0]
    tool = ds[by_id["tool"]]
    trained_text = tok.decode(tool["input_ids"][tool["loss_mask"].bool()])
    assert CALC_OPEN in trained_text and f"42{CALC_CLOSE}" not in trained_text
    assert 0 < trained < sum(len(ids) for ids, _ in local)
    assert type(verl_tok).__name__ == "Qwen2Tokenizer" and type(tok).__name__ != "Qwen2Tokenizer"
    assert torch.equal(ds[0]["input_ids"], torch.tensor(local[0][0]))


def test_sft_dataset_refuses_what_verl_would_not_mask_and_names_bad_rows(model_dir, tmp_path):
    from verl.utils import hf_tokenizer

    from rl.verl_sft import TwinarmSFTDataset, write_sft_parquet

    path, world = model_dir
    files = tmp_path / "sft.parquet"
    write_sft_parquet(rows_of(world), files)
    tok = hf_tokenizer(str(path))
    with pytest.raises(DataError, match=r"data.pad_mode 'right': .* only with pad_mode no_padding"):
        TwinarmSFTDataset([str(files)], tok, data_config(tmp_path, files, extra=["data.pad_mode=right"]))
    with pytest.raises(DataError, match=r"data.truncation 'left'"):
        TwinarmSFTDataset([str(files)], tok, data_config(tmp_path, files, extra=["data.truncation=left"]))
    with pytest.raises(DataError, match=rf"{files}: row 0 \(id '.+'\): [0-9]+ tokens > max_length 16"):
        TwinarmSFTDataset([str(files)], tok, data_config(tmp_path, files, max_length=16))


def test_sft_translation_composes_and_validates_through_verls_config(tmp_path):
    from rl.verl_config import VerlConfigError, render
    from rl.verl_sft import SFT_SOURCES, check_sft, compose_sft, sft_overrides

    sft = SFTSpec(epochs=2, lr=1e-5, batch_size=64, max_length=8192, warmup_ratio=0.05, weight_decay=0.01)
    overrides = sft_overrides(sft, VerlSpec(nnodes=2, n_gpus_per_node=8), "bf16", 3, train_files="/s/sft.parquet",
                              model="/s/base", checkpoints="/s/ck", ablation="q", arm="control")
    assert set(SFT_SOURCES) <= set(overrides)
    checked = check_sft(render(overrides))
    assert checked == {"engine": "FSDPEngineConfig", "optim": "FSDPOptimizerConfig",
                       "checkpoint": "CheckpointConfig", "profiler": "ProfilerConfig",
                       "data.custom_cls": "TwinarmSFTDataset"}
    config = compose_sft(render(overrides))
    assert (config.optim.lr, config.optim.weight_decay, config.optim.lr_scheduler_type) == (1e-5, 0.01, "cosine")
    assert (config.data.train_batch_size, config.data.max_length, config.trainer.total_epochs) == (64, 8192, 2)
    assert (config.trainer.nnodes, config.trainer.n_gpus_per_node, config.trainer.seed) == (2, 8, 3)
    assert config.data.custom_cls.path == "pkg://rl.verl_sft" and config.data.pad_mode == "no_padding"

    with pytest.raises(VerlConfigError, match=r"verl SFT override 'optim.lr_warmup_ratio' \(a fixed setting\): "
                                              r"verl 0.9.1's sft_trainer_engine config refuses it"):
        compose_sft(render(overrides, ["optim.lr_warmup_ratio=0.1"]))
    with pytest.raises(VerlConfigError, match=r"verl SFT section 'optim' \(spec keys .*sft.lr.*\): "):
        check_sft(render({**overrides, "optim.lr_scheduler_type": "triangle"}))
