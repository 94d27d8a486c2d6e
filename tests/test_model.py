"""The delivery protocol's SPIN model (model/delivery.pml) at the small bounds.

Every property must verify with 0 errors over the whole state space, and every mutant of the
model (model/README.md) must yield a counterexample: a property that cannot fail proves
nothing. Skips only when `spin` or `gcc` is missing (`.ci/run` installs them).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.model_check import (
    HOLDING,
    SMALL,
    VARIANTS,
    Bound,
    Variant,
    Verifier,
    available,
)

pytestmark = [pytest.mark.skipif(available() is not None,
                                 reason=f"model check needs SPIN: {available()}"),
              # One worker runs them all, so each verifier is compiled once per session,
              # not once per worker that happens to get one of its properties.
              pytest.mark.xdist_group("spin")]

_BY_NAME = {b.name: b for b in SMALL}
_VARIANT_BOUND = next(b for b in SMALL if b.variants)


@pytest.fixture(scope="module")
def verifiers() -> Iterator[dict[str, Verifier]]:
    """One compiled verifier per small bound, built on first use."""
    built: dict[str, Verifier] = {}
    yield built
    for ver in built.values():
        ver.close()


def _verifier(cache: dict[str, Verifier], bound: Bound, variant: Variant | None = None
              ) -> Verifier:
    key = " ".join((bound.name, *(() if variant is None else variant.defines)))
    if key not in cache:
        cache[key] = Verifier(bound, () if variant is None else variant.defines)
    return cache[key]


@pytest.mark.parametrize(("bound", "prop"), [(b.name, p) for b in SMALL for p in b.properties])
def test_property_holds(verifiers: dict[str, Verifier], bound: str, prop: str) -> None:
    """Each LTL property of the delivery model holds in every reachable state and path."""
    res = _verifier(verifiers, _BY_NAME[bound]).check(prop)
    assert res.complete, f"{prop}: search incomplete\n{res.output}"
    assert res.errors == 0, f"{prop} fails at bound {bound}:\n{res.trail[-6000:]}"
    assert res.states > 1000  # the model ran, it did not stop at its first state


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_mutant_yields_counterexample(verifiers: dict[str, Verifier], variant: Variant) -> None:
    """Each mutant of the protocol (README: teeth) breaks its property with a trail."""
    res = _verifier(verifiers, _VARIANT_BOUND, variant).check(variant.breaks)
    assert res.errors > 0, f"{variant.name} ({variant.what}) did not break {variant.breaks}"
    assert res.trail, "SPIN found a violation but left no trail to replay"


@pytest.mark.parametrize("variant", HOLDING, ids=lambda v: v.name)
def test_inflight_rule_ignores_forged_ack(verifiers: dict[str, Verifier],
                                          variant: Variant) -> None:
    """With the in-flight rule, an ack naming a record not in flight marks nothing."""
    bound = next(b for b in SMALL if not b.variants)  # the smaller state space
    res = _verifier(verifiers, bound, variant).check(variant.breaks)
    assert res.complete and res.errors == 0, res.trail[-6000:]
