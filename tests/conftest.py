"""Shared fixtures: tiny random-initialised models of every supported family."""

from __future__ import annotations

import os

import pytest
import torch

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


def tiny_config(family: str, vocab: int = 96, layers: int = 2):
    """A small config of the given family: hidden 64, 4 heads (2 KV heads), MLP 96."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    """A random-initialised causal LM in eval mode (fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw))
    with torch.no_grad():  # larger, less uniform weights than the default init, like real models
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
                p.mul_(1 + 3 * torch.rand(p.shape[1]) ** 4)
    return model.eval()


def tiny_tokens(n: int = 8, t: int = 32, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    """Random token windows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


TEXT = " ".join(f"the {w} of the {v} is {u}." for w, v, u in zip(
    ["state", "union", "nation", "people", "law"] * 80, ["house", "senate", "court", "army", "navy"] * 80,
    ["strong", "sound", "free", "just", "great"] * 80))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved as a HF folder with a small byte-level BPE tokenizer, and text.txt beside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(d)
    tiny_model("llama", vocab=300).save_pretrained(d)
    (d / "text.txt").write_text(TEXT)
    return d


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
