"""Prompt-to-Prompt attention control (Hertz et al., arXiv 2208.01626) over
the codes of any inversion method.

An edit chain runs the source branch (the code edited with the source
prompt: imprint's reconstruction row) and the target rows of the same image
and seed in the same batched UNet calls. While the control is installed,
every attention layer computes the source rows' attention probabilities and
injects them into their target rows:

- cross-attention, for the first `cross_until` of the schedule's steps: the
  target's map over its own tokens is drawn from the source's map through a
  token alignment (`replace`: word-for-word for prompts with the same number
  of words; `refine`: a global alignment of the token sequences, new tokens
  keep their own attention; `auto`, the default: replace when source and
  target have the same number of words, refine otherwise, per prompt pair, as
  the edit-friendly paper's reference code chooses between P2P's
  AttentionReplace and AttentionRefine), then optionally re-weighted per word;
- self-attention, for the first `self_until` of the schedule's steps, at
  maps of at most `self_max_tokens` positions (P2P injects 16x16 and coarser
  maps).

Both fractions count over the schedule's full `steps` and from the edit's
first step, as the reference code does (the edit-friendly paper's P2P
controller is built with the full number of steps while its edit runs only
`steps - skip` of them): at 100 steps, skip 36, cross 0.6 and self 0.2
inject the first 60 and 20 of the edit's 64 steps (`injected_steps`).

Only the conditional half of a guided call is controlled (the unconditional
rows all share the empty prompt), as in the original code. Maps are injected
on the fly inside each call: nothing is stored across steps, so memory does
not grow with the number of steps. The layer's own processor (SDPA) runs
whenever no injection is due, and the original processors are restored,
with the step hook removed, when the chain ends: nothing stays installed on
the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

MODES = ("auto", "replace", "refine")
CONTROLS = ("none", "p2p")


@dataclass(frozen=True)
class P2PConfig:
    cross_until: float = 0.6  # fraction of the schedule's steps with cross-attention injected (official code: 0.6)
    self_until: float = 0.2  # fraction of the schedule's steps with self-attention injected (official code: 0.2)
    # "auto": replace for prompts with the same number of words, else refine;
    # "replace": same number of words only; "refine": token alignment for any prompts
    mode: str = "auto"
    reweight: Mapping[str, float] = field(default_factory=dict)  # target word -> attention factor
    self_max_tokens: int = 256  # self-attention maps of at most this many positions are injected (16x16)

    def check(self) -> "P2PConfig":
        for name in ("cross_until", "self_until"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {v!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for word, factor in self.reweight.items():
            if not isinstance(word, str) or not word.strip() or " " in word.strip():
                raise ValueError(f"reweight keys must be single words, got {word!r}")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 <= factor < float("inf"):
                raise ValueError(f"reweight[{word!r}] must be a finite number >= 0, got {factor!r}")
        if not isinstance(self.self_max_tokens, int) or self.self_max_tokens < 1:
            raise ValueError(f"self_max_tokens must be a positive integer, got {self.self_max_tokens!r}")
        return self

    def as_params(self) -> dict:
        """What defines a P2P edit, for the output rows."""
        return {"control": "p2p", "cross_until": float(self.cross_until), "self_until": float(self.self_until),
                "mode": self.mode, "reweight": {k: float(v) for k, v in sorted(self.reweight.items())}}


# --------------------------------------------------------------------------
# Token alignment
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenMap:
    """How a target prompt's cross-attention draws on its source prompt's.

    For target token j: new[j] = alpha[j] * sum_k weights[j, k] A_src[k]
    + (1 - alpha[j]) A_tgt[j], then times equalizer[j]. Rows and columns
    index the padded token sequence (start token, words, end and padding)."""

    weights: torch.Tensor  # [L, L]
    alpha: torch.Tensor  # [L]
    equalizer: torch.Tensor  # [L]


def _ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, truncation=False).input_ids)


def _word_spans(tokenizer, prompt: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The prompt's space-separated words and the [start, end) token
    positions of each (position 0 is the start token). CLIP's tokenizer
    splits words independently, so a word's tokens are its own."""
    words = prompt.split()
    spans, pos = [], 1
    for w in words:
        n = len(_ids(tokenizer, w, special=False))
        spans.append((pos, pos + n))
        pos += n
    if pos != len(_ids(tokenizer, prompt)) - 1:
        raise ValueError(f"cannot align the words of {prompt!r} with its tokens")
    return words, spans


def _tail(weights: torch.Tensor, end_tgt: int, end_src: int) -> None:
    """End token and padding: aligned from the end of each prompt."""
    size = weights.shape[0]
    for p in range(end_tgt, size):
        weights[p, min(p - end_tgt + end_src, size - 1)] = 1.0


def _check_length(tokenizer, prompt: str, size: int) -> None:
    n = len(_ids(tokenizer, prompt))
    if n > size:
        raise ValueError(f"prompt has {n} tokens, more than the text encoder's {size}: {prompt[:60]!r}")


def replace_map(tokenizer, source: str, target: str, size: int = 77) -> TokenMap:
    """Word-for-word alignment of two prompts with the same number of words
    (P2P's word swap). An unchanged word maps token to token; a swapped word
    spreads each of its target tokens evenly over the source word's tokens."""
    for p in (source, target):
        _check_length(tokenizer, p, size)
    ws, ss = _word_spans(tokenizer, source)
    wt, st = _word_spans(tokenizer, target)
    if len(ws) != len(wt):
        raise ValueError(f"mode 'replace' needs prompts with the same number of words ({len(ws)} in {source!r}, "
                         f"{len(wt)} in {target!r}); use mode 'refine'")
    weights = torch.zeros(size, size)
    weights[0, 0] = 1.0
    for (a, b), (c, d) in zip(ss, st):
        if b - a == d - c:
            for k in range(d - c):
                weights[c + k, a + k] = 1.0
        else:
            weights[c:d, a:b] = 1.0 / (b - a)
    _tail(weights, st[-1][1] if st else 1, ss[-1][1] if ss else 1)
    return TokenMap(weights, torch.ones(size), torch.ones(size))


def align_tokens(source: Sequence[int], target: Sequence[int]) -> list[int]:
    """Global alignment (Needleman-Wunsch; match +1, mismatch -1, gap 0, as
    P2P's refinement): for each target token, the index of the source token
    it is aligned with, or -1 for a token the source does not have."""
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j], score[i][j - 1])
    out = [-1] * m
    i, j = n, m
    while i > 0 and j > 0:
        if score[i][j] == score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1):
            if source[i - 1] == target[j - 1]:
                out[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j]:
            i -= 1
        else:
            j -= 1
    return out


def refine_map(tokenizer, source: str, target: str, size: int = 77) -> TokenMap:
    """P2P's refinement: target tokens aligned with a source token take its
    attention; tokens the source lacks (added words) keep their own."""
    for p in (source, target):
        _check_length(tokenizer, p, size)
    src, tgt = _ids(tokenizer, source)[1:-1], _ids(tokenizer, target)[1:-1]
    weights, alpha = torch.zeros(size, size), torch.ones(size)
    weights[0, 0] = 1.0
    for j, i in enumerate(align_tokens(src, tgt)):
        if i < 0:
            alpha[j + 1] = 0.0
        else:
            weights[j + 1, i + 1] = 1.0
    _tail(weights, len(tgt) + 1, len(src) + 1)
    return TokenMap(weights, alpha, torch.ones(size))


def pair_mode(mode: str, source: str, target: str) -> str:
    """The alignment a prompt pair gets: `auto` is replace when both have the
    same number of (space-separated) words, else refine."""
    if mode != "auto":
        return mode
    return "replace" if len(source.split()) == len(target.split()) else "refine"


def token_map(config: P2PConfig, tokenizer, source: str, target: str, size: int = 77) -> TokenMap:
    """The token map of one (source, target) pair. Raises ValueError, with the
    reason, when the pair cannot be aligned under the config (the worker
    checks every sample's prompts with `check_prompts` before any work, so
    such a sample is an error row, not a failed batch)."""
    mode = pair_mode(config.mode, source, target)
    tm = (replace_map if mode == "replace" else refine_map)(tokenizer, source, target, size)
    if not config.reweight:
        return tm
    words, spans = _word_spans(tokenizer, target)
    eq = tm.equalizer.clone()
    for word, factor in config.reweight.items():
        hits = [s for w, s in zip(words, spans) if w.strip(".,;:!?").lower() == word.strip().lower()]
        if not hits:
            raise ValueError(f"reweight word {word!r} is not in the target prompt {target!r}")
        for a, b in hits:
            eq[a:b] = float(factor)
    return TokenMap(tm.weights, tm.alpha, eq)


def check_prompts(config: P2PConfig, tokenizer, source: str, targets: Sequence[str], size: int = 77) -> None:
    """Raise ValueError naming the first target prompt that cannot be aligned
    with `source` under `config` (a reweight word it lacks, words that do not
    match their tokens, different word counts in mode replace)."""
    for target in targets:
        try:
            token_map(config, tokenizer, source, target, size)
        except ValueError as exc:
            raise ValueError(f"p2p cannot align target prompt {target!r} with source {source!r}: {exc}") from None


def template_word_change(template: str) -> int | None:
    """How many words a target template adds to (or, negative, removes from)
    every source prompt; None when that depends on the source (no `{source}`:
    a fixed prompt; `{source}` twice: the change grows with the source)."""
    import string

    if sum(1 for _, name, _, _ in string.Formatter().parse(template) if name == "source") != 1:
        return None
    marker = "\x00"  # one word standing for the source (no prompt holds it)
    return len(template.format(source=marker).split()) - 1


# --------------------------------------------------------------------------
# The plan of one controlled chain
# --------------------------------------------------------------------------


@dataclass
class P2PPlan:
    """Which row of the chain injects into which, with what token maps, at
    which steps. Rows are the chain's latents (the conditional half of a
    guided call); a source row has source_of[r] == r."""

    source_of: torch.Tensor  # long [R]
    weights: torch.Tensor  # [T, L, L] for the T target rows (those with source_of[r] != r)
    alpha: torch.Tensor  # [T, L]
    equalizer: torch.Tensor  # [T, L]
    step_of: dict[int, int]  # timestep -> index of the edit step
    cross_steps: int  # steps 0 .. cross_steps - 1 inject cross-attention
    self_steps: int
    self_max_tokens: int

    @property
    def rows(self) -> int:
        return int(self.source_of.numel())

    @property
    def targets(self) -> torch.Tensor:
        return (self.source_of != torch.arange(self.rows)).nonzero().flatten()


def injected_steps(config: P2PConfig, num_steps: int) -> tuple[int, int]:
    """(cross, self): how many of an edit's first steps get the source's
    cross- and self-attention maps, for a schedule of `num_steps` steps (the
    full `steps`, not `steps - skip`). The reference's counts: P2P's
    controller holds its cross-attention schedule as num_steps + 1 rows and
    injects rows [0, int(cross_until * (num_steps + 1))); self-attention
    while the step is below int(self_until * num_steps)."""
    return int(config.cross_until * (num_steps + 1)), int(config.self_until * num_steps)


def make_plan(config: P2PConfig, tokenizer, prompts: Sequence[str], source_of: Sequence[int],
              timesteps: Sequence[int], size: int = 77, num_steps: int | None = None) -> P2PPlan:
    """prompts[r]: the prompt row r is edited with; source_of[r]: the row
    whose maps it receives (itself for a source row; a source row must be
    its own source). timesteps: the edit's timesteps, first step first.
    num_steps: the schedule's full number of steps the fractions count over
    (a code's `num_steps`; None = len(timesteps), an edit without skip)."""
    config.check()
    r = len(prompts)
    if len(source_of) != r:
        raise ValueError(f"source_of has {len(source_of)} entries for {r} rows")
    for i, s in enumerate(source_of):
        if not 0 <= s < r or source_of[s] != s:
            raise ValueError(f"row {i}: its source row {s} must be a row of the chain that is its own source")
    src = torch.tensor(list(source_of), dtype=torch.long)
    maps = [token_map(config, tokenizer, prompts[s], prompts[i], size) for i, s in enumerate(source_of) if s != i]
    cross_steps, self_steps = injected_steps(config, len(timesteps) if num_steps is None else int(num_steps))
    stack = (lambda xs, shape: torch.stack(xs) if xs else torch.zeros((0, *shape)))
    return P2PPlan(
        source_of=src,
        weights=stack([m.weights for m in maps], (size, size)),
        alpha=stack([m.alpha for m in maps], (size,)),
        equalizer=stack([m.equalizer for m in maps], (size,)),
        step_of={int(t): j for j, t in enumerate(timesteps)},
        cross_steps=cross_steps,
        self_steps=self_steps,
        self_max_tokens=config.self_max_tokens,
    )


# --------------------------------------------------------------------------
# Attention processors installed for the duration of a chain
# --------------------------------------------------------------------------


class _State:
    """The step the chain is at, advanced by a forward pre-hook on the UNet."""

    def __init__(self, plan: P2PPlan):
        self.plan = plan
        self.step = -1
        self.targets = plan.targets
        self.sources = plan.source_of[self.targets]

    def on_call(self, module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        t = int(t.flatten()[0]) if torch.is_tensor(t) else int(t)  # one host read per UNet call, only under control
        if t not in self.plan.step_of:
            raise ValueError(f"UNet called at timestep {t}, which is not a step of the controlled edit")
        self.step = self.plan.step_of[t]

    def active(self, cross: bool) -> bool:
        limit = self.plan.cross_steps if cross else self.plan.self_steps
        return 0 <= self.step < limit and self.targets.numel() > 0


class P2PAttnProcessor:
    """Wraps a layer's own processor: runs it unchanged when no injection is
    due, else computes attention explicitly and injects the source rows'
    probabilities into their target rows."""

    def __init__(self, state: _State, base: Callable, cross: bool):
        self.state, self.base, self.cross = state, base, cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        st = self.state
        positions = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        if not st.active(self.cross) or (not self.cross and positions > st.plan.self_max_tokens):
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self._controlled(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _controlled(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        probs = self._inject(probs.view(batch, attn.heads, *probs.shape[1:])).view(batch * attn.heads, *probs.shape[1:])
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _inject(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [B, heads, N, M]; B is the chain's rows, or twice that for a
        guided call ([uncond; cond]: only the conditional half is controlled)."""
        st, rows = self.state, self.state.plan.rows
        if probs.shape[0] not in (rows, 2 * rows):
            raise ValueError(f"a controlled UNet call has {probs.shape[0]} rows; P2P needs the chain's {rows} rows "
                             "(or 2x with guidance) in one call: raise batch.max_unet_batch or edit fewer rows at once")
        off = probs.shape[0] - rows
        tgt, src = st.targets.to(probs.device) + off, st.sources.to(probs.device) + off
        base = probs[src]
        if self.cross:
            plan = st.plan
            mapped = torch.einsum("bhnk,bjk->bhnj", base, plan.weights.to(probs.device, probs.dtype))
            alpha = plan.alpha.to(probs.device, probs.dtype)[:, None, None, :]
            new = (alpha * mapped + (1 - alpha) * probs[tgt]) * plan.equalizer.to(probs.device, probs.dtype)[:, None, None, :]
        else:
            new = base
        out = probs.clone()
        out[tgt] = new
        return out


def raw_unet(unet: Any) -> torch.nn.Module:
    """The diffusers UNet behind imprint's wrappers (call counters, the
    epsilon adapter). A compiled UNet is refused: the control's Python-side
    state would make it recompile at every step."""
    seen = 0
    while not isinstance(unet, torch.nn.Module) and hasattr(unet, "net") and seen < 8:
        unet, seen = unet.net, seen + 1
    if type(unet).__name__ == "OptimizedModule":
        raise ValueError("P2P attention control needs the eager UNet; turn model.compile off for p2p edits")
    if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "set_attn_processor"):
        raise ValueError("P2P attention control needs a diffusers UNet2DConditionModel (with attention processors)")
    return unet


@contextmanager
def attention_control(unet: Any, plan: P2PPlan) -> Iterator[_State]:
    """Install the control on `unet` for the duration of the block; the
    original processors come back and the step hook goes away on exit,
    also when the block raises."""
    net = raw_unet(unet)
    saved = dict(net.attn_processors)
    state = _State(plan)
    hook = net.register_forward_pre_hook(state.on_call, with_kwargs=True)
    try:
        net.set_attn_processor({name: P2PAttnProcessor(state, proc, name.endswith("attn2.processor"))
                                for name, proc in saved.items()})
        yield state
    finally:
        hook.remove()
        net.set_attn_processor(saved)


def edit(method: Any, unet: Any, scheduler, code, cond: torch.Tensor, uncond: torch.Tensor | None, *,
         prompts: Sequence[str], source_of: Sequence[int], tokenizer, config: P2PConfig = P2PConfig(),
         cfg_scale: float | torch.Tensor = 9.0, **params) -> torch.Tensor:
    """`method.edit` (any inversion method's module, or its name) under P2P
    control. Row r of `code`/`cond` is edited with prompts[r] and receives
    the maps of row source_of[r]; the source rows are usually the codes
    edited with the source prompt at the source guidance (their outputs are
    the reconstructions). All rows run in one UNet call per step."""
    if isinstance(method, str):
        from .inversion import get_method

        method = get_method(method)
    if getattr(method, "EDIT_NEEDS_SOURCE", False):
        prompts, source_of, params = _source_row_layout(prompts, source_of, params)
    plan = make_plan(config, tokenizer, prompts, source_of, code.timesteps.tolist(), context_length(tokenizer),
                     num_steps=code.num_steps)
    with attention_control(unet, plan):
        return method.edit(unet, scheduler, code, cond, uncond, cfg_scale=cfg_scale, max_batch=None, **params)


def _source_row_layout(prompts: Sequence[str], source_of: Sequence[int], params: dict) -> tuple[list, list, dict]:
    """The controlled call of a method that evaluates every row with the
    source prompt on that row's own edited latent (turbo-edit: one call on
    [all R rows with the source prompt; the edit rows with their targets]).
    An edit row takes its maps from its own source-prompt row (the source
    prompt on the edited latent), not from another chain's latent. Rows that
    are their own source are edited with the source prompt alone (the
    reconstruction rows); they have no target half."""
    r = len(prompts)
    own = [source_of[i] == i for i in range(r)]
    given = params.get("reconstruct")
    if given is not None and [bool(x) for x in torch.as_tensor(given).tolist()] != own:
        raise ValueError("reconstruct must mark exactly the rows that are their own P2P source")
    edit_rows = [i for i in range(r) if not own[i]]
    call_prompts = [prompts[source_of[i]] for i in range(r)] + [prompts[i] for i in edit_rows]
    call_source_of = list(range(r)) + edit_rows
    return call_prompts, call_source_of, {**params, "reconstruct": torch.tensor(own)}


def context_length(tokenizer) -> int:
    n = int(getattr(tokenizer, "model_max_length", 77) or 77)
    return n if n < 10_000 else 77
