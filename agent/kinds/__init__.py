"""Component kinds. Each module offers the same functions:

FIELDS                       kind-specific config fields: name -> (type, default)
validate(values, expand)     -> spec mapping (raise ValueError for bad values)
inputs(comp, ctx)            -> JSON-able desired inputs (fingerprinted into the marker)
probe(comp, ctx, marker)     -> None when the real artifact is fine, else a Problem
install(comp, ctx)           -> metadata for the marker (version, ...); raises InstallError
"""

from agent.kinds import command, download, folders, git, manager, nodes, overall, pip

KINDS = {"git": git, "pip": pip, "command": command, "nodes": nodes, "manager": manager,
         "download": download, "folders": folders, "overall": overall}
