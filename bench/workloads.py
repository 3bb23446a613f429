"""Benchmark workloads, built deterministically from a seed (see docs/benchmarks.md).

W1: T tenants, each with its own prefix-tuning adapter (32 virtual tokens, seed = tenant index)
and its own ~250-token English system prompt; R distinct ~40-token questions per tenant; each
request is the tokenizer's chat template over (system, user) with the generation prompt, and
asks for N new tokens with EOS ignored.

The texts are generated from word lists with ``random.Random(seed)``, so the same arguments
give the same token ids on every machine with the same tokenizer.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bench.peft_adapters import make_prefix_tuning

SYSTEM_TOKENS = 250
QUESTION_TOKENS = 40
VIRTUAL_TOKENS = 32


@dataclass(frozen=True)
class WorkloadRequest:
    """One request: ``prompt_ids`` is the full chat-templated prompt (system + user + the
    assistant header); tenant ``t``'s adapter (``Workload.adapter_dirs[t]``) goes in front of
    it."""

    tenant: int
    prompt_ids: list[int]
    system_prompt: str
    question: str


@dataclass(frozen=True)
class Workload:
    """Requests in submission order (tenant-major); every request asks for ``new_tokens``."""

    requests: list[WorkloadRequest]
    new_tokens: int
    adapter_dirs: list[Path]  # index = tenant

    @property
    def tenants(self) -> int:
        return len(self.adapter_dirs)

    def by_tenant(self) -> list[list[WorkloadRequest]]:
        groups: list[list[WorkloadRequest]] = [[] for _ in self.adapter_dirs]
        for request in self.requests:
            groups[request.tenant].append(request)
        return groups

    def shared_prefix_len(self, tenant: int) -> int:
        """Leading prompt tokens common to all of ``tenant``'s requests (system prompt part)."""
        prompts = [r.prompt_ids for r in self.requests if r.tenant == tenant]
        return len(os.path.commonprefix(prompts))


def build_w1(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    adapter_root: str | Path,
    tenants: int = 4,
    requests_per_tenant: int = 4,
    new_tokens: int = 32,
    seed: int = 0,
) -> Workload:
    """Write tenant t's adapter to ``adapter_root/tenant-{t:03d}`` (overwriting) and build W1."""
    root = Path(adapter_root)
    texts = w1_texts(tokenizer, tenants, requests_per_tenant, seed)
    adapter_dirs = [
        make_prefix_tuning(
            model, root / f"tenant-{t:03d}", num_virtual_tokens=VIRTUAL_TOKENS, seed=t
        )
        for t in range(tenants)
    ]
    requests = []
    for t, (system, questions) in enumerate(texts):
        for question in questions:
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ]
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            requests.append(WorkloadRequest(t, list(ids), system, question))
    return Workload(requests=requests, new_tokens=new_tokens, adapter_dirs=adapter_dirs)


def w1_texts(
    tokenizer: PreTrainedTokenizerBase, tenants: int, requests_per_tenant: int, seed: int = 0
) -> list[tuple[str, list[str]]]:
    """Per tenant: (system prompt, R questions), each as close to SYSTEM_TOKENS / QUESTION_TOKENS
    tokens as whole sentences allow. All system prompts and all questions are distinct."""
    rng = random.Random(seed)
    out: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for t in range(tenants):
        system = _grow(tokenizer, SYSTEM_TOKENS, _persona_sentence(rng, t), lambda: _policy(rng))
        questions = []
        while len(questions) < requests_per_tenant:
            question = _grow(
                tokenizer, QUESTION_TOKENS, _question_opening(rng), lambda: _detail(rng)
            )
            if question not in seen:
                seen.add(question)
                questions.append(question)
        out.append((system, questions))
    return out


def _grow(
    tokenizer: PreTrainedTokenizerBase, target: int, first: str, more: Callable[[], str]
) -> str:
    """Append sentences from ``more`` while that brings the token count closer to ``target``."""
    sentences = [first]
    length = _count(tokenizer, first)
    while length < target:
        candidate = [*sentences, more()]
        longer = _count(tokenizer, " ".join(candidate))
        if longer - target > target - length:
            break
        sentences, length = candidate, longer
    return " ".join(sentences)


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def _options(text: str) -> tuple[str, ...]:
    return tuple(text.split("|"))


NAMES = _options(
    "Ada|Basil|Clara|Dmitri|Elena|Farid|Greta|Hugo|Ines|Jonas|Keiko|Luis|Mira|Nils|Olga"
    "|Pavel|Quinn|Rosa|Sami|Tara"
)
COMPANIES = _options(
    "Northwind|Bluepeak|Cedar & Co|Harborline|Ironleaf|Juniper Labs|Kestrel|Lumen Works"
    "|Maple Freight|Nimbus Health|Orchard Bank|Pinecrest|Quarry Tools|Redwood Travel"
    "|Silverlake|Tidewater"
)
INDUSTRIES = _options(
    "shipping|insurance|travel|retail banking|home repair|healthcare|software"
    "|gardening supplies|car rental|education|energy|catering"
)
CITIES = _options(
    "Lisbon|Oslo|Denver|Osaka|Nairobi|Toronto|Lyon|Melbourne|Austin|Krakow|Seville|Dublin"
)
TONES = _options("friendly|formal|concise|patient|cheerful|calm|precise|warm")
VERBS = _options(
    "confirm|explain|summarise|double-check|mention|avoid|clarify|describe|recommend|verify"
)
OBJECTS = _options(
    "the order number|the delivery date|the refund policy|the opening hours"
    "|the warranty terms|the customer's name|any extra fees|the next steps"
    "|the safety rules|the privacy notice|the booking reference|the total price"
)
CONDITIONS = _options(
    "the customer is upset|a question is unclear|the request involves money"
    "|a deadline is close|the item is out of stock|the user asks for a manager"
    "|personal data is involved|the answer is uncertain|a mistake was made"
    "|the topic is outside your role"
)
TOPICS = _options(
    "late deliveries|interest rates|seasonal prices|loyalty points|roof leaks"
    "|appointment times|data backups|travel insurance|battery life|soil quality"
    "|exchange rates|spare parts|gift cards|school fees|heating costs"
)
ROLES = _options(
    "a small business owner|a student|a retired teacher|a nurse|a new customer"
    "|a project manager|a parent of two|a freelance designer|a farmer|a chef"
)


def _persona_sentence(rng: random.Random, tenant: int) -> str:
    return (
        f"You are {rng.choice(NAMES)}, the {rng.choice(TONES)} assistant of "
        f"{rng.choice(COMPANIES)}, a {rng.choice(INDUSTRIES)} company based in "
        f"{rng.choice(CITIES)} (tenant number {tenant})."
    )


def _policy(rng: random.Random) -> str:
    return rng.choice(
        [
            f"Always {rng.choice(VERBS)} {rng.choice(OBJECTS)} when {rng.choice(CONDITIONS)}.",
            f"If {rng.choice(CONDITIONS)}, stay {rng.choice(TONES)} and "
            f"{rng.choice(VERBS)} {rng.choice(OBJECTS)}.",
            f"Never promise anything about {rng.choice(TOPICS)} unless you "
            f"{rng.choice(VERBS)} {rng.choice(OBJECTS)} first.",
            f"Keep answers {rng.choice(TONES)}, and {rng.choice(VERBS)} "
            f"{rng.choice(OBJECTS)} before you close the conversation.",
        ]
    )


def _question_opening(rng: random.Random) -> str:
    return (
        f"I am {rng.choice(ROLES)} from {rng.choice(CITIES)}, and I have a question about "
        f"{rng.choice(TOPICS)}."
    )


def _detail(rng: random.Random) -> str:
    return rng.choice(
        [
            f"Could you {rng.choice(VERBS)} {rng.choice(OBJECTS)} for me?",
            f"How do {rng.choice(TOPICS)} affect {rng.choice(OBJECTS)}?",
            f"What should I do first if {rng.choice(CONDITIONS)}?",
        ]
    )
