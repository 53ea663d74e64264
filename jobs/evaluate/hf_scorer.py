"""Scoring with a transformers causal LM: batched across questions, each prompt computed once.

- Prefill (`_prefill`), shared by both tasks: a batch's prompts right-padded, sorted by length.
  The common token prefix of a batch (the task description, and the examples where they are
  shared) is run once and its cache copied to every row, when it is at least a quarter of the
  prompt. The rows' own parts then go through in chunks of `prefill_chunk` tokens (chunked
  prefill): a chunk attends to the cache so far and to itself causally, so attention does the
  causal triangle, not the whole masked square, and a pass's activations stay small. One mask
  serves every row, since a row's padding comes after its real tokens, where causality hides
  it. The last decoder layer runs in full only at each row's last token and as keys and values
  elsewhere (`last_layer`): nothing reads the rest of its output. The cache grows in place
  (`kv_room`), not by a copy a chunk or a step.
- Choices: the prompts prefilled; each prompt's last position predicts its choices' first
  tokens. Then every choice token of every row in one small pass on that cache, with a mask by
  which a choice token sees its prompt and its own choice's earlier tokens (never padding or
  another choice), at positions that restart after the prompt. The log-likelihood of a choice
  is the same as over its own `prompt + choice` row (the unit tests hold them equal), but the
  prompt is computed once instead of five times. Logits are taken only where a choice token is
  predicted.
- Generation: greedy. The prefill batches of a group write into one key/value slab, and all the
  group's rows decode together on it (a decode step costs about the same for 30 rows as for
  200), the padding masked out and each row's positions continuing from its own length; a row
  stops at a token that holds a newline or at its own token cap. Finished rows are carried
  along until only a quarter of the rows are going, then dropped together.
- Batch sizes: prefill batches of `batch_tokens` (by default, on a GPU, a key/value cache of
  1 GiB within 16,384..262,144 tokens, since for a small model the per-forward overhead, not the
  arithmetic, is what one-question-at-a-time evaluation pays for; on a CPU, 16,384 tokens);
  generation groups of a 1 GiB cache.
- The model is loaded in its saved dtype (`dtype="auto"`), unless told otherwise.
- Chunks, the in-place cache, the slab and the last-layer pass need transformers 5.x caches and
  Llama's decoder layer; elsewhere each batch runs in one pass and decodes on its own.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

ChoiceRequest = tuple[list[int], list[list[int]]]  # (prompt ids, ids of each choice)
GenRequest = tuple[list[int], int]  # (prompt ids, max new tokens)


def _dtype_kwargs(version: str, dtype: str) -> dict:
    import torch

    value = "auto" if dtype == "auto" else getattr(torch, dtype)
    major, minor = (int(x) for x in version.split(".")[:2])
    return {"dtype": value} if (major, minor) >= (4, 56) else {"torch_dtype": value}


KV_BUDGET_BYTES = 1 << 30  # the key/value cache one batch may hold by default
COMPACT_WHEN = 4  # decoding drops finished rows once only 1/COMPACT_WHEN of the batch is going
# Tokens a row per prefill pass (see _prefill). Tiny model on a CPU, JSQuAD, 200 questions,
# generation: 64 -> 0.242 s, 128 -> 0.228 s, 256 -> 0.260 s, one pass -> 0.320 s.
PREFILL_CHUNK = 128
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


def keep_freed_memory() -> bool:
    """Have this process's allocator keep freed memory for reuse (glibc: mallopt), so that the
    evaluation's large, short-lived tensors (prefill activations, the key/value slab) do not
    come fresh from the kernel, page-faulting their way in, at every batch.

    glibc serves an allocation over its mmap threshold with a fresh mapping and gives the pages
    back on free, and trims the heap's free top beyond 128 KiB; raising both to their useful
    maxima (32 MiB, 1 GiB) keeps the pages mapped. Tiny model on a CPU, JSQuAD, 200 questions:
    generation 0.200 -> 0.177 s, the one-at-a-time loop unchanged (1.30 -> 1.30 s). A process
    setting, made by the evaluation job for itself; False where there is no glibc.
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


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
        self._prefix_memo: tuple | None = None  # (prefix ids, its cache) within one call
        params = inspect.signature(self.model.base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        from jobs.evaluate import last_layer

        # a prefill runs the last layer in full only at each row's last token (keys/values elsewhere)
        self._last_layer = last_layer if last_layer.supported(self.model) else None
        from jobs.evaluate import kv_room

        # decoding appends to a cache with room, not by copying it (transformers 5.x)
        self._kv_room = kv_room if kv_room.layered_caches() else None
        self.prefill_chunk = PREFILL_CHUNK
        # rows decoded together: as many as a KV_BUDGET_BYTES cache holds, with a slab to join them in
        kv_tokens = default_batch_tokens(self.model.config, self.model.dtype.itemsize)
        self.decode_tokens = max(self.batch_tokens, kv_tokens) if self._kv_room else self.batch_tokens

    # ------------------------------------------------------------ tokens

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def encode_all(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, in one call (the tokenizer batches them)."""
        return self.tok(list(texts), add_special_tokens=False).input_ids if texts else []

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
        try:
            for batch in batches(lengths, self.batch_tokens):
                for i, scores in zip(batch, self._choice_batch([requests[i] for i in batch]), strict=True):
                    out[i] = scores
        finally:
            self._prefix_memo = None
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
        span = max(sum(len(c) for c in cs) for _, cs in reqs)  # the choice tokens of a row, padded
        shared, own, cache, last = self._prefill([p for p, _ in reqs], room=span)
        head = self.model.get_output_embeddings()
        with torch.no_grad():
            first_lp = torch.log_softmax(head(last).float(), dim=-1)
        # pass 2: the choice tokens of every row
        past = shared + max(own)
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
            mask = self._additive(allowed)[:, None]
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
        """The key/value cache of `prefix` repeated for `rows` rows. It is computed once for the
        batches of one `generate` or `choice_logprobs` call that share it (`_prefix_memo`)."""
        torch = self.torch
        key = tuple(prefix)
        if self._prefix_memo is None or self._prefix_memo[0] != key:
            with torch.no_grad():
                out = self.model.base_model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True)
            self._prefix_memo = (key, out[self._cache_kw])  # the output field is renamed with the argument
        cache = copy.deepcopy(self._prefix_memo[1])
        cache.batch_repeat_interleave(rows)
        return cache

    def _prefill(self, prompts: Sequence[list[int]], room: int = 0, slab=None, rows: range | None = None):
        """Every prompt right-padded, on the cache of the batch's shared prefix when that is worth
        it, in passes of `prefill_chunk` tokens along the rows (chunked prefill).

        Each pass's queries see the cache so far and their own chunk causally: one mask for all
        rows, since a row's padding comes after its real tokens, where causality hides it. A
        chunk attends only to the keys before it, so the attention work is the causal triangle
        rather than the whole square a masked pass computes, and each pass's activations stay
        small. The cache has room for the chunks and for `room` more tokens a row (`kv_room`);
        without it (transformers 4.x) the rows go in one pass. The last layer runs in full only
        at each row's last token (`last_layer`), where supported.

        Returns (shared, own, cache, last): the shared prefix's length, each row's own length
        after it, the key/value cache of the whole batch and each row's last hidden state.
        """
        torch = self.torch
        shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)  # each row keeps >= 1 token
        if shared * PREFIX_WORTH < sum(len(p) for p in prompts) / len(prompts):
            shared = 0  # a short shared prefix saves less than its copies to every row cost
        own = [len(p) - shared for p in prompts]
        width = max(own)
        cache = self._prefix_cache(prompts[0][:shared], len(prompts)) if shared > 0 else None
        chunk = width
        if self._kv_room is not None:
            from transformers import DynamicCache

            cache = cache if cache is not None else DynamicCache(config=self.model.config)
            if self._kv_room.supported(cache):
                cache = self._kv_room.with_room(cache, width + room, slab, rows)
                chunk = self.prefill_chunk
            elif slab is not None:
                raise ValueError(f"a slab needs transformers' DynamicLayer caches, not {cache.layers}")
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, : own[b]] = torch.tensor(prompt[shared:])
        ids = ids.to(self.device)
        ends = torch.tensor(own) - 1  # each row's last real token
        last = None
        for start in range(0, width, chunk):
            stop = min(start + chunk, width)
            at = (ends - start).clamp(0, stop - start - 1)  # the row's last token, where it is in this pass
            tail = self._last_layer.last_positions_only(self.model, at) if self._last_layer else nullcontext()
            with torch.no_grad(), tail:
                out = self.model.base_model(
                    input_ids=ids[:, start:stop],
                    attention_mask=self._causal_after(shared + start, stop - start),
                    use_cache=True,
                    **{self._cache_kw: cache},
                )
            cache = out[self._cache_kw]
            hidden = out.last_hidden_state
            hidden = hidden[:, 0] if self._last_layer else hidden[torch.arange(len(prompts)), at]
            here = ((ends >= start) & (ends < stop)).to(self.device)
            last = hidden if last is None else torch.where(here[:, None], hidden, last)
        return shared, own, cache, last

    def _additive(self, allowed):
        """An attention mask in the model's dtype: 0 where `allowed`, the dtype's minimum elsewhere."""
        torch = self.torch
        mask = torch.zeros(allowed.shape, dtype=self.model.dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.model.dtype).min)

    def _causal_after(self, past: int, n: int):
        """The additive mask by which `n` new tokens see `past` cached ones and each other
        causally (None with nothing cached: the plain causal kernel then applies)."""
        if past == 0:
            return None
        allowed = self.torch.ones((n, past + n), dtype=self.torch.bool, device=self.device).tril(past)
        return self._additive(allowed)[None, None]

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
        try:
            with self.torch.inference_mode():
                for group in batches(lengths, self.decode_tokens):
                    for i, text in zip(group, self._generate_group([requests[i] for i in group]), strict=True):
                        out[i] = text
        finally:
            self._prefix_memo = None
        return out

    def _generate_group(self, reqs: Sequence[GenRequest]) -> list[str]:
        """Prefill in batches of `batch_tokens`, then decode every row of the group together.

        Each prefill batch (its shared prefix once, its rows right-padded, in chunks) writes into
        its own rows of one slab (`kv_room`); the slab then is the cache all rows decode on, a
        row's columns past its prompt masked out. Without a slab (transformers 4.x) the group is
        one prefill batch. While decoding, the mask (additive) grows by a column a step and each
        row's positions continue from its own length. A row that has stopped is carried along,
        its tokens ignored, until only a quarter of the rows are going: then the others leave
        the batch together (dropping cache rows copies the cache, so it is done seldom).
        """
        torch = self.torch
        stops = self.newline_ids()
        cap = max(c for _, c in reqs)
        split = batches([len(p) for p, _ in reqs], self.batch_tokens)
        order = [i for part in split for i in part]
        reqs = [reqs[i] for i in order]  # each prefill batch is a run of rows
        prompts = [p for p, _ in reqs]
        parts, start = [], 0
        for part in split:
            parts.append(range(start, start + len(part)))
            start += len(part)
        slab = None
        if self._kv_room is not None and len(parts) > 1:
            slab = self._kv_room.Slab(len(reqs), max(len(p) for p in prompts) + cap)
        elif len(parts) > 1:
            raise ValueError("a generation group without a slab must be one prefill batch")
        ends, lasts, filled = [], [], []
        for rows in parts:
            shared, own, cache, last = self._prefill([prompts[r] for r in rows], room=cap, slab=slab, rows=rows)
            ends += [shared + n for n in own]
            lasts.append(last)
            filled.append((rows, shared + max(own)))
        width = max(w for _, w in filled)
        if slab is not None:
            cache = self._kv_room.joined(slab, self.model.config, width, filled)
        last = torch.cat(lasts)
        allowed = torch.arange(width)[None, :] < torch.tensor(ends)[:, None]
        mask = self._additive(allowed)
        first = self.model.get_output_embeddings()(last).argmax(-1).tolist()
        tokens = [[t] for t in first]
        going = {b for b, (t, (_, c)) in enumerate(zip(first, reqs, strict=True)) if t not in stops and c > 1}
        rows = list(range(len(reqs)))  # the request of each row of the cache
        mask = mask.to(self.device)
        pos = torch.tensor([len(p) for p in prompts], device=self.device)
        while going:
            if len(going) * COMPACT_WHEN <= len(rows):
                keep = [r for r, b in enumerate(rows) if b in going]
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(index)
                mask, pos, rows = mask[index], pos[index], [rows[r] for r in keep]
            mask = torch.cat([mask, torch.zeros((len(rows), 1), dtype=mask.dtype, device=self.device)], dim=1)
            out = self.model(
                input_ids=torch.tensor([[tokens[b][-1]] for b in rows], device=self.device),
                attention_mask=mask[:, None, None, :],
                position_ids=pos[:, None],
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: cache},
            )
            cache = out[self._cache_kw]
            pos = pos + 1
            for b, t in zip(rows, out.logits[:, -1].argmax(-1).tolist(), strict=True):
                if b in going:
                    tokens[b].append(t)
                    if t in stops or len(tokens[b]) >= reqs[b][1]:
                        going.discard(b)
        texts = [self.tok.decode(t) for t in tokens]
        back = [""] * len(texts)
        for i, text in zip(order, texts, strict=True):
            back[i] = text
        return back
