"""The MH kernel: a batch of chains over token sequences, one edit move per chain per transition."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from ppl_lm.inference._runtime import (
    Scores,
    check_has_latent,
    latent_sites,
    run_model,
    run_model_until,
    sequence_base,
    sequence_sites,
)
from ppl_lm.inference.mh.latents import check_updatable, random_walk_sites, update_other_latents
from ppl_lm.inference.mh.moves import MOVES, EditBatch, check_moves, content_length, draw_positions, log_q_token
from ppl_lm.inference.mh.start import initial_states
from ppl_lm.inference.mh.state import ChainState, ModelLayout, mh_accept, site_masks
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel

from ppl_lm import seeding as _random
from ppl_lm.lm.base import start_rows
from ppl_lm.tokens import after_eos_mask, categorical

__all__ = ["EditKernel", "EditSite"]


@dataclass(frozen=True)
class EditSite:
    """The sequence site one transition edits: its LM, length, and each chain's prompt rows under
    the other sites' current values (a later site's prompt may be an earlier site's value)."""

    name: str
    lm: object
    T: int
    eos: int
    prompt: torch.Tensor  # [P] shared or [C, P]
    prompt_lengths: torch.Tensor | None  # [C] when the prompts are ragged


class EditKernel(MCMCKernel):
    """A batch of MH chains over token sequences, moved by LM-guided edits.

    Args:
        model: a vectorised Pyro model with one or more latent ``lm.sequence(...)`` sites (and any other
            latent sites with a finite support or a continuous one).
        num_chains: chains, run as one batch.
        moves: move name -> probability (see :data:`~ppl_lm.inference.mh.moves.MOVES`); normalised.
        thin: transitions per kept sample after warm-up.
        initial_samples: LongTensor ``[num_chains, T]`` of starting states; by default, prior
            samples that satisfy every condition.
        init_budget: most prior draws spent looking for admissible starting states.

    The state handed to and returned by ``sample`` is ``{"x": [C, T], "accepted": [C],
    "move": [C]}`` (all int64); the kernel keeps the values and scores of every chain in
    :attr:`state` (a :class:`ChainState`), and what it read from the model in :attr:`layout`.
    """

    def __init__(self, model, *, num_chains: int = 4, moves: Mapping[str, float] | None = None,
                 thin: int = 1, initial_samples: torch.Tensor | None = None, init_budget: int | None = None,
                 progress: bool = False):
        self.model = model
        self.progress = progress
        self.num_chains = num_chains
        self.move_probs = check_moves(moves)
        self.thin = thin
        self.initial_samples = initial_samples
        self.init_budget = init_budget if init_budget is not None else max(4096, 64 * num_chains)
        self.transforms: dict = {}  # tells Pyro's MCMC that values need no transform
        self.warmup_steps = 0
        self.layout: ModelLayout | None = None  # set in setup
        self.state: ChainState | None = None  # set in setup
        self._initial_params = None

    # -- Pyro MCMCKernel interface ------------------------------------------------------------
    def setup(self, warmup_steps, *args, **kwargs):
        self.warmup_steps = warmup_steps
        sites = latent_sites(self.model, args, kwargs, placeholder=True)
        check_has_latent(sites, "mh")
        seq = sequence_sites(sites)
        # The main site (the Posterior's samples) is the first; every sequence site is edited in turn.
        # With none (every text observed) a transition updates the other latents only.
        others = {k: v for k, v in sites.items() if k not in seq}
        check_updatable(others)
        self.layout = ModelLayout(args, kwargs, list(sites), seq, others, next(iter(seq), None))
        values = initial_states(self.model, self.layout, self.num_chains, self.initial_samples, self.init_budget,
                                self._score, self.progress)
        scores = self._score(values)
        self.layout = dataclasses.replace(self.layout, masks=site_masks(scores.trace, seq))
        self.state = ChainState(values, scores, len(MOVES), random_walk_sites(others))
        zeros = torch.zeros(self.num_chains, dtype=torch.long)
        self._initial_params = {"x": self._main().clone(), "accepted": zeros, "move": zeros.clone()}

    @property
    def initial_params(self):
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params):
        self.initial_samples = params["x"]

    @property
    def site(self) -> str | None:
        """The main sequence site (``None`` when every text is observed)."""
        return self.layout.site

    def sample(self, params):
        warm = self.state.t < self.warmup_steps
        for _ in range(1 if warm else self.thin):
            move, acc = self._transition(warm)
        self.state.t += 1
        if not warm:
            self.state.record(self.site)
        return {"x": self._main().clone(), "accepted": acc.long(), "move": move}

    def _main(self) -> torch.Tensor:
        """The main sequence site's value of every chain (``[C, 0]`` when every text is observed)."""
        if self.site is None:
            return torch.zeros(self.num_chains, 0, dtype=torch.long)
        return self.state.values[self.site]

    def logging(self):
        s = self.state
        prop, acc = s.proposed + s.proposed_warm, s.accepted + s.accepted_warm
        rate = float(acc.sum()) / max(1, int(prop.sum()))
        return OrderedDict([("acc. rate", f"{rate:.3f}")])

    def diagnostics(self):
        return {"acceptance": self.acceptance()}

    # -- public helpers -----------------------------------------------------------------------
    def acceptance(self) -> dict[str, float]:
        """Post-warm-up acceptance rate of each move with positive probability."""
        out = {}
        for i, m in enumerate(MOVES):
            if self.move_probs[i] > 0:
                n = int(self.state.proposed[i])
                out[m] = float(self.state.accepted[i]) / n if n else float("nan")
        return out

    # -- internals ----------------------------------------------------------------------------
    def _score(self, values: dict[str, torch.Tensor]) -> Scores:
        """The joint target of every chain's values (all latent sites): every sequence site is
        scored under the prompt the other values give it."""
        with torch.no_grad():
            return run_model(self.model, self.layout.args, self.layout.kwargs, self.num_chains, data=values)

    def _edit_site(self, name: str) -> EditSite:
        """The sequence site ``name`` as the next edit sees it, read by running the model up to it."""
        d = self.layout.seq[name]
        with torch.no_grad():
            _, msg = run_model_until(self.model, self.layout.args, self.layout.kwargs, self.num_chains,
                                     {k: v for k, v in self.state.values.items() if k != name})
        if msg is None or msg["name"] != name:
            raise ValueError(f"method='mh' expected the model to sample the sequence site {name!r}; the sites a model "
                             "samples must not depend on the values drawn")
        prompt, lengths = sequence_base(msg["fn"]).prompt_rows(self.num_chains)
        return EditSite(name, d.lm, d.max_new_tokens, d.lm.eos_id, prompt, lengths)

    def _transition(self, warm: bool):
        """One MH transition of every chain: an edit of one sequence site (each in turn, given the
        others), then an update of every other latent site; returns (move index [C], accepted [C])."""
        state, layout = self.state, self.layout
        g = _random.generator("cpu")
        if not layout.seq:  # every sequence observed: Gibbs and random-walk steps on the other latents
            update_other_latents(state, layout.others, self._score, warm, g)
            zeros = torch.zeros(self.num_chains, dtype=torch.long)
            return zeros, zeros.bool()
        names = list(layout.seq)
        site = self._edit_site(names[state.transitions % len(names)])
        state.transitions += 1
        x = state.values[site.name]
        move = torch.multinomial(self.move_probs.float(), len(x), replacement=True, generator=g)
        batch = self._edit_batch(site, x, move, g)
        proposal, log_fwd, log_rev = x.clone(), *torch.zeros(2, len(x), dtype=torch.float64)
        for i, row in enumerate(MOVES.values()):
            mine = move == i
            if mine.any():  # each drawn move on the whole batch; every chain keeps its own move's row
                p, f, r = row.propose(batch)
                proposal = torch.where(mine[:, None], p, proposal)
                log_fwd, log_rev = torch.where(mine, f, log_fwd), torch.where(mine, r, log_rev)
        scores = self._score({**state.values, site.name: proposal})
        new_target = scores.log_prior.double() + scores.log_likelihood.double()
        accept = mh_accept(new_target, state.log_target, log_fwd, log_rev, g)
        state.count(move, accept, warm)
        state.take(accept, {site.name: proposal}, scores)
        if layout.others:
            update_other_latents(state, layout.others, self._score, warm, g)
        return move, accept

    def _edit_batch(self, site: EditSite, x: torch.Tensor, move: torch.Tensor, g) -> EditBatch:
        """Where each chain's move edits, one LM pass over the chains, and the shared random draws."""
        C, T, eos = len(x), site.T, site.eos
        u = torch.rand(C, dtype=torch.float64, generator=g)
        n = content_length(x, eos)
        pos, k = draw_positions(move, u, n, T)
        suffix = torch.tensor([row.edits == "suffix" for row in MOVES.values()])[move]
        at_pos, tok_lp_x, y, y_lp = self._lm_pass(site, x, pos, k, suffix.nonzero()[:, 0])
        lq = log_q_token(at_pos, eos)  # [C, V] restricted next-token law at pos
        z = categorical(lq.float(), g)
        V = site.lm.vocab_size
        z_uniform = torch.randint(V - 1, (C,), generator=g)
        z_uniform = z_uniform + (z_uniform >= eos).long()
        log_move_probs = {m: self.move_probs[i].log() for i, m in enumerate(MOVES)}
        return EditBatch(x, n, eos, V, log_move_probs, pos, k, lq, z, z_uniform, tok_lp_x, y, y_lp, g, site,
                         self.layout.masks.get(site.name, ()))

    @torch.no_grad()
    def _lm_pass(self, site: EditSite, x: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, sel: torch.Tensor):
        """One incremental LM pass: every ``x`` teacher-forced, plus, for the chains ``sel``
        (suffix moves), ``x[:k]`` followed by a suffix sampled from the LM.

        Returns ``(logp_at_pos [C, V], tok_lp_x [C, T], y [C, T], y_lp [C, T])``: the next-token
        law given ``x[:pos]``, the per-token log-probs of ``x``, the suffix proposals (``x`` for
        chains not in ``sel``) and the per-token log-probs of ``y`` (0 after EOS).
        """
        lm, (C, T), eos = site.lm, x.shape, site.eos
        dev = lm.device
        gen = _random.generator(dev)
        xd, posd = x.to(dev), pos.to(dev)
        seld = sel.to(dev)
        ys, ks = xd[seld].clone(), k.to(dev)[seld]
        m = len(sel)
        prompt, lengths = site.prompt, site.prompt_lengths
        if prompt.dim() > 1:
            prompt = torch.cat([prompt, prompt[sel]])
        if lengths is not None:
            lengths = torch.cat([lengths, lengths[sel]])
        state = start_rows(lm, prompt.to(dev), C + m, lengths)
        tok_lp_x = torch.zeros(C, T, dtype=torch.float64, device=dev)
        ys_lp = torch.zeros(m, T, dtype=torch.float64, device=dev)
        at_pos = torch.zeros(C, lm.vocab_size, dtype=torch.float32, device=dev)
        done = torch.zeros(m, dtype=torch.bool, device=dev)
        for t in range(T):
            logp = state.logprobs.float()
            lx, ly = logp[:C], logp[C:]
            tok_lp_x[:, t] = lx.gather(-1, xd[:, t : t + 1])[:, 0].double()
            at_pos = torch.where((posd == t)[:, None], lx, at_pos)
            tok = ys[:, t]
            if m:
                s = categorical(ly, gen)
                tok = torch.where(t < ks, ys[:, t], torch.where(done, torch.full_like(s, eos), s))
                lp = ly.gather(-1, tok[:, None])[:, 0].double()
                ys_lp[:, t] = torch.where(done, torch.zeros_like(lp), lp)
                ys[:, t] = tok
                done = done | (tok == eos)
            if t + 1 < T:
                state = lm.extend(state, torch.cat([xd[:, t], tok]))
        tok_lp_x = tok_lp_x.masked_fill(after_eos_mask(xd, eos), 0.0)
        y, y_lp = x.clone(), torch.zeros(C, T, dtype=torch.float64)
        y[sel], y_lp[sel] = ys.cpu(), ys_lp.cpu()
        return at_pos.cpu(), tok_lp_x.cpu(), y, y_lp
