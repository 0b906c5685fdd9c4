"""ON_POLICY > 0 in distill.py: that share of the steps trains on the student's own continuations
of DATASET's prompts, scored by the teacher (GKD, arXiv 2306.13649); only sampled tokens carry
loss.

    uv run distill.py STUDENT=out/distilled ON_POLICY=1.0 DIVERGENCE=reverse_kl
"""

import dataclasses
import time

import torch

import common


def check_knobs(fsdp: bool, teacher_cache: str | None, kl_weight: float):
    """ON_POLICY > 0 with knobs and recipe constants it cannot work with: one clear error."""
    if fsdp:
        raise common.UserError("ON_POLICY > 0 samples with the whole student on every process: "
                               "run it with FSDP=False (DDP); FSDP-sharded generation is not supported")
    if teacher_cache:
        raise common.UserError("ON_POLICY > 0 needs the live teacher to score the student's "
                               "samples, which no cache holds: set TEACHER_CACHE=None")
    if kl_weight == 0:
        raise common.UserError("ON_POLICY > 0 with _KL_WEIGHT=0 in distill.py: the student's own "
                               "samples carry no loss without the teacher's")


def is_sampled_step(step: int, share: float, seed: int) -> bool:
    """Whether optimizer step `step` (1-based) trains on the student's samples: a draw < `share`
    from a generator seeded by (`seed`, step), so that a resumed run and every process agree."""
    if share <= 0:
        return False
    return share >= 1 or torch.rand(1, generator=torch.Generator().manual_seed(
        seed * 1_000_003 + step)).item() < share


def start(held_documents: int) -> dict:
    """Where prompt_stream begins: after the documents the held-out rows were packed from."""
    return {"epoch": 0, "documents": held_documents, "after_held_out": held_documents}


def prompt_ids(doc, tokenizer, seq_len: int, n: int, share: float) -> list[int] | None:
    """The prompt of document number `n`: a `messages` conversation up to its last user turn,
    rendered with the chat template and its generation prompt; else the first `share` x
    `seq_len` tokens of its text (None: an empty text)."""
    if isinstance(doc, dict) and "messages" in doc:
        common.render(doc, tokenizer, "STUDENT")  # the template and the record's shape, checked
        turns = doc["messages"]
        users = [i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("role") == "user"]
        if not users:
            raise common.UserError(f"DATASET document {n} has no user turn: ON_POLICY prompts the "
                                   f"student with a conversation up to its last user turn; drop "
                                   f"such records, or set ON_POLICY=0")
        text = tokenizer.apply_chat_template(turns[:users[-1] + 1], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > seq_len - 2:
            raise common.UserError(f"DATASET document {n}'s prompt is {len(ids)} tokens: SEQ_LEN="
                                   f"{seq_len} leaves no room to sample an answer; raise SEQ_LEN "
                                   f"or drop long conversations")
        return ids
    ids = tokenizer(common.render(doc, tokenizer, "STUDENT"), add_special_tokens=False)["input_ids"]
    return ids[:max(1, int(seq_len * share))] or None


def prompt_stream(dataset: str, tokenizer, seq_len: int, seed: int, position: dict, share: float,
                  strict: bool = True):
    """Prompts forever, one per document of DATASET after the held-out ones (in the order
    common.row_stream reads them; again from the first when they run out), keeping `position`
    up to date in place like row_stream. A document that cannot give a prompt is an error when
    `strict` (the first step's, checked before anything loads), else skipped with a warning
    (so that one odd record in a large dataset cannot stop a long run for good)."""
    while True:
        found = False
        for doc in common.documents(dataset, seed, skip=position["documents"]):
            n = position["documents"]
            position["documents"] += 1
            try:
                ids = prompt_ids(doc, tokenizer, seq_len, n, share)
            except common.UserError as e:
                if strict:
                    raise
                common.print0(f"warning: skipped: {e}")
                continue
            if ids:
                found = True
                yield torch.tensor(ids, dtype=torch.long)
        if not found:
            raise common.UserError(f"DATASET={dataset!r} has no documents to prompt with after "
                                   f"the held-out rows; use more data or fewer EVAL_SAMPLES")
        position.update(epoch=position["epoch"] + 1, documents=position["after_held_out"])


def end_tokens(config, tokenizer) -> list[int]:
    """The ids that end a sample: the config's eos ids and the tokenizer's."""
    ids = getattr(config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def check_inputs(dataset: str, s_conf, tokenizer, seq_len: int, seed: int, position: dict,
                 n_prompts: int, share: float):
    """Refuse, before anything loads, a student that could not sample and a first step whose
    prompts cannot be made."""
    if end_tokens(s_conf, tokenizer) == []:
        raise common.UserError("STUDENT has no eos token (config or tokenizer): a sample could "
                               "never end; set eos_token_id in its config.json")
    first = prompt_stream(dataset, tokenizer, seq_len, seed, dict(position), share)
    for _ in range(n_prompts):
        next(first)


def generate(student, prompts: list, width: int, pad: int, eos: list[int], max_new: int,
             temperature: float, acc) -> torch.Tensor:
    """transformers' `generate` on left-padded `prompts` (batched, KV cache), sampling from the
    full distribution at `temperature` with the global torch RNG (which checkpoints save)."""
    from transformers import GenerationConfig
    batch = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros_like(batch)
    for b, p in enumerate(prompts):
        batch[b, width - len(p):], attention[b, width - len(p):] = p, 1
    sampling = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                max_new_tokens=max_new, pad_token_id=pad, eos_token_id=eos)
    # the student's own generation_config (repetition penalty, top-k, ...) would bend the
    # distribution the loss is on: a neutral one for the call
    saved, student.generation_config = student.generation_config, GenerationConfig(
        pad_token_id=pad, eos_token_id=eos)
    was_training = student.training
    student.eval()
    dev = common.input_device(student)
    try:
        with torch.no_grad(), acc.autocast():
            return student.generate(input_ids=batch.to(dev), attention_mask=attention.to(dev),
                                    generation_config=sampling)
    finally:
        student.generation_config = saved
        student.train(was_training)


def sample_rows(student, prompts: list, seq_len: int, eos: list[int], pad: int, acc,
                temperature: float) -> tuple:
    """The student's continuations of `prompts` (1-D token tensors) as rows of `seq_len` tokens:
    (rows, mask, sampled tokens). Each row is its prompt, the sampled tokens up to and with the
    first eos, then padding; `mask` [rows, seq_len - 1] marks the predictions of the sampled
    tokens. This is the one function a faster engine (e.g. vLLM) would replace."""
    width = max(len(p) for p in prompts)
    out = generate(student, prompts, width, pad, eos, seq_len - width, temperature, acc)
    rows = torch.full((len(prompts), seq_len), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), seq_len - 1, dtype=torch.bool)
    sampled = 0
    ends = torch.tensor(eos)
    for b, p in enumerate(prompts):
        new = out[b, width:].cpu()
        hit = torch.isin(new, ends).nonzero()
        new = new[:hit[0, 0] + 1] if len(hit) else new
        rows[b, :len(p)], rows[b, len(p):len(p) + len(new)] = p, new
        mask[b, len(p) - 1:len(p) - 1 + len(new)] = True
        sampled += len(new)
    return rows, mask, sampled


@dataclasses.dataclass
class Sampler:
    """Samples on on-policy steps (`sample_rows` with this run's settings) and what sampling
    cost this process."""
    seq_len: int
    eos: list
    pad: int
    temperature: float
    seconds: float = 0.0
    tokens: int = 0
    steps: int = 0

    @classmethod
    def of(cls, s_conf, tokenizer, seq_len: int, temperature: float) -> "Sampler":
        eos = end_tokens(s_conf, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        return cls(seq_len, eos, pad, temperature)

    def sample(self, student, prompts: list, acc) -> tuple:
        """(rows, mask) of the student's continuations of `prompts`."""
        t0 = time.time()
        rows, mask, n = sample_rows(student, prompts, self.seq_len, self.eos, self.pad, acc,
                                    self.temperature)
        self.seconds += time.time() - t0
        self.tokens, self.steps = self.tokens + n, self.steps + 1
        return rows, mask

    def summary(self, train_seconds: float, acc) -> dict:
        """Sampled steps, sampled tokens of all processes and their rate per second of
        sampling, and sampling's share of the step time (for the run summary)."""
        n = acc.reduce(torch.tensor(float(self.tokens), device=acc.device), "sum").item()
        return {"steps": self.steps, "tokens": n,
                "tokens_per_s": n / self.seconds if self.seconds else 0.0,
                "share_of_step_time": self.seconds / train_seconds if train_seconds else 0.0}
