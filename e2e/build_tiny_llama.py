"""Build a tiny random-weight Llama model with a locally trained tokenizer, for real vLLM tests.

No model can be downloaded here, so the model is made: a byte-level BPE tokenizer trained with
`tokenizers` on seeded generated text, a chat template in tokenizer_config.json, and a
`LlamaForCausalLM` with seeded random weights saved by transformers. Same seed and sizes give
the same files. Runs with the vLLM venv's python (it needs torch, transformers, tokenizers):

    .tools/vllm-venv/bin/python e2e/build_tiny_llama.py --out .tools/tiny-llama --seed 0
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import shutil
import sys

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def generated_corpus(*, rng: random.Random, lines: int) -> list[str]:
    """Pseudo-words from syllables, plus digits and punctuation, so BPE learns real merges."""
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    punctuation = [".", ",", "?", "!", ":", ";"]
    corpus = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(5, 30)):
            word = rng.choice(words)
            parts.append(word.capitalize() if rng.random() < 0.1 else word)
            if rng.random() < 0.05:
                parts.append(str(rng.randint(0, 9999)))
        corpus.append(" ".join(parts) + rng.choice(punctuation))
    return corpus


def build(*, out: pathlib.Path, seed: int, vocab_size: int, hidden: int, layers: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(generated_corpus(rng=rng, lines=4000), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    building = out.with_name(out.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    model.save_pretrained(building, safe_serialization=True)
    fast.save_pretrained(building)
    # Newer transformers write the template to chat_template.jinja only; older readers (and
    # people) look for it in tokenizer_config.json, so it goes in both.
    tokenizer_config_path = building / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    (building / "twinroute-tiny-llama.json").write_text(
        json.dumps(
            {"seed": seed, "vocab_size": len(fast), "hidden": hidden, "layers": layers},
            sort_keys=True,
        )
    )
    shutil.rmtree(out, ignore_errors=True)
    building.rename(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    build(
        out=args.out,
        seed=args.seed,
        vocab_size=args.vocab_size,
        hidden=args.hidden,
        layers=args.layers,
    )
    print(f"tiny llama written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
