"""Tiny random Hugging Face models of the five tested families, and what a test needs of them.

Every model is built from a config (nothing downloaded) in eval mode with ``torch.manual_seed``
fixed by the caller. Sizes: decoders have 6 query heads in 2 kv groups of width 8 (hidden 48),
BERT and ViT 4 heads of width 8 (hidden 32); MLPs are 64 wide; two layers each.
"""

from __future__ import annotations

import attrs
import torch
import transformers as T

H_GQA, G_GQA, H_MHA, D = 6, 2, 4, 8
MLP = 64


@attrs.frozen
class Family:
    name: str
    build: object  # () -> model
    inputs: object  # (model) -> example input
    layer: str  # format string of the attention module of layer i
    q: str  # q projection under the attention module
    mlp: str  # format string of the module whose out channels are the MLP width
    reload: object  # the Auto class to reload with
    gqa: bool


def _decoder(config_cls, model_cls):
    def build():
        return model_cls(config_cls(vocab_size=96, hidden_size=H_GQA * D, intermediate_size=MLP,
                                    num_hidden_layers=2, num_attention_heads=H_GQA,
                                    num_key_value_heads=G_GQA, max_position_embeddings=64)).eval()
    return build


def _ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 10))


def _pixels(model):
    return torch.randn(2, 3, 16, 16)


FAMILIES = {
    "llama": Family("llama", _decoder(T.LlamaConfig, T.LlamaForCausalLM), _ids, "model.layers.{}.self_attn",
                    "q_proj", "model.layers.{}.mlp.up_proj", T.AutoModelForCausalLM, True),
    "mistral": Family("mistral", _decoder(T.MistralConfig, T.MistralForCausalLM), _ids,
                      "model.layers.{}.self_attn", "q_proj", "model.layers.{}.mlp.up_proj",
                      T.AutoModelForCausalLM, True),
    "qwen2": Family("qwen2", _decoder(T.Qwen2Config, T.Qwen2ForCausalLM), _ids, "model.layers.{}.self_attn",
                    "q_proj", "model.layers.{}.mlp.up_proj", T.AutoModelForCausalLM, True),
    "bert": Family("bert", lambda: T.BertForSequenceClassification(T.BertConfig(
        vocab_size=96, hidden_size=H_MHA * D, num_hidden_layers=2, num_attention_heads=H_MHA,
        intermediate_size=MLP, max_position_embeddings=32, num_labels=3)).eval(), _ids,
        "bert.encoder.layer.{}.attention.self", "query", "bert.encoder.layer.{}.intermediate.dense",
        T.AutoModelForSequenceClassification, False),
    "vit": Family("vit", lambda: T.ViTForImageClassification(T.ViTConfig(
        image_size=16, patch_size=8, hidden_size=H_MHA * D, num_hidden_layers=2, num_attention_heads=H_MHA,
        intermediate_size=MLP, num_labels=3)).eval(), _pixels, "vit.layers.{}.attention", "q_proj",
        "vit.layers.{}.mlp.fc1", T.AutoModelForImageClassification, False),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    family = FAMILIES[name]
    model = family.build()
    return family, model, family.inputs(model)


def groups(tracker):
    return {g.name: g for g in tracker.groups}


def group(tracker, family, layer, fn):
    return groups(tracker)[f"{family.layer.format(layer)}.{family.q}:{fn}"]


def uniform_request(tracker, family, heads=True, kv=True, mlp=True, layers=(0, 1)):
    """In every layer: one query head per kv group, one kv head (GQA), 25 % of the MLP.

    GQA (6 heads reading 2 kv heads, 3 each): query heads 1 (kv 0) and 4 (kv 1), and kv head
    1 (query heads 3..5) go, leaving query heads 0 and 2 on kv head 0. Without GQA: head 1.
    """
    request = {}
    for i in layers:
        if heads:
            request[group(tracker, family, i, "prune_num_heads").id] = [1, 4] if family.gqa else [1]
        if kv and family.gqa:
            request[group(tracker, family, i, "prune_kv_heads").id] = [1]
        if mlp:
            width = groups(tracker)[f"{family.mlp.format(i)}:prune_out_channels"]
            request[width.id] = list(range(2, width.n_units, 4))
    return request


def logits(model, x):
    with torch.no_grad():
        out = model(x) if not isinstance(x, dict) else model(**x)
    return out.logits


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items()
    )
