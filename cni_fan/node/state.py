"""What must survive the agent: the node state file."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class NodeState:
    """The sysctl values `up` replaced, and which firewall rules it applied
    (their source and the firewall's own listing of them, so a later `up`
    can tell they are still in place)."""
    path: Path
    saved_sysctls: dict[str, str] = field(default_factory=dict)
    firewall: str = ""
    firewall_rules: str = ""
    firewall_listing: str = ""

    @classmethod
    def load(cls, data_dir: str) -> "NodeState":
        path = Path(data_dir) / "node-state.json"
        try:
            raw = json.loads(path.read_text())
            return cls(path, dict(raw.get("saved_sysctls", {})), str(raw.get("firewall", "")),
                       str(raw.get("firewall_rules", "")), str(raw.get("firewall_listing", "")))
        except (OSError, ValueError):
            return cls(path)

    def save(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"saved_sysctls": self.saved_sysctls, "firewall": self.firewall,
                                   "firewall_rules": self.firewall_rules,
                                   "firewall_listing": self.firewall_listing}, indent=1))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def forget(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
