"""Which branch scores a bounded layer in a step: GEMM rows over its live tokens, or the bound.

Both branches are exact (see `bounded.py`); only their cost differs, and where the crossover lies depends
on the machine. On an Intel Xeon GEMM rows won on MiniLM 16 x 64 and SmolLM2 2 x 256. On an AMD EPYC the
bound won on both, by 11 points of a full fine-tuning step on SmolLM2 (0.87x against 0.98x). A fixed
token threshold is therefore wrong somewhere, so each layer's cost of each branch is measured in the run,
on the machine that runs it:

- **Probe steps.** The first `2 * PROBES` scoring steps that have a threshold guess alternate: the bound on
  every layer, then GEMM rows on every layer. The schedule is fixed, so the branch of a probe step never
  depends on a timing. The bound's time includes its re-scoring at `certify`.
- **The choice.** After the probes, layer L takes GEMM rows in a step with T live tokens iff
  T * r_L <= b_L. Here r_L is its fastest GEMM-rows time per live token and b_L its fastest bound time.
  The fastest is used because a busy machine only ever adds time. GEMM rows cost grows with T; the
  bound's barely does (its norms, and the dot products of its few candidates).
- **Fixed from then on.** The choices are saved with the engine state (`state_dict`). A run resumed from
  any later checkpoint makes the same choices, so it is bitwise the uninterrupted run. A run resumed
  inside the probe steps measures the rest again; it is still exact, but its choices can differ. A run
  resumed on another machine keeps the choices measured on the first one (exact too, maybe slower).
  `ID3Config(bounded_gemm_tokens=N)` fixes one threshold for every layer instead. Nothing is measured
  then, and runs are bitwise reproducible across machines.

Example:
    >>> costs = BranchCosts(fixed=None)
    >>> costs.branch("fc", tokens=512, probe=costs.probe_branch())  # the first probe step: the bound
    'bound'
"""

from __future__ import annotations

import math

# Probe steps per branch. The fastest of two readings is what decides, so one interrupted step cannot.
PROBES = 2
# Layers without readings (the probes have not run, or the layer never reached them) use this fixed
# threshold: the rule before the costs were measured.
UNMEASURED_TOKENS = 1024
# A process-wide fixed threshold for every engine whose config leaves `bounded_gemm_tokens` at None (None:
# measured). Read at each layer's backward: tests and benchmarks set it to force one branch.
FIXED_TOKENS: int | None = None


class BranchCosts:
    """The per-layer branch choice of the bounded path: measured over the probe steps, or one fixed
    threshold (`fixed`: live tokens at or below which GEMM rows score a layer; None: measured)."""

    def __init__(self, fixed: int | None = None) -> None:
        self.fixed = fixed
        self.probes_done = 0
        # name -> {"rows": [seconds per live token, ...], "bound": [seconds, ...]}, during the probe steps
        self.readings: dict[str, dict[str, list[float]]] = {}
        # name -> live tokens at or below which GEMM rows cost less (after the probe steps)
        self.rows_below: dict[str, float] = {}

    @property
    def threshold(self) -> int | None:
        """The fixed threshold in force (the config's, else `FIXED_TOKENS`), or None: measured."""
        return self.fixed if self.fixed is not None else FIXED_TOKENS

    @property
    def measuring(self) -> bool:
        return self.threshold is None and self.probes_done < 2 * PROBES

    def probe_branch(self) -> str | None:
        """The branch every layer takes in the next scoring step with a threshold guess, while probing."""
        if not self.measuring:
            return None
        return "bound" if self.probes_done % 2 == 0 else "rows"

    def branch(self, name: str, tokens: int, probe: str | None) -> str:
        """'rows' or 'bound' for layer `name` in a step with `tokens` live tokens (`probe`: the step's)."""
        if self.threshold is not None:
            below = self.threshold
        elif probe is not None:
            return probe
        else:
            below = self.rows_below.get(name, UNMEASURED_TOKENS)
        return "rows" if tokens <= below else "bound"

    def record(self, name: str, branch: str, tokens: int, seconds: float) -> None:
        """One layer's time in a probe step (a second call for the same step adds to its bound reading:
        the re-scoring at `certify`)."""
        entry = self.readings.setdefault(name, {"rows": [], "bound": []})
        if branch == "rows":
            entry["rows"].append(seconds / max(tokens, 1))
        else:
            entry["bound"].append(seconds)

    def add_rescoring(self, name: str, seconds: float) -> None:
        """Time spent re-scoring `name` at `certify` in this probe step: part of its bound reading."""
        bound = self.readings.get(name, {}).get("bound")
        if bound:
            bound[-1] += seconds

    def end_step(self, probe: str | None) -> None:
        """A probe step ended (its branch: `probe`). After the last, fix each layer's threshold."""
        if probe is None or not self.measuring:
            return
        self.probes_done += 1
        if self.measuring:
            return
        for name, entry in self.readings.items():
            if entry["rows"] and entry["bound"]:
                self.rows_below[name] = min(entry["bound"]) / max(min(entry["rows"]), 1e-12)
        self.readings = {}

    def summary(self) -> str:
        """One line on how the branch is chosen (the engine's plan summary)."""
        if self.threshold is not None:
            return f"at most {self.threshold} live tokens: GEMM rows over them, more: the bound"
        if self.measuring:
            return (
                f"GEMM rows or the bound, per layer, by their times on this machine over the first "
                f"{2 * PROBES} scoring steps (both branches, {PROBES} steps each), then fixed"
            )
        finite = sorted(v for v in self.rows_below.values() if math.isfinite(v))
        if not finite:
            return "GEMM rows or the bound, per layer, as measured on this machine"
        return (
            f"GEMM rows or the bound, per layer, as measured on this machine: GEMM rows up to "
            f"{finite[0]:.0f}..{finite[-1]:.0f} live tokens ({len(finite)} layers)"
        )

    def state_dict(self) -> dict:
        return {
            "probes_done": self.probes_done,
            "readings": {n: {k: list(v) for k, v in e.items()} for n, e in self.readings.items()},
            "rows_below": dict(self.rows_below),
        }

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the measured choices. The configured `fixed` threshold stays: it is the user's setting."""
        if not state:
            return
        self.probes_done = int(state.get("probes_done", 0))
        self.readings = {n: {k: list(v) for k, v in e.items()} for n, e in state.get("readings", {}).items()}
        self.rows_below = {n: float(v) for n, v in state.get("rows_below", {}).items()}
