"""The chart's self-drafting targets: target.spaceMasks/spaceMaskToken reach the target, router.selfDraft the router,
and with draft.enabled false no draft pool is rendered; by default none of the flags appears.

Needs ``helm`` (see tests/helm_tools.py).
"""

from __future__ import annotations

from helm_tools import by_component, containers, flag_value, render, schema_errors, template


def _args(rendered, role: str) -> list[str]:
    return containers(by_component(rendered, "Deployment")[role])[0]["args"]


def test_self_drafting_targets_and_a_router_that_calls_no_draft_service() -> None:
    rendered = render(sets=("router.selfDraft=true", "target.spaceMasks=4", "target.spaceMaskToken=16",
                            "draft.enabled=false"))
    target, router = _args(rendered, "target"), _args(rendered, "router")
    assert (flag_value(target, "--space-masks"), flag_value(target, "--space-mask-token")) == ("4", "16")
    assert "--self-draft" in router
    assert "draft" not in by_component(rendered, "Deployment")
    assert not schema_errors(rendered)


def test_by_default_targets_read_their_model_folder_and_the_router_drafts_with_pools() -> None:
    rendered = render()
    assert flag_value(_args(rendered, "target"), "--space-masks") is None
    assert "--self-draft" not in _args(rendered, "router")


def test_the_schema_refuses_more_masks_than_a_step_drafts() -> None:
    result = template(sets=("target.spaceMasks=17",))
    assert result.returncode != 0 and "spaceMasks" in result.stderr
