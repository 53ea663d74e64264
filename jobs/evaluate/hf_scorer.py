"""Scoring with a transformers causal LM: batched across questions, each prompt computed once.

- Choices: two passes a batch. The prompts first, right-padded, in one plain causal pass (no
  mask, the fast kernel) that keeps their key/value cache; each prompt's last position
  predicts its choices' first tokens. Then every choice token of every row in one small pass on
  that cache, with a mask by which a choice token sees its prompt and its own choice's earlier
  tokens (never padding or another choice), at positions that restart after the prompt. The
  log-likelihood of a choice is the same as over its own `prompt + choice` row (the unit tests
  hold them equal), but the prompt is computed once instead of five times. Rows are sorted by
  length and batched to a token budget; logits are taken only where a choice token is predicted.
- The common token prefix of a batch (the task description, and the examples where they are
  shared) is run once and its key/value cache reused by every row of the batch, when it is at
  least a quarter of the prompt (below that, the plain causal pass over whole rows is faster).
- Generation: greedy, over length-sorted batches. A shared prefix of at least a quarter of the
  prompt is run once; every row's own part then goes through ONE right-padded pass on that cache
  (causal, so no real token sees the padding after it; with a shorter prefix, the whole rows in
  one plain causal pass) and the first token is read at each row's last real position. All
  rows decode together, the padding masked out and each row's positions continuing from its own
  length; a row stops at a token that holds a newline or at its own token cap and leaves the
  batch (its cache rows are dropped), so the others go on without it.
- Batches are as large as `batch_tokens` allows: by default, on a GPU, a key/value cache of
  1 GiB (within 16,384..262,144 tokens), since for a small model the per-forward overhead, not
  the arithmetic, is what one-question-at-a-time evaluation pays for; on a CPU, 16,384 tokens.
- The model is loaded in its saved dtype (`dtype="auto"`), unless told otherwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

ChoiceRequest = tuple[list[int], list[list[int]]]  # (prompt ids, ids of each choice)
GenRequest = tuple[list[int], int]  # (prompt ids, max new tokens)


def _dtype_kwargs(version: str, dtype: str) -> dict:
    import torch

    value = "auto" if dtype == "auto" else getattr(torch, dtype)
    major, minor = (int(x) for x in version.split(".")[:2])
    return {"dtype": value} if (major, minor) >= (4, 56) else {"torch_dtype": value}


KV_BUDGET_BYTES = 1 << 30  # the key/value cache one batch may hold by default
PREFIX_WORTH = 4  # a batch's shared prefix is cached when it is >= 1/4 of its mean prompt


CPU_BATCH_TOKENS = 16384  # on a CPU: the batch budget whatever the model (see default_batch_tokens)


def default_batch_tokens(config, itemsize: int, device: str = "cuda") -> int:
    """Tokens per batch: on a GPU, as many as a KV_BUDGET_BYTES key/value cache holds, within
    [16,384, 262,144]; on a CPU, CPU_BATCH_TOKENS.

    On a GPU, fewer, larger batches pay the per-forward overhead less often: a small model takes
    hundreds of questions per batch, a 13b-sized one stays at 16,384 tokens (13 GB of cache). On
    a CPU, a batch's activations and attention mask leave the caches long before the overhead
    matters (tiny model, 200 questions, eval_speed.py: 262,144 -> 16,384 tokens a batch took
    JCommonsenseQA from 216 to 255 questions/s and JSQuAD from 270 to 350).
    """
    if device == "cpu":
        return CPU_BATCH_TOKENS
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * head_dim * itemsize
    return max(16384, min(262144, KV_BUDGET_BYTES // per_token))


def newline_token_ids(tok) -> frozenset[int]:
    """Every token of a tokenizer whose text holds a newline."""
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    return frozenset(i for i, t in enumerate(texts) if "\n" in t)


def batches(lengths: Sequence[int], budget: int, max_rows: int = 256) -> list[list[int]]:
    """Indices sorted by length (longest first), cut into batches of at most `budget` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < max_rows and lengths[out[-1][0]] * (len(out[-1]) + 1) <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    n = min(len(r) for r in rows)
    first = rows[0]
    for i in range(n):
        if any(r[i] != first[i] for r in rows):
            return i
    return n


class HFScorer:
    engine = "transformers"

    def __init__(
        self, model_dir: Path, device: str = "cpu", dtype: str = "auto", batch_tokens: int | None = None
    ) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        kwargs = _dtype_kwargs(transformers.__version__, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs).to(device).eval()
        self.device = device
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self.batch_tokens = batch_tokens or default_batch_tokens(
            self.model.config, self.model.dtype.itemsize, str(device).split(":")[0]
        )
        self._newline_ids: frozenset[int] | None = None
        params = inspect.signature(self.model.base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x

    # ------------------------------------------------------------ tokens

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def newline_ids(self) -> frozenset[int]:
        """Every token whose text holds a newline: generation stops at the first one."""
        if self._newline_ids is None:
            self._newline_ids = newline_token_ids(self.tok)
        return self._newline_ids

    # ------------------------------------------------------------ choices

    def choice_logprobs(self, requests: Sequence[ChoiceRequest]) -> list[list[float]]:
        """Summed log-probability of each choice's tokens after its prompt."""
        lengths = [len(p) + sum(len(c) for c in cs) for p, cs in requests]
        out: list[list[float]] = [[] for _ in requests]
        for batch in batches(lengths, self.batch_tokens):
            for i, scores in zip(batch, self._choice_batch([requests[i] for i in batch]), strict=True):
                out[i] = scores
        return out

    def _choice_batch(self, reqs: Sequence[ChoiceRequest]) -> list[list[float]]:
        """The prompts in one plain causal pass, then every choice token in one small masked pass.

        Pass 1 runs each row's prompt (right-padded, after the batch's shared prefix when that is
        worth caching) with the causal kernel and no mask, keeping its key/value cache; the last
        prompt position predicts each choice's first token. Pass 2 runs all five choices' tokens
        of a row on that cache: a choice token sees the row's prompt and its own choice's earlier
        tokens, never the padding or another choice, at positions that restart after the prompt.
        Only pass 2 needs a mask, and it is (choice tokens) x (prompt + choice tokens) a row.
        """
        torch = self.torch
        shared, own, cache, last = self._prefill([p for p, _ in reqs])
        head = self.model.get_output_embeddings()
        with torch.no_grad():
            first_lp = torch.log_softmax(head(last).float(), dim=-1)
        # pass 2: the choice tokens of every row
        span = max(sum(len(c) for c in cs) for _, cs in reqs)
        past = shared + max(own)
        neg = torch.finfo(self.model.dtype).min
        cids = torch.zeros((len(reqs), span), dtype=torch.long)
        pos = torch.zeros((len(reqs), span), dtype=torch.long)
        allowed = torch.zeros((len(reqs), span, past + span), dtype=torch.bool)
        rows, at, targets, owner = [], [], [], []  # pass-2 predictions: (row, column) -> target token
        out_lp = [[0.0] * len(cs) for _, cs in reqs]
        for b, (_, choices) in enumerate(reqs):
            n = shared + own[b]
            off = 0
            for j, cont in enumerate(choices):
                m = len(cont)
                cids[b, off : off + m] = torch.tensor(cont)
                pos[b, off : off + m] = torch.arange(n, n + m)
                allowed[b, off : off + m, past + off : past + off + m] = torch.ones(m, m, dtype=torch.bool).tril()
                out_lp[b][j] += float(first_lp[b, cont[0]])
                rows += [b] * (m - 1)
                at += list(range(off, off + m - 1))
                targets += cont[1:]
                owner += [(b, j)] * (m - 1)
                off += m
            allowed[b, :off, :n] = True  # every choice token sees the row's prompt
            for t in range(off, span):  # padding attends to itself only
                allowed[b, t, past + t] = True
        if targets:  # some choice has a second token
            mask = torch.zeros(allowed.shape, dtype=self.model.dtype).masked_fill_(~allowed, neg)[:, None]
            with torch.no_grad():
                hidden = self.model.base_model(
                    input_ids=cids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=pos.to(self.device),
                    use_cache=True,
                    **{self._cache_kw: cache},
                ).last_hidden_state
                picked = hidden[torch.tensor(rows), torch.tensor(at)]
                lp = torch.log_softmax(head(picked).float(), dim=-1)
                lp = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].cpu().tolist()
            for (b, j), v in zip(owner, lp, strict=True):
                out_lp[b][j] += v
        return out_lp

    def _prefix_cache(self, prefix: list[int], rows: int):
        """The key/value cache of `prefix`, computed once, repeated for `rows` rows."""
        torch = self.torch
        with torch.no_grad():
            out = self.model.base_model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True)
        cache = out[self._cache_kw]  # the output field is renamed with the argument
        cache.batch_repeat_interleave(rows)
        return cache

    def _prefill(self, prompts: Sequence[list[int]]):
        """Every prompt in one right-padded causal pass (no mask: a real token never sees the
        padding after it), on the cache of the batch's shared prefix when that is worth it.

        Returns (shared, own, cache, last): the shared prefix's length, each row's own length
        after it, the key/value cache of the whole batch and each row's last hidden state.
        """
        torch = self.torch
        shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)  # each row keeps >= 1 token
        if shared * PREFIX_WORTH < sum(len(p) for p in prompts) / len(prompts):
            # A short shared prefix (the description alone, examples drawn per question) saves
            # less than it costs: on its cache the prefill needs an explicit mask, and attention
            # with one is slower than the plain causal kernel over the whole row.
            shared = 0
        cache = self._prefix_cache(prompts[0][:shared], len(prompts)) if shared > 0 else None
        own = [len(p) - shared for p in prompts]
        ids = torch.zeros((len(prompts), max(own)), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, : own[b]] = torch.tensor(prompt[shared:])
        with torch.no_grad():
            out = self.model.base_model(input_ids=ids.to(self.device), use_cache=True, **{self._cache_kw: cache})
        last = out.last_hidden_state[torch.arange(len(prompts)), torch.tensor(own) - 1]
        return shared, own, out[self._cache_kw], last

    # ------------------------------------------------------------ held-out loss

    def sum_nll(self, windows: Sequence[Sequence[int]]) -> float:
        """Summed next-token cross-entropy over each window (nats)."""
        torch = self.torch
        total = 0.0
        for batch in batches([len(w) for w in windows], self.batch_tokens):
            width = max(len(windows[i]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for b, i in enumerate(batch):
                w = torch.tensor(list(windows[i]))
                ids[b, : len(w)] = w
                labels[b, : len(w) - 1] = w[1:]
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device)).logits.float()
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), labels.to(logits.device).flatten(), reduction="sum", ignore_index=-100
                )
            )
        return total

    # ------------------------------------------------------------ generation

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        """Greedy continuation of each prompt, up to its own token cap or the first newline."""
        lengths = [len(p) + cap for p, cap in requests]
        out = [""] * len(requests)
        with self.torch.inference_mode():
            for batch in batches(lengths, self.batch_tokens):
                for i, text in zip(batch, self._generate_batch([requests[i] for i in batch]), strict=True):
                    out[i] = text
        return out

    def _generate_batch(self, reqs: Sequence[GenRequest]) -> list[str]:
        """The shared prefix once, every row's own part in one right-padded pass, then decode together.

        Right padding keeps the prefill causal with no mask: a real token never sees the padding
        after it. While decoding, the padding columns are masked out and each row's positions
        continue from its own length. A row that has stopped leaves the batch (its cache rows go).
        """
        torch = self.torch
        stops = self.newline_ids()
        prompts = [p for p, _ in reqs]
        shared, own, cache, last = self._prefill(prompts)
        mask = torch.zeros((len(reqs), shared + max(own)), dtype=torch.long)
        mask[:, :shared] = 1
        for b in range(len(reqs)):
            mask[b, shared : shared + own[b]] = 1
        first = self.model.get_output_embeddings()(last).argmax(-1).tolist()
        tokens = [[t] for t in first]
        alive = [b for b, (t, (_, cap)) in enumerate(zip(first, reqs, strict=True)) if t not in stops and cap > 1]
        mask = mask.to(self.device)[alive]
        pos = torch.tensor([len(prompts[b]) for b in alive], device=self.device)
        if alive and len(alive) < len(reqs):
            cache.batch_select_indices(torch.tensor(alive, dtype=torch.long, device=self.device))
        while alive:
            mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype, device=self.device)], dim=1)
            out = self.model(
                input_ids=torch.tensor([[tokens[b][-1]] for b in alive], device=self.device),
                attention_mask=mask,
                position_ids=pos[:, None],
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: cache},
            )
            cache = out[self._cache_kw]
            pos = pos + 1
            keep = []
            for row, (b, t) in enumerate(zip(alive, out.logits[:, -1].argmax(-1).tolist(), strict=True)):
                tokens[b].append(t)
                if t not in stops and len(tokens[b]) < reqs[b][1]:
                    keep.append(row)
            if keep and len(keep) < len(alive):
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(index)
                mask, pos = mask[index], pos[index]
            alive = [alive[r] for r in keep]
        return [self.tok.decode(t) for t in tokens]
