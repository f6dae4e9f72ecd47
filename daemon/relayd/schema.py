"""JSON Schema of the configuration, for editors (taplo, yaml-language-server) and CI.

pydantic renders plugin tables as ``oneOf`` + an OpenAPI ``discriminator`` that JSON Schema
validators ignore, so an editor would only say "not valid under any of the schemas". We
rewrite each such union into if/then branches on the tag, which makes validators name the
misspelt key or the unknown kind.
"""

from __future__ import annotations

from typing import Any

from relayd.config.model import build_settings_model
from relayd.plugins import Registry

SCHEMA_ID = "https://relayd.invalid/schemas/relayd.schema.json"


def settings_schema(registry: Registry, *, fragment: bool = False) -> dict[str, Any]:
    model = build_settings_model(registry)
    schema = model.model_json_schema(mode="validation")
    schema = _rewrite_unions(schema)
    schema = _check_key_names(schema)
    if fragment:
        schema = _strip_required(schema)
        schema["title"] = "relayd conf.d fragment"
    else:
        schema["title"] = "relayd configuration"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def _rewrite_unions(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _rewrite_unions(v) for k, v in node.items()}
        disc = node.get("discriminator")
        if disc and "oneOf" in node:
            tag = disc["propertyName"]
            mapping = disc.get("mapping", {})
            branches = [
                # "required" in the if: a table without the tag matches no branch, so the
                # only error is the missing tag, not one per kind.
                {"if": {"properties": {tag: {"const": value}}, "required": [tag]}, "then": {"$ref": ref}}
                for value, ref in sorted(mapping.items())
            ]
            return {
                "type": "object",
                "required": [tag],
                "properties": {tag: {"enum": sorted(mapping)}},
                "allOf": branches,
            }
        return node
    if isinstance(node, list):
        return [_rewrite_unions(v) for v in node]
    return node


def _check_key_names(node: Any) -> Any:
    """dict[Name, X] renders as patternProperties, under which a key that does not match the
    pattern ("MyRelay") is silently allowed; pydantic rejects it, so the schema must too."""
    if isinstance(node, dict):
        out = {k: _check_key_names(v) for k, v in node.items()}
        patterns = out.get("patternProperties")
        if isinstance(patterns, dict) and len(patterns) == 1 and "additionalProperties" not in out:
            out["propertyNames"] = {"pattern": next(iter(patterns))}
        return out
    if isinstance(node, list):
        return [_check_key_names(v) for v in node]
    return node


def _strip_required(node: Any) -> Any:
    """conf.d fragments may set any subset of keys; only the plugin tag stays required."""
    if isinstance(node, dict):
        out = {k: _strip_required(v) for k, v in node.items()}
        if "required" in out:
            kept = [r for r in out["required"] if r in ("kind", "method")]
            if kept:
                out["required"] = kept
            else:
                del out["required"]
        return out
    if isinstance(node, list):
        return [_strip_required(v) for v in node]
    return node
