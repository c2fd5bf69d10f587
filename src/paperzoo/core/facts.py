"""A fixed world of facts, stated in sentence templates: a task whose answers must live in the weights.

The memory-layer papers (Memory Layers at Scale, 2412.09764) claim that sparse memory
stores simple associations ("the birthday of X", "the capital of Y") more cheaply than
dense weights. `Facts` is that kind of knowledge as tokens, in its own vocabulary:

- `entities` people, each named by two tokens (a first and a last name, drawn as distinct
  pairs from two name pools), so no single embedding row identifies an entity and its
  facts must be composed from both names, as a multi-token name must be in an LM;
- `relations` relations, each with `attributes` possible values (tokens of their own);
- one fact per (entity, relation): an attribute drawn once, from `facts_seed`. The facts
  are the same in every sample and every sequence, so the only way to answer is to have
  stored them during training;
- sentence templates of three filler words around the name and the relation, in either
  order (``w1 FIRST LAST w2 REL w3 ATTR`` or ``w1 REL w2 FIRST LAST w3 ATTR``).
  `statement_templates` are used for training; `question_templates`, different word
  triples of the same filler vocabulary, never appear in training and are how recall is
  measured, so a fact counts as known only when it is retrieved from the name and the
  relation, whatever the phrasing.

`sample(n, seed)` draws training rows (``split="statements"``) or question rows
(``split="questions"``): BOS and `per_row` sentences about uniformly drawn facts, each
attribute token scored. `questions()` asks every fact once with every question template,
one sentence per row, and `fact_index` says which fact each row asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from paperzoo.core.tasks import TaskBatch

SENTENCE = 7  # w1 FIRST LAST w2 REL w3 ATTR (or with the relation first)


@dataclass(frozen=True)
class Facts:
    entities: int = 512
    first_names: int = 32
    last_names: int = 32
    relations: int = 4
    attributes: int = 16  # values per relation
    words: int = 16  # filler vocabulary of the templates
    statement_templates: int = 8
    question_templates: int = 4
    per_row: int = 4  # sentences per row
    split: str = "statements"  # "statements" (training phrasings) or "questions" (held-out phrasings)
    facts_seed: int = 0  # fixes the world (names, facts, templates), not the rows drawn

    def __post_init__(self):
        if self.split not in ("statements", "questions"):
            raise ValueError(f"split must be 'statements' or 'questions', not {self.split!r}")
        if self.entities > self.first_names * self.last_names:
            raise ValueError(f"{self.entities} entities need at least as many (first, last) name pairs")
        if self.statement_templates + self.question_templates > 2 * self.words ** 3:
            raise ValueError("not enough distinct templates for this filler vocabulary")

    # token ids: first names, last names, relations, attributes (per relation), words, BOS
    @property
    def last_offset(self) -> int:
        return self.first_names

    @property
    def relation_offset(self) -> int:
        return self.first_names + self.last_names

    @property
    def attribute_offset(self) -> int:
        return self.relation_offset + self.relations

    @property
    def word_offset(self) -> int:
        return self.attribute_offset + self.relations * self.attributes

    @property
    def bos(self) -> int:
        return self.word_offset + self.words

    @property
    def vocab_size(self) -> int:
        return self.bos + 1

    @property
    def length(self) -> int:
        return 1 + self.per_row * SENTENCE

    @property
    def n_facts(self) -> int:
        return self.entities * self.relations

    @cached_property
    def world(self) -> dict[str, torch.Tensor]:
        """names [E, 2] (first, last ids), attribute [E, R] (index within its relation), templates [S + Q, 4]."""
        g = torch.Generator().manual_seed(10_000 + self.facts_seed)
        pairs = torch.randperm(self.first_names * self.last_names, generator=g)[:self.entities]
        names = torch.stack([pairs // self.last_names, pairs % self.last_names], dim=1)
        attribute = torch.randint(0, self.attributes, (self.entities, self.relations), generator=g)
        n = self.statement_templates + self.question_templates
        codes = torch.randperm(2 * self.words ** 3, generator=g)[:n]  # (order, w1, w2, w3), all distinct
        templates = torch.stack([codes // self.words ** 3, codes // self.words ** 2 % self.words,
                                 codes // self.words % self.words, codes % self.words], dim=1)
        return {"names": names, "attribute": attribute, "templates": templates}

    def templates(self, split: str | None = None) -> torch.Tensor:
        t = self.world["templates"]
        return t[:self.statement_templates] if (split or self.split) == "statements" else t[self.statement_templates:]

    def answer_token(self, fact: torch.Tensor) -> torch.Tensor:
        e, r = fact // self.relations, fact % self.relations
        return self.attribute_offset + r * self.attributes + self.world["attribute"][e, r]

    def sentences(self, fact: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
        """[..., 7] tokens stating fact ids `fact` [...] in templates `template` [..., 4]; the answer is last."""
        names = self.world["names"][fact // self.relations]
        first, last = names[..., 0], self.last_offset + names[..., 1]
        relation = self.relation_offset + fact % self.relations
        order, w = template[..., 0], self.word_offset + template[..., 1:]
        answer = self.answer_token(fact)
        entity_first = torch.stack([w[..., 0], first, last, w[..., 1], relation, w[..., 2], answer], dim=-1)
        relation_first = torch.stack([w[..., 0], relation, w[..., 1], first, last, w[..., 2], answer], dim=-1)
        return torch.where(order[..., None].bool(), relation_first, entity_first)

    def _batch(self, sentences: torch.Tensor) -> TaskBatch:
        n = len(sentences)
        tokens = torch.cat([torch.full((n, 1), self.bos), sentences.flatten(1)], dim=1)
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[:, SENTENCE::SENTENCE] = True  # every sentence's last token, the attribute
        return TaskBatch(tokens, scored)

    def sample(self, n: int, seed: int) -> TaskBatch:
        g = torch.Generator().manual_seed(int(seed))
        fact = torch.randint(0, self.n_facts, (n, self.per_row), generator=g)
        templates = self.templates()
        template = templates[torch.randint(0, len(templates), (n, self.per_row), generator=g)]
        return self._batch(self.sentences(fact, template))

    def questions(self, split: str = "questions") -> tuple[TaskBatch, torch.Tensor]:
        """Every fact asked once in every template of `split`, one sentence per row; and each row's fact id."""
        templates = self.templates(split)
        fact = torch.arange(self.n_facts).repeat_interleave(len(templates))
        template = templates.repeat(self.n_facts, 1)
        return self._batch(self.sentences(fact, template)[:, None]), fact
