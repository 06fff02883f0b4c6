"""onepath's declarations as Dagster component types: ``type: onepath.Model`` in ``assets/**/defs.yaml``.

Thin adapters over the specs (``platform_defs.specs``) and the factories, so a component and a Python
declaration give the same assets and checks. Each type's attribute schema is derived from its spec (the
spec's fields without those the type says: ``kind``, and a model line's ``source``), so ``dg check yaml``,
``dg scaffold defs`` and the loader know one list of fields. The organisation is loaded, and its graph built,
by the composition root (``platform_defs.definitions``: governance by track needs the whole organisation); a
component's ``build_defs`` returns its own slice of that one graph, never a second one.

Types here, instances in the declarations folder (``assets/``); ``onepath`` re-exports these lazily.
"""

from __future__ import annotations

import functools
import textwrap
from typing import Any, ClassVar

import dagster as dg
from pydantic import BaseModel, ConfigDict, create_model

from platform_defs.specs import COMPONENT_TYPES, NotebookDeclSpec, fixed_by_type, parse_component


@functools.cache
def attributes_model(type_name: str) -> type[BaseModel]:
    """The attribute schema of ``type_name``: its spec's fields (types, defaults, descriptions), minus the ones
    the type says. The spec's validators run when the component loads (``parse_component``)."""
    spec_type = COMPONENT_TYPES[type_name]
    fixed = fixed_by_type(spec_type)
    fields: dict[str, Any] = {k: (f.annotation, f) for k, f in spec_type.model_fields.items() if k not in fixed}
    return create_model(f"{type_name.split('.')[-1]}Attributes", __config__=ConfigDict(extra="forbid"),
                        __doc__=spec_type.__doc__, __module__=spec_type.__module__, **fields)


# the starting file ``dg scaffold defs <type> <path>`` writes: valid as written, each field explained
SCAFFOLDS: dict[str, str] = {
    "onepath.Dataset": """\
        type: onepath.Dataset
        attributes:
          name: {name}                  # lowercase letters, digits and '_'
          owner: my-team                 # your team, as the policy lists it (assets/policy.yaml, teams)
          # track: ml-standard           # left out: your team's default track
          description: What one row is, and where it comes from.
          generator: my_package.data:generate   # 'module:function' returning a pandas DataFrame
          params: {{}}                     # passed to the generator
          columns:                       # every column; roles: feature (default), label, id, timestamp
            - {{name: customer_id, dtype: string, role: id}}
            - {{name: amount, dtype: float, min: 0}}
            - {{name: label, dtype: int, role: label, values: [0, 1]}}
        """,
    "onepath.Model": """\
        type: onepath.Model
        attributes:
          name: {name}
          owner: my-team                 # your team, as the policy lists it
          dataset: my_dataset            # the dataset declaration it trains on
          trainer: my_package.trainer:train   # 'module:function(X, y, params) -> fitted sklearn estimator'
          metrics: {{roc_auc: 0.7}}        # minimum held-out metrics: below them, the version is blocked
          # purpose: credit_decision     # what it decides (the policy's purposes); a purpose sets a minimum track
        """,
    "onepath.Endpoint": """\
        type: onepath.Endpoint
        attributes:
          name: {name}
          owner: my-team                 # your team, as the policy lists it
          model: my_model                # the model declaration it serves (its track is the model's)
          environments: [staging, prod]  # promoted in this order
          # pass_through: [request_id]   # dataset columns callers send that the inference log keeps
        """,
    "onepath.AppRelease": """\
        type: onepath.AppRelease
        attributes:
          name: {name}
          owner: my-team                 # your team, as the policy lists it
          source: apps/{name}            # the app's folder, inside the project
          entrypoint: main:app           # 'module:attribute' of its ASGI app, inside source
          calls: []                      # the endpoints it calls (their environments must cover the app's)
        """,
    "onepath.ModelLine": """\
        type: onepath.ModelLine         # dataset -> model -> endpoint, for a model registered from a notebook
        attributes:
          name: {name}
          owner: my-team                 # your team, as the policy lists it
          version: 1                     # the registered version deployed (onepath.register updates it)
          label: label                   # the label column of the train and test frames
          pii: []                        # personal-data columns: never features, never logged
          protected: []                  # protected attributes the fairness checks slice by
        """,
}


class _Scaffolder(dg.Scaffolder):
    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        from resources.files import atomic_write

        type_name = request.type_name.rsplit(".", 2)
        type_name = f"onepath.{type_name[-1]}"
        target = request.target_path
        name = target.name.replace("-", "_").lower() if target.name else "my_declaration"
        target.mkdir(parents=True, exist_ok=True)
        atomic_write(target / "defs.yaml", textwrap.dedent(SCAFFOLDS[type_name]).format(name=name).encode())


class _Declaration(dg.Component):
    """One declaration of the organisation, as a Dagster component."""

    type_name: ClassVar[str]

    def __init__(self, spec: Any):
        self.spec = spec

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        return attributes_model(cls.type_name)

    @classmethod
    def get_description(cls) -> str | None:
        return (cls.__doc__ or "").strip().splitlines()[0]

    @classmethod
    def load(cls, attributes: BaseModel | None, context: dg.ComponentLoadContext) -> "_Declaration":
        data = attributes.model_dump(exclude_unset=True) if attributes is not None else {}
        return cls(parse_component(cls.type_name, data, str(context.path)))

    def specs(self) -> list[Any]:
        return self.spec.expand() if isinstance(self.spec, NotebookDeclSpec) else [self.spec]

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        from platform_defs.definitions import declaration_slice  # the composition root: the one graph

        return declaration_slice(self.specs())


def _component(type_name: str, doc: str) -> type[_Declaration]:
    cls = type(type_name.split(".")[-1], (_Declaration,), {"type_name": type_name, "__doc__": doc,
                                                           "__module__": __name__})
    return dg.scaffold_with(_Scaffolder)(cls)


Dataset = _component("onepath.Dataset", "A dataset: generated data, validated by its columns' checks.")
Model = _component("onepath.Model", "A model trained by a trainer function on a dataset, gated by its track.")
Endpoint = _component("onepath.Endpoint", "An inference endpoint serving a model in each environment.")
AppRelease = _component("onepath.AppRelease", "An app release: an ASGI app calling endpoints, on track 'app'.")
ModelLine = _component("onepath.ModelLine", "A notebook model line: snapshot dataset -> model -> endpoint "
                                            "(what onepath.register writes).")

COMPONENTS = {"onepath.Dataset": Dataset, "onepath.Model": Model, "onepath.Endpoint": Endpoint,
              "onepath.AppRelease": AppRelease, "onepath.ModelLine": ModelLine}
assert set(COMPONENTS) == set(COMPONENT_TYPES)

__all__ = ["Dataset", "Model", "Endpoint", "AppRelease", "ModelLine", "attributes_model"]
