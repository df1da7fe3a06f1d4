"""Operators outside the ONNX standard, for the exporter's translation functions.

onnxscript writes a node only for an operator whose schema onnx knows; the operators
the export writes beyond the standard (our ``glm.QuantizedLinear`` marker, onnxruntime's
``com.microsoft`` contrib operators) are registered here, in this process's onnx schema
registry, with the inputs, outputs and attributes the export uses.
"""
from __future__ import annotations

MSFT = "com.microsoft"  # onnxruntime's contrib operators


def use_domain(proto, domain: str) -> None:
    """Declare ``domain`` (version 1) among ``proto``'s opset imports, once."""
    from onnx import helper  # heavy: imported where used (a plain glmrt command never loads it)

    if not any(o.domain == domain for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(domain, 1))


def op(domain: str, name: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str]],
       types: dict[str, list[str]], attributes: dict[str, str]):
    """The onnxscript op writing ``domain.name`` nodes. ``inputs``: (name, type variable,
    optional) in the operator's order; ``outputs``: (name, type variable); ``types``: type
    variable -> allowed ``tensor(...)`` types; ``attributes``: name -> INT, FLOAT or STRING."""
    import onnx  # heavy, as above
    import onnxscript
    from onnx.defs import OpSchema

    if not onnx.defs.has(name, domain):
        param, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
        onnx.defs.register_schema(OpSchema(
            name, domain, 1,
            inputs=[param(n, t, param_option=opt) if optional else param(n, t) for n, t, optional in inputs],
            outputs=[param(n, t) for n, t in outputs],
            type_constraints=[(t, allowed, "") for t, allowed in types.items()],
            attributes=[OpSchema.Attribute(a, getattr(OpSchema.AttrType, kind), a) for a, kind in attributes.items()]))
    return onnxscript.values.Op(onnxscript.values.Opset(domain, 1), name, onnx.defs.get_schema(name, 1, domain))
