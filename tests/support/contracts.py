"""An import-linter contract of our own: no package imports another package's private module.

Each package's shared API is what its public modules and its ``__init__`` export; a module
whose dotted name has a segment starting with ``_`` (``consumers._client``) is that package's
own business. Checked for every direct import between two of the root packages."""

from __future__ import annotations

from typing import Any

from importlinter import Contract, ContractCheck, fields, output


def _private(module: str) -> bool:
    return any(p.startswith("_") and not p.startswith("__") for p in module.split(".")[1:])


class PrivateModulesContract(Contract):
    """Configuration: ``packages``, the root packages whose private modules are their own."""

    type_name = "private_modules"

    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph: Any, verbose: bool) -> ContractCheck:
        roots = set(self.packages)  # type: ignore[call-overload]
        broken: list[dict[str, Any]] = []
        for importer in sorted(graph.modules):
            top = importer.split(".")[0]
            if top not in roots:
                continue
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                other = imported.split(".")[0]
                if other in roots and other != top and _private(imported):
                    for d in graph.get_import_details(importer=importer, imported=imported):
                        broken.append(d)
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for d in check.metadata["broken"]:
            output.print_error(
                f"{d['importer']}:{d['line_number']} imports the private module "
                f"{d['imported']} ({d['line_contents']})"
            )
            output.new_line()
