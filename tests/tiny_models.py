"""Tiny randomly initialised causal LMs built from configs: no downloads, milliseconds per forward.

Example:
    >>> from tests.tiny_models import tiny_model, TINY_ARCHITECTURES
    >>> model = tiny_model("llama")
"""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=128)

TINY_CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_COMMON, **_DECODER, num_key_value_heads=2),
    "mistral": lambda: T.MistralConfig(**_COMMON, **_DECODER, num_key_value_heads=2),
    "qwen2": lambda: T.Qwen2Config(**_COMMON, **_DECODER, num_key_value_heads=2),
    "gemma3_text": lambda: T.Gemma3TextConfig(**_COMMON, **_DECODER, num_key_value_heads=1, head_dim=8, sliding_window=8),
    "phi3": lambda: T.Phi3Config(**_COMMON, **_DECODER, num_key_value_heads=2),
    "gpt2": lambda: T.GPT2Config(**_COMMON, n_embd=32, n_layer=4, n_head=4, n_positions=128),
    "gptj": lambda: T.GPTJConfig(**_COMMON, n_embd=32, n_layer=4, n_head=4, n_positions=128, rotary_dim=4),
    "gpt_neox": lambda: T.GPTNeoXConfig(**_COMMON, **_DECODER),
    "opt": lambda: T.OPTConfig(**_COMMON, hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
                               max_position_embeddings=128, word_embed_proj_dim=32),
}
# Not a transformers architecture: a llama whose blocks return ``(hidden,)`` tuples, as transformers < 5 and
# many remote-code checkpoints do. transformers 5.24 returns bare tensors from every block of the configs
# above, so without it the engine's tuple path would go untested.
TUPLE_BLOCK_ARCH = "llama_tuple_blocks"
TINY_ARCHITECTURES = sorted([*TINY_CONFIGS, TUPLE_BLOCK_ARCH])


class _TupleBlock(T.models.llama.modeling_llama.LlamaDecoderLayer):
    """A llama block that returns ``(hidden,)`` and accepts the previous block's tuple.

    A subclass rather than a wrapper, so transformers' own ``output_hidden_states`` recorder sees the block
    output exactly as the loop of a tuple-returning model would.
    """

    def forward(self, hidden_states, *args, **kwargs):
        if isinstance(hidden_states, tuple):
            hidden_states = hidden_states[0]
        return (super().forward(hidden_states, *args, **kwargs),)


class _UnwrapTuple(torch.nn.Module):
    """The final norm of a tuple-block model: unpacks the last block's tuple first."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, hidden_states):
        return self.norm(hidden_states[0] if isinstance(hidden_states, tuple) else hidden_states)


def _with_tuple_blocks(model: torch.nn.Module) -> torch.nn.Module:
    for block in model.model.layers:
        block.__class__ = _TupleBlock
    model.model.norm = _UnwrapTuple(model.model.norm)
    return model


def tiny_model(arch: str, seed: int = 0, vocab_size: int = VOCAB, **config_overrides) -> torch.nn.Module:
    """A random tiny model of ``arch`` in eval mode, deterministic for a given seed."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS["llama" if arch == TUPLE_BLOCK_ARCH else arch]()
    config.vocab_size = vocab_size
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if arch == TUPLE_BLOCK_ARCH:
        model = _with_tuple_blocks(model)
    # Spread logits so greedy decoding is not decided by float noise between near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model


# A Qwen-style chat template for byte_tokenizer(): real system/user/assistant turns, generation prompt last.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer():
    """A byte-level tokenizer (no merges) whose decode() reproduces the text exactly; vocab 259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(sorted(alphabet))}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.padding_side = "left"
    return tok


def tiny_model_for_bytes(arch: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A tiny model of ``arch`` whose vocabulary fits :func:`byte_tokenizer`."""
    return tiny_model(arch, seed, vocab_size=259, **config_overrides)
