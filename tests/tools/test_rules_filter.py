"""``uproxy rules`` shows the filter table's lines too (uproxy.filter_rules)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

UDP_NO_ENDPOINTS = """\
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  clusterIP: 10.0.0.10
  ports: [{name: dns, port: 53, protocol: UDP}]
"""


def test_uproxy_rules_prints_the_filter_table(tmp_path: Path) -> None:
    (tmp_path / "dns.yaml").write_text(UDP_NO_ENDPOINTS)
    done = subprocess.run([sys.executable, "-m", "uproxy", "rules", "--manifests",
                           str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "*filter" in done.stdout
    assert ('"default/dns:dns has no endpoints" -j REJECT' in done.stdout), done.stdout
