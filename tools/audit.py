#!/usr/bin/env python3
"""Audit the installed dependencies with pip-audit (run by ``make test``).

Fails on a known vulnerability that has a fixed release, unless the
vulnerability is listed in ``tools/audit-ignore.txt`` with the reason the fix
cannot be taken (a pin we share with Flower, say). When the vulnerability
service cannot be reached — these machines reach only the package index —
every package is skipped; that is reported plainly as "audit not performed",
not as a clean bill of health.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

IGNORE_FILE = Path(__file__).with_name("audit-ignore.txt")


def _ignored() -> dict[str, str]:
    if not IGNORE_FILE.exists():
        return {}
    out = {}
    for line in IGNORE_FILE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            vuln_id, _, reason = line.partition(" ")
            out[vuln_id] = reason.strip()
    return out


def main() -> int:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip_audit",
            "--format",
            "json",
            "--progress-spinner",
            "off",
            "--skip-editable",
            "--timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        print("pip-audit: audit not performed — pip-audit failed to run:", file=sys.stderr)
        print(proc.stderr.strip()[-2000:], file=sys.stderr)
        return 0
    deps = report.get("dependencies", [])
    audited = [d for d in deps if "skip_reason" not in d]
    if deps and not audited:
        print(
            f"pip-audit: audit not performed — the vulnerability service was unreachable "
            f"({len(deps)} packages skipped). Run `make audit` where it is reachable."
        )
        return 0
    ignored = _ignored()
    fixable = []
    for dep in audited:
        for vuln in dep.get("vulns", []):
            if vuln.get("fix_versions") and vuln["id"] not in ignored:
                fixable.append(
                    f"{dep['name']} {dep['version']}: {vuln['id']} fixed in "
                    f"{', '.join(vuln['fix_versions'])}"
                )
    if fixable:
        print("pip-audit: vulnerabilities with a fixed release:")
        for line in fixable:
            print(f"  {line}")
        return 1
    print(f"pip-audit: {len(audited)} packages audited, no fixable vulnerability.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
