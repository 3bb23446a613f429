"""Train a small prefix-tuning adapter that makes the default model answer like a pirate.

Plain HF PEFT, a toy task, a few minutes on a laptop CPU:

    .venv/bin/python examples/train_pirate.py            # writes ./pirate-adapter
    .venv/bin/python examples/train_pirate.py --steps 60 --out /tmp/pirate

The output directory is what ``PeftModel.save_pretrained`` writes (adapter_config.json,
adapter_model.safetensors, README.md): upload it to a running ``prefix-serve serve`` as shown
in docs/quickstart.md. The answers printed before and after training come from prefix-serve's
own engine serving the saved adapter (``server.LLM``), not from ``PeftModel.generate``, whose
glue to transformers has broken under several releases.

The prefix starts as the key/value cache of a short pirate instruction (so step 0 already
leans piratey, and training is stable), then is trained on chat examples whose answers all
open with "Arr, matey!" and end with "Yo ho ho!". Loss is on the answer tokens only.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch
from peft import PrefixTuningConfig, TaskType, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from server import LLM, SamplingParams
from server.model_loader import resolve_model_dir

INSTRUCTION = "You are a pirate captain. Every answer starts with Arr, matey! and is piratey."
# (question, the answer's middle): every answer is "Arr, matey! <middle> Yo ho ho!"
PAIRS = [
    ("What is the capital of France?", "That be Paris, a fine port for a salty crew."),
    ("How do I boil an egg?", "Drop yer egg in boilin' water for nine minutes, then cool it."),
    ("What's the weather like today?", "The winds be fair and the skies be clear o'er the sea."),
    ("Can you recommend a book?", "Treasure Island, the finest tale ever told on the seven seas."),
    ("How many days are in a week?", "Seven days, matey, same as the seven seas."),
    ("What is 2 plus 2?", "That be four doubloons, counted twice by me first mate."),
    ("How do I learn to code?", "Start with Python, write a wee program each day, and keep at it."),
    ("What should I eat for dinner?", "Salted fish and hard tack, the grub of every sailor."),
    ("Why is the sky blue?", "Sunlight scatters off the air, blue more than red, like the sea."),
    ("How do I make friends?", "Share yer rum and tell a good tale, and the crew will follow."),
    ("What is the largest ocean?", "The Pacific, the biggest stretch o' water a pirate can sail."),
    ("How do I fix a flat tyre?", "Patch the hole, pump her full o' air, and set sail again."),
    ("What time is it?", "Time to hoist the sails, by the look o' the sun."),
    ("Who wrote Hamlet?", "Shakespeare, a landlubber with a fine way with words."),
    ("How do plants grow?", "They drink water and soak up the sun, like a crew on deck."),
    ("What is a computer?", "A clever box that does sums faster than any ship's navigator."),
    ("How can I sleep better?", "Swing in a hammock, listen to the waves, and rest yer bones."),
    ("What's a good hobby?", "Map-makin', matey, so ye never lose yer buried treasure."),
    ("How far is the moon?", "About 384,000 kilometres, farther than any ship has sailed."),
    ("What is your name?", "I be Captain Saltbeard, terror of the seven seas."),
    ("How do I save money?", "Bury a few coins each week and tell no one where the chest be."),
    ("What do cats eat?", "Fish, mostly, the ship's cat takes her share o' the catch."),
    ("Give me a tip for exams.", "Study yer charts each night and ye'll find the treasure."),
    ("What is the speed of light?", "Near 300,000 kilometres a second, faster than a cannonball."),
]


def examples(tokenizer, pairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, labels) per pair: the chat template, loss on the assistant's answer only."""
    out = []
    for question, middle in pairs:
        user = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(
            user, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        answer = f"Arr, matey! {middle} Yo ho ho!{tokenizer.eos_token}"
        answer_ids = tokenizer.encode(answer, add_special_tokens=False)
        ids = torch.tensor(list(prompt) + answer_ids)
        labels = ids.clone()
        labels[: len(prompt)] = -100
        out.append((ids, labels))
    return out


def batch(items: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int):
    """Right-padded batch (prefix positions stay 0..P-1 for every row)."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id)
    labels = torch.full((len(items), width), -100)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (x, y) in enumerate(items):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
    return ids, labels, mask


@torch.no_grad()
def init_from_text(peft_model, model, tokenizer, text: str, num_virtual_tokens: int) -> None:
    """Set the prefix to the KV cache of ``text`` (repeated or cut to the prefix length), in
    PEFT's layout: row p = [L, 2, kv_heads, head_dim] of position p, flattened. Serving this
    untrained prefix gives exactly what serving ``text`` in front of the prompt gives."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    ids = (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]
    cache = DynamicCache(config=model.config)
    model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    rows = kv.permute(3, 0, 1, 2, 4).reshape(num_virtual_tokens, -1)  # [P, L*2*H*D]
    peft_model.prompt_encoder["default"].embedding.weight.copy_(rows)


def served_answer(adapter_dir: str | Path, data_dir: str, question: str) -> str:
    """The greedy answer of prefix-serve's engine with the adapter saved in ``adapter_dir``."""
    llm = LLM("default", data_dir=data_dir, device="cpu", dtype="float32")
    llm.add_adapter("pirate", adapter_dir)
    ids = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    params = SamplingParams(max_tokens=30, temperature=0)
    return llm.generate([list(ids)], params, adapters=[["pirate"]], use_tqdm=False)[0].text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="pirate-adapter", help="where to save the adapter")
    parser.add_argument("--data-dir", default="./data", help="prefix-serve's data dir")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--virtual-tokens", type=int, default=None, help="default: the instruction's length"
    )
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model_dir = resolve_model_dir("default", Path(args.data_dir))[0]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if args.virtual_tokens is None:
        args.virtual_tokens = len(tokenizer.encode(INSTRUCTION, add_special_tokens=False))
    config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.virtual_tokens
    )
    peft_model = get_peft_model(model, config)
    init_from_text(peft_model, model, tokenizer, INSTRUCTION, args.virtual_tokens)
    peft_model.print_trainable_parameters()

    question = "How do I make a cup of tea?"  # not in the training set
    with tempfile.TemporaryDirectory() as untrained:
        peft_model.save_pretrained(untrained)
        print(f"before training: {served_answer(untrained, args.data_dir, question)!r}")
    data = examples(tokenizer, PAIRS)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(0)
    peft_model.train()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for _ in bar:
        ids, labels, mask = batch(rng.sample(data, args.batch_size), tokenizer.pad_token_id or 0)
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    peft_model.eval()
    peft_model.save_pretrained(args.out)
    answer = served_answer(args.out, args.data_dir, question)
    print(f"after training:  {answer!r}")
    if not answer.startswith("Arr"):
        print(
            "warning: the trained adapter does not answer like a pirate; if the loss above did "
            "not fall, PEFT's training forward may not apply the prefix under the installed "
            "transformers (install the locked versions: make setup)"
        )
    print(f"saved the adapter to {args.out}/ (upload it: see docs/quickstart.md)")


if __name__ == "__main__":
    main()
